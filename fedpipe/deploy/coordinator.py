"""`fedpipe-server`: a Flower SuperLink plus the fedpipe run submitted to it, supervised.

The coordinator writes a Flower app folder (a pyproject.toml only, so the installed
fedpipe is what runs), starts the SuperLink with its state in the run directory,
submits the run with `flwr run`, prints each round as it lands in metrics.jsonl, and
stops every process it started when the run ends, fails, or is interrupted.
Everything that can be checked (certificates, keys, the port) is checked before the run
directory exists, and a run directory whose run never got submitted is removed again, so
a failed start leaves nothing behind.
"""

from __future__ import annotations

import errno
import json
import logging
import socket
import subprocess
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import tomli_w

from fedpipe.config import ConfigError, RunConfig, config_from_toml, config_to_toml
from fedpipe.crypto.certs import check_server_files
from fedpipe.crypto.keys import load_aggregator_key
from fedpipe.crypto.nodekeys import load_node_public_key
from fedpipe.deploy.processes import Child, flower_env, last_message, wait_for_port
from fedpipe.errors import os_message, os_reason
from fedpipe.metrics import RoundRecord, progress_line
from fedpipe.progress import RoundProgress
from fedpipe.records import RUN_CONFIG_KEY
from fedpipe.rundir import (
    CONFIG_FILE,
    METRICS_FILE,
    SUMMARY_FILE,
    create_run_dir,
    discard_run_dir,
)
from fedpipe.server_app import SEAL_KEY_FILE

__all__ = ["CoordinatorOptions", "CoordinatorResult", "DeployError", "run_coordinator"]

log = logging.getLogger(__name__)

CONNECTION = "fedpipe"  # connection name in FLWR_HOME/config.toml
APP_NAME = "fedpipe-run"
STATUS_EVERY = 5.0  # seconds between `flwr ls` calls while a run is going
STATUS_SOON = 0.5  # ... and once the ServerApp has written its summary


class DeployError(RuntimeError):
    """The deployment could not start or the run failed; the message says why."""


@dataclass(frozen=True)
class CoordinatorOptions:
    host: str = "127.0.0.1"  # address the SuperLink binds (0.0.0.0 for real devices)
    port: int = 9092
    certs: Path | None = None  # folder from `fedpipe certs`; None only with insecure
    insecure: bool = False
    node_keys: tuple[Path, ...] = ()  # OpenSSH public keys of allowed devices
    seal_key: Path | None = None  # the aggregator's private key (`fedpipe keys`)
    start_timeout: float = 60.0
    # Progress lines go here; tests collect them.
    # Where progress goes: None = the live view (a bar on a terminal, lines otherwise).
    echo: Callable[[str], None] | None = None


@dataclass(frozen=True)
class CoordinatorResult:
    run_dir: Path
    run_id: int
    status: str
    summary: dict[str, Any]


def _flwr_home(run_dir: Path) -> Path:
    return run_dir / "flower"


def _write_app(home: Path) -> Path:
    """A Flower app folder with no Python files: the installed fedpipe is what runs."""
    app = home / "app"
    app.mkdir(parents=True, exist_ok=True)
    (app / "pyproject.toml").write_text(
        tomli_w.dumps(
            {
                "build-system": {"requires": ["hatchling"], "build-backend": "hatchling.build"},
                "project": {"name": APP_NAME, "version": "1.0.0", "license": "Apache-2.0"},
                "tool": {
                    "flwr": {
                        "app": {
                            "publisher": "fedpipe",
                            "components": {
                                "serverapp": "fedpipe.apps:server_app",
                                "clientapp": "fedpipe.apps:client_app",
                            },
                            # Flower rejects run-config keys an app does not declare.
                            "config": {
                                RUN_CONFIG_KEY: "",
                                "run-dir": "",
                                "resume": False,
                                SEAL_KEY_FILE: "",
                            },
                        }
                    }
                },
            }
        )
    )
    return app


def _write_connection(home: Path, opts: CoordinatorOptions) -> None:
    host = "127.0.0.1" if opts.host in ("0.0.0.0", "::") else opts.host
    conn: dict[str, Any] = {"address": f"{host}:{opts.port}"}
    if opts.insecure:
        conn["insecure"] = True
    else:
        assert opts.certs is not None
        conn["root-certificates"] = str((opts.certs / "ca.crt").resolve())
    text = tomli_w.dumps({"superlink": {"default": CONNECTION, CONNECTION: conn}})
    (home / "config.toml").write_text(text)


