"""fedpipe <command>: the tools around a run (certificates, device shards, ...).

Each subcommand is a thin layer over a library function a user can also call from Python.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from pathlib import Path

from fedpipe.cli.args import Parser, port
from fedpipe.config import ConfigError, load_config
from fedpipe.crypto import write_certs, write_node_key
from fedpipe.crypto.keys import write_aggregator_keys
from fedpipe.data import (
    label_histograms,
    load_dataset,
    partition_indices,
    write_shards,
)
from fedpipe.errors import os_reason
from fedpipe.serve import ServeConfig

Handler = Callable[[argparse.Namespace], int]
RELEASE_REFUSED = 3  # exit status of an export the release gate refused


def _certs(args: argparse.Namespace) -> int:
    paths = write_certs(Path(args.out), args.hosts, force=args.force)
    print(f"CA certificate   {paths.ca_cert}  (give this to every device)")
    print(f"CA private key   {paths.ca_key}  (0600; keep it off the coordinator if you can)")
    print(f"server cert+key  {paths.server_cert}, {paths.server_key} (0600)")
    print(f"valid for: {', '.join(args.hosts)}")
    return 0


def _node_key(args: argparse.Namespace) -> int:
    private, public = write_node_key(Path(args.out), args.name, force=args.force)
    print(f"device private key {private} (0600; stays on the device: fedpipe-client --auth-key)")
    print(f"device public key  {public} (to the coordinator: fedpipe-server --node-keys)")
    return 0


def _keys(args: argparse.Namespace) -> int:
    private, public, fp = write_aggregator_keys(Path(args.out), force=args.force)
    print(f"aggregator private key {private} (0600; coordinator only: fedpipe-server --seal-key)")
    print(f"aggregator public key  {public} (to every device: fedpipe-client --aggregator-key)")
    print(f"fingerprint            {fp} (devices pin it: fedpipe-client --pin)")
    return 0


def _report(args: argparse.Namespace) -> int:
    from fedpipe.report import write_report

    out = Path(args.out) if args.out else None
    print(write_report([Path(d) for d in args.runs], out, force=args.force))
    return 0


def _export(args: argparse.Namespace) -> int:
    from fedpipe.export import ReleaseRefused, export_run, markdown_table

    try:
        rows = export_run(
            Path(args.run),
            force=args.force,
            threads=args.threads,
            overrides=args.overrides,
            ignore_gate=args.ignore_gate,
        )
    except ReleaseRefused as exc:
        print(f"fedpipe export: refused: {exc}", file=sys.stderr)
        return RELEASE_REFUSED
    print(markdown_table(rows), end="")
    print(f"-> {Path(args.run) / 'export'}")
    return 0


def _serve(args: argparse.Namespace) -> int:
    from fedpipe.serve import serve

    fields = ServeConfig.__dataclass_fields__
    serve(Path(args.run), ServeConfig(**{k: v for k, v in vars(args).items() if k in fields}))
    return 0


def _partition(args: argparse.Namespace) -> int:
    cfg = load_config(args.config, args.overrides)
    paths = write_shards(cfg.data, cfg.partition, cfg.seed, Path(args.out), force=args.force)
    parts = partition_indices(cfg.data, cfg.partition, cfg.seed)
    ds = load_dataset(cfg.data)
    hists = label_histograms(ds.train.y.numpy(), list(parts), ds.num_classes)
    for path, idx, hist in zip(paths, parts, hists, strict=True):
        print(f"{path}  {len(idx):>6} examples  labels {hist}")
    return 0


def _parser() -> argparse.ArgumentParser:
    p = Parser(prog="fedpipe", description=__doc__.splitlines()[0])
    sub = p.add_subparsers(dest="command", required=True)

    c = sub.add_parser("certs", help="create a CA and a TLS server certificate")
    c.add_argument("--out", default="certs", help="folder for ca.crt, ca.key, server.*")
    c.add_argument(
        "--hosts",
        nargs="+",
        default=["127.0.0.1", "localhost"],
        help="host names and IP addresses devices use to reach the coordinator",
    )
    c.add_argument("--force", action="store_true", help="replace existing files")
    c.set_defaults(handler=_certs)

    a = sub.add_parser("keys", help="create the aggregator's key pair for sealed updates")
    a.add_argument("--out", default="keys", help="folder for aggregator.key / aggregator.pub")
    a.add_argument("--force", action="store_true", help="replace existing files")
    a.set_defaults(handler=_keys)

    k = sub.add_parser("node-key", help="create a device key for node authentication")
    k.add_argument("--out", default="keys", help="folder for <name>.key and <name>.pub")
    k.add_argument("--name", required=True, help="device name, e.g. pi-kitchen")
    k.add_argument("--force", action="store_true", help="replace existing files")
    k.set_defaults(handler=_node_key)

    r = sub.add_parser("report", help="plots and an HTML page for one or more runs")
    r.add_argument("runs", nargs="+", metavar="RUN_DIR", help="several runs are overlaid")
    r.add_argument("--out", help="output folder (default: <first run>/report)")
    r.add_argument("--force", action="store_true", help="overwrite an existing report")
    r.set_defaults(handler=_report)

    e = sub.add_parser(
        "export", help="TorchScript float32, int8 and pruned models, gated, checked and timed"
    )
    e.add_argument("run", metavar="RUN_DIR")
    e.add_argument(
        "overrides",
        nargs="*",
        metavar="key=value",
        help="over the run's own config, e.g. release.min_accuracy=0.98 export.prune_amount=0.8",
    )
    e.add_argument(
        "--ignore-gate",
        action="store_true",
        help="export a model below the release bar anyway (release.json records it)",
    )
    e.add_argument("--threads", type=int, default=1, help="CPU threads for the timings")
    e.add_argument("--force", action="store_true", help="overwrite <run>/export")
    e.set_defaults(handler=_export)

    _serve_parser(sub)

    s = sub.add_parser("partition", help="write one shard file per device from a dataset")
    s.add_argument("--config", help="run config naming data and partition")
    s.add_argument("--out", required=True, help="folder for client-<i>.npz")
    s.add_argument("--force", action="store_true", help="overwrite existing shard files")
    s.add_argument("overrides", nargs="*", metavar="key=value")
    s.set_defaults(handler=_partition)
    return p


def _serve_parser(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    d = ServeConfig()
    v = sub.add_parser("serve", help="an HTTP inference service for an exported model")
    v.add_argument("run", metavar="RUN_DIR", help="a run exported with `fedpipe export`")
    v.add_argument("--host", default=d.host)
    v.add_argument("--port", type=port, default=d.port)
    v.add_argument("--artifact", default=d.artifact, help="name in export.json (or fp32, int8)")
    v.add_argument(
        "--max-batch", type=int, default=d.max_batch, help="examples per model call; 1: no batching"
    )
    v.add_argument(
        "--max-wait-ms", type=float, default=d.max_wait_ms,
        help="how long a batch may wait to fill",
    )  # fmt: skip
    v.add_argument("--max-queue", type=int, default=d.max_queue, help="examples queued before 503")
    v.add_argument("--max-body-bytes", type=int, default=d.max_body_bytes, help="else 413")
    v.add_argument("--max-inputs", type=int, default=d.max_inputs, help="per request, else 413")
    v.add_argument(
        "--max-connections", type=int, default=d.max_connections, help="open at once, else 503"
    )
    v.add_argument("--threads", type=int, default=d.threads, help="torch intra-op threads")
    v.add_argument("--drift-window", type=int, default=d.drift_window, help="examples")
    v.add_argument("--drift-threshold", type=float, default=d.drift_threshold, help="PSI")
    v.add_argument(
        "--drift-min-examples", type=int, default=d.drift_min_examples,
        help="seen before drift is scored",
    )  # fmt: skip
    v.set_defaults(handler=_serve)


def _destination(args: argparse.Namespace) -> Path:
    """The folder a command writes into."""
    if args.command == "export":
        return Path(args.run) / "export"
    if args.command == "report" and not args.out:
        return Path(args.runs[0]) / "report"
    return Path(args.out)


def _within(path: Path, folder: Path) -> bool:
    """`path` is the folder, inside it, or one of the folders it is to be made in."""
    path, folder = path.absolute(), folder.absolute()
    return path == folder or path in folder.parents or folder in path.parents


def _os_error(exc: OSError, args: argparse.Namespace) -> str:
    """One line: which file could not be written (or read) and why."""
    if exc.filename is None:  # fedpipe's own message (an existing file, a readable key)
        return str(exc)
    path, out = Path(exc.filename), _destination(args)
    if not _within(path, out):
        return f"cannot read {path}: {os_reason(exc)}"
    fix = "pass --out a folder you can write" if "out" in args else f"make {out.parent} writable"
    return f"cannot write {path}: {os_reason(exc)}; {fix}"


def _parse(argv: list[str] | None) -> argparse.Namespace:
    """argparse, plus ``key=value`` overrides after an option (`export RUN --force a=1`):
    argparse stops filling a positional list once an option follows the positional
    before it, and would reject them."""
    parser = _parser()
    args, extra = parser.parse_known_args(argv)
    if extra and "overrides" in args and all("=" in e and not e.startswith("-") for e in extra):
        args.overrides = [*args.overrides, *extra]
    elif extra:
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    return args


def main(argv: list[str] | None = None) -> int:
    args = _parse(argv)
    handler: Handler = args.handler
    try:
        return handler(args)
    except OSError as exc:  # a missing dataset, an existing file, an unwritable --out, ...
        print(f"fedpipe {args.command}: error: {_os_error(exc, args)}", file=sys.stderr)
        return 1
    except (ConfigError, ValueError, RuntimeError) as exc:
        print(f"fedpipe {args.command}: error: {exc}", file=sys.stderr)
        return 2 if isinstance(exc, ConfigError) else 1


if __name__ == "__main__":
    sys.exit(main())
