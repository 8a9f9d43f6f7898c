"""MNIST FedAvg benchmark: rounds to 99 % test accuracy and final accuracy.

    python benchmarks/mnist_fedavg.py [--config simulations/mnist_cnn_iid.toml] [key=value ...]

Runs the McMahan et al. CNN with 10 clients (the shipped config) on Flower's simulation
engine, prints a markdown table and writes JSON next to this script (results/). Exits 0
with a message when the MNIST files are not available.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path

import torch

from fedpipe.config import load_config
from fedpipe.data import DatasetNotFoundError, load_dataset
from fedpipe.metrics import read_metrics
from fedpipe.rundir import METRICS_FILE
from fedpipe.simulation import quiet_flower, run_simulation

ROOT = Path(__file__).resolve().parents[1]
TARGET = 0.99


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--config", default=str(ROOT / "simulations" / "mnist_cnn_iid.toml"))
    p.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "mnist_fedavg.json"))
    p.add_argument("overrides", nargs="*")
    args = p.parse_args(argv)
    quiet_flower()
    cfg = load_config(args.config, ["output_dir=runs/bench", *args.overrides])
    try:
        load_dataset(cfg.data)
    except DatasetNotFoundError as exc:
        print(f"skipped: {exc}")
        return 0

    t0 = time.perf_counter()
    result = run_simulation(cfg)
    wall = time.perf_counter() - t0
    rounds = read_metrics(result.run_dir / METRICS_FILE)
    hit = next((r["round"] for r in rounds if r["accuracy"] >= TARGET), None)
    report = {
        "config": args.config,
        "overrides": args.overrides,
        "clients": cfg.partition.num_clients,
        "partition": cfg.partition.scheme,
        "rounds": len(rounds),
        "rounds_to_99": hit,
        "final_accuracy": rounds[-1]["accuracy"],
        "best_accuracy": max(r["accuracy"] for r in rounds),
        "mean_round_seconds": sum(r["seconds"] for r in rounds) / len(rounds),
        "wall_seconds": wall,
        "mb_up_total": sum(r["bytes_up"] for r in rounds) / 1e6,
        "machine": f"{platform.processor() or platform.machine()}, torch {torch.__version__}, "
        f"{torch.get_num_threads()} threads, cuda={torch.cuda.is_available()}",
        "run_dir": str(result.run_dir),
        "per_round_accuracy": [r["accuracy"] for r in rounds],
    }
    print("| config | clients | rounds | rounds to 99 % | final acc | best acc | s/round | MB up |")
    print("|---|---|---|---|---|---|---|---|")
    print(
        f"| {Path(args.config).name} | {report['clients']} | {report['rounds']} | "
        f"{hit if hit else 'not reached'} | {report['final_accuracy']:.4f} | "
        f"{report['best_accuracy']:.4f} | {report['mean_round_seconds']:.1f} | "
        f"{report['mb_up_total']:.1f} |"
    )
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
