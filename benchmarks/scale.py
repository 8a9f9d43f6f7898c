"""Scale benchmark: driver memory and round time from 10 to 10,000 clients.

    python benchmarks/scale.py [--part memory|tenk|all] [--quick] [--systems a,b]
                               [--sizes 10,100,1000] [--hidden 500] [--rounds 3] [--epochs 1]

Systems: "flower" is the same job as a plain Flower 1.42 simulation with stock FedAvg
(benchmarks/plain_flower/sim_app.py); "fedpipe-streaming" and "fedpipe-buffered" are
fedpipe's simulation with federation.aggregation=streaming / buffered and two workers.
All train fedpipe's MNIST MLP on IID shards with fedpipe's loop (batch 16, lr 0.05) and
use 1 CPU per client: two clients train at a time on this 2-core machine.

- memory: 10, 100 and 1,000 clients per round (fraction 1.0, so N clients in all), 3
  rounds. Driver peak RSS (ru_maxrss of the process that runs the simulation; Ray's
  workers are processes of their own and do not count), the peak of the simulation alone
  (the high-water mark reset once the dataset is loaded: loading MNIST by itself peaks
  at about 1.4 GB), and the mean wall time of rounds >= 2 (round 1 starts the workers).
- tenk: 10,000 registered clients, fraction 0.1 (1,000 per round), 3 rounds, fedpipe's
  default MLP (hidden 64) and local epochs (3): six MNIST examples per client. Per round:
  wall time, the clients' summed training seconds, and the efficiency ratio
  wall / (summed training seconds / workers), which is 1.0 when both workers train all
  the time and the framework costs nothing; "x faster" = Flower's round time / this
  system's.

Model: the MLP with two hidden layers of 500 (648,010 parameters, 2.6 MB of float32 per
reply). 1,000 replies are then 2.6 GB, well above the driver's 1.1 GB floor (torch, Flower
and MNIST), so holding a round's replies shows, while even three copies of them stay
under 10 GB of the 24 (measured: Flower's driver peaks at 6.6 GB, about two copies).

Every configuration runs in a fresh process (benchmarks/_measure.py), so peaks do not
mix. Prints markdown tables and merges into benchmarks/results/scale.json (--quick:
scale_quick.json): a configuration measured again replaces its row, the others stay, so
the fedpipe rows can be added without rerunning Flower's 10,000-client baseline.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # run as a script: make `benchmarks` importable
    sys.path.insert(0, str(ROOT))

from benchmarks._measure import measure, peak_rss_mb, reset_peak_rss  # noqa: E402

PLAIN = "benchmarks.plain_flower.sim_app:run_plain_flower"
FEDPIPE = "benchmarks.scale:run_fedpipe"
SYSTEMS: dict[str, tuple[str, dict[str, Any]]] = {
    "flower": (PLAIN, {}),
    "fedpipe-streaming": (FEDPIPE, {"aggregation": "streaming"}),
    "fedpipe-buffered": (FEDPIPE, {"aggregation": "buffered"}),
}
WORKERS = 2  # fedpipe's simulation.workers; Flower runs one 1-CPU actor per core (2 here)
TIMEOUT_S = 3600.0  # per configuration


# --------------------------------------------------------------------------------------
# THE FEDPIPE HALF. Filled in by the round-engine / simulation rewrite: until the keys
# below exist and work, load_config raises ConfigError (or the run fails) and the row
# records the error instead of figures. It must return what run_plain_flower returns:
# "rounds" rows with round, seconds, sampled, replies, train_seconds; "workers"; and
# simulation_peak_rss_mb where it can.
# --------------------------------------------------------------------------------------
def run_fedpipe(
    aggregation: str,
    num_clients: int,
    fraction: float,
    rounds: int,
    hidden: int,
    epochs: int,
    seed: int = 0,
    workers: int = WORKERS,
) -> dict[str, Any]:
    """The same job on fedpipe's simulation, `aggregation` = "streaming" or "buffered"."""
    from fedpipe.config import load_config
    from fedpipe.data import load_dataset
    from fedpipe.metrics import read_metrics
    from fedpipe.rundir import METRICS_FILE
    from fedpipe.simulation import quiet_flower, run_simulation

    quiet_flower()
    overrides = [
        "data.dataset=mnist",
        "partition.scheme=iid",
        f"partition.num_clients={num_clients}",
        "model.name=mlp",
        f"model.hidden={hidden}",
        f"train.epochs={epochs}",
        "train.batch_size=16",
        "train.lr=0.05",
        "train.device=cpu",
        f"federation.rounds={rounds}",
        f"federation.fraction_train={fraction}",
        "federation.fraction_evaluate=0.0",
        # fedpipe's min_nodes is the smallest sample (Flower's min_train_nodes); its
        # engine identifies every connected node before sampling, so no separate
        # min_available_nodes is needed: the sample is exactly fraction x clients.
        f"federation.min_nodes={max(1, int(num_clients * fraction))}",
        "federation.round_timeout=3600",
        f"federation.aggregation={aggregation}",
        # Plain FedAvg, as Flower's: fedpipe's default update bounds off.
        "bounds.weight_ratio=0",
        "bounds.norm_ratio=0",
        f"simulation.workers={workers}",
        f"seed={seed}",
        "output_dir=runs/bench-scale",
    ]
    cfg = load_config(None, overrides)
    load_dataset(cfg.data)  # cached: the simulation's own load is then free
    setup_peak = peak_rss_mb()
    reset = reset_peak_rss()
    rss_at_start = peak_rss_mb()
    t0 = time.perf_counter()
    result = run_simulation(cfg)
    wall = time.perf_counter() - t0
    metrics = read_metrics(result.run_dir / METRICS_FILE)
    return {
        "system": f"fedpipe-{aggregation}",
        "num_clients": num_clients,
        "fraction": fraction,
        "per_round_target": max(1, int(num_clients * fraction)),
        "hidden": hidden,
        "epochs": epochs,
        "seed": seed,
        "workers": workers,
        "setup_peak_rss_mb": setup_peak,
        "rss_mb_before_simulation": rss_at_start if reset else None,
        "simulation_peak_rss_mb": peak_rss_mb() if reset else None,
        "wall_seconds": wall,
        "run_dir": str(result.run_dir),
        "rounds": [
            {
                "round": r["round"],
                "seconds": r["seconds"],
                "sampled": r["clients_sampled"],
                "replies": r["clients_replied"],
                "failed": r["clients_failed"],
                "train_seconds": r["train_seconds"],
                "slowest_train_seconds": r.get("slowest_train_seconds", 0.0),
                "accuracy": r["accuracy"],
            }
            for r in metrics
        ],
    }


