"""`fedpipe-client`: a Flower SuperNode on a device, with the device's own data.

Everything is checked before connecting (the data file loads, the profile is valid, the
CA file exists), so a misconfigured device fails in a second with a message, not after
a round timeout on the coordinator.
"""

from __future__ import annotations

import os
import signal
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from types import FrameType
from typing import Any

import numpy as np

from fedpipe.client_app import AGGREGATOR_KEY, DATA_PATH
from fedpipe.config import ConfigError, DataConfig, load_profile, parse_value
from fedpipe.crypto.keys import load_public_key
from fedpipe.crypto.seal import public_bytes
from fedpipe.data import load_dataset
from fedpipe.deploy.processes import Child, flower_env, free_port
from fedpipe.deploy.supernode import DEFAULT_POLL, POLL_ENV
from fedpipe.deploy.warm import SOCKET_ENV, install_shim

__all__ = ["DeviceError", "DeviceOptions", "node_config", "run_device"]

# flower-supernode's exit code for a failed connection (TLS handshake, refused auth, ...)
FLOWER_CONNECTION_FAILED = 305


class DeviceError(RuntimeError):
    """The device could not join; the message says why."""


@dataclass(frozen=True)
class DeviceOptions:
    superlink: str  # host:port of the coordinator
    data: Path  # the device's shard (.npz), or a folder holding it
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


def _client_id(opts: DeviceOptions) -> int:
    if opts.client_id is not None:
        return opts.client_id
    with np.load(opts.data) as npz:
        if "client_id" not in npz.files:
            raise DeviceError(f"{opts.data} stores no client id; pass --client-id")
        return int(npz["client_id"])


def shard_file(data: Path, client_id: int | None) -> Path:
    """--data names a shard file, or a folder holding client-<id>.npz or a single .npz."""
    if data.is_dir():
        if client_id is not None and (data / f"client-{client_id}.npz").is_file():
            return data / f"client-{client_id}.npz"
        found = sorted(data.glob("*.npz"))
        if len(found) == 1:
            return found[0]
        want = f"client-{client_id}.npz" if client_id is not None else "exactly one .npz"
        raise DeviceError(f"--data {data}: folder holds no {want} ({len(found)} .npz files)")
    if not data.is_file():
        raise DeviceError(f"--data {data}: no such file (write shards with fedpipe partition)")
    return data


def node_config(opts: DeviceOptions) -> dict[str, Any]:
    """What the ClientApp reads from context.node_config on this device."""
    data = shard_file(opts.data, opts.client_id)
    opts = replace(opts, data=data)
    try:
        ds = load_dataset(DataConfig(dataset="file", path=str(opts.data.resolve())))
    except (ValueError, OSError) as exc:
        raise DeviceError(f"--data {opts.data}: {exc}") from exc
    if len(ds.train) == 0:
        raise DeviceError(f"--data {opts.data}: the shard holds no training examples")
    settings = load_profile(opts.profile) if opts.profile else {}
    config: dict[str, Any] = {"client-id": _client_id(opts), DATA_PATH: str(opts.data.resolve())}
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
        if opts.root_certificates is None or not opts.root_certificates.is_file():
            raise DeviceError(
                "TLS needs --root-certificates CA.crt (the coordinator's `fedpipe certs` CA); "
                "--insecure turns TLS off"
            )
        argv += ["--root-certificates", str(opts.root_certificates.resolve())]
    if opts.auth_key is not None:
        if not opts.auth_key.is_file():
            raise DeviceError(f"--auth-key {opts.auth_key}: no such file")
        argv += ["--auth-supernode-private-key", str(opts.auth_key.resolve())]
    return argv


def _explain(code: int, tail: str) -> str:
    if "CERTIFICATE_VERIFY_FAILED" in tail:
        return "TLS: the coordinator's certificate is not signed by the given CA (refused)"
    if "Failed to activate SuperNode" in tail or "must be registered" in tail:
        return "the coordinator refused this device's key (not registered with it)"
    if code == FLOWER_CONNECTION_FAILED:
        return "could not connect to the coordinator"
    return f"flower-supernode exited with code {code}"


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

    def stop(signum: int, frame: FrameType | None) -> None:
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGTERM, stop)
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
        raise DeviceError(f"{_explain(code, node.tail(40))}\n--- last lines ---\n{node.tail()}")
    return 0