def _superlink_argv(run_dir: Path, opts: CoordinatorOptions) -> list[str]:
    argv = [
        "flower-superlink",
        "--database",
        str((_flwr_home(run_dir) / "superlink.db").resolve()),
        "--isolation",
        "subprocess",
        "--disable-runtime-dependency-installation",
        "--host",
        opts.host,
        "--port",
        str(opts.port),
    ]
    if opts.insecure:
        return [*argv, "--insecure"]
    assert opts.certs is not None  # _check_certs ran
    files = {name: (opts.certs / name).resolve() for name in ("server.crt", "server.key", "ca.crt")}
    argv += ["--ssl-certfile", str(files["server.crt"]), "--ssl-keyfile", str(files["server.key"])]
    argv += ["--ssl-ca-certfile", str(files["ca.crt"])]
    if opts.node_keys:
        argv.append("--enable-supernode-auth")
    return argv


def _flwr(home: Path, *args: str, timeout: float = 60.0) -> dict[str, Any]:
    """Run the `flwr` CLI with JSON output; it exits 0 even on errors, so read `success`."""
    try:
        out = subprocess.run(
            ["flwr", *args, "--format", "json"],
            env=flower_env(home),
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
        )
    except subprocess.TimeoutExpired as exc:
        raise DeployError(f"flwr {args[0]} did not answer in {timeout:.0f} s") from exc
    start = out.stdout.find("{")
    try:
        reply: dict[str, Any] = json.loads(out.stdout[start:]) if start >= 0 else {}
    except json.JSONDecodeError:
        reply = {}
    if not reply.get("success", False):
        detail = reply.get("error-message") or last_message(out.stderr or out.stdout)
        raise DeployError(f"flwr {args[0]} failed: {' '.join(str(detail).split())}")
    return reply


def _submit(
    home: Path, app: Path, cfg: RunConfig, run_dir: Path, resume: bool, seal_key: Path | None
) -> int:
    values: dict[str, Any] = {
        RUN_CONFIG_KEY: config_to_toml(cfg),
        "run-dir": str(run_dir.resolve()),
        "resume": resume,
        # The key's path, never the key: the SuperLink keeps run configs in its database.
        SEAL_KEY_FILE: str(seal_key.resolve()) if seal_key else "",
    }
    run_config = home / "run-config.toml"
    run_config.write_text(tomli_w.dumps(values))
    reply = _flwr(home, "run", str(app), CONNECTION, "--run-config", str(run_config))
    return int(reply["run-id"])


def _status(home: Path, run_id: int) -> tuple[str, str]:
    reply = _flwr(home, "ls", "--run-id", str(run_id), timeout=30.0)
    run = reply["runs"][0]
    return str(run.get("status", "")), str(run.get("status-details", ""))


def _register_nodes(home: Path, keys: tuple[Path, ...]) -> None:
    for key in keys:
        reply = _flwr(home, "supernode", "register", str(key.resolve()), CONNECTION)
        log.info("registered device key %s as node %s", key.name, reply.get("node-id"))


def _check_certs(opts: CoordinatorOptions) -> None:
    """The TLS files, checked as the SuperLink will use them (and private keys as ssh would)."""
    if opts.insecure:
        return
    if opts.certs is None:
        raise DeployError("TLS needs --certs DIR (from `fedpipe certs`), or pass --insecure")
    if not opts.certs.is_dir():
        raise DeployError(
            f"--certs {opts.certs}: no such folder; create it with "
            f"`fedpipe certs --out {opts.certs} --hosts HOST ...`"
        )
    try:
        check_server_files(opts.certs)
    except (OSError, ValueError) as exc:
        reason = os_message(exc) if isinstance(exc, OSError) else str(exc)
        raise DeployError(f"--certs {opts.certs}: {reason}") from exc


def _check_node_keys(opts: CoordinatorOptions) -> None:
    """Every device key parses as the SuperLink's registration will need it."""
    for key in opts.node_keys:
        try:
            load_node_public_key(key)
        except FileNotFoundError as exc:
            raise DeployError(
                f"--node-keys {key}: no such file; a device writes it with "
                "`fedpipe node-key --name NAME`"
            ) from exc
        except OSError as exc:
            raise DeployError(f"--node-keys {key}: {os_reason(exc)}") from exc
        except ValueError as exc:
            raise DeployError(f"--node-keys {exc}; see `fedpipe node-key`") from exc


