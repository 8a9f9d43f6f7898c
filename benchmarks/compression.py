"""Compression benchmark: every codec, with and without error feedback, in ONE run.

    python benchmarks/compression.py [--config FILE] [--schemes float32,int8,...] [key=value ...]
    python benchmarks/compression.py --both-directions [key=value ...]

Same config, seed, partition and rounds for every scheme, so the figures are side by side:
final accuracy, gap to float32, measured bits/param up, total MB up, and codec time
(client encode + server decode) as a share of local training time. Default: MNIST CNN,
Dirichlet(0.5), 10 clients when MNIST is available, else the embedded digits set with the
same partition. Prints a markdown table and writes JSON to benchmarks/results/.

--both-directions compares uplink and downlink (broadcast) compression in one run, on
three setups (MNIST needed): an MLP (hidden 200) on 10 IID clients for 3 rounds; the CNN
on 10 Dirichlet(0.5) clients for 20 rounds; and the CNN on 100 such clients with
fraction_train 0.1 for 20 rounds, where most sampled devices missed rounds (what that
costs is in the downlink columns: whole models, single changes, catch-up chains).
Traffic is per sampled client per round, up + down, in bits per model parameter.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

from fedpipe.config import CODECS, load_config
from fedpipe.data import DatasetNotFoundError, load_dataset
from fedpipe.metrics import read_metrics
from fedpipe.rundir import METRICS_FILE
from fedpipe.simulation import quiet_flower, run_simulation

ROOT = Path(__file__).resolve().parents[1]
MNIST = ROOT / "simulations" / "mnist_cnn_dirichlet.toml"
DIGITS = ROOT / "simulations" / "default.toml"
DIGITS_SKEW = ["partition.scheme=dirichlet", "partition.alpha=0.5", "partition.min_size=20"]


def _variants(schemes: list[str]) -> list[tuple[str, bool]]:
    """float32 once (nothing to feed back), every other scheme without and with feedback."""
    out = [("float32", False)] if "float32" in schemes else []
    return out + [(s, ef) for s in schemes if s != "float32" for ef in (False, True)]


def _measure(config: str, overrides: list[str], scheme: str, ef: bool) -> dict[str, Any]:
    cfg = load_config(
        config, [*overrides, f"codec.scheme={scheme}", f"codec.error_feedback={str(ef).lower()}"]
    )
    t0 = time.perf_counter()
    rounds = read_metrics(run_simulation(cfg).run_dir / METRICS_FILE)
    bits = [r["bits_per_param_up"] for r in rounds if r["bits_per_param_up"] is not None]
    train = sum(r["train_seconds"] for r in rounds)
    codec = sum(r["encode_seconds"] + r["decode_seconds"] for r in rounds)
    return {
        "scheme": scheme,
        "error_feedback": ef,
        "final_accuracy": rounds[-1]["accuracy"],
        "accuracy_per_round": [r["accuracy"] for r in rounds],
        "bits_per_param_up": sum(bits) / len(bits) if bits else None,
        "mb_up": sum(r["bytes_up"] for r in rounds) / 1e6,
        "codec_share_of_training": codec / train if train else None,
        "wall_seconds": time.perf_counter() - t0,
    }


IID = ROOT / "simulations" / "mnist_cnn_iid.toml"
EF = "codec.error_feedback=true"
# (setup, config, overrides): the three setups of --both-directions
SETUPS = (
    ("mlp-iid-10x3", IID, ["model.name=mlp", "model.hidden=200", "federation.rounds=3"]),
    ("cnn-dirichlet-10x20", MNIST, ["federation.rounds=20"]),
    (
        "cnn-dirichlet-100x0.1x20",
        MNIST,
        ["federation.rounds=20", "partition.num_clients=100", "federation.fraction_train=0.1"],
    ),
)
# (label, overrides) per setup: float32 both ways, today's best uplink-only setting
# (top-k + error feedback), the rotation quantizer up, and both directions compressed.
VARIANTS: dict[str, list[tuple[str, list[str]]]] = {
    "mlp-iid-10x3": [
        ("float32", []),
        ("hadamard1+EF up", ["codec.scheme=hadamard1", EF]),
        (
            "hadamard1+EF up, hadamard1 down",
            ["codec.scheme=hadamard1", EF, "downlink.scheme=hadamard1"],
        ),
    ],
    "cnn-dirichlet-10x20": [
        ("float32", []),
        ("topk+EF up", ["codec.scheme=topk", EF]),
        ("hadamard1+EF up", ["codec.scheme=hadamard1", EF]),
        (
            "hadamard1+EF up, hadamard1 down",
            ["codec.scheme=hadamard1", EF, "downlink.scheme=hadamard1"],
        ),
        ("topk+EF up, hadamard1 down", ["codec.scheme=topk", EF, "downlink.scheme=hadamard1"]),
    ],
    "cnn-dirichlet-100x0.1x20": [
        ("hadamard1+EF up", ["codec.scheme=hadamard1", EF]),
        (
            "hadamard1+EF up, hadamard1 down",
            ["codec.scheme=hadamard1", EF, "downlink.scheme=hadamard1"],
        ),
    ],
}


def _mean(values: list[float | None]) -> float | None:
    kept = [v for v in values if v is not None]
    return sum(kept) / len(kept) if kept else None


def _measure_both(config: Path, overrides: list[str]) -> dict[str, Any]:
    """One run: accuracy, traffic both ways, what the broadcasts carried, codec time."""
    t0 = time.perf_counter()
    rounds = read_metrics(run_simulation(load_config(config, overrides)).run_dir / METRICS_FILE)
    up = _mean([r["bits_per_param_up"] for r in rounds])
    down = _mean([r["bits_per_param_down"] for r in rounds])
    train = sum(r["train_seconds"] for r in rounds)
    codec = sum(r["encode_seconds"] + r["decode_seconds"] for r in rounds)
    broadcast = sum(r["broadcast_seconds"] for r in rounds)
    keys = ("full", "diff", "catchup", "current", "behind")
    return {
        "final_accuracy": rounds[-1]["accuracy"],
        "accuracy_per_round": [r["accuracy"] for r in rounds],
        "bits_per_param_up": up,
        "bits_per_param_down": down,
        "bits_per_param_total": (up or 0.0) + (down or 0.0),
        "bits_per_param_down_per_round": [r["bits_per_param_down"] for r in rounds],
        "mb_up": sum(r["bytes_up"] for r in rounds) / 1e6,
        "mb_down": sum(r["bytes_down"] for r in rounds) / 1e6,
        "downlink": {k: sum(r[f"downlink_{k}"] for r in rounds) for k in keys},
        "clients_failed": sum(r["clients_failed"] for r in rounds),
        "codec_share_of_training": codec / train if train else None,
        "broadcast_seconds": broadcast,
        "wall_seconds": time.perf_counter() - t0,
    }


def both_directions(out: Path, extra: list[str]) -> int:
    """Uplink and downlink compression side by side (see the module docstring)."""
    load_dataset(load_config(MNIST).data)  # MNIST or a clear DatasetNotFoundError
    rows: list[dict[str, Any]] = []
    for setup, config, overrides in SETUPS:
        base = ["output_dir=runs/bench-both-directions", *overrides, *extra]
        for label, variant in VARIANTS[setup]:
            row = {"setup": setup, "variant": label, "config": str(config)}
            row["overrides"] = [*base, *variant]
            row.update(_measure_both(config, row["overrides"]))
            rows.append(row)
            print(f"{setup} | {label}: {row['final_accuracy']:.4f}", flush=True)
    print(
        "\n| setup | variant | final acc | gap to float32 (pt) | bits/param up | down | total "
        "| whole / one change / catch-up (behind) | failed | codec / training |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        ref = next(
            (x for x in rows if x["setup"] == r["setup"] and x["variant"] == "float32"), None
        )
        r["gap_pt"] = None if ref is None else 100 * (r["final_accuracy"] - ref["final_accuracy"])
        d, share = r["downlink"], r["codec_share_of_training"]
        gap = "" if r["gap_pt"] is None else f"{r['gap_pt']:+.2f}"
        pct = "" if share is None else f"{100 * share:.2f} %"
        print(
            f"| {r['setup']} | {r['variant']} | {r['final_accuracy']:.4f} | {gap} "
            f"| {r['bits_per_param_up']:.3f} | {r['bits_per_param_down']:.3f} "
            f"| {r['bits_per_param_total']:.3f} "
            f"| {d['full']} / {d['diff']} / {d['catchup']} ({d['behind']}) "
            f"| {r['clients_failed']} | {pct} |"
        )
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"rows": rows}, indent=2) + "\n")
    print(f"\nwrote {out}")
    return 0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument(
        "--both-directions",
        action="store_true",
        help="uplink + downlink compression on MNIST MLP and CNN (writes "
        "results/compression_both_directions.json unless --out)",
    )
    p.add_argument("--config", help="run config (default: MNIST Dirichlet, else digits)")
    p.add_argument("--schemes", default=",".join(CODECS))
    p.add_argument("--out", default=None)
    p.add_argument("overrides", nargs="*")
    args = p.parse_args(argv)
    quiet_flower()
    results = ROOT / "benchmarks" / "results"
    if args.both_directions:
        out = Path(args.out or results / "compression_both_directions.json")
        return both_directions(out, args.overrides)
    config, base = args.config, ["output_dir=runs/bench-compression"]
    if config is None:
        try:
            load_dataset(load_config(MNIST).data)
            config = str(MNIST)
        except DatasetNotFoundError:
            config, base = str(DIGITS), [*base, *DIGITS_SKEW]
    overrides = [*base, *args.overrides]
    schemes = args.schemes.split(",")
    rows = [_measure(config, overrides, s, ef) for s, ef in _variants(schemes)]
    ref = next((r["final_accuracy"] for r in rows if r["scheme"] == "float32"), None)
    print(f"config: {config} {' '.join(overrides)}\n")
    print(
        "| scheme | error feedback | final acc | gap to float32 (pt) | bits/param up "
        "| MB up | codec / training time |"
    )
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        r["gap_pt"] = None if ref is None else 100 * (r["final_accuracy"] - ref)
        share = r["codec_share_of_training"]
        gap = "" if r["gap_pt"] is None else f"{r['gap_pt']:+.2f}"
        pct = "" if share is None else f"{100 * share:.2f} %"
        print(
            f"| {r['scheme']} | {'yes' if r['error_feedback'] else 'no'} | "
            f"{r['final_accuracy']:.4f} | {gap} | {r['bits_per_param_up']:.2f} | "
            f"{r['mb_up']:.2f} | {pct} |"
        )
    out = Path(args.out or results / "compression.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(
        json.dumps({"config": config, "overrides": overrides, "rows": rows}, indent=2) + "\n"
    )
    print(f"\nwrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