# --------------------------------------------------------------------------------------


def _config(part: str, args: argparse.Namespace, clients: int) -> dict[str, Any]:
    """The keywords every system gets for one configuration."""
    if part == "memory":
        return {
            "num_clients": clients,
            "fraction": 1.0,
            "rounds": args.rounds,
            "hidden": args.hidden,
            "epochs": args.epochs,
            "seed": args.seed,
        }
    return {
        "num_clients": args.tenk_clients,
        "fraction": args.tenk_fraction,
        "rounds": args.tenk_rounds,
        "hidden": args.tenk_hidden,
        "epochs": args.tenk_epochs,
        "seed": args.seed,
    }


def _summarise(
    part: str, system: str, config: dict[str, Any], report: dict[str, Any]
) -> dict[str, Any]:
    """One row of the JSON: the configuration, the headline figures, the raw rounds."""
    row: dict[str, Any] = {
        "part": part,
        "system": system,
        **config,
        "peak_rss_mb": report.get("peak_rss_mb"),
        "process_seconds": report.get("wall_seconds"),
    }
    result = report.get("result")
    if result is not None and result.get("setup_peak_rss_mb") is not None:
        # The function lowered the high-water mark after loading the data: the process's
        # peak is the higher of the two.
        row["peak_rss_mb"] = max(row["peak_rss_mb"] or 0.0, result["setup_peak_rss_mb"])
    if result is None:
        row["error"] = report.get("error", "no result")
        if "traceback" in report:
            row["traceback"] = report["traceback"]
        return row
    workers = int(result.get("workers") or WORKERS)
    rounds = [
        {**r, "efficiency": _efficiency(r["seconds"], r["train_seconds"], workers)}
        for r in result["rounds"]
    ]
    later = [r for r in rounds if r["round"] >= 2] or rounds
    row |= {
        "workers": workers,
        "simulation_peak_rss_mb": result.get("simulation_peak_rss_mb"),
        "setup_peak_rss_mb": result.get("setup_peak_rss_mb"),
        "rss_mb_before_simulation": result.get("rss_mb_before_simulation"),
        "mean_round_seconds": statistics.fmean(r["seconds"] for r in later),
        "mean_train_seconds": statistics.fmean(r["train_seconds"] for r in later),
        "mean_efficiency": statistics.fmean(r["efficiency"] for r in later),
        "sampled_per_round": [r["sampled"] for r in rounds],
        "replies_per_round": [r["replies"] for r in rounds],
        "final_accuracy": rounds[-1]["accuracy"] if rounds else None,
        "per_round": rounds,
    }
    for key in ("params", "per_round_target", "run_dir"):
        if key in result:
            row[key] = result[key]
    return row


