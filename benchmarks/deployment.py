"""Deployment overhead: fedpipe vs a plain Flower app doing the same work, in ONE run.

    python benchmarks/deployment.py [--rounds 6] [--clients 3]

Both run on 127.0.0.1 with TLS (fedpipe also seals every update, its deployment default),
a SuperLink and one SuperNode per device, the embedded
digits data split into the same per-device shard files, the same MLP, one local epoch.
Per round: wall time, and overhead = wall time minus the slowest client's training time
(what the framework costs around the work). Round 1 includes devices connecting and is
left out of the medians. Prints a markdown table and writes JSON.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import tomli_w

from fedpipe.config import load_config
from fedpipe.crypto import write_certs
from fedpipe.crypto.keys import write_aggregator_keys
from fedpipe.data import write_shards
from fedpipe.deploy.coordinator import CONNECTION, CoordinatorOptions, run_coordinator
from fedpipe.deploy.processes import Child, flower_env, free_port, wait_for_port
from fedpipe.metrics import read_metrics
from fedpipe.rundir import METRICS_FILE

ROOT = Path(__file__).resolve().parents[1]
PLAIN_APP = ROOT / "benchmarks" / "plain_flower"
WORK = ["train.epochs=1", "train.batch_size=16", "train.lr=0.05", "train.momentum=0.9"]


def _clients(tmp: Path, n: int, port: int, certs: Path, plain: bool) -> list[Child]:
    out = []
    for i in range(n):
        shard = tmp / "shards" / f"client-{i}.npz"
        state = tmp / ("plain" if plain else "fedpipe") / f"device-{i}"
        if plain:  # stock flower-supernode
            argv = ["flower-supernode", "--superlink", f"127.0.0.1:{port}"]
            argv += ["--root-certificates", str(certs / "ca.crt"), "--port", str(free_port())]
            argv += ["--node-config", f'client-id={i} data-path="{shard}"']
            env = flower_env(state)
        else:  # fedpipe-client, updates sealed to the aggregator (the deployment default)
            argv = [sys.executable, "-m", "fedpipe.cli.client", "--superlink", f"127.0.0.1:{port}"]
            argv += ["--root-certificates", str(certs / "ca.crt"), "--data", str(shard)]
            argv += [
                "--state-dir",
                str(state),
                "--aggregator-key",
                str(tmp / "keys" / "aggregator.pub"),
            ]
            env = flower_env(state)
        out.append(Child(f"device-{i}", argv, env, state / "device.log"))
    return out


def _stop(children: list[Child]) -> None:
    for c in children:
        c.stop()


def _plain(tmp: Path, certs: Path, rounds: int, n: int) -> list[dict[str, Any]]:
    home, port = tmp / "plain" / "flower", free_port()
    home.mkdir(parents=True)
    conn = {"address": f"127.0.0.1:{port}", "root-certificates": str(certs / "ca.crt")}
    (home / "config.toml").write_text(
        tomli_w.dumps({"superlink": {"default": CONNECTION, CONNECTION: conn}})
    )
    argv = ["flower-superlink", "--isolation", "subprocess", "--port", str(port)]
    argv += ["--disable-runtime-dependency-installation", "--database", str(home / "db.sqlite")]
    argv += [
        "--ssl-certfile",
        str(certs / "server.crt"),
        "--ssl-keyfile",
        str(certs / "server.key"),
    ]
    argv += ["--ssl-ca-certfile", str(certs / "ca.crt")]
    superlink = Child("superlink", argv, flower_env(home), home / "superlink.log")
    clients: list[Child] = []
    try:
        wait_for_port("127.0.0.1", port, 60, superlink)
        clients = _clients(tmp, n, port, certs, plain=True)
        out = tmp / "plain" / "rounds.json"
        run_cfg = home / "run.toml"
        run_cfg.write_text(tomli_w.dumps({"rounds": rounds, "min-nodes": n, "out": str(out)}))
        env = flower_env(home, {"PYTHONPATH": str(PLAIN_APP)})
        subprocess.run(
            ["flwr", "run", str(PLAIN_APP), CONNECTION, "--run-config", str(run_cfg)],
            env=env,
            check=True,
            capture_output=True,
            timeout=120,
        )
        deadline = time.monotonic() + 60 * rounds + 120
        while not out.exists():
            if time.monotonic() > deadline:
                raise TimeoutError(f"plain Flower run did not finish:\n{superlink.tail()}")
            time.sleep(0.5)
        rows: list[dict[str, Any]] = json.loads(out.read_text())
        return rows
    finally:
        _stop(clients)
        superlink.stop()


def _fedpipe(tmp: Path, certs: Path, rounds: int, n: int) -> list[dict[str, Any]]:
    cfg = load_config(
        None,
        [
            *WORK,
            f"federation.rounds={rounds}",
            f"federation.min_nodes={n}",
            f"partition.num_clients={n}",
            f"output_dir='{tmp / 'fedpipe' / 'runs'}'",
        ],
    )
    port = free_port()
    seal_key = tmp / "keys" / "aggregator.key"
    opts = CoordinatorOptions(port=port, certs=certs, seal_key=seal_key, echo=lambda line: None)
    clients = _clients(tmp, n, port, certs, plain=False)
    try:
        result = run_coordinator(cfg, opts)
    finally:
        _stop(clients)
    return [
        {
            "round": r["round"],
            "seconds": r["seconds"],
            "slowest_train_seconds": r["slowest_train_seconds"],
            "accuracy": r["accuracy"],
        }
        for r in read_metrics(result.run_dir / METRICS_FILE)
    ]


def _summary(rows: list[dict[str, Any]]) -> dict[str, float]:
    steady = rows[1:] or rows
    return {
        "round_seconds": statistics.median(r["seconds"] for r in steady),
        "overhead_seconds": statistics.median(
            r["seconds"] - r["slowest_train_seconds"] for r in steady
        ),
        "final_accuracy": rows[-1]["accuracy"],
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rounds", type=int, default=6)
    p.add_argument("--clients", type=int, default=3)
    p.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "deployment.json"))
    args = p.parse_args(argv)
    with tempfile.TemporaryDirectory() as d:
        tmp = Path(d)
        certs = write_certs(tmp / "certs", ["127.0.0.1", "localhost"]).folder
        write_aggregator_keys(tmp / "keys")
        cfg = load_config(None, [f"partition.num_clients={args.clients}"])
        write_shards(cfg.data, cfg.partition, cfg.seed, tmp / "shards")
        runs = {
            "plain Flower 1.42": _plain(tmp, certs, args.rounds, args.clients),
            "fedpipe": _fedpipe(tmp, certs, args.rounds, args.clients),
        }
    table = {name: _summary(rows) for name, rows in runs.items()}
    base = table["plain Flower 1.42"]["overhead_seconds"]
    print(f"{args.clients} devices, {args.rounds} rounds, TLS on 127.0.0.1, medians of rounds 2+\n")
    print("| framework | round s | overhead s | overhead vs plain Flower | final acc |")
    print("|---|---|---|---|---|")
    for name, s in table.items():
        print(
            f"| {name} | {s['round_seconds']:.2f} | {s['overhead_seconds']:.2f} | "
            f"{s['overhead_seconds'] / base:.2f}x | {s['final_accuracy']:.4f} |"
        )
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"summary": table, "rounds": runs}, indent=2) + "\n")
    print(f"\nwrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
