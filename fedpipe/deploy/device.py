"""`fedpipe-client`: a Flower SuperNode on a device, with the device's own data.

Everything is checked before connecting (the data file loads, the profile is valid, the
CA file is a certificate, the node key is private and parses) and the coordinator is
probed (`fedpipe.deploy.preflight`), so a misconfigured device fails in a second with one
line that says what to fix, not after a round timeout on the coordinator.
"""

from __future__ import annotations

import os
import signal
import sys
import time
import zipfile
import zlib
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from types import FrameType
from typing import Any

import numpy as np
from cryptography import x509

from fedpipe.client_app import AGGREGATOR_KEY, DATA_PATH
from fedpipe.config import ConfigError, DataConfig, load_profile, parse_value
from fedpipe.crypto.keys import load_public_key
from fedpipe.crypto.nodekeys import load_node_private_key
from fedpipe.crypto.seal import public_bytes
from fedpipe.data import load_dataset
from fedpipe.deploy import preflight
from fedpipe.deploy.processes import Child, flower_env, free_port, last_message
from fedpipe.deploy.supernode import DEFAULT_POLL, POLL_ENV
from fedpipe.deploy.warm import SOCKET_ENV, install_shim
from fedpipe.errors import os_reason

__all__ = ["DeviceError", "DeviceOptions", "node_config", "run_device"]

# flower-supernode's exit code for a failed connection (TLS handshake, refused auth, ...)
FLOWER_CONNECTION_FAILED = 305
ZIP_MAGIC = b"PK\x03\x04"
# What numpy and zipfile raise on a damaged .npz: truncated, CRC or deflate errors, an
# empty file, a pickle, a bare .npy, an array of the wrong shape where a number belongs.
UNREADABLE_SHARD = (
    EOFError,
    ValueError,
    KeyError,
    TypeError,
    AttributeError,
    zipfile.BadZipFile,
    zlib.error,
)


class DeviceError(RuntimeError):
    """The device could not join; the message says why."""


@dataclass(frozen=True)
class DeviceOptions:
    superlink: str  # host:port of the coordinator
    # the device's shard (.npz) or a folder holding it, for fedpipe's built-in task;
    # None: the run's task reads the device's data itself (then client_id is needed)
    data: Path | None
    root_certificates: Path | None = None  # the coordinator's CA certificate (pinned)
    insecure: bool = False
    profile: Path | None = None
    client_id: int | None = None  # default: the id stored in the shard file
    auth_key: Path | None = None  # OpenSSH private key registered on the coordinator
    state_dir: Path | None = None  # Flower's FLWR_HOME for this device
    max_wait: float = 600.0  # give up reconnecting after this many seconds
    poll_seconds: float = DEFAULT_POLL  # idle poll of the coordinator (Flower's own: 3 s)
    aggregator_key: Path | None = None  # public key updates are sealed to
    pin: str | None = None  # its expected fingerprint
    extra: tuple[str, ...] = ()  # more node config, "key=value" (TOML literal values)
    warm: bool = True  # fork ClientApp processes from a pre-imported zygote (fedpipe.deploy.warm)
    echo: Callable[[str], None] = field(default=lambda line: print(line, flush=True))
    probe_timeout: float = 3.0  # seconds for each step of the pre-flight probe


def _stored_client_id(path: Path) -> int:
    with np.load(path) as npz:
        if "client_id" not in npz.files:
            raise DeviceError(f"--data {path} stores no client id; pass --client-id")
        return int(npz["client_id"])


def _check_zip(path: Path) -> None:
    """An .npz is a zip file; anything else (empty, text, a bare .npy) is said so plainly."""
    with path.open("rb") as f:
        head = f.read(4)
    if head != ZIP_MAGIC:
        raise ValueError("an empty file" if not head else "not an .npz (zip) file")


def _load_shard(path: Path, client_id: int | None) -> int:
    """Read the shard as the ClientApp will, and its client id: a damaged file fails here,
    with the fix, and not as a traceback in a ClientApp process in the middle of a round."""
    try:
        _check_zip(path)
        ds = load_dataset(DataConfig(dataset="file", path=str(path.resolve())))
        cid = client_id if client_id is not None else _stored_client_id(path)
    except OSError as exc:
        raise DeviceError(f"--data {path}: cannot read it: {os_reason(exc)}") from exc
    except UNREADABLE_SHARD as exc:
        detail = _describe(exc, path)
        raise DeviceError(
            f"--data {path}: not a readable shard ({detail}); re-create it with `fedpipe partition`"
        ) from exc
    if len(ds.train) == 0:
        raise DeviceError(f"--data {path}: the shard holds no training examples")
    return cid


def _describe(exc: Exception, path: Path) -> str:
    text = str(exc).replace(f"{path.resolve()}: ", "")
    if isinstance(exc, zlib.error):
        return f"damaged compressed data: {text}"
    return text if isinstance(exc, ValueError) else f"{type(exc).__name__}: {text}"


