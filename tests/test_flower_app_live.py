"""examples/flower_app under Flower's own `flwr run`: in Flower's simulation runtime,
the same app with fedpipe (int4 + error feedback) and without, same rounds and data;
and deployed, on a SuperLink with two SuperNode processes.

The SuperLink (and SuperNodes) are started here, so the test knows every process it
owns; `flwr run` builds the app's FAB from a copy of the example. Flower's runtime
dependency installation is off (everything is in this environment), and so are
telemetry and update checks.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest

from fedpipe.deploy.processes import free_port

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("no_leftover_processes")]

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "flower_app"
BIN = Path(sys.executable).parent


def _descendants(pid: int) -> list[int]:
    """Every process below `pid` (by parent pid; sessions do not matter)."""
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        children.setdefault(int(fields[1]), []).append(int(stat.parent.name))
    out, todo = [], [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            out.append(child)
            todo.append(child)
    return out


class LocalFlower:
    """A SuperLink (simulation, or with SuperNodes) in its own FLWR_HOME, and `flwr run`
    against it."""

    def __init__(self, home: Path, simulation: bool = True) -> None:
        self.home, self.port = home, free_port()
        home.mkdir(parents=True, exist_ok=True)
        self.env = {
            **os.environ,
            "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}",
            "FLWR_HOME": str(home),
            "FLWR_TELEMETRY_ENABLED": "0",
            "FLWR_DISABLE_UPDATE_CHECK": "1",
            "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1",
            "RAY_USAGE_STATS_ENABLED": "0",
        }
        (home / "config.toml").write_text(
            f'[superlink]\ndefault = "t"\n\n[superlink.t]\naddress = "127.0.0.1:{self.port}"\n'
            "insecure = true\n"
        )
        self.procs: list[subprocess.Popen[bytes]] = []
        mode = ["--simulation"] if simulation else ["--isolation", "subprocess"]
        self.superlink = self._spawn(
            "superlink",
            "flower-superlink", "--insecure", *mode, "--host", "127.0.0.1",
            "--port", str(self.port), "--disable-runtime-dependency-installation",
        )  # fmt: skip
        self._wait_healthy()

    def _spawn(self, log: str, *argv: str) -> subprocess.Popen[bytes]:
        out = (self.home / f"{log}.log").open("w")
        proc = subprocess.Popen(
            [str(BIN / argv[0]), *argv[1:]], env=self.env, stdout=out,
            stderr=subprocess.STDOUT, start_new_session=True,
        )  # fmt: skip
        out.close()
        self.procs.append(proc)
        return proc

    def supernode(self, partition: int, partitions: int) -> None:
        """A SuperNode process for one device, holding partition `partition`."""
        self._spawn(
            f"supernode-{partition}",
            "flower-supernode", "--insecure", "--superlink", f"127.0.0.1:{self.port}",
            "--node-config", f"partition-id={partition} num-partitions={partitions}",
            "--port", str(free_port()), "--isolation", "subprocess",
        )  # fmt: skip

    def _wait_healthy(self, timeout: float = 60) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{self.port}/health", timeout=2):
                    return
            except OSError:
                time.sleep(0.3)
        pytest.fail(f"SuperLink not healthy:\n{(self.home / 'superlink.log').read_text()}")

    def flwr(self, *args: str, timeout: float = 600) -> str:
        out = subprocess.run(
            [str(BIN / "flwr"), *args], env=self.env, capture_output=True, text=True,
            timeout=timeout,
        )  # fmt: skip
        return out.stdout + out.stderr

    def run(self, app: Path, run_config: str, simulation: bool = True) -> str:
        """`flwr run` to the end (--stream); fails unless the run completed."""
        sim = "num-supernodes=4 client-resources-num-cpus=1 init-args-num-cpus=2"
        federation = ["--federation-config", sim] if simulation else []
        out = self.flwr("run", str(app), "t", "--stream", *federation, "--run-config", run_config)
        found = re.search(r"Successfully started run (\d+)", out)
        assert found, out
        listing = self.flwr("ls", "t", "--run-id", found.group(1), "--format", "json")
        status = json.loads(listing[listing.index("{") :])["runs"][0]["status"]
        assert status == "finished:completed", out
        return out

    def close(self) -> None:
        owned = [pid for p in self.procs for pid in (p.pid, *_descendants(p.pid))]
        for proc in reversed(self.procs):  # SuperNodes, then the SuperLink
            proc.send_signal(signal.SIGTERM)
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(20)
        time.sleep(2)
        for pid in owned:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)


@pytest.fixture
def local_flower(tmp_path: Path, request: pytest.FixtureRequest) -> Iterator[LocalFlower]:
    flower = LocalFlower(tmp_path / "flwr-home", simulation=getattr(request, "param", True))
    try:
        yield flower
    finally:
        flower.close()


def _app(tmp_path: Path) -> Path:
    app = tmp_path / "app"
    shutil.copytree(EXAMPLE, app, ignore=shutil.ignore_patterns("__pycache__"))
    return app


def test_flwr_run_the_flower_app_with_fedpipe_matches_it_without(
    local_flower: LocalFlower, tmp_path: Path
) -> None:
    """Same app, 4 simulated SuperNodes, 10 rounds: with fedpipe's mod and wrapper (int4
    + error feedback) the replies are fedpipe-encoded (about 4.9 bits per parameter of
    this 19,210-parameter MLP) and the accuracy of its last three rounds is within 0.5 pt
    of plain Flower's."""
    app = _app(tmp_path)
    final: dict[bool, float] = {}
    for fedpipe in (True, False):
        metrics = tmp_path / f"metrics-{fedpipe}.jsonl"
        flag = str(fedpipe).lower()
        local_flower.run(app, f'num-server-rounds=10 use-fedpipe={flag} metrics-path="{metrics}"')
        rounds = [json.loads(line) for line in metrics.read_text().splitlines()]
        assert rounds[-1]["round"] == 10
        # the last three rounds: one of the 360 test digits is 0.28 pt, and two runs of
        # plain Flower differ by a digit or two (arrival order changes float sums)
        final[fedpipe] = sum(r["accuracy"] for r in rounds[-3:]) / 3
        if fedpipe:
            assert all(4.0 < r["bits_up"] < 5.0 for r in rounds if r["round"] > 0)
        else:
            assert all(r["bits_up"] is None for r in rounds)
    print(f"accuracy, rounds 8-10: with fedpipe {final[True]:.4f}, plain {final[False]:.4f}")
    assert final[False] > 0.9
    assert abs(final[True] - final[False]) <= 0.005


@pytest.mark.parametrize("local_flower", [False], indirect=True)
def test_flwr_run_deploys_the_flower_app_with_fedpipe_on_supernodes(
    local_flower: LocalFlower, tmp_path: Path
) -> None:
    """A SuperLink and two SuperNode processes: `flwr run` deploys the app, fedpipe's
    mod on each device encodes int4 with error feedback and rebuilds a hadamard1
    broadcast, and the run completes with every round's replies encoded."""
    for partition in range(2):
        local_flower.supernode(partition, 2)
    metrics = tmp_path / "metrics.jsonl"
    config = f'num-server-rounds=3 use-fedpipe=true downlink="hadamard1" metrics-path="{metrics}"'
    local_flower.run(_app(tmp_path), config, simulation=False)
    rounds = [json.loads(line) for line in metrics.read_text().splitlines()]
    assert [r["round"] for r in rounds if r["round"] > 0] == [1, 2, 3]
    assert all(4.0 < r["bits_up"] < 5.0 for r in rounds if r["round"] > 0)
    assert rounds[-1]["bits_down"] < 3 and rounds[-1]["accuracy"] > 0.8
