"""Secure aggregation benchmark: fedpipe's SecAgg of 8-bit updates against Flower's SecAgg+.

    python benchmarks/secagg.py [--part accuracy|scaling|all] [--rounds 10]
                                [--sizes 10,50,200] [--systems a,b,...]

accuracy: one model, one partition, one seed, every client every round; each system
in a fresh process (benchmarks/_measure.py):
- "fedpipe-float32": fedpipe's FedAvg, float32 updates (the accuracy reference);
- "fedpipe-int8": fedpipe, int8 updates with error feedback, sealed-free plain FedAvg:
  the same quantization budget without secure aggregation;
- "fedpipe-secagg": fedpipe, security.secagg=on, 8-bit codes with error feedback;
- "flower-secaggplus": Flower 1.42's SecAgg+ (legacy API; benchmarks/plain_flower/
  secaggplus_app.py) with the same local training, its default clipping (+-8) and
  quantization (2^22), full neighbourhoods (num_shares = clients) and the same
  threshold as fedpipe's.
Config: simulations/mnist_cnn_dirichlet.toml (MNIST, the McMahan CNN, 1,663,370
parameters, Dirichlet(0.5) over 10 clients, SGD lr 0.05 momentum 0.9, batch 50, one
local epoch), falling back to the digits MLP when MNIST is absent. Per system: accuracy
after each round, bits per parameter per client up (every stage) and of the masked
input alone, down, wall seconds per round (rounds >= 2), and per device: training
seconds and the protocol's own seconds per stage.

Per-device protocol time in fedpipe comes from two places: the masked-input stage's
quantize + shares + mask time is measured on the device in the run (its encode-seconds
claim); the key stages (advertise, share, unmask), which do not depend on the model,
are timed in the scaling part's protocol run at the same size (10 devices). Flower's
per-stage client CPU is measured by its app's meter.

scaling: the protocol alone (the real device and aggregator code, devices answered in
this process by the tests' protocol driver, tests/secagg_devices.py, with fixed random
8-bit codes of the CNN's size) at 10, 50 and 200 devices,
SecAgg (every device a neighbour of every other) against SecAgg+ (16 neighbours):
per-device CPU seconds per stage and the aggregator's seconds per stage. SecAgg's
per-device cost grows with n; SecAgg+'s stays near flat.

Prints markdown tables and writes benchmarks/results/secagg.json (a part run again
replaces its own entry; `--systems` measured again replace their own rows).
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # run as a script: make `benchmarks` importable
    sys.path.insert(0, str(ROOT))

from benchmarks._measure import measure  # noqa: E402

MNIST = ROOT / "simulations" / "mnist_cnn_dirichlet.toml"
OUT = ROOT / "benchmarks" / "results" / "secagg.json"
SYSTEMS = ("fedpipe-float32", "fedpipe-int8", "fedpipe-secagg", "flower-secaggplus")
SECAGG = ['security.secagg="on"', "secagg.bits=8", "codec.error_feedback=true"]
VARIANTS = {
    "fedpipe-float32": [],
    "fedpipe-int8": ['codec.scheme="int8"', "codec.error_feedback=true"],
    "fedpipe-secagg": SECAGG,
}
CNN_PARAMS = 1_663_370
STAGES = ("advertise", "share", "masked", "unmask")


# -- the accuracy part (each function runs in a process of its own) -------------------


def _config(config: str, overrides: list[str]) -> Any:
    from fedpipe.config import load_config

    return load_config(config, overrides)


def run_fedpipe(config: str, overrides: list[str]) -> dict[str, Any]:
    """One fedpipe simulation: its rounds as the benchmark reports them."""
    import tempfile

    from fedpipe.metrics import read_metrics
    from fedpipe.rundir import METRICS_FILE
    from fedpipe.simulation import run_simulation

    with tempfile.TemporaryDirectory(prefix="bench-secagg-") as tmp:
        cfg = _config(config, [*overrides, f"output_dir='{tmp}'"])
        result = run_simulation(cfg)
        rounds = read_metrics(result.run_dir / METRICS_FILE)
    return {"rounds": rounds, "clients": cfg.partition.num_clients}


def run_flower(config: str, overrides: list[str], threshold: int) -> dict[str, Any]:
    """Flower's SecAgg+ on the same model, partition, seed and local training."""
    from benchmarks.plain_flower.secaggplus_app import run_flower_secaggplus

    cfg = _config(config, overrides)
    n = cfg.partition.num_clients
    return run_flower_secaggplus(
        cfg.data.dataset,
        cfg.model.name,
        cfg.partition,
        cfg.federation.rounds,
        cfg.train.epochs,
        num_shares=n,
        reconstruction_threshold=threshold,
        clipping_range=8.0,
        quantization_range=2**22,
        seed=cfg.seed,
        max_weight=10**6,  # no client's weight clipped: the same weights as FedAvg's
        train_cfg=cfg.train,
    )


