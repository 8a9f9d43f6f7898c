"""Local training time of one client epoch, per device profile setting (CPU or CUDA).

    python benchmarks/local_training.py [--examples 6000] [--device auto]

MNIST-shaped random data (the timing does not depend on the pixels), McMahan CNN, one
epoch. Each row is one (batch size, AMP) setting, timed after a warm-up epoch on the
same device in the same run. Prints a markdown table and writes JSON.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

from fedpipe.config import ModelConfig, TrainConfig
from fedpipe.data import Split
from fedpipe.models import build_model
from fedpipe.training import select_device, train

ROOT = Path(__file__).resolve().parents[1]


def _time_epoch(split: Split, cfg: TrainConfig, device: torch.device) -> float:
    model = build_model(ModelConfig(name="cnn"), (1, 28, 28), 10)
    train(model, split, cfg, torch.Generator().manual_seed(0), device)  # warm-up
    if device.type == "cuda":
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    train(model, split, cfg, torch.Generator().manual_seed(1), device)
    if device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - t0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--examples", type=int, default=6000)
    p.add_argument("--device", default="auto")
    p.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "local_training.json"))
    args = p.parse_args(argv)
    device = select_device(args.device)
    g = torch.Generator().manual_seed(0)
    split = Split(
        torch.rand(args.examples, 1, 28, 28, generator=g),
        torch.randint(0, 10, (args.examples,), generator=g),
    )
    settings = [(50, False), (256, False)] + (
        [(50, True), (256, True)] if device.type == "cuda" else []
    )
    rows = []
    for batch, amp in settings:
        cfg = TrainConfig(
            epochs=1, batch_size=batch, amp=amp, device=device.type, threads=torch.get_num_threads()
        )
        seconds = _time_epoch(split, cfg, device)
        rows.append(
            {
                "device": str(device),
                "batch_size": batch,
                "amp": amp,
                "epoch_seconds": seconds,
                "examples_per_second": args.examples / seconds,
            }
        )
    name = (
        torch.cuda.get_device_name() if device.type == "cuda" else f"cpu x{torch.get_num_threads()}"
    )
    print(f"device: {name}, {args.examples} examples, McMahan CNN, 1 epoch\n")
    print("| batch | AMP | epoch s | examples/s |\n|---|---|---|---|")
    for r in rows:
        print(
            f"| {r['batch_size']} | {'yes' if r['amp'] else 'no'} | "
            f"{r['epoch_seconds']:.3f} | {r['examples_per_second']:.0f} |"
        )
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"device": name, "rows": rows}, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