def shard_file(data: Path, client_id: int | None) -> Path:
    """--data names a shard file, or a folder holding client-<id>.npz or a single .npz."""
    if data.is_dir():
        if client_id is not None and (data / f"client-{client_id}.npz").is_file():
            return data / f"client-{client_id}.npz"
        found = sorted(data.glob("*.npz"))
        if len(found) == 1:
            return found[0]
        raise DeviceError(f"--data {data}: {_folder_problem(len(found), client_id)}")
    if not data.is_file():
        raise DeviceError(
            f"--data {data}: no such file or folder; write device shards with "
            "`fedpipe partition --out DIR` and pass one of them"
        )
    return data


def _folder_problem(count: int, client_id: int | None) -> str:
    if count == 0:
        return "the folder holds no .npz files; write device shards with `fedpipe partition`"
    if client_id is not None:
        return (
            f"the folder holds no client-{client_id}.npz ({count} other .npz files); check "
            "--client-id, or pass the shard file itself"
        )
    return (
        f"the folder holds {count} .npz files, not exactly one: pass this device's shard "
        "file, or --client-id N to pick client-N.npz"
    )


def node_config(opts: DeviceOptions) -> dict[str, Any]:
    """What the ClientApp reads from context.node_config on this device."""
    config: dict[str, Any]
    if opts.data is None:  # a task package's own data: only who this device is
        if opts.client_id is None:
            raise DeviceError("without --data (a task that reads its own data), pass --client-id")
        config = {"client-id": opts.client_id}
    else:
        data = shard_file(opts.data, opts.client_id)
        config = {"client-id": _load_shard(data, opts.client_id), DATA_PATH: str(data.resolve())}
    settings = load_profile(opts.profile) if opts.profile else {}
    config.update(settings)
    if opts.aggregator_key is not None:
        try:
            key = load_public_key(opts.aggregator_key, opts.pin)
        except ValueError as exc:  # KeyMismatch included: stop before connecting
            raise DeviceError(str(exc)) from exc
        config[AGGREGATOR_KEY] = public_bytes(key).hex()
    elif opts.pin is not None:
        raise DeviceError("--pin needs --aggregator-key (the key file to check against it)")
    for item in opts.extra:
        name, sep, raw = item.partition("=")
        if not sep or not name:
            raise DeviceError(f"--node-config {item!r} must look like key=value")
        config[name.strip()] = parse_value(raw.strip())
    return config


def _format(config: dict[str, Any]) -> str:
    def literal(v: Any) -> str:
        if isinstance(v, bool):
            return "true" if v else "false"
        if isinstance(v, str):
            if '"' in v:
                raise ConfigError(f"node config value {v!r} may not contain a double quote")
            return f'"{v}"'
        return str(v)

    return " ".join(f"{k}={literal(v)}" for k, v in config.items())


def _argv(opts: DeviceOptions, config: dict[str, Any]) -> list[str]:
    # Flower's flower-supernode, run through fedpipe's entry point for a prompter poll.
    argv = [sys.executable, "-m", "fedpipe.deploy.supernode", "--superlink", opts.superlink]
    argv += ["--node-config", _format(config)]
    # Each SuperNode serves its ClientApp processes on a local port; several devices may
    # share one machine in tests, so take a free one.
    argv += ["--port", str(free_port()), "--isolation", "subprocess"]
    argv += ["--max-wait-time", str(opts.max_wait)]
    if opts.insecure:
        argv.append("--insecure")
    else:
        argv += ["--root-certificates", str(_check_ca(opts.root_certificates).resolve())]
    if opts.auth_key is not None:
        _check_auth_key(opts.auth_key)
        argv += ["--auth-supernode-private-key", str(opts.auth_key.resolve())]
    return argv


def _check_ca(path: Path | None) -> Path:
    """The CA file must hold a PEM certificate: Flower would report a wrong file only as a
    failed connection, after --max-wait seconds."""
    if path is None:
        raise DeviceError(
            "TLS needs --root-certificates CA.crt (the coordinator's `fedpipe certs` CA); "
            "--insecure turns TLS off"
        )
    try:
        x509.load_pem_x509_certificates(path.read_bytes())
    except FileNotFoundError as exc:
        raise DeviceError(
            f"--root-certificates {path}: no such file; copy ca.crt from the coordinator's "
            "`fedpipe certs` folder"
        ) from exc
    except OSError as exc:
        raise DeviceError(f"--root-certificates {path}: cannot read it: {os_reason(exc)}") from exc
    except ValueError as exc:
        raise DeviceError(
            f"--root-certificates {path}: not a PEM certificate; use the ca.crt that "
            "`fedpipe certs` wrote on the coordinator"
        ) from exc
    return path