def _check_port(opts: CoordinatorOptions) -> None:
    """Bind the port once, as the SuperLink will: taken or unbindable shows here, and not as a
    SuperLink that dies (or, worse, as another program answering on the port)."""
    try:
        family = socket.getaddrinfo(opts.host, opts.port, type=socket.SOCK_STREAM)[0][0]
        with socket.socket(family, socket.SOCK_STREAM) as sock:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as the SuperLink does
            sock.bind((opts.host, opts.port))
    except socket.gaierror as exc:
        raise DeployError(f"--host {opts.host}: cannot resolve it ({exc.strerror})") from exc
    except OSError as exc:
        if exc.errno == errno.EADDRINUSE:
            raise DeployError(
                f"port {opts.port} on {opts.host} is already in use (another fedpipe-server?); "
                "stop that program or pass another --port"
            ) from exc
        raise DeployError(
            f"cannot listen on {opts.host}:{opts.port}: {os_reason(exc)}; check --host and --port"
        ) from exc


def _check_seal_key(cfg: RunConfig, opts: CoordinatorOptions) -> None:
    """Fail before starting anything when sealing is on and the key is unusable."""
    if not cfg.security.sealed(deployed=True):
        return
    if opts.seal_key is None:
        raise DeployError(
            f"security.seal={cfg.security.seal!r} seals updates in deployment: create the "
            "aggregator key with `fedpipe keys --out keys` and pass --seal-key "
            "keys/aggregator.key (or set security.seal=off)"
        )
    try:
        load_aggregator_key(opts.seal_key)
    except (OSError, ValueError) as exc:
        reason = os_reason(exc) if isinstance(exc, OSError) else str(exc)
        raise DeployError(f"--seal-key {opts.seal_key}: {reason}") from exc


class _Progress:
    """Show each new round of metrics.jsonl: `echo` a line, or the live view's bar."""

    def __init__(
        self, path: Path, total: int, echo: Callable[[str], None] | None, view: RoundProgress
    ) -> None:
        self.path, self.total, self.echo, self.view, self.offset = path, total, echo, view, 0

    def poll(self) -> None:
        """Only the complete lines appended since the last poll are read."""
        if not self.path.exists():
            return
        with self.path.open("rb") as f:
            f.seek(self.offset)
            data = f.read()
        done = data[: data.rfind(b"\n") + 1]
        self.offset += len(done)
        for line in done.splitlines():
            rec = RoundRecord(**json.loads(line))
            if self.echo is not None:
                self.echo(progress_line(rec, self.total))
            else:
                self.view.update(rec)


def run_coordinator(
    cfg: RunConfig | None,
    opts: CoordinatorOptions,
    resume_dir: Path | None = None,
) -> CoordinatorResult:
    """Start the SuperLink, submit the run, follow it to the end, stop everything."""
    cfg = _resumed_config(resume_dir) if resume_dir is not None else cfg
    if cfg is None:
        raise ValueError("run_coordinator needs a config or a run directory to resume")
    _check_seal_key(cfg, opts)
    _check_certs(opts)
    _check_node_keys(opts)
    _check_port(opts)
    made_output_dir = not Path(cfg.output_dir).exists()
    run_dir = resume_dir or _new_run_dir(cfg)
    home = _flwr_home(run_dir)
    superlink: Child | None = None
    run_id = None
    try:
        superlink = _start_superlink(run_dir, opts)
        _register_nodes(home, opts.node_keys)
        run_id = _submit(
            home, _write_app(home), cfg, run_dir, resume_dir is not None, opts.seal_key
        )
        say = opts.echo or (lambda line: print(line, flush=True))
        say(f"run {run_id} submitted; devices connect to {opts.host}:{opts.port} -> {run_dir}")
        status, details = _follow(home, run_id, run_dir, cfg, superlink, opts.echo)
        saved = _save_serverapp_log(home, run_id, run_dir)
    finally:
        if superlink is not None:
            superlink.stop()
        if run_id is None and resume_dir is None:  # never started: leave nothing behind
            discard_run_dir(run_dir, made_output_dir)
    if status != "finished:completed":
        detail = " ".join(details.split())
        where = f"ServerApp log: {saved}" if saved else f"see {home / 'superlink.log'}"
        raise DeployError(f"run {run_id} ended {status}: {detail} ({where})")
    summary = json.loads((run_dir / SUMMARY_FILE).read_text())
    return CoordinatorResult(run_dir, run_id, status, summary)


