"""Warm ClientApp processes: fork each `flwr-clientapp` from a process that is ready.

Flower 1.42 starts a fresh `flwr-clientapp` process for every message a device gets.
With a PyTorch ClientApp that is 2-3 s of imports per round on a small CPU, before any
training (measured in benchmarks/deployment.py), more than the training itself.

fedpipe keeps Flower's process model and swaps only the start-up: a zygote process
imports torch, Flower's ClientApp runtime and fedpipe once, then forks one child per task.
A shim named `flwr-clientapp`, first on the SuperNode's PATH, hands its argv, environment
and stdio to the zygote, relays signals to the forked child and exits with its code.
The child then runs Flower's own `flwr_clientapp()` entry point unchanged. If the zygote
is not there, the shim runs Flower's real `flwr-clientapp` instead (a cold start).
"""

from __future__ import annotations

import json
import os
import signal
import socket
import sys
import threading
import traceback
from pathlib import Path

__all__ = ["SOCKET_ENV", "install_shim", "serve"]

SOCKET_ENV = "FEDPIPE_WARM_SOCKET"

_SHIM = """#!{python}
# fedpipe's flwr-clientapp shim (see fedpipe/deploy/warm.py); generated, do not edit.
import json, os, signal, socket, sys
real = {real!r}
try:
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.connect(os.environ[{env!r}])
except (KeyError, OSError):
    os.execv(real, [real, *sys.argv[1:]])
request = {{"argv": ["flwr-clientapp", *sys.argv[1:]], "env": dict(os.environ), "cwd": os.getcwd()}}
socket.send_fds(s, [json.dumps(request).encode() + b"\\n"], [0, 1, 2])
replies = s.makefile()
pid = int(replies.readline())
for sig in (signal.SIGTERM, signal.SIGINT):
    signal.signal(sig, lambda signum, frame: os.kill(pid, signum))
line = replies.readline()
sys.exit(int(line) if line.strip() else 1)
"""


def install_shim(bin_dir: Path) -> Path:
    """Write the `flwr-clientapp` shim into `bin_dir` (to go first on the SuperNode's PATH)."""
    real = Path(sys.executable).parent / "flwr-clientapp"
    bin_dir.mkdir(parents=True, exist_ok=True)
    shim = bin_dir / "flwr-clientapp"
    shim.write_text(_SHIM.format(python=sys.executable, real=str(real), env=SOCKET_ENV))
    shim.chmod(0o755)
    return shim


def _recv_request(conn: socket.socket) -> tuple[dict[str, object], list[int]]:
    data, fds, _flags, _addr = socket.recv_fds(conn, 1 << 20, 3)
    while not data.endswith(b"\n"):
        more = conn.recv(1 << 20)
        if not more:
            break
        data += more
    return json.loads(data), list(fds)


def _run_child(request: dict[str, object], fds: list[int]) -> int:
    """In the forked child: become the `flwr-clientapp` process the shim stands for."""
    from flwr.supernode.cli.flwr_clientapp import flwr_clientapp

    for target, fd in enumerate(fds):
        os.dup2(fd, target)
        os.close(fd)
    env, argv = request["env"], request["argv"]
    assert isinstance(env, dict) and isinstance(argv, list)
    os.chdir(str(request["cwd"]))
    os.environ.clear()
    os.environ.update({str(k): str(v) for k, v in env.items()})
    sys.argv = [str(a) for a in argv]
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        flwr_clientapp()
        return 0
    except SystemExit as exc:
        return exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
    except BaseException:
        traceback.print_exc()
        return 1
    finally:
        sys.stdout.flush()
        sys.stderr.flush()


def _report_exit(pid: int, conn: socket.socket) -> None:
    _, status = os.waitpid(pid, 0)
    try:
        conn.sendall(f"{os.waitstatus_to_exitcode(status)}\n".encode())
    finally:
        conn.close()


def serve(socket_path: Path) -> None:
    """The zygote: import once, then fork a ClientApp process per shim connection."""
    import torch  # noqa: F401 - the point: imported before forking
    from flwr.supernode.cli import flwr_clientapp  # noqa: F401

    import fedpipe.apps  # noqa: F401

    socket_path.unlink(missing_ok=True)
    server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    server.bind(str(socket_path))
    os.chmod(socket_path, 0o600)  # only this user may ask for a ClientApp process
    server.listen(64)
    print(f"warm ClientApp zygote ready on {socket_path}", flush=True)
    while True:
        conn, _ = server.accept()
        try:
            request, fds = _recv_request(conn)
        except (OSError, ValueError) as exc:
            print(f"bad shim request: {exc}", file=sys.stderr, flush=True)
            conn.close()
            continue
        sys.stdout.flush()
        sys.stderr.flush()
        pid = os.fork()
        if pid == 0:  # child
            server.close()
            conn.close()
            os._exit(_run_child(request, fds))
        for fd in fds:
            os.close(fd)
        conn.sendall(f"{pid}\n".encode())
        threading.Thread(target=_report_exit, args=(pid, conn), daemon=True).start()


if __name__ == "__main__":
    serve(Path(sys.argv[1]))