def _efficiency(seconds: float, train_seconds: float, workers: int) -> float:
    """Round wall time over the time `workers` busy workers would need to train."""
    return seconds / (train_seconds / workers) if train_seconds > 0 else float("inf")


def _key(row: dict[str, Any]) -> tuple[Any, ...]:
    """What identifies a measurement: a rerun of the same key replaces the row."""
    names = ("part", "system", "num_clients", "fraction", "rounds", "hidden", "epochs", "seed")
    return tuple(row.get(k) for k in names)


def _same_config(row: dict[str, Any], config: dict[str, Any]) -> bool:
    return all(row.get(k) == v for k, v in config.items())


def _fmt(value: float | None, spec: str) -> str:
    return "" if value is None else format(value, spec)


def _faster(ref: dict[str, Any] | None, row: dict[str, Any], key: str) -> str:
    if ref is None or row is ref or ref.get(key) is None or row.get(key) is None:
        return ""
    return f"{ref[key] / row[key]:.2f}x"


def _memory_table(rows: list[dict[str, Any]], configs: list[dict[str, Any]]) -> str:
    lines = [
        "| clients/round | system | peak RSS MB | simulation peak RSS MB | "
        "mean round s (>= 2) | efficiency | replies/round | x faster | error |",
        "|---" * 9 + "|",
    ]
    for config in configs:
        mine = [r for r in rows if r["part"] == "memory" and _same_config(r, config)]
        ref = next((r for r in mine if r["system"] == "flower" and "error" not in r), None)
        for r in sorted(mine, key=lambda r: list(SYSTEMS).index(r["system"])):
            replies = "/".join(str(n) for n in r.get("replies_per_round", []))
            lines.append(
                f"| {config['num_clients']} | {r['system']} | {_fmt(r['peak_rss_mb'], '.0f')} | "
                f"{_fmt(r.get('simulation_peak_rss_mb'), '.0f')} | "
                f"{_fmt(r.get('mean_round_seconds'), '.2f')} | "
                f"{_fmt(r.get('mean_efficiency'), '.2f')} | {replies} | "
                f"{_faster(ref, r, 'mean_round_seconds')} | {_short(r.get('error'))} |"
            )
    return "\n".join(lines)


def _tenk_table(rows: list[dict[str, Any]], config: dict[str, Any]) -> str:
    lines = [
        "| system | round | sampled | replies | wall s | summed train s | efficiency | "
        "x faster | peak RSS MB | error |",
        "|---" * 10 + "|",
    ]
    mine = [r for r in rows if r["part"] == "tenk" and _same_config(r, config)]
    ref = next((r for r in mine if r["system"] == "flower" and "error" not in r), None)
    ref_rounds = {x["round"]: x for x in ref["per_round"]} if ref else {}
    for r in sorted(mine, key=lambda r: list(SYSTEMS).index(r["system"])):
        rss = _fmt(r["peak_rss_mb"], ".0f")
        if "error" in r:
            lines.append(f"| {r['system']} | | | | | | | | {rss} | {_short(r['error'])} |")
            continue
        for x in r["per_round"]:
            lines.append(
                f"| {r['system']} | {x['round']} | {x['sampled']} | {x['replies']} | "
                f"{x['seconds']:.1f} | {x['train_seconds']:.1f} | {x['efficiency']:.2f} | "
                f"{_faster(ref_rounds.get(x['round']), x, 'seconds')} | {rss} | |"
            )
    return "\n".join(lines)


def _short(error: str | None, limit: int = 80) -> str:
    if not error:
        return ""
    line = error.splitlines()[0].replace("|", "/")
    return line if len(line) <= limit else line[: limit - 3] + "..."


def _machine() -> str:
    import torch

    mem = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 1e9
    return (
        f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, "
        f"{mem:.0f} GB, torch {torch.__version__}, python {platform.python_version()}"
    )


