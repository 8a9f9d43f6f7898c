"""Export benchmark: every artifact of `fedpipe export` for one trained run, in one table.

    python benchmarks/export.py --run RUN_DIR [key=value ...]

Exports the run again (`--force`; `export.*` / `release.*` overrides as for `fedpipe
export`), prints the table, and writes it with the run's model, horizon and accuracy to
benchmarks/results/export_<run name>.json. The run the README quotes is the MNIST CNN of
simulations/mnist_cnn_iid.toml trained for 5 rounds with federated evaluation:

    fedpipe-sim --config simulations/mnist_cnn_iid.toml federation.rounds=5 \\
        federation.fraction_evaluate=0.5 partition.holdout=0.1 name=mnist-cnn
"""

from __future__ import annotations

import argparse
import json
import os
from dataclasses import asdict
from pathlib import Path

from fedpipe.config import load_config
from fedpipe.export import EXPORT_DIR, export_run, markdown_table
from fedpipe.rundir import CONFIG_FILE, SUMMARY_FILE

ROOT = Path(__file__).resolve().parents[1]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--run", required=True, help="a finished run directory")
    p.add_argument("--threads", type=int, default=1, help="CPU threads for the timings")
    p.add_argument("--out", help="default: benchmarks/results/export_<run name>.json")
    p.add_argument("overrides", nargs="*", metavar="key=value")
    args = p.parse_args(argv)
    run = Path(args.run)
    cfg = load_config(str(run / CONFIG_FILE))
    rows = export_run(run, force=True, threads=args.threads, overrides=args.overrides)
    print(markdown_table(rows), end="")
    summary = json.loads((run / SUMMARY_FILE).read_text())
    export = json.loads((run / EXPORT_DIR / "export.json").read_text())
    name = run.name.rsplit("-", 2)[0].replace("-", "_")  # without the time stamp
    result = {
        "run": str(run),
        "model": cfg.model.name,
        "dataset": cfg.data.dataset,
        "rounds": summary["rounds"],
        "clients": cfg.partition.num_clients,
        "partition": cfg.partition.scheme,
        "final_accuracy": summary["final_accuracy"],
        "load_average_before": os.getloadavg(),
        "overrides": args.overrides,
        **{k: export[k] for k in ("threads", "torch", "export", "skipped") if k in export},
        "artifacts": [asdict(r) for r in rows],
        "release": json.loads((run / EXPORT_DIR / "release.json").read_text()),
    }
    out = Path(args.out or ROOT / "benchmarks" / "results" / f"export_{name}.json")
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
