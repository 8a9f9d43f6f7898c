"""fedpipe-sim [--config FILE] [key=value ...]: run a simulation on this machine."""

from __future__ import annotations

import argparse
import sys

from fedpipe.cli.args import Parser
from fedpipe.config import ConfigError, load_config
from fedpipe.errors import os_message
from fedpipe.simulation import RunFailed, quiet_flower, run_simulation


def _parser() -> argparse.ArgumentParser:
    p = Parser(prog="fedpipe-sim", description=__doc__)
    p.add_argument("--config", help="TOML run config (default: the embedded digits setup)")
    p.add_argument(
        "overrides",
        nargs="*",
        metavar="key=value",
        help="override any config key, e.g. federation.rounds=10 train.lr=0.1",
    )
    p.add_argument("-v", "--verbose", action="store_true", help="show Flower and Ray logs")
    return p


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    quiet_flower(verbose=args.verbose)
    try:
        result = run_simulation(load_config(args.config, args.overrides))
    except (ConfigError, RunFailed, ValueError) as exc:
        print(f"fedpipe-sim: error: {exc}", file=sys.stderr)
        return 2 if isinstance(exc, ConfigError) else 1
    except OSError as exc:  # a missing dataset (its message says where fedpipe looked), ...
        print(f"fedpipe-sim: error: {os_message(exc)}", file=sys.stderr)
        return 1
    s = result.summary
    print(
        f"done: {s['rounds']} rounds, final accuracy {s['final_accuracy']:.4f}, "
        f"{s['wall_seconds']:.1f} s, up {s['total_bytes_up'] / 1e6:.2f} MB, "
        f"down {s['total_bytes_down'] / 1e6:.2f} MB -> {result.run_dir}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
