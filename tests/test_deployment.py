"""End to end on 127.0.0.1 with real processes: fedpipe-server, fedpipe-client, TLS, faults."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from fedpipe.crypto import write_certs, write_node_key
from fedpipe.crypto.keys import write_aggregator_keys
from fedpipe.deploy.processes import free_port
from fedpipe.metrics import read_metrics
from fedpipe.rundir import METRICS_FILE

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("no_leftover_processes")]

SERVER_ARGS = ["model.hidden=16", "federation.wait_for_nodes=120"]


class Deployment:
    """One coordinator and its devices, all real processes; everything is killed at the end."""

    def __init__(self, root: Path, clients: int) -> None:
        self.root, self.port = root, free_port()
        self.certs = write_certs(root / "certs", ["127.0.0.1", "localhost"])
        # Updates are sealed in deployment by default: the aggregator key pair.
        self.seal_key, self.seal_pub, self.fingerprint = write_aggregator_keys(root / "keys")
        self.shards = root / "shards"
        self.common = [f"partition.num_clients={clients}", f"output_dir='{root / 'runs'}'"]
        self._run_cli("fedpipe.cli.main", "partition", "--out", str(self.shards), *self.common)
        self.procs: list[subprocess.Popen[str]] = []

    def _run_cli(self, module: str, *args: str) -> None:
        subprocess.run([sys.executable, "-m", module, *args], check=True, capture_output=True)

    def _spawn(self, module: str, *args: str, log: str) -> subprocess.Popen[str]:
        out = (self.root / log).open("w")
        proc = subprocess.Popen(
            [sys.executable, "-m", module, *args], stdout=out, stderr=subprocess.STDOUT, text=True
        )
        self.procs.append(proc)
        return proc

    def server(
        self, *args: str, log: str = "server.log", insecure: bool = False
    ) -> subprocess.Popen[str]:
        net = ["--insecure"] if insecure else ["--certs", str(self.certs.folder)]
        net += ["--port", str(self.port), "--seal-key", str(self.seal_key)]
        return self._spawn("fedpipe.cli.server", *net, *args, log=log)

    def client(  # noqa: PLR0913
        self,
        i: int,
        ca: Path | None = None,
        log: str = "",
        key: Path | None = None,
        port: int | None = None,
        extra: tuple[str, ...] = (),
        sealed: bool = True,
        data: bool = True,  # False: the run's task reads the device's data itself
    ) -> subprocess.Popen[str]:
        auth = ["--auth-key", str(key)] if key else []
        net = (
            ["--insecure"]
            if "--insecure" in extra
            else ["--root-certificates", str(ca or self.certs.ca_cert)]
        )
        rest = [a for a in extra if a != "--insecure"]
        return self._spawn(
            "fedpipe.cli.client",
            "--superlink",
            f"127.0.0.1:{port or self.port}",
            *net,
            *(
                ["--aggregator-key", str(self.seal_pub), "--pin", self.fingerprint]
                if sealed
                else []
            ),
            *rest,
            *(
                ["--data", str(self.shards / f"client-{i}.npz")]
                if data
                else ["--client-id", str(i)]
            ),
            "--state-dir",
            str(self.root / f"device-{i}"),
            "--max-wait",
            "120",
            *auth,
            log=log or f"client-{i}.log",
        )

    def run_dir(self) -> Path:
        return next((self.root / "runs").iterdir())

    def rounds_done(self) -> int:
        dirs = list((self.root / "runs").glob("*"))
        path = dirs[0] / METRICS_FILE if dirs else None
        return len(read_metrics(path)) if path and path.exists() else 0

    def wait_rounds(self, n: int, timeout: float = 240) -> None:
        deadline = time.monotonic() + timeout
        while self.rounds_done() < n:
            if time.monotonic() > deadline:
                pytest.fail(f"round {n} not reached in {timeout} s:\n{self.log('server.log')}")
            time.sleep(0.2)

    def log(self, name: str) -> str:
        return (self.root / name).read_text()

    def close(self) -> None:
        for p in self.procs:
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)
        for p in self.procs:
            try:
                p.wait(60)
            except subprocess.TimeoutExpired:
                p.kill()
        # Whatever a killed parent could not stop (a SuperLink, a SuperNode) goes too.
        for pid_file in self.root.glob("**/*.pid"):
            with contextlib.suppress(ProcessLookupError):
                _kill_group(pid_file)


@pytest.fixture
def deployment(tmp_path: Path, request: pytest.FixtureRequest) -> Iterator[Deployment]:
    d = Deployment(tmp_path, clients=request.param)
    try:
        yield d
    finally:
        d.close()


def _kill_group(pid_file: Path) -> None:
    os.killpg(int(pid_file.read_text()), signal.SIGKILL)


@pytest.mark.parametrize("deployment", [3], indirect=True)
def test_tls_coordinator_and_three_devices_complete_a_run(deployment: Deployment) -> None:
    """...with a compressed broadcast: each device rebuilds the public model in its own
    context.state, and the restarted one, holding nothing, is sent the whole model."""
    d = deployment
    args = ["federation.rounds=3", "federation.min_nodes=3", "federation.round_timeout=30"]
    args += ["downlink.scheme=hadamard1", "downlink.chunk_size=256"]
    server = d.server(*args, *SERVER_ARGS, *d.common)
    clients = [d.client(i) for i in range(3)]
    # A device holding another CA's certificate is refused at the TLS handshake.
    other = write_certs(d.root / "other-ca", ["127.0.0.1"])
    rogue = d.client(0, ca=other.ca_cert, log="rogue.log")
    assert rogue.wait(120) == 1
    assert "not signed by the given CA" in d.log("rogue.log")
    # A device that restarts rejoins: stop device 0 after round 1, start it again.
    d.wait_rounds(1)
    clients[0].send_signal(signal.SIGTERM)
    assert clients[0].wait(60) == 130
    clients[0] = d.client(0, log="client-0-restarted.log")

    assert server.wait(300) == 0, d.log("server.log")
    run = d.run_dir()
    for name in ("config.toml", "metrics.jsonl", "summary.json", "model.pt", "checkpoint.npz"):
        assert (run / name).is_file(), name
    rounds = read_metrics(run / METRICS_FILE)
    assert [r["round"] for r in rounds] == [1, 2, 3]
    assert rounds[0]["clients_replied"] == 3 and rounds[0]["clients_failed"] == 0
    assert rounds[-1]["clients_replied"] == 3  # the restarted device is back
    assert rounds[0]["downlink_full"] == 3
    assert all(r["downlink_diff"] >= 2 for r in rounds[1:])  # those that kept running
    assert sum(r["downlink_full"] for r in rounds[1:]) >= 1  # the restarted one
    assert rounds[-1]["accuracy"] > 0.5
    assert "round   3/3" in d.log("server.log")
    assert all(c.poll() is None for c in clients)  # devices stay up for the next run
    # Closing the loop: the next run starts from this run's model. (A new SuperLink does
    # not know the old one's nodes: the devices join it afresh.)
    for c in clients:
        c.send_signal(signal.SIGTERM)
        c.wait(60)
    clients = [d.client(i, log=f"client-{i}-retrain.log") for i in range(3)]
    retrain = d.server(
        *args[:3], *SERVER_ARGS, *d.common, f"output_dir='{d.root / 'retrain'}'",
        "--init-from", str(run), log="retrain.log",
    )  # fmt: skip
    assert retrain.wait(300) == 0, d.log("retrain.log")
    child = next((d.root / "retrain").iterdir())
    lineage = json.loads((child / "lineage.json").read_text())
    assert lineage["parent"]["run_dir"] == str(run.resolve())
    assert lineage["initial_accuracy"] == rounds[-1]["accuracy"]  # it starts where run ended
    assert read_metrics(child / METRICS_FILE)[0]["accuracy"] >= rounds[-1]["accuracy"] - 0.05


@pytest.mark.parametrize("deployment", [3], indirect=True)
def test_dead_device_is_counted_and_killed_coordinator_resumes(deployment: Deployment) -> None:
    d = deployment
    args = ["federation.rounds=4", "federation.min_nodes=2", "federation.round_timeout=20"]
    server = d.server(*args, *SERVER_ARGS, *d.common)
    clients = [d.client(i) for i in range(3)]

    d.wait_rounds(1)  # round 2 is now in flight: kill device 2 (SuperNode and all)
    _kill_group(d.root / "device-2" / "supernode.pid")
    clients[2].kill()
    d.wait_rounds(2)  # then the coordinator, SuperLink and ServerApp included
    server.kill()
    _kill_group(d.run_dir() / "flower" / "superlink.pid")
    done_before = d.rounds_done()

    resumed = d.server("--resume", str(d.run_dir()), log="resume.log")
    assert resumed.wait(300) == 0, d.log("resume.log")
    rounds = read_metrics(d.run_dir() / METRICS_FILE)
    assert [r["round"] for r in rounds] == [1, 2, 3, 4]  # no gap: the round in flight re-ran
    assert done_before >= 2
    assert rounds[1]["clients_failed"] >= 1  # the dead device, after the round timeout
    assert all(r["clients_replied"] >= 2 for r in rounds)
    assert all(c.poll() is None for c in clients[:2])


@pytest.mark.parametrize("deployment", [2], indirect=True)
def test_node_authentication_admits_registered_devices_only(deployment: Deployment) -> None:
    d = deployment
    keys = d.root / "keys"
    good, good_pub = write_node_key(keys, "good")
    stranger, _ = write_node_key(keys, "stranger")
    server = d.server(
        "--node-keys",
        str(good_pub),
        "federation.rounds=1",
        "federation.min_nodes=1",
        *SERVER_ARGS,
        *d.common,
    )
    d.client(0, key=good)
    refused = d.client(1, key=stranger, log="stranger.log")
    assert refused.wait(120) == 1
    assert "refused this device's key" in d.log("stranger.log")
    assert server.wait(300) == 0, d.log("server.log")
    rounds = read_metrics(d.run_dir() / METRICS_FILE)
    assert rounds[0]["clients_replied"] == 1 and rounds[0]["clients_sampled"] == 1
    assert b"PRIVATE" not in (d.root / "server.log").read_bytes()


class Recorder:
    """A TCP relay between the devices and the SuperLink that keeps every byte it moves."""

    def __init__(self, target_port: int) -> None:
        self.target, self.data, self.lock = target_port, bytearray(), threading.Lock()
        self.server = socket.create_server(("127.0.0.1", 0))
        self.port = self.server.getsockname()[1]
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                down, _ = self.server.accept()
            except OSError:
                return
            try:
                up = socket.create_connection(("127.0.0.1", self.target))
            except OSError:  # the SuperLink is gone (between runs): refuse this device too
                down.close()
                continue
            for a, b in ((down, up), (up, down)):
                threading.Thread(target=self._pump, args=(a, b), daemon=True).start()

    def _pump(self, src: socket.socket, dst: socket.socket) -> None:
        try:
            while chunk := src.recv(65536):
                with self.lock:
                    self.data += chunk
                dst.sendall(chunk)
        except OSError:
            pass
        finally:
            with contextlib.suppress(OSError):
                dst.shutdown(socket.SHUT_WR)

    def close(self) -> None:
        self.server.close()


CANARY = [1234.5 + i / 8 for i in range(16)]  # exact in float32


@pytest.mark.parametrize("deployment", [2], indirect=True)
def test_canary_never_reaches_the_relay_in_clear(deployment: Deployment) -> None:
    """Transport without TLS (the worst case: TLS ends at an operator's relay). Sealing off
    first, as the control that shows the canary would be found; then sealing on."""
    d = deployment
    pattern = np.array(CANARY, np.float32).tobytes()
    canary = ",".join(str(v) for v in CANARY)
    seen: dict[str, tuple[bool, bool]] = {}
    for mode in ("off", "on"):
        before = set((d.root / "runs").glob("*")) if (d.root / "runs").exists() else set()
        relay = Recorder(d.port)
        server = d.server(
            f"security.seal={mode}", "federation.rounds=1", "federation.min_nodes=2",
            *SERVER_ARGS, *d.common, insecure=True, log=f"server-{mode}.log",
        )  # fmt: skip
        extra = ("--insecure", "--node-config", f'test-canary="{canary}"')
        on = mode == "on"
        clients = [
            d.client(0, port=relay.port, extra=extra, log=f"canary-{mode}.log", sealed=on),
            d.client(1, port=relay.port, extra=("--insecure",), log=f"plain-{mode}.log", sealed=on),
        ]
        assert server.wait(300) == 0, d.log(f"server-{mode}.log")
        assert "clients 2/2 ok" in d.log(f"server-{mode}.log")
        for c in clients:
            c.send_signal(signal.SIGTERM)
            c.wait(60)
        relay.close()
        (run,) = set((d.root / "runs").glob("*")) - before
        database = b"".join(p.read_bytes() for p in (run / "flower").glob("superlink.db*"))
        seen[mode] = (pattern in database, pattern in bytes(relay.data))
        if mode == "on":
            _check_canary_aggregated(d, run)
    assert seen["off"] == (True, True)  # the detector works: plain Flower would leak it
    assert seen["on"] == (False, False)  # sealed: neither the database nor the wire has it


def _check_canary_aggregated(d: Deployment, run: Path) -> None:
    """The sealed canary still reached the aggregate: FedAvg weights it by shard size."""
    from fedpipe.checkpoint import CHECKPOINT_FILE, load_checkpoint
    from fedpipe.config import DataConfig, config_from_toml
    from fedpipe.data import load_dataset
    from fedpipe.models import build_model
    from fedpipe.seed import set_seed

    cfg = config_from_toml((run / "config.toml").read_text())
    set_seed(cfg.seed)
    ds = load_dataset(cfg.data)
    start = build_model(cfg.model, ds.input_shape, ds.num_classes).state_dict()
    first = next(iter(start))
    after = load_checkpoint(run / CHECKPOINT_FILE).arrays[first].reshape(-1)[:16]
    sizes = [
        len(load_dataset(DataConfig(dataset="file", path=str(d.shards / f"client-{i}.npz"))).train)
        for i in range(2)
    ]
    moved = after - start[first].numpy().reshape(-1)[:16]
    np.testing.assert_allclose(moved, np.array(CANARY) * sizes[0] / sum(sizes), atol=0.5)


TASKS = {  # task -> (folder on every process's import path, accuracy after 3 rounds)
    "user_task.task": (Path(__file__).resolve().parent, 0.9),
    "my_task.task": (Path(__file__).resolve().parents[1] / "examples" / "my_task", 0.75),
}


@pytest.mark.parametrize("deployment", [2], indirect=True)
@pytest.mark.parametrize("task", list(TASKS))
def test_a_task_package_runs_on_real_devices(
    deployment: Deployment, task: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """tests/user_task (a task defined outside fedpipe) and examples/my_task, each on the
    import path of every process as an installed package would be: its model, data and
    loop on the devices (which have no shard: --client-id only), its test set at the
    coordinator."""
    folder, bar = TASKS[task]
    path = os.pathsep.join(filter(None, [str(folder), os.environ.get("PYTHONPATH")]))
    monkeypatch.setenv("PYTHONPATH", path)
    d = deployment
    args = ["federation.rounds=3", "federation.min_nodes=2", "federation.round_timeout=60"]
    server = d.server(*args, f"task='{task}'", *SERVER_ARGS, *d.common)
    clients = [d.client(i, data=False) for i in range(2)]
    assert server.wait(300) == 0, d.log("server.log")
    rounds = read_metrics(d.run_dir() / METRICS_FILE)
    assert [r["clients_replied"] for r in rounds] == [2, 2, 2]
    assert rounds[-1]["accuracy"] > bar
    assert all(c.poll() is None for c in clients)