def _mean(values: list[float]) -> float | None:
    return statistics.fmean(values) if values else None


def _fedpipe_row(name: str, report: dict[str, Any], key_stages: dict[str, float]) -> dict[str, Any]:
    rounds, n = report["rounds"], report["clients"]
    later = rounds[1:] or rounds
    params = report.get("params")
    train = [r["train_seconds"] / max(1, r["clients_replied"]) for r in rounds]
    masked_stage = [r["encode_seconds"] / max(1, r["clients_replied"]) for r in rounds]
    row: dict[str, Any] = {
        "system": name,
        "accuracy_per_round": [r["accuracy"] for r in rounds],
        "final_accuracy": rounds[-1]["accuracy"],
        "bits_per_param_up": _mean(
            [r["bits_per_param_up"] for r in rounds if r["bits_per_param_up"]]
        ),
        "bits_per_param_masked": _mean(
            [r["bits_per_param_masked"] for r in rounds if r.get("bits_per_param_masked")]
        ),
        "mb_down_per_client_round": _mean([r["bytes_down"] / n / 1e6 for r in rounds]),
        "round_seconds": _mean([r["seconds"] for r in later]),
        "device_train_seconds": _mean(train),
        "device_encode_seconds": _mean(masked_stage),
        "abandoned_rounds": sum(1 for r in rounds if r.get("secagg_abandoned")),
        "params": params,
    }
    if name == "fedpipe-secagg":
        stage = {**key_stages, "masked": row["device_encode_seconds"]}
        row["device_stage_seconds"] = stage
        row["protocol_share_of_training"] = sum(stage.values()) / row["device_train_seconds"]
    return row


FLOWER_STAGES = {"setup": "advertise", "share_keys": "share", "unmask": "unmask"}


def _flower_row(report: dict[str, Any]) -> dict[str, Any]:
    rounds, n = report["rounds"], report["partition"]["num_clients"]
    later = rounds[1:] or rounds

    def mean(r: dict[str, Any], *path: str) -> float:
        value: Any = r
        for key in path:
            value = value.get(key, {}) if isinstance(value, dict) else {}
        return float(value) if isinstance(value, int | float) else 0.0

    stage = {
        ours: _mean([mean(r, "stages", theirs, "client_cpu_seconds", "mean") for r in rounds])
        for theirs, ours in FLOWER_STAGES.items()
    }
    stage["masked"] = _mean([mean(r, "secagg_collect_cpu_seconds", "mean") for r in rounds])
    train = _mean([mean(r, "train_cpu_seconds", "mean") for r in rounds])
    return {
        "system": "flower-secaggplus",
        "accuracy_per_round": [r["accuracy"] for r in rounds],
        "final_accuracy": rounds[-1]["accuracy"],
        "bits_per_param_up": _mean([r["bits_per_param_per_client"]["up"] for r in rounds]),
        "bits_per_param_masked": _mean(
            [r["bits_per_param_per_client"]["masked_vector"] for r in rounds]
        ),
        "mb_down_per_client_round": _mean([r["bytes_down"] / n / 1e6 for r in rounds]),
        "round_seconds": _mean([r["seconds"] for r in later]),
        "device_train_seconds": train,
        "device_stage_seconds": stage,
        "protocol_share_of_training": sum(v or 0.0 for v in stage.values()) / train
        if train
        else None,
        "params": report["params"],
        "raw": report,
    }


# -- the scaling part -----------------------------------------------------------------


