"""fedpipe-server [--config FILE] [key=value ...] --certs DIR | --insecure: run a coordinator.

Starts a Flower SuperLink (state in <run dir>/flower/superlink.db), submits the fedpipe
run, prints each round, writes the run directory, and stops everything on exit.
`--resume RUN_DIR` continues a run that was killed, from its last checkpoint;
`--init-from RUN_DIR` starts a new run from a finished run's global model.
"""

from __future__ import annotations

import argparse
import signal
import sys
from pathlib import Path
from types import FrameType

from fedpipe.cli.args import Parser, port
from fedpipe.config import ConfigError, load_config
from fedpipe.deploy.coordinator import CoordinatorOptions, DeployError, run_coordinator
from fedpipe.errors import os_message
from fedpipe.lineage import LineageError, load_parent
from fedpipe.simulation import quiet_flower

INSECURE_WARNING = (
    "WARNING: --insecure: TLS is OFF. Model updates, the global model and device "
    "credentials cross the network in clear text. Use only on a closed test network."
)


def _parser() -> argparse.ArgumentParser:
    p = Parser(prog="fedpipe-server", description=__doc__.splitlines()[0])
    p.add_argument("--config", help="TOML run config (default: the embedded digits setup)")
    p.add_argument("overrides", nargs="*", metavar="key=value")
    tls = p.add_mutually_exclusive_group()
    tls.add_argument("--certs", type=Path, help="folder from `fedpipe certs` (TLS)")
    tls.add_argument("--insecure", action="store_true", help="no TLS (test networks only)")
    p.add_argument("--host", default="127.0.0.1", help="address to bind (0.0.0.0: all)")
    p.add_argument("--port", type=port, default=9092, help="port devices connect to (1..65535)")
    p.add_argument(
        "--node-keys",
        type=Path,
        action="append",
        default=[],
        metavar="PATH",
        help="a device's OpenSSH public key, or a folder of *.pub; repeatable "
        "(turns on node authentication: other devices are refused)",
    )
    p.add_argument(
        "--seal-key",
        type=Path,
        help="aggregator private key from `fedpipe keys` (updates are sealed to it)",
    )
    p.add_argument("--resume", type=Path, metavar="RUN_DIR", help="continue a killed run")
    p.add_argument(
        "--init-from",
        type=Path,
        metavar="RUN_DIR",
        help="start from that run's global model (same as model.init=RUN_DIR); the run "
        "records it in lineage.json",
    )
    p.add_argument("-v", "--verbose", action="store_true")
    return p


def _public_keys(paths: list[Path]) -> tuple[Path, ...]:
    """Each --node-keys path, a folder expanded to its *.pub files. An empty folder is an
    error: it would turn node authentication off without a word."""
    keys: list[Path] = []
    for path in paths:
        found = sorted(path.glob("*.pub")) if path.is_dir() else [path]
        if not found:
            raise DeployError(
                f"--node-keys {path}: the folder holds no .pub files; put each device's "
                "`fedpipe node-key` .pub there"
            )
        keys += found
    return tuple(keys)


def _interrupt(signum: int, frame: FrameType | None) -> None:
    raise KeyboardInterrupt  # SIGTERM stops everything as Ctrl-C does


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    signal.signal(signal.SIGTERM, _interrupt)
    quiet_flower(verbose=args.verbose)
    if args.insecure:
        print(INSECURE_WARNING, file=sys.stderr)
    elif args.certs is None:
        print(
            "fedpipe-server: error: give --certs DIR (see `fedpipe certs`) or --insecure",
            file=sys.stderr,
        )
        return 2
    if args.node_keys and args.insecure:
        print("fedpipe-server: error: node authentication needs TLS", file=sys.stderr)
        return 2
    try:
        opts = CoordinatorOptions(
            host=args.host,
            port=args.port,
            certs=args.certs,
            insecure=args.insecure,
            node_keys=_public_keys(args.node_keys),
            seal_key=args.seal_key,
        )
        if args.init_from is not None and args.resume:
            raise ConfigError("--init-from starts a new run; --resume continues one: not both")
        init = [f"model.init={args.init_from.resolve()}"] if args.init_from else []
        cfg = None if args.resume else load_config(args.config, [*args.overrides, *init])
        if cfg is not None and cfg.model.init:
            load_parent(cfg.model.init)  # a bad parent fails before any process starts
        result = run_coordinator(cfg, opts, resume_dir=args.resume)
    except KeyboardInterrupt:
        print("fedpipe-server: interrupted; all processes stopped", file=sys.stderr)
        return 130
    except (ConfigError, DeployError, LineageError) as exc:
        print(f"fedpipe-server: error: {exc}", file=sys.stderr)
        return 2 if isinstance(exc, ConfigError | LineageError) else 1
    except OSError as exc:  # a missing dataset (its message says where fedpipe looked), ...
        print(f"fedpipe-server: error: {os_message(exc)}", file=sys.stderr)
        return 1
    s = result.summary
    print(
        f"done: {s['rounds']} rounds, final accuracy {s['final_accuracy']:.4f}, "
        f"{s['clients_failed']} client failures -> {result.run_dir}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