SERVERAPP_LOG = "serverapp.log"


def _save_serverapp_log(home: Path, run_id: int, run_dir: Path) -> Path | None:
    """The ServerApp's own log (dropped replies, a failure's traceback) into the run
    directory: Flower keeps it only in the SuperLink's database, readable while it runs."""
    try:
        out = subprocess.run(
            ["flwr", "log", str(run_id), CONNECTION, "--show"],
            env=flower_env(home),
            capture_output=True,
            text=True,
            timeout=30.0,
            check=False,
        )
    except (OSError, subprocess.TimeoutExpired) as exc:
        log.warning("could not fetch the ServerApp log of run %d: %s", run_id, exc)
        return None
    path = run_dir / SERVERAPP_LOG
    path.write_text(out.stdout)
    return path


def _resumed_config(run_dir: Path) -> RunConfig:
    try:
        return config_from_toml((run_dir / CONFIG_FILE).read_text())
    except FileNotFoundError as exc:
        raise DeployError(
            f"--resume {run_dir}: no {CONFIG_FILE} there; give a run directory that "
            "fedpipe-server wrote (runs/<name>-<timestamp>)"
        ) from exc
    except (OSError, ConfigError) as exc:
        reason = os_reason(exc) if isinstance(exc, OSError) else str(exc)
        raise DeployError(f"--resume {run_dir}: cannot read its {CONFIG_FILE}: {reason}") from exc


def _new_run_dir(cfg: RunConfig) -> Path:
    try:
        return create_run_dir(cfg)
    except OSError as exc:
        where = exc.filename or cfg.output_dir
        raise DeployError(
            f"cannot create the run directory {where}: {os_reason(exc)}; "
            "set output_dir=... to a folder you can write"
        ) from exc


def _start_superlink(run_dir: Path, opts: CoordinatorOptions) -> Child:
    """The SuperLink, accepting connections; DeployError with its last log line if not."""
    home = _flwr_home(run_dir)
    home.mkdir(parents=True, exist_ok=True)
    _write_connection(home, opts)
    superlink = Child(
        "flower-superlink", _superlink_argv(run_dir, opts), flower_env(home), home / "superlink.log"
    )
    (home / "superlink.pid").write_text(f"{superlink.pid}\n")  # for operators and fault tests
    host = "127.0.0.1" if opts.host == "0.0.0.0" else opts.host
    try:
        wait_for_port(host, opts.port, opts.start_timeout, superlink)
    except (RuntimeError, TimeoutError) as exc:
        superlink.stop()
        why = superlink.last_message() or str(exc).splitlines()[0]
        raise DeployError(f"the SuperLink did not start: {why}") from exc
    return superlink


def _follow(
    home: Path,
    run_id: int,
    run_dir: Path,
    cfg: RunConfig,
    superlink: Child,
    echo: Callable[[str], None] | None,
) -> tuple[str, str]:
    """Until the run finishes. `flwr ls` starts a Python process, so it is asked every few
    seconds, or at once when the ServerApp has written its summary."""
    view = RoundProgress(cfg.federation.rounds)
    try:
        return _watch(
            home,
            run_id,
            run_dir,
            superlink,
            _Progress(run_dir / METRICS_FILE, cfg.federation.rounds, echo, view),
        )
    finally:
        view.close()


def _watch(
    home: Path, run_id: int, run_dir: Path, superlink: Child, progress: _Progress
) -> tuple[str, str]:
    last_check = time.monotonic()
    while True:
        progress.poll()
        if superlink.poll() is not None:
            raise DeployError(
                f"the SuperLink exited with code {superlink.poll()}: {superlink.last_message()} "
                f"(see {superlink.log_path})"
            )
        # Once the ServerApp has written its summary, the end is a moment away.
        every = STATUS_SOON if (run_dir / SUMMARY_FILE).exists() else STATUS_EVERY
        if time.monotonic() - last_check >= every:
            last_check = time.monotonic()
            status, details = _status(home, run_id)
            if status.startswith("finished"):
                progress.poll()
                return status, details
        time.sleep(0.25)
