"""fedpipe-client --superlink HOST:PORT --data SHARD --root-certificates CA: join a run.

Runs a Flower SuperNode for this device with its own data file and device profile; it
trains whenever the coordinator asks, until stopped (Ctrl-C) or the coordinator is gone.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from fedpipe.cli.args import Parser, address
from fedpipe.config import ConfigError
from fedpipe.deploy.device import DeviceError, DeviceOptions, run_device
from fedpipe.errors import os_reason


def _parser() -> argparse.ArgumentParser:
    p = Parser(prog="fedpipe-client", description=__doc__.splitlines()[0])
    p.add_argument(
        "--superlink", type=address, required=True, help="coordinator address, host:port"
    )
    p.add_argument(
        "--data",
        type=Path,
        help="this device's shard (.npz) for fedpipe's built-in task; omit it (and pass "
        "--client-id) when the run's task package reads the device's data itself",
    )
    tls = p.add_mutually_exclusive_group()
    tls.add_argument("--root-certificates", type=Path, help="the coordinator's CA certificate")
    tls.add_argument("--insecure", action="store_true", help="no TLS (test networks only)")
    p.add_argument("--profile", type=Path, help="device profile TOML (see clients/)")
    p.add_argument("--client-id", type=int, help="default: the id stored in the shard")
    p.add_argument("--auth-key", type=Path, help="OpenSSH private key registered as a node")
    p.add_argument(
        "--aggregator-key", type=Path, help="aggregator public key: updates are sealed to it"
    )
    p.add_argument("--pin", help="expected aggregator key fingerprint (SHA256:...)")
    p.add_argument(
        "--node-config",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="extra Flower node config (advanced; repeatable)",
    )
    p.add_argument("--state-dir", type=Path, help="Flower state folder for this device")
    p.add_argument("--max-wait", type=float, default=600.0, help="seconds to keep reconnecting")
    return p


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if args.insecure:
        print(
            "WARNING: --insecure: TLS is OFF; this device's updates cross the network in "
            "clear text.",
            file=sys.stderr,
        )
    opts = DeviceOptions(
        superlink=args.superlink,
        data=args.data,
        root_certificates=args.root_certificates,
        insecure=args.insecure,
        profile=args.profile,
        client_id=args.client_id,
        auth_key=args.auth_key,
        state_dir=args.state_dir,
        max_wait=args.max_wait,
        aggregator_key=args.aggregator_key,
        pin=args.pin,
        extra=tuple(args.node_config),
    )
    try:
        return run_device(opts)
    except KeyboardInterrupt:  # Ctrl-C while it checks or waits for the coordinator
        print("fedpipe-client: interrupted", file=sys.stderr)
        return 130
    except (ConfigError, DeviceError) as exc:
        print(f"fedpipe-client: error: {exc}", file=sys.stderr)
        return 2 if isinstance(exc, ConfigError) else 1
    except OSError as exc:  # what is left: the device's state folder cannot be written
        where = f" {exc.filename}" if exc.filename else ""
        print(
            f"fedpipe-client: error: cannot write{where}: {os_reason(exc)}; check --state-dir",
            file=sys.stderr,
        )
        return 1


if __name__ == "__main__":
    sys.exit(main())