def _check_auth_key(path: Path) -> None:
    """A node key others can read is refused, as ssh refuses one."""
    try:
        load_node_private_key(path)
    except FileNotFoundError as exc:
        raise DeviceError(
            f"--auth-key {path}: no such file; create one with `fedpipe node-key --name NAME`"
        ) from exc
    except OSError as exc:
        raise DeviceError(f"--auth-key {path}: {os_reason(exc)}") from exc
    except ValueError as exc:
        raise DeviceError(
            f"--auth-key {exc}; create one with `fedpipe node-key --name NAME`"
        ) from exc


def _interrupt(signum: int, frame: FrameType | None) -> None:
    raise KeyboardInterrupt  # SIGTERM stops the device as Ctrl-C does


def _probe(opts: DeviceOptions) -> None:
    """The pre-flight probe; it may wait up to --max-wait, so SIGTERM ends it as Ctrl-C."""
    previous = signal.signal(signal.SIGTERM, _interrupt)
    try:
        preflight.probe(
            opts.superlink,
            None if opts.insecure else opts.root_certificates,
            wait=opts.max_wait,
            timeout=opts.probe_timeout,
            notify=opts.echo,
        )
    except preflight.PreflightError as exc:
        raise DeviceError(str(exc)) from exc
    except ValueError as exc:  # an address the command line did not check (Python API)
        raise DeviceError(f"--superlink {exc}") from exc
    finally:
        signal.signal(signal.SIGTERM, previous)


def _explain(code: int, log: str, opts: DeviceOptions) -> str:
    """One line for a SuperNode that stopped: the probe passed, so this is what it met later
    (or what the probe could not tell), read from Flower's log."""
    host, port = preflight.split_address(opts.superlink)
    if "Hostname mismatch" in log or "IP address mismatch" in log:
        return preflight.hostname_mismatch(host, [])
    if "CERTIFICATE_VERIFY_FAILED" in log and opts.root_certificates is not None:
        return preflight.untrusted(host, port, opts.root_certificates)
    if "WRONG_VERSION_NUMBER" in log:
        return preflight.not_tls(host, port)
    if "Failed to activate SuperNode" in log or "must be registered" in log:
        return "the coordinator refused this device's key (not registered with it)"
    if "Unable to parse the private key file" in log:
        return f"--auth-key {opts.auth_key}: Flower cannot parse it (see `fedpipe node-key`)"
    detail = last_message(_after_exit_code(log)) or last_message(log)
    if code == FLOWER_CONNECTION_FAILED:
        return f"could not connect to the coordinator at {host}:{port}: {detail}"
    return f"flower-supernode exited with code {code}: {detail or 'no message in its log'}"


def _after_exit_code(log: str) -> str:
    """Flower's exit report is `Exit Code: N`, its reason, then boilerplate; the reason."""
    _, found, report = log.rpartition("Exit Code:")
    lines = report.splitlines()[1:] if found else []
    keep = [ln for ln in lines if not ln.startswith(("The SuperNode could not", "For more"))]
    return "\n".join(keep)


def _start_zygote(state: Path, env: dict[str, str]) -> Child | None:
    """The warm-start zygote, ready before the SuperNode can ask for a ClientApp."""
    install_shim(state / "bin")
    sock = state / "warm.sock"
    sock.unlink(missing_ok=True)
    argv = [sys.executable, "-m", "fedpipe.deploy.warm", str(sock)]
    zygote = Child("fedpipe-warm", argv, env, state / "warm.log")
    deadline = time.monotonic() + 60
    while not sock.exists():
        if zygote.poll() is not None or time.monotonic() > deadline:
            zygote.stop()
            return None  # the shim then starts Flower's own flwr-clientapp (cold)
        time.sleep(0.05)
    return zygote


def run_device(opts: DeviceOptions) -> int:
    """Run the SuperNode until it exits or this process is told to stop; its exit code."""
    config = node_config(opts)
    argv = _argv(opts, config)
    _probe(opts)  # before any file or process is made
    state = opts.state_dir or Path.home() / ".cache" / "fedpipe" / f"device-{config['client-id']}"
    state.mkdir(parents=True, exist_ok=True)
    env = flower_env(state, {POLL_ENV: str(opts.poll_seconds)})
    zygote = _start_zygote(state, env) if opts.warm else None
    if zygote is not None:
        env["PATH"] = os.pathsep.join([str(state / "bin"), env["PATH"]])
        env[SOCKET_ENV] = str(state / "warm.sock")
    node = Child("flower-supernode", argv, env, state / "supernode.log")
    (state / "supernode.pid").write_text(f"{node.pid}\n")  # for operators (and fault tests)
    opts.echo(f"device {config['client-id']} joining {opts.superlink} (log: {node.log_path})")
    previous = signal.signal(signal.SIGTERM, _interrupt)
    try:
        while (code := node.poll()) is None:
            time.sleep(0.2)
    except KeyboardInterrupt:
        node.stop()
        return 130
    finally:
        signal.signal(signal.SIGTERM, previous)
        node.stop()
        if zygote is not None:
            zygote.stop()
    if code != 0:
        raise DeviceError(f"{_explain(code, node.tail(200), opts)} (log: {node.log_path})")
    return 0