def protocol_costs(devices: int, count: int, neighbours: int, bits: int = 8) -> dict[str, Any]:
    """One SecAgg round, the devices answered in this process with fixed codes; CPU
    seconds per device per stage (mean) and the aggregator's own seconds per stage."""
    import numpy as np
    from flwr.supercore.task_identity import TaskIdentity

    from fedpipe.config import SecAggConfig
    from fedpipe.secagg.wire import ADVERTISE, MASKED, SHARE, UNMASK
    from tests.secagg_devices import Devices, run_round

    TaskIdentity.run_id, TaskIdentity.task_id, TaskIdentity.node_id = 1, 1, 0
    names = {ADVERTISE: "advertise", SHARE: "share", MASKED: "masked", UNMASK: "unmask"}
    cpu: dict[str, float] = dict.fromkeys(STAGES, 0.0)

    class Timed(Devices):
        def _answer(self, me: int, kind: str, content: Any) -> Any:
            t0 = time.process_time()
            try:
                return super()._answer(me, kind, content)
            finally:
                cpu[names[kind]] += time.process_time() - t0

    codes = np.random.default_rng(0).integers(0, 1 << bits, count + 1).astype(np.uint32)
    cfg = SecAggConfig(bits=bits, neighbours=neighbours, stage_timeout=600)
    devs = Timed(cfg, dict.fromkeys(range(devices), codes))
    t0 = time.process_time()
    out = run_round(devs, count, round_s=600)
    total = time.process_time() - t0
    assert out.total is not None, out.abandoned
    server = {s: max(0.0, out.seconds.get(s, 0.0) - cpu[s]) for s in STAGES}
    server["reconstruct"] = out.seconds.get("reconstruct", 0.0)
    return {
        "devices": devices,
        "neighbours": neighbours or devices - 1,
        "params": count,
        "device_seconds": {s: cpu[s] / devices for s in STAGES},
        "device_seconds_total": sum(cpu.values()) / devices,
        "server_seconds": server,
        "cpu_seconds": total,
    }


# -- main -----------------------------------------------------------------------------


def _accuracy_part(config: str, overrides: list[str], systems: list[str]) -> dict[str, Any]:
    cfg = _config(config, overrides)
    from fedpipe.secagg.graph import threshold

    t = threshold(cfg.secagg.threshold, cfg.secagg.neighbours, cfg.partition.num_clients)
    key = measure(
        "benchmarks.secagg:protocol_costs",
        {
            "devices": cfg.partition.num_clients,
            "count": _param_count(config, overrides),
            "neighbours": 0,
        },
    )
    key_stages = {s: key["result"]["device_seconds"][s] for s in ("advertise", "share", "unmask")}
    rows = []
    for name in systems:
        if name == "flower-secaggplus":
            rep = measure(
                "benchmarks.secagg:run_flower",
                {"config": config, "overrides": overrides, "threshold": t},
            )
        else:
            rep = measure(
                "benchmarks.secagg:run_fedpipe",
                {"config": config, "overrides": [*overrides, *VARIANTS[name]]},
            )
        if "result" not in rep:
            print(f"{name} failed: {rep.get('error')}\n{rep.get('traceback', '')}")
            continue
        res = rep["result"]
        res["params"] = _param_count(config, overrides)
        rows.append(
            _flower_row(res) if name == "flower-secaggplus" else _fedpipe_row(name, res, key_stages)
        )
    ref = next((r["final_accuracy"] for r in rows if r["system"] == "fedpipe-float32"), None)
    for r in rows:
        r["gap_pt"] = None if ref is None else 100 * (r["final_accuracy"] - ref)
    return {
        "config": config,
        "overrides": overrides,
        "threshold": t,
        "rows": rows,
        "key_stage_run": key.get("result"),
    }


def _merged(old: dict[str, Any] | None, new: dict[str, Any]) -> dict[str, Any]:
    """`new` with the rows of systems it did not run kept from `old` (same config and
    overrides only), so one system can be measured again without rerunning the others."""
    if not old or (old["config"], old["overrides"]) != (new["config"], new["overrides"]):
        return new
    ran = {r["system"] for r in new["rows"]}
    rows = [r for r in old["rows"] if r["system"] not in ran] + new["rows"]
    rows.sort(key=lambda r: SYSTEMS.index(r["system"]))
    ref = next((r["final_accuracy"] for r in rows if r["system"] == "fedpipe-float32"), None)
    for r in rows:
        r["gap_pt"] = None if ref is None else 100 * (r["final_accuracy"] - ref)
    return {**new, "rows": rows}


