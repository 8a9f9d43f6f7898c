"""Compression benchmark: every codec, with and without error feedback, in ONE run.

    python benchmarks/compression.py [--config FILE] [--schemes float32,int8,...] [key=value ...]

Same config, seed, partition and rounds for every scheme, so the figures are side by side:
final accuracy, gap to float32, measured bits/param up, total MB up, and codec time
(client encode + server decode) as a share of local training time. Default: MNIST CNN,
Dirichlet(0.5), 10 clients when MNIST is available, else the embedded digits set with the
same partition. Prints a markdown table and writes JSON to benchmarks/results/.
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


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--config", help="run config (default: MNIST Dirichlet, else digits)")
    p.add_argument("--schemes", default=",".join(CODECS))
    p.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "compression.json"))
    p.add_argument("overrides", nargs="*")
    args = p.parse_args(argv)
    quiet_flower()
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
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(
        json.dumps({"config": config, "overrides": overrides, "rows": rows}, indent=2) + "\n"
    )
    print(f"\nwrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
