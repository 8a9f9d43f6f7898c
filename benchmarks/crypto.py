"""Sealed updates: seal/open throughput (one core), bytes of overhead, share of round time.

    python benchmarks/crypto.py [--rounds 2] [--skip-simulation]

1. Throughput: seal and open an update shaped like the MNIST CNN's (8 tensors, 1,663,370
   float32 values, 6.65 MB) and its int8 encoding; median of repeated runs, one thread.
2. Overhead: serialized bytes of the sealed reply records minus the unsealed ones, as
   Flower transfers them, and the cryptographic part alone (ephemeral key + tag).
3. Round share: a simulation with the MNIST CNN (the embedded digits MLP when MNIST is
   absent), security.seal=on; crypto seconds (clients' sealing + server's opening) over
   round seconds, from metrics.jsonl.
Prints a markdown table and writes JSON.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey
from flwr.app import RecordDict

from fedpipe.codec import CastCodec, Encoded, UniformCodec
from fedpipe.config import ModelConfig, load_config
from fedpipe.crypto.seal import Binding, open_sealed, seal
from fedpipe.data import DatasetNotFoundError, load_dataset
from fedpipe.metrics import read_metrics
from fedpipe.models import build_model
from fedpipe.records import CODEC, UPDATE, encode_records, wire_bytes
from fedpipe.rundir import METRICS_FILE
from fedpipe.simulation import quiet_flower, run_simulation

ROOT = Path(__file__).resolve().parents[1]
PARAMS = 1_663_370  # McMahan CNN on MNIST
BIND = Binding(run_id=1, server_round=1, node_id=1)


def _median_seconds(fn: Any, reps: int) -> float:
    fn()  # warm-up
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def _size(enc: Encoded) -> int:
    arrays, meta = encode_records(enc)
    return wire_bytes(RecordDict({UPDATE: arrays, CODEC: meta}))


def throughput(reps: int) -> list[dict[str, Any]]:
    key = X25519PrivateKey.generate()
    rng = np.random.default_rng(0)
    model = build_model(ModelConfig(name="cnn"), (1, 28, 28), 10)  # the real layout
    update = {k: rng.normal(size=v.shape).astype(np.float32) for k, v in model.state_dict().items()}
    assert sum(v.size for v in update.values()) == PARAMS
    payloads = {
        "float32": CastCodec(np.float32).encode(update, rng),
        "int8": UniformCodec(8, 1024).encode(update, np.random.default_rng(0)),
    }
    rows = []
    for name, enc in payloads.items():
        nbytes = sum(a.nbytes for a in enc.arrays.values())
        sealed = seal(enc, key.public_key(), BIND)
        t_seal = _median_seconds(lambda e=enc: seal(e, key.public_key(), BIND), reps)
        t_open = _median_seconds(lambda s=sealed: open_sealed(s, key, BIND), reps)
        rows.append(
            {
                "payload": name,
                "mb": nbytes / 1e6,
                "seal_mb_s": nbytes / 1e6 / t_seal,
                "open_mb_s": nbytes / 1e6 / t_open,
                "wire_overhead_bytes": _size(sealed) - _size(enc),
                "crypto_overhead_bytes": 48,
            }
        )
    return rows


def round_share(rounds: int) -> dict[str, Any]:
    overrides = [f"federation.rounds={rounds}", "security.seal=on", "output_dir=runs/bench-crypto"]
    config = ROOT / "simulations" / "mnist_cnn_dirichlet.toml"
    try:
        cfg = load_config(config, overrides)
        load_dataset(cfg.data)
    except DatasetNotFoundError:
        cfg = load_config(ROOT / "simulations" / "default.toml", overrides)
    records = read_metrics(run_simulation(cfg).run_dir / METRICS_FILE)
    crypto = sum(r["crypto_seconds"] for r in records)
    wall = sum(r["seconds"] for r in records)
    return {
        "config": cfg.name,
        "rounds": rounds,
        "crypto_seconds": crypto,
        "round_seconds": wall,
        "share": crypto / wall,
        "final_accuracy": records[-1]["accuracy"],
        "clients_failed": sum(r["clients_failed"] for r in records),
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--reps", type=int, default=15)
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--skip-simulation", action="store_true")
    p.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "crypto.json"))
    args = p.parse_args(argv)
    quiet_flower()
    rows = throughput(args.reps)
    print("| payload | MB | seal MB/s | open MB/s | wire overhead (B) | crypto overhead (B) |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        print(
            f"| {r['payload']} | {r['mb']:.2f} | {r['seal_mb_s']:.0f} | {r['open_mb_s']:.0f} | "
            f"{r['wire_overhead_bytes']} | {r['crypto_overhead_bytes']} |"
        )
    share = None if args.skip_simulation else round_share(args.rounds)
    if share is not None:
        print(
            f"\nsimulation {share['config']}, {share['rounds']} rounds, sealed: crypto "
            f"{share['crypto_seconds']:.3f} s of {share['round_seconds']:.1f} s round time "
            f"= {100 * share['share']:.3f} %, final accuracy {share['final_accuracy']:.4f}, "
            f"{share['clients_failed']} failed"
        )
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"throughput": rows, "round_share": share}, indent=2) + "\n")
    print(f"\nwrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