def _param_count(config: str, overrides: list[str]) -> int:
    from fedpipe.data import load_dataset
    from fedpipe.models import build_model

    cfg = _config(config, overrides)
    ds = load_dataset(cfg.data)
    model = build_model(cfg.model, ds.input_shape, ds.num_classes)
    return sum(int(v.numel()) for v in model.state_dict().values())


def _print_accuracy(part: dict[str, Any]) -> None:
    print(f"config: {part['config']} {' '.join(part['overrides'])}\n")
    print(
        "| system | final acc | gap to float32 (pt) | bits/param up (all stages) | "
        "bits/param masked input | MB down /client/round | s/round |"
    )
    print("|---|---|---|---|---|---|---|")
    for r in part["rows"]:
        gap = "" if r["gap_pt"] is None else f"{r['gap_pt']:+.2f}"
        masked = "" if r["bits_per_param_masked"] is None else f"{r['bits_per_param_masked']:.2f}"
        print(
            f"| {r['system']} | {r['final_accuracy']:.4f} | {gap} | {r['bits_per_param_up']:.2f} "
            f"| {masked} | {r['mb_down_per_client_round']:.2f} | {r['round_seconds']:.1f} |"
        )
    for r in part["rows"]:
        if "device_stage_seconds" in r:
            st = r["device_stage_seconds"]
            print(
                f"\n{r['system']} per device: training {r['device_train_seconds']:.2f} s; "
                + ", ".join(f"{k} {v * 1000:.1f} ms" for k, v in st.items())
                + f"; protocol / training = {100 * r['protocol_share_of_training']:.2f} %"
            )


def _print_scaling(rows: list[dict[str, Any]]) -> None:
    print(
        "\n| devices | neighbours | "
        + " | ".join(f"device {s} (ms)" for s in STAGES)
        + " | device total (ms) | aggregator total (s) |"
    )
    print("|---|---|" + "---|" * (len(STAGES) + 2))
    for r in rows:
        d = r["device_seconds"]
        print(
            f"| {r['devices']} | {r['neighbours']} | "
            + " | ".join(f"{1000 * d[s]:.1f}" for s in STAGES)
            + f" | {1000 * r['device_seconds_total']:.1f} | "
            + f"{sum(r['server_seconds'].values()):.2f} |"
        )


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--part", choices=("accuracy", "scaling", "all"), default="all")
    p.add_argument("--rounds", type=int, default=10)
    p.add_argument("--sizes", default="10,50,200")
    p.add_argument("--neighbours", type=int, default=16)
    p.add_argument("--systems", default=",".join(SYSTEMS))
    p.add_argument("--out", default=str(OUT))
    p.add_argument("overrides", nargs="*")
    args = p.parse_args(argv)
    out = Path(args.out)
    results: dict[str, Any] = json.loads(out.read_text()) if out.is_file() else {}
    results["machine"] = (
        f"{platform.node()} {platform.machine()} cpus={__import__('os').cpu_count()}"
    )
    if args.part in ("accuracy", "all"):
        from fedpipe.data import DatasetNotFoundError, load_dataset

        config = str(MNIST)
        overrides = [f"federation.rounds={args.rounds}", *args.overrides]
        try:
            load_dataset(_config(config, overrides).data)
        except DatasetNotFoundError:
            config = str(ROOT / "simulations" / "default.toml")
        part = _accuracy_part(config, overrides, args.systems.split(","))
        results["accuracy"] = _merged(results.get("accuracy"), part)
        part = results["accuracy"]
        _print_accuracy(part)
    if args.part in ("scaling", "all"):
        rows = []
        for n in (int(s) for s in args.sizes.split(",")):
            for k in (0, args.neighbours):
                if k and k >= n - 1:
                    continue
                rep = measure(
                    "benchmarks.secagg:protocol_costs",
                    {"devices": n, "count": CNN_PARAMS, "neighbours": k},
                )
                if "result" in rep:
                    rows.append(rep["result"])
                else:
                    print(f"scaling n={n} k={k} failed: {rep.get('error')}")
        results["scaling"] = rows
        _print_scaling(rows)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=2) + "\n")
    print(f"\nwrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
