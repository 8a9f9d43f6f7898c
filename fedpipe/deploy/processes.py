"""Child processes fedpipe starts and must stop: Flower's SuperLink and SuperNode.

Each child gets its own process group, so stopping it also stops what it spawned
(Flower's SuperExec, ServerApp and ClientApp processes), and every wait is bounded.
"""

from __future__ import annotations

import ctypes
import os
import re
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import IO

__all__ = ["Child", "flower_env", "free_port", "last_message", "wait_for_port"]

PR_SET_PDEATHSIG = 1  # prctl option, <linux/prctl.h>
_ANSI = re.compile(r"\x1b\[[0-9;]*m")
# Log lines that never explain a failure: progress chatter, pointers, traceback scaffolding.
_NOISE = re.compile(r"^(INFO|DEBUG)\b|^For more information|^Traceback \(|^[\^~]+$")
OFFLINE_ENV = {"FLWR_TELEMETRY_ENABLED": "0", "FLWR_DISABLE_UPDATE_CHECK": "1"}


def flower_env(flwr_home: Path, extra: Mapping[str, str] | None = None) -> dict[str, str]:
    """Environment for Flower processes: offline, our own FLWR_HOME, this venv's tools.

    Flower starts `flower-superexec`, `flwr-serverapp` and `flwr-clientapp` by name, so the
    folder of the running interpreter goes first on PATH.
    """
    env = dict(os.environ)
    env.update(OFFLINE_ENV)
    env["FLWR_HOME"] = str(flwr_home)
    env["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "")])
    env["PYTHONUNBUFFERED"] = "1"
    env.update(extra or {})
    return env


def last_message(log: str) -> str:
    """The last line of a Flower log that says something: what a one-line error quotes.
    Colour codes, INFO chatter and traceback frames (indented) are skipped, so a crash
    ends up as its exception line."""
    for raw in reversed(_ANSI.sub("", log).splitlines()):
        line = " ".join(raw.split())
        if line and not raw[:1].isspace() and not _NOISE.match(line):
            return line
    return ""


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


def wait_for_port(host: str, port: int, timeout: float, child: Child | None = None) -> None:
    """Until something accepts connections on host:port; fails early if `child` died."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if child is not None and child.poll() is not None:
            raise RuntimeError(f"{child.name} exited with code {child.poll()}:\n{child.tail()}")
        try:
            with socket.create_connection((host, port), timeout=0.5):
                return
        except OSError:
            time.sleep(0.1)
    raise TimeoutError(f"nothing listens on {host}:{port} after {timeout:.0f} s")


class Child:
    """A supervised child process with its output in a log file."""

    def __init__(
        self, name: str, argv: Sequence[str], env: Mapping[str, str], log_path: Path
    ) -> None:
        self.name, self.log_path = name, log_path
        log_path.parent.mkdir(parents=True, exist_ok=True)
        self._log: IO[bytes] = log_path.open("ab")
        self.proc = subprocess.Popen(
            list(argv),
            env=dict(env),
            stdout=self._log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            start_new_session=True,  # its own process group: we stop its children too
            preexec_fn=_die_with_parent,
        )

    @property
    def pid(self) -> int:
        return self.proc.pid

    def poll(self) -> int | None:
        return self.proc.poll()

    def tail(self, lines: int = 15) -> str:
        text = self.log_path.read_text(errors="replace") if self.log_path.exists() else ""
        return "\n".join(text.splitlines()[-lines:])

    def last_message(self) -> str:
        text = self.log_path.read_text(errors="replace") if self.log_path.exists() else ""
        return last_message(text)

    def wait(self, timeout: float | None = None) -> int:
        return self.proc.wait(timeout)

    def stop(self, grace: float = 10.0) -> int | None:
        """SIGTERM the whole group, SIGKILL what is left after `grace` seconds."""
        for sig, wait in ((signal.SIGTERM, grace), (signal.SIGKILL, 5.0)):
            try:
                os.killpg(self.proc.pid, sig)
            except ProcessLookupError:
                break
            deadline = time.monotonic() + wait
            while time.monotonic() < deadline and _group_alive(self.proc.pid):
                self.proc.poll()
                time.sleep(0.05)
            if not _group_alive(self.proc.pid):
                break
        self._log.close()
        return self.proc.poll()


def _die_with_parent() -> None:
    """In the child: get SIGTERM if fedpipe dies, even by SIGKILL (Linux; no-op elsewhere).

    The child has its own session, so without this a killed fedpipe-client would leave its
    SuperNode (and zygote) running with nobody to stop them.
    """
    if sys.platform.startswith("linux"):
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(PR_SET_PDEATHSIG, signal.SIGTERM)


def _group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    # A zombie leader still "exists" until reaped; the group is alive only if any member runs.
    return _any_running(pgid)


def _any_running(pgid: int) -> bool:
    proc = Path("/proc")
    if not proc.exists():
        return True
    for entry in proc.iterdir():
        if not entry.name.isdigit():
            continue
        try:
            fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        state, group = fields[0], int(fields[2])
        if group == pgid and state != "Z":
            return True
    return False
