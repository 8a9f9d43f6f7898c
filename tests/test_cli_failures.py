"""Every command-line failure ends in one line on stderr that names the cause and the fix,
a non-zero exit code, no traceback, and nothing half-made on disk.

Most cases call the console scripts' `main(argv)` in this process (a traceback would fail
the test as an exception); one runs a real console script in a subprocess. TLS cases talk
to small ssl servers on 127.0.0.1 rather than a SuperLink (the `slow` test uses a real one).
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import ssl
import subprocess
import sys
import threading
import time
import zipfile
from collections.abc import Callable, Iterator
from dataclasses import fields
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from fedpipe.cli.client import main as client_main
from fedpipe.cli.main import main as fedpipe_main
from fedpipe.cli.server import main as server_main
from fedpipe.cli.sim import main as sim_main
from fedpipe.crypto import write_certs, write_node_key
from fedpipe.crypto.keys import write_aggregator_keys
from fedpipe.deploy import coordinator, preflight
from fedpipe.deploy.device import DeviceOptions, _explain, node_config
from fedpipe.deploy.processes import free_port, last_message
from fedpipe.simulation import RunFailed

Main = Callable[[list[str]], int]


@pytest.fixture(autouse=True)
def _keep_sigterm() -> Iterator[None]:
    """fedpipe-server's main turns SIGTERM into Ctrl-C; give pytest its own handler back."""
    previous = signal.getsignal(signal.SIGTERM)
    yield
    signal.signal(signal.SIGTERM, previous)


def one_line(text: str) -> str:
    """The single error line of `text` (stderr), after the --insecure warning if any."""
    lines = [ln for ln in text.splitlines() if not ln.startswith("WARNING: --insecure")]
    assert "Traceback" not in text
    assert len(lines) == 1, lines
    return lines[0]


def fails(main: Main, argv: list[str], capsys: pytest.CaptureFixture[str], code: int = 1) -> str:
    """Run a console script's main, which must fail with `code` and one line on stderr."""
    try:
        rc = main(argv)
    except SystemExit as exc:  # argparse's usage errors
        rc = int(exc.code or 0)
    assert rc == code
    return one_line(capsys.readouterr().err)


def shard(path: Path, **extra: Any) -> Path:
    x = np.random.default_rng(0).random((200, 64), dtype=np.float32)
    arrays: dict[str, Any] = {"x": x, "y": np.arange(200) % 10, "num_classes": 10, "client_id": 0}
    np.savez(path, **(arrays | extra))
    return path


# ---- 1. ports and addresses are checked while the arguments are read ----------------------


@pytest.mark.parametrize("port", ["99999", "0", "-1", "65536", "abc", ""])
def test_server_port_out_of_range_is_one_usage_line(
    port: str, capsys: pytest.CaptureFixture[str]
) -> None:
    line = fails(server_main, ["--insecure", "--port", port], capsys, code=2)
    assert line.startswith("fedpipe-server: error: argument --port:") and "1..65535" in line


@pytest.mark.parametrize(
    ("address", "why"),
    [
        ("coordinator", "not HOST:PORT"),
        (":9092", "not HOST:PORT"),
        ("host:", "not a number"),
        ("host:http", "not a number"),
        ("host:99999", "1..65535"),
        ("host:0", "1..65535"),
        ("::1:9092", "brackets"),
    ],
)
def test_client_superlink_must_be_host_and_port(
    address: str, why: str, capsys: pytest.CaptureFixture[str]
) -> None:
    argv = ["--superlink", address, "--insecure", "--data", "x.npz"]
    line = fails(client_main, argv, capsys, code=2)
    assert line.startswith("fedpipe-client: error: argument --superlink:") and why in line


def test_addresses_that_are_fine() -> None:
    assert preflight.split_address("10.0.0.2:9092") == ("10.0.0.2", 9092)
    assert preflight.split_address("[::1]:1") == ("::1", 1)
    assert preflight.split_address("coordinator.lan:65535") == ("coordinator.lan", 65535)


