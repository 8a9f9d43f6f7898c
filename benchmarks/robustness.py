"""Robustness benchmark: every simulated attack against every defence, in ONE run.

    python benchmarks/robustness.py [--attacks a,b] [--defences d,e] [key=value ...]

Same data, partition, seed, attackers and rounds for every cell, so the figures are side
by side: the final test accuracy of each (attack, defence) pair and its gap to the same
defence without attackers. Default: MNIST, Dirichlet(0.5), 20 clients, 20 % attackers
(the same 4 every round), 10 rounds, the MLP with hidden width 200, one local epoch;
the embedded digits set with the same split when MNIST is absent. Defences:

- fedavg: Flower's FedAvg with fedpipe's bounds off (plain FedAvg);
- fedavg+bounds: FedAvg with fedpipe's default bounds (weight cap 3x and norm clip 2x
  the previous round's medians);
- fedmedian, fedtrimmedavg, krum, bulyan: Flower's robust strategies, bounds off
  (krum and bulyan told f = the number of attackers).

Prints a markdown table and writes JSON to benchmarks/results/.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

from fedpipe.config import ATTACKS, load_config
from fedpipe.data import DatasetNotFoundError, load_dataset
from fedpipe.metrics import read_metrics
from fedpipe.rundir import METRICS_FILE
from fedpipe.simulation import quiet_flower, run_simulation

ROOT = Path(__file__).resolve().parents[1]
BASE = [
    "partition.scheme=dirichlet",
    "partition.alpha=0.5",
    "partition.num_clients=20",
    "partition.min_size=20",
    "model.name=mlp",
    "model.hidden=200",
    "train.epochs=1",
    "train.batch_size=32",
    "federation.rounds=10",
    "federation.min_nodes=20",
    "simulation.attacker_fraction=0.2",
    "output_dir=runs/bench-robustness",
]
BOUNDS_OFF = ["bounds.weight_ratio=0", "bounds.norm_ratio=0"]
DEFENCES: dict[str, list[str]] = {
    "fedavg": ["federation.strategy=fedavg", *BOUNDS_OFF],
    "fedavg+bounds": ["federation.strategy=fedavg"],
    "fedmedian": ["federation.strategy=fedmedian", *BOUNDS_OFF],
    "fedtrimmedavg": ["federation.strategy=fedtrimmedavg", *BOUNDS_OFF],
    "krum": ["federation.strategy=krum", "federation.num_malicious=4", *BOUNDS_OFF],
    "bulyan": ["federation.strategy=bulyan", "federation.num_malicious=4", *BOUNDS_OFF],
}


def _dataset(overrides: list[str]) -> list[str]:
    """MNIST where its files are, else the embedded digits set."""
    try:
        load_dataset(load_config(None, ["data.dataset=mnist"]).data)
        return ["data.dataset=mnist", *overrides]
    except DatasetNotFoundError:
        return ["data.dataset=digits", *overrides]


def _measure(overrides: list[str], attack: str, defence: str) -> dict[str, Any]:
    attack_keys = [f"simulation.attack={attack}"]
    if attack == "none":  # no attack: nobody attacks (attacker_fraction needs an attack)
        overrides = [o for o in overrides if not o.startswith("simulation.attacker_")]
    cfg = load_config(None, [*overrides, *DEFENCES[defence], *attack_keys])
    t0 = time.perf_counter()
    rounds = read_metrics(run_simulation(cfg).run_dir / METRICS_FILE)
    return {
        "attack": attack,
        "defence": defence,
        "final_accuracy": rounds[-1]["accuracy"],
        "accuracy_per_round": [r["accuracy"] for r in rounds],
        "clipped": sum(r.get("updates_clipped", 0) for r in rounds),
        "capped": sum(r.get("weights_capped", 0) for r in rounds),
        "rejected": sum(r.get("clients_rejected", 0) for r in rounds),
        "wall_seconds": time.perf_counter() - t0,
    }


def _table(rows: list[dict[str, Any]], attacks: list[str], defences: list[str]) -> str:
    acc = {(r["attack"], r["defence"]): r["final_accuracy"] for r in rows}
    lines = ["| attack | " + " | ".join(defences) + " |", "|---" * (len(defences) + 1) + "|"]
    for attack in attacks:
        cells = []
        for d in defences:
            a, ref = acc.get((attack, d)), acc.get(("none", d))
            gap = (
                "" if a is None or ref is None or attack == "none" else f" ({100 * (a - ref):+.1f})"
            )
            cells.append("" if a is None else f"{a:.4f}{gap}")
        lines.append(f"| {attack} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--attacks", default=",".join(ATTACKS))
    p.add_argument("--defences", default=",".join(DEFENCES))
    p.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "robustness.json"))
    p.add_argument("overrides", nargs="*", help="key=value, applied to every cell")
    args = p.parse_args(argv)
    quiet_flower()
    overrides = _dataset([*BASE, *args.overrides])
    attacks, defences = args.attacks.split(","), args.defences.split(",")
    if "none" not in attacks:
        attacks = ["none", *attacks]  # every gap needs its attack-free reference
    rows = []
    for attack in attacks:
        for defence in defences:
            rows.append(_measure(overrides, attack, defence))
            r = rows[-1]
            took = f"{r['wall_seconds']:.0f} s"
            print(f"{attack:>18} x {defence:<14} {r['final_accuracy']:.4f} ({took})", flush=True)
    print(f"\nconfig: {' '.join(overrides)}\n")
    print("final test accuracy (gap to the same defence without attackers, pt)\n")
    print(_table(rows, attacks, defences))
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"overrides": overrides, "rows": rows}, indent=2) + "\n")
    print(f"\nwrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