def _run(
    part: str,
    systems: list[str],
    configs: list[dict[str, Any]],
    rows: list[dict[str, Any]],
    save: Callable[[], None],
    machine: str,
) -> None:
    """Measure every (config, system) pair, one fresh process each, one at a time."""
    for config in configs:
        for system in systems:
            target, extra = SYSTEMS[system]
            label = f"{part}: {system}, {config['num_clients']} clients x {config['fraction']}"
            print(f"--- {label} ...", flush=True)
            report = measure(target, {**extra, **config}, timeout=TIMEOUT_S)
            row = _summarise(part, system, config, report) | {"machine": machine}
            rows[:] = [r for r in rows if _key(r) != _key(row)] + [row]
            save()  # after every configuration: a later crash keeps what was measured
            took = f"{row['process_seconds']:.0f} s"
            if "error" in row:
                print(f"--- {label}: FAILED ({took}): {_short(row['error'], 200)}", flush=True)
            else:
                print(
                    f"--- {label}: peak {row['peak_rss_mb']:.0f} MB, "
                    f"{row['mean_round_seconds']:.2f} s/round ({took})",
                    flush=True,
                )


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--part", choices=("memory", "tenk", "all"), default="all")
    p.add_argument("--quick", action="store_true", help="small sizes: a smoke test")
    p.add_argument("--systems", default=",".join(SYSTEMS))
    p.add_argument("--sizes", default=None, help="clients per round (memory part)")
    p.add_argument("--hidden", type=int, default=None, help="MLP hidden width (500)")
    p.add_argument("--rounds", type=int, default=None, help="memory part rounds (3)")
    p.add_argument("--epochs", type=int, default=1)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--tenk-clients", type=int, default=None, help="registered clients (10000)")
    p.add_argument("--tenk-fraction", type=float, default=0.1)
    # fedpipe's default MLP and local epochs: the per-client work a default run does
    p.add_argument("--tenk-hidden", type=int, default=64)
    p.add_argument("--tenk-epochs", type=int, default=3)
    p.add_argument("--tenk-rounds", type=int, default=None, help="(3)")
    p.add_argument("--out", default=None)
    p.add_argument("--fresh", action="store_true", help="drop the rows already in --out")
    p.add_argument("--table", action="store_true", help="only print the tables from --out")
    args = p.parse_args(argv)
    quick = args.quick
    args.sizes = args.sizes or ("10,100" if quick else "10,100,1000")
    args.hidden = args.hidden or (100 if quick else 500)
    args.rounds = args.rounds or (2 if quick else 3)
    args.tenk_clients = args.tenk_clients or (1000 if quick else 10_000)
    args.tenk_rounds = args.tenk_rounds or (2 if quick else 3)
    name = "scale_quick.json" if quick else "scale.json"
    out = Path(args.out or ROOT / "benchmarks" / "results" / name)
    systems = args.systems.split(",")
    unknown = sorted(set(systems) - set(SYSTEMS))
    if unknown:
        p.error(f"unknown systems {unknown}; choose from {sorted(SYSTEMS)}")

    old = {} if args.fresh or not out.is_file() else json.loads(out.read_text())
    rows: list[dict[str, Any]] = old.get("rows", [])
    machine = _machine()

    def save() -> None:
        out.parent.mkdir(parents=True, exist_ok=True)
        report = {"machine": machine, "workers": WORKERS, "rows": rows}
        out.write_text(json.dumps(report, indent=2) + "\n")

    memory = [_config("memory", args, int(n)) for n in args.sizes.split(",")]
    tenk = _config("tenk", args, 0)
    if args.part in ("memory", "all") and not args.table:
        _run("memory", systems, memory, rows, save, machine)
    if args.part in ("tenk", "all") and not args.table:
        _run("tenk", systems, [tenk], rows, save, machine)

    sections = [f"machine: {machine}; MLP hidden={args.hidden}, {args.epochs} local epoch(s)"]
    if args.part in ("memory", "all"):
        head = f"driver memory and round time, fraction 1.0, {args.rounds} rounds"
        sections.append(f"{head}\n\n{_memory_table(rows, memory)}")
    if args.part in ("tenk", "all"):
        head = (
            f"{tenk['num_clients']} clients, fraction {tenk['fraction']}, {tenk['rounds']} "
            f"rounds, MLP hidden={tenk['hidden']}, {tenk['epochs']} local epoch(s); "
            "efficiency = wall / (summed train s / workers)"
        )
        sections.append(f"{head}\n\n{_tenk_table(rows, tenk)}")
    print("\n" + "\n\n".join(sections))
    if not args.table:
        print(f"\nwrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