def test_the_console_script_prints_one_line_for_a_bad_port() -> None:
    out = subprocess.run(
        [sys.executable, "-m", "fedpipe.cli.server", "--port", "99999"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert out.returncode == 2
    assert "out of range (1..65535)" in one_line(out.stderr)


# ---- 2. unreadable shards ------------------------------------------------------------------


def _damage(kind: str, path: Path) -> None:
    good = shard(path.with_name("good.npz")).read_bytes()
    if kind == "empty":
        path.write_bytes(b"")
    elif kind == "truncated":
        path.write_bytes(good[: len(good) // 2])
    elif kind == "tail-cut":
        path.write_bytes(good[:-10])
    elif kind == "crc":  # one flipped byte inside x's data
        data = bytearray(good)
        data[len(good) // 3] ^= 0xFF
        path.write_bytes(bytes(data))
    elif kind == "deflate":  # compressed, with the compressed stream damaged
        np.savez_compressed(path, x=np.random.default_rng(0).random((1000, 8)), y=np.zeros(1000))
        data = bytearray(path.read_bytes())
        data[100:140] = bytes(40)
        path.write_bytes(bytes(data))
    elif kind == "text":
        path.write_text("not a shard\n")
    elif kind == "npy":
        with path.open("wb") as f:
            np.save(f, np.zeros(3))
    elif kind == "pickle":
        np.savez(path, x=np.array([object()], dtype=object), y=np.zeros(1))
    elif kind == "client-id":  # an array where the id belongs
        shard(path, client_id=np.arange(3))
    elif kind == "no-labels":
        np.savez(path, x=np.zeros((3, 4), np.float32))


@pytest.mark.parametrize(
    "kind",
    ["empty", "truncated", "tail-cut", "crc", "deflate", "text", "npy", "pickle", "client-id"]
    + ["no-labels"],
)
def test_unreadable_shard_is_one_line_naming_the_file_and_the_fix(
    kind: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    bad = tmp_path / f"{kind}.npz"
    _damage(kind, bad)
    state = tmp_path / "state"
    argv = ["--superlink", "127.0.0.1:9", "--insecure", "--data", str(bad)]
    line = fails(client_main, [*argv, "--state-dir", str(state), "--max-wait", "0"], capsys)
    assert line.startswith(f"fedpipe-client: error: --data {bad}:")
    assert "re-create it with `fedpipe partition`" in line
    assert not state.exists()


def test_the_damaged_shards_really_are_damaged(tmp_path: Path) -> None:
    """The cases above exercise numpy's and zipfile's errors, not fedpipe's own checks."""
    for kind, error in [("crc", zipfile.BadZipFile), ("truncated", zipfile.BadZipFile)]:
        _damage(kind, tmp_path / f"{kind}.npz")
        with pytest.raises(error), np.load(tmp_path / f"{kind}.npz") as npz:
            npz["x"]


@pytest.mark.parametrize(
    ("data", "why"),
    [
        ("missing.npz", "no such file or folder"),
        ("missing-dir/", "no such file or folder"),
        ("empty-dir", "holds no .npz files"),
    ],
)
def test_missing_data_is_one_line(
    data: str, why: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    (tmp_path / "empty-dir").mkdir()
    argv = ["--superlink", "127.0.0.1:9", "--insecure", "--data", str(tmp_path / data)]
    line = fails(client_main, [*argv, "--max-wait", "0"], capsys)
    assert why in line and "fedpipe partition" in line


def test_no_data_and_no_client_id_is_one_line(capsys: pytest.CaptureFixture[str]) -> None:
    """Without --data (a task package reading its own data) the device must say who it is."""
    argv = ["--superlink", "127.0.0.1:9", "--insecure", "--max-wait", "0"]
    line = fails(client_main, argv, capsys)
    assert "pass --client-id" in line


# ---- 3. files that cannot be written -------------------------------------------------------


@pytest.mark.parametrize(
    "argv",
    [
        ["keys", "--out", "{blocked}/keys"],
        ["certs", "--out", "{blocked}/certs"],
        ["node-key", "--name", "pi", "--out", "{blocked}/keys"],
        ["partition", "--out", "{blocked}/shards", "partition.num_clients=2"],
        ["keys", "--out", "{blocked}"],  # --out is an existing file
    ],
)
def test_unwritable_out_is_one_line_and_leaves_nothing(
    argv: list[str], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    blocked = tmp_path / "a-file"  # a regular file: nothing can be made under it, even by root
    blocked.write_text("")
    line = fails(fedpipe_main, [a.format(blocked=blocked) for a in argv], capsys)
    assert line.startswith(f"fedpipe {argv[0]}: error: cannot write {blocked}")
    assert "pass --out a folder you can write" in line
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a-file"]


def test_report_to_an_unwritable_out_is_one_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from fedpipe.metrics import RoundRecord

    run = tmp_path / "run"
    run.mkdir()
    record = {f.name: 0 for f in fields(RoundRecord)} | {"round": 1}
    (run / "metrics.jsonl").write_text(f"{record}\n".replace("'", '"'))
    (tmp_path / "a-file").write_text("")
    line = fails(fedpipe_main, ["report", str(run), "--out", str(tmp_path / "a-file/r")], capsys)
    assert f"cannot write {tmp_path / 'a-file'}" in line


# ---- 4. the device's pre-flight probe of the coordinator -----------------------------------


class Server:
    """A TCP server on 127.0.0.1 that hands each connection to `serve`, in a thread."""

    def __init__(self, serve: Callable[[socket.socket], None]) -> None:
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.sock.settimeout(0.1)
        self.port: int = self.sock.getsockname()[1]
        self.serve, self.stopped = serve, threading.Event()
        self.thread = threading.Thread(target=self._loop, daemon=True)
        self.thread.start()

    def _loop(self) -> None:
        while not self.stopped.is_set():
            try:
                conn, _ = self.sock.accept()
            except TimeoutError:
                continue
            with conn:
                conn.settimeout(3)
                with contextlib.suppress(OSError):  # ssl.SSLError too: the client gave up
                    self.serve(conn)

    def close(self) -> None:
        self.stopped.set()
        self.thread.join(5)
        self.sock.close()


def tls(folder: Path) -> Callable[[socket.socket], None]:
    """Serve TLS with the certificate `fedpipe certs` wrote into `folder`."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(folder / "server.crt", folder / "server.key")

    def serve(conn: socket.socket) -> None:
        with context.wrap_socket(conn, server_side=True) as t:
            t.recv(1)  # until the client closes

    return serve


def plain_http(conn: socket.socket) -> None:
    """What the SuperLink (uvicorn) does with a TLS ClientHello when it runs --insecure."""
    conn.recv(4096)
    conn.sendall(b"HTTP/1.1 400 Bad Request\r\ncontent-length: 0\r\n\r\n")


def hang_up(conn: socket.socket) -> None:
    """Accept and close at once: the probe cannot tell anything from that."""


@pytest.fixture
def serve() -> Iterator[Callable[[Callable[[socket.socket], None]], Server]]:
    servers: list[Server] = []

    def start(handler: Callable[[socket.socket], None]) -> Server:
        servers.append(Server(handler))
        return servers[-1]

    yield start
    for s in servers:
        s.close()


ServeFn = Callable[[Callable[[socket.socket], None]], Server]


def test_probe_nothing_listening() -> None:
    port = free_port()
    with pytest.raises(preflight.PreflightError) as err:
        preflight.probe(f"127.0.0.1:{port}", None, wait=0)
    assert str(err.value) == (
        f"cannot reach the coordinator at 127.0.0.1:{port}: connection refused; "
        "is fedpipe-server running there? check --superlink"
    )


def test_probe_waits_for_a_coordinator_that_starts_late() -> None:
    port = free_port()
    heard: list[str] = []

    def late() -> None:
        time.sleep(0.4)
        with socket.create_server(("127.0.0.1", port)) as s:
            s.settimeout(5)
            s.accept()[0].close()

    threading.Thread(target=late, daemon=True).start()
    preflight.probe(f"127.0.0.1:{port}", None, wait=10, notify=heard.append)
    assert len(heard) == 1 and "retrying for up to 10 s (--max-wait)" in heard[0]


def test_probe_gives_up_after_max_wait() -> None:
    start = time.monotonic()
    heard: list[str] = []
    with pytest.raises(preflight.PreflightError, match="connection refused"):
        preflight.probe(f"127.0.0.1:{free_port()}", None, wait=0.5, notify=heard.append)
    assert 0.4 < time.monotonic() - start < 3 and len(heard) == 1


def test_sigterm_while_waiting_for_the_coordinator_stops_the_device_cleanly(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    threading.Timer(0.5, os.kill, (os.getpid(), signal.SIGTERM)).start()
    argv = ["--superlink", f"127.0.0.1:{free_port()}", "--insecure", "--max-wait", "30"]
    argv += ["--data", str(shard(tmp_path / "s.npz")), "--state-dir", str(tmp_path / "st")]
    start = time.monotonic()
    line = fails(client_main, argv, capsys, code=130)
    assert line == "fedpipe-client: interrupted" and time.monotonic() - start < 5
    assert not (tmp_path / "st").exists()


def test_probe_unknown_host_name() -> None:
    with pytest.raises(preflight.PreflightError, match="cannot resolve .*check --superlink"):
        preflight.probe("no-such-host.invalid:9092", None)


def test_probe_accepts_the_right_ca(tmp_path: Path, serve: ServeFn) -> None:
    certs = write_certs(tmp_path, ["127.0.0.1"])
    server = serve(tls(tmp_path))
    preflight.probe(f"127.0.0.1:{server.port}", certs.ca_cert)


@pytest.mark.parametrize("names", [["coordinator.lan"], ["10.9.8.7", "coordinator.lan"]])
def test_probe_hostname_mismatch_names_the_certificate_s_names(
    names: list[str], tmp_path: Path, serve: ServeFn
) -> None:
    certs = write_certs(tmp_path, names)  # DNS name only (code 62) / IP address (code 64)
    server = serve(tls(tmp_path))
    with pytest.raises(preflight.PreflightError) as err:
        preflight.probe(f"127.0.0.1:{server.port}", certs.ca_cert)
    assert str(err.value) == (
        f"TLS: the coordinator's certificate is not valid for 127.0.0.1 (it lists "
        f"{', '.join(names)}); connect using a name it lists, or re-create it with "
        "`fedpipe certs --hosts 127.0.0.1 ...` on the coordinator"
    )


def test_probe_another_ca(tmp_path: Path, serve: ServeFn) -> None:
    write_certs(tmp_path / "server", ["127.0.0.1"])
    other = write_certs(tmp_path / "other", ["127.0.0.1"])
    server = serve(tls(tmp_path / "server"))
    with pytest.raises(preflight.PreflightError, match="not signed by the given CA"):
        preflight.probe(f"127.0.0.1:{server.port}", other.ca_cert)


def test_probe_tls_device_and_plain_coordinator(tmp_path: Path, serve: ServeFn) -> None:
    certs = write_certs(tmp_path, ["127.0.0.1"])
    server = serve(plain_http)
    with pytest.raises(preflight.PreflightError, match=r"does not use TLS \(started with --ins"):
        preflight.probe(f"127.0.0.1:{server.port}", certs.ca_cert)


def test_probe_insecure_device_and_tls_coordinator(tmp_path: Path, serve: ServeFn) -> None:
    write_certs(tmp_path, ["127.0.0.1"])
    server = serve(tls(tmp_path))
    with pytest.raises(preflight.PreflightError) as err:
        preflight.probe(f"127.0.0.1:{server.port}", None)
    assert str(err.value) == (
        f"the coordinator at 127.0.0.1:{server.port} uses TLS: pass --root-certificates CA.crt "
        "(the ca.crt from its `fedpipe certs` folder) instead of --insecure"
    )


def test_probe_lets_undecided_cases_through(tmp_path: Path, serve: ServeFn) -> None:
    certs = write_certs(tmp_path, ["127.0.0.1"])
    preflight.probe(f"127.0.0.1:{serve(plain_http).port}", None)  # both without TLS: fine
    hung = serve(hang_up)
    preflight.probe(f"127.0.0.1:{hung.port}", certs.ca_cert)  # the SuperNode will say
    preflight.probe(f"127.0.0.1:{hung.port}", None)


def test_client_reports_the_probe_in_one_line_and_makes_no_state(
    tmp_path: Path, serve: ServeFn, capsys: pytest.CaptureFixture[str]
) -> None:
    certs = write_certs(tmp_path / "certs", ["coordinator.lan"])
    server = serve(tls(tmp_path / "certs"))
    state = tmp_path / "state"
    argv = ["--superlink", f"127.0.0.1:{server.port}", "--root-certificates", str(certs.ca_cert)]
    argv += ["--data", str(shard(tmp_path / "s.npz")), "--state-dir", str(state)]
    line = fails(client_main, argv, capsys)
    assert line.startswith("fedpipe-client: error: TLS: the coordinator's certificate is not")
    assert "(it lists coordinator.lan)" in line
    assert not state.exists()


@pytest.mark.parametrize(
    ("content", "why"),
    [(None, "no such file; copy ca.crt"), ("not a certificate\n", "not a PEM certificate")],
)
def test_root_certificates_must_be_a_pem_file(
    content: str | None, why: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    ca = tmp_path / "ca.crt"
    if content is not None:
        ca.write_text(content)
    argv = ["--superlink", "127.0.0.1:9", "--root-certificates", str(ca)]
    line = fails(client_main, [*argv, "--data", str(shard(tmp_path / "s.npz"))], capsys)
    assert line.startswith(f"fedpipe-client: error: --root-certificates {ca}:") and why in line


# What flower-supernode logs when it stops (colour codes included), as seen on 127.0.0.1.
EXIT_305 = (
    "\x1b[91mERROR \x1b[0m:     Exit Code: 305\nFailed to initialize the connection to the "
    "SuperLink.\n{detail}\nThe SuperNode could not establish a connection to the SuperLink.\n"
    "\nFor more information, visit: <https://flower.ai/docs/framework/1.42/en/ref-exit-codes/"
    "305.html>\nINFO:     Shutting down\n"
)


@pytest.mark.parametrize(
    ("detail", "expected"),
    [
        (
            "[SSL: CERTIFICATE_VERIFY_FAILED] certificate verify failed: Hostname mismatch, "
            "certificate is not valid for 'localhost'. (_ssl.c:1006)",
            "TLS: the coordinator's certificate is not valid for localhost; connect using",
        ),
        (
            "[SSL: CERTIFICATE_VERIFY_FAILED] certificate verify failed: self-signed certificate "
            "in certificate chain (_ssl.c:1006)",
            "TLS: the coordinator's certificate at localhost:9092 is not signed by the given CA",
        ),
        (
            "[Errno 111] Connection refused",
            "could not connect to the coordinator at localhost:9092: [Errno 111] Connection",
        ),
    ],
)
def test_supernode_failures_are_explained_in_one_line(detail: str, expected: str) -> None:
    opts = DeviceOptions("localhost:9092", Path("s.npz"), root_certificates=Path("ca.crt"))
    message = _explain(305, EXIT_305.format(detail=detail), opts)
    assert message.startswith(expected) and "\n" not in message


def test_unexplained_supernode_exit_quotes_its_last_meaningful_line() -> None:
    log = (
        "\x1b[92mINFO \x1b[0m:      Starting Flower SuperNode\nTraceback (most recent call "
        'last):\n  File "x.py", line 1, in <module>\n    boom()\n    ^^^^^^\n'
        "ValueError: the node config has no key 'data-path'\nINFO:     Finished server process\n"
    )
    opts = DeviceOptions("10.0.0.2:9092", Path("s.npz"), insecure=True)
    assert _explain(1, log, opts) == (
        "flower-supernode exited with code 1: ValueError: the node config has no key 'data-path'"
    )
    assert last_message("\n\x1b[92mINFO \x1b[0m: hello\n  indented\n") == ""


# ---- 5. a coordinator that cannot start leaves no run directory ----------------------------


@pytest.fixture
def keys(tmp_path: Path) -> dict[str, Path]:
    """certs/, an aggregator key and two device keys, all as `fedpipe` writes them."""
    write_certs(tmp_path / "certs", ["127.0.0.1"])
    private, _, _ = write_aggregator_keys(tmp_path / "keys")
    _, pub = write_node_key(tmp_path / "nodes", "pi")
    return {"certs": tmp_path / "certs", "seal": private, "node": pub, "runs": tmp_path / "runs"}


def _server(
    keys: dict[str, Path], capsys: pytest.CaptureFixture[str], *args: str, code: int = 1
) -> str:
    overrides = [a for a in args if "=" in a and not a.startswith("-")]  # key=value: last
    options = [a for a in args if a not in overrides]
    argv = ["--port", str(free_port()), *options, *overrides, f"output_dir='{keys['runs']}'"]
    line = fails(server_main, argv, capsys, code=code)
    assert line.startswith("fedpipe-server: error: ")
    assert not keys["runs"].exists()  # nothing was made
    return line.removeprefix("fedpipe-server: error: ")


def test_server_refuses_a_taken_port(
    keys: dict[str, Path], capsys: pytest.CaptureFixture[str]
) -> None:
    with socket.create_server(("127.0.0.1", 0)) as taken:
        port = taken.getsockname()[1]
        line = _server(keys, capsys, "--insecure", "security.seal=off", "--port", str(port))
    assert line == (
        f"port {port} on 127.0.0.1 is already in use (another fedpipe-server?); stop that "
        "program or pass another --port"
    )


def test_server_refuses_an_address_it_cannot_bind(
    keys: dict[str, Path], capsys: pytest.CaptureFixture[str]
) -> None:
    line = _server(keys, capsys, "--insecure", "security.seal=off", "--host", "198.51.100.77")
    assert line.startswith("cannot listen on 198.51.100.77:") and "check --host" in line


def _break_certs(how: str, certs: Path, other: Path) -> None:
    if how == "no-folder":
        for p in certs.iterdir():
            p.unlink()
        certs.rmdir()
    elif how == "no-server-key":
        (certs / "server.key").unlink()
    elif how in ("server.key", "ca.key"):
        (certs / how).chmod(0o644)
    elif how == "bad-pem":
        (certs / "server.crt").write_text("junk\n")
    elif how == "other-key":
        (certs / "server.key").unlink()
        (certs / "server.key").write_bytes((other / "server.key").read_bytes())
        (certs / "server.key").chmod(0o600)


@pytest.mark.parametrize(
    ("how", "why"),
    [
        ("no-folder", "no such folder; create it with `fedpipe certs --out"),
        ("no-server-key", "holds no server.key; create them with `fedpipe certs --out"),
        ("server.key", "server.key is readable by other users (mode 644); run: chmod 600"),
        ("ca.key", "ca.key is readable by other users (mode 644); run: chmod 600"),
        ("bad-pem", "server.crt is not a PEM certificate; re-create it with `fedpipe certs`"),
        ("other-key", "server.key is not the key of"),
    ],
)
def test_server_checks_its_certificates_first(
    how: str, why: str, keys: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    _break_certs(how, keys["certs"], write_certs(tmp_path / "other", ["x"]).folder)
    line = _server(keys, capsys, "--certs", str(keys["certs"]), "security.seal=off")
    assert line.startswith(f"--certs {keys['certs']}: ") and why in line


def test_server_refuses_a_readable_seal_key(
    keys: dict[str, Path], capsys: pytest.CaptureFixture[str]
) -> None:
    keys["seal"].chmod(0o640)
    line = _server(keys, capsys, "--certs", str(keys["certs"]), "--seal-key", str(keys["seal"]))
    assert line.endswith(f"is readable by other users (mode 640); run: chmod 600 {keys['seal']}")


@pytest.mark.parametrize(
    ("node_keys", "why"),
    [
        ("empty-folder", "the folder holds no .pub files"),
        ("missing.pub", "no such file; a device writes it with `fedpipe node-key"),
        ("bad.pub", "is not an OpenSSH public key"),
    ],
)
def test_server_checks_node_keys_first(
    node_keys: str,
    why: str,
    keys: dict[str, Path],
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    (tmp_path / "empty-folder").mkdir()
    (tmp_path / "bad.pub").write_text("ssh-rsa AAAA not-a-key\n")
    args = ["--certs", str(keys["certs"]), "security.seal=off"]
    line = _server(keys, capsys, *args, "--node-keys", str(tmp_path / node_keys))
    assert line.startswith(f"--node-keys {tmp_path / node_keys}") and why in line


def test_server_resume_of_a_folder_that_is_no_run(
    keys: dict[str, Path], capsys: pytest.CaptureFixture[str]
) -> None:
    line = _server(keys, capsys, "--insecure", "--resume", str(keys["certs"]))
    assert "no config.toml there; give a run directory" in line


def test_server_output_dir_that_cannot_be_made(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    (tmp_path / "a-file").write_text("")
    argv = ["--insecure", "--port", str(free_port()), "security.seal=off"]
    line = fails(server_main, [*argv, f"output_dir='{tmp_path / 'a-file' / 'runs'}'"], capsys)
    assert "cannot create the run directory" in line and "set output_dir=" in line


class _FakeSuperLink:
    stopped = False

    def stop(self) -> None:
        self.stopped = True


@pytest.mark.parametrize("failure", [coordinator.DeployError, KeyboardInterrupt])
def test_a_start_that_fails_before_the_run_is_submitted_removes_the_run_dir(
    failure: type[BaseException], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from fedpipe.config import config_to_toml, load_config

    link = _FakeSuperLink()
    monkeypatch.setattr(coordinator, "_start_superlink", lambda run_dir, opts: link)

    def fail(*args: Any) -> None:
        raise failure("flwr supernode register failed")

    monkeypatch.setattr(coordinator, "_register_nodes", fail)
    cfg = load_config(None, [f"output_dir='{tmp_path / 'runs'}'", "security.seal=off"])
    opts = coordinator.CoordinatorOptions(port=free_port(), insecure=True)
    with pytest.raises(failure):
        coordinator.run_coordinator(cfg, opts)
    assert link.stopped and not (tmp_path / "runs").exists()  # it made runs/ too
    # ... but the folder of a run being resumed is never removed
    resumed = tmp_path / "runs" / "old"
    resumed.mkdir(parents=True)
    (resumed / "config.toml").write_text(config_to_toml(cfg))
    with pytest.raises(failure):
        coordinator.run_coordinator(None, opts, resume_dir=resumed)
    assert (resumed / "config.toml").is_file()


# ---- 5b. fedpipe-sim -----------------------------------------------------------------------


def test_sim_removes_the_run_dir_of_a_run_that_never_ran_a_round(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    import fedpipe.simulation as simulation

    def failing(cfg: Any, run_dir: Path) -> None:
        raise RunFailed(f"simulation failed: RuntimeError('no model') (run directory {run_dir})")

    monkeypatch.setattr(simulation, "_simulate", failing)
    line = fails(sim_main, [f"output_dir='{tmp_path / 'runs'}'"], capsys)
    assert line == "fedpipe-sim: error: simulation failed: RuntimeError('no model')"
    assert not (tmp_path / "runs").exists()
    (tmp_path / "runs" / "earlier-run").mkdir(parents=True)  # an output folder in use stays
    fails(sim_main, [f"output_dir='{tmp_path / 'runs'}'"], capsys)
    assert [p.name for p in (tmp_path / "runs").iterdir()] == ["earlier-run"]


def test_sim_keeps_the_run_dir_once_a_round_ran(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    import fedpipe.simulation as simulation

    def one_round_then_fail(cfg: Any, run_dir: Path) -> None:
        (run_dir / "metrics.jsonl").write_text('{"round": 1}\n')
        raise RunFailed(f"simulation failed: boom (run directory {run_dir})")

    monkeypatch.setattr(simulation, "_simulate", one_round_then_fail)
    line = fails(sim_main, [f"output_dir='{tmp_path / 'runs'}'"], capsys)
    (run,) = (tmp_path / "runs").iterdir()
    assert line.endswith(f"(run directory {run})")


def test_sim_output_dir_that_cannot_be_made(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    (tmp_path / "a-file").write_text("")
    line = fails(sim_main, [f"output_dir='{tmp_path / 'a-file' / 'runs'}'"], capsys)
    assert "cannot create the run directory" in line and "set output_dir=" in line


# ---- 6. private keys other users can read are refused --------------------------------------


@pytest.mark.parametrize(
    ("setup", "why"),
    [
        ("readable", "is readable by other users (mode 644); run: chmod 600"),
        ("missing", "no such file; create one with `fedpipe node-key --name NAME`"),
        ("not-a-key", "is not an OpenSSH private key"),
    ],
)
def test_client_auth_key_is_checked_like_ssh_does(
    setup: str, why: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    key, _ = write_node_key(tmp_path, "pi")
    if setup == "readable":
        key.chmod(0o644)
    elif setup == "missing":
        key.unlink()
    else:
        key.write_text("-----BEGIN NOTHING-----\n")
    argv = ["--superlink", "127.0.0.1:9", "--insecure", "--auth-key", str(key)]
    line = fails(client_main, [*argv, "--data", str(shard(tmp_path / "s.npz"))], capsys)
    assert line.startswith(f"fedpipe-client: error: --auth-key {key}") and why in line


def test_node_config_still_reads_a_good_shard(tmp_path: Path) -> None:
    config = node_config(DeviceOptions("127.0.0.1:9", shard(tmp_path / "s.npz")))
    assert config["client-id"] == 0


# ---- a real coordinator ----------------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.usefixtures("no_leftover_processes")
def test_probe_against_a_real_tls_superlink(tmp_path: Path) -> None:
    certs = write_certs(tmp_path / "certs", ["127.0.0.1"])
    port = free_port()
    argv = [sys.executable, "-m", "fedpipe.cli.server", "--certs", str(certs.folder)]
    argv += ["--port", str(port), "security.seal=off", "federation.wait_for_nodes=60"]
    server = subprocess.Popen(
        [*argv, f"output_dir='{tmp_path / 'runs'}'"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        preflight.probe(f"127.0.0.1:{port}", certs.ca_cert, wait=60)  # up, and TLS is right
        with pytest.raises(preflight.PreflightError, match="not valid for localhost"):
            preflight.probe(f"localhost:{port}", certs.ca_cert)
        with pytest.raises(preflight.PreflightError, match="uses TLS"):
            preflight.probe(f"127.0.0.1:{port}", None)
        assert server.poll() is None  # the probes did not disturb it
    finally:
        server.send_signal(signal.SIGTERM)
        assert server.wait(60) == 130
