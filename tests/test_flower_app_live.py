"""examples/flower_app under Flower's own `flwr run`, in Flower's simulation runtime:
the same app with fedpipe (int4 + error feedback) and without, same rounds and data.

A SuperLink in simulation mode (started here, so the test knows every process it
owns) runs the app as a FAB built by `flwr run` from a copy of the example; Flower's
runtime dependency installation is off (everything is in this environment), and so
are telemetry and update checks.
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
    """A simulation SuperLink in its own FLWR_HOME, and `flwr run` against it."""

    def __init__(self, home: Path) -> None:
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
        self.log = (home / "superlink.log").open("w")
        self.superlink = subprocess.Popen(
            [str(BIN / "flower-superlink"), "--insecure", "--simulation", "--host", "127.0.0.1",
             "--port", str(self.port), "--disable-runtime-dependency-installation"],
            env=self.env, stdout=self.log, stderr=subprocess.STDOUT, start_new_session=True,
        )  # fmt: skip
        self._wait_healthy()

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

    def run(self, app: Path, run_config: str) -> str:
        """`flwr run` to the end (--stream); fails unless the run completed."""
        sim = "num-supernodes=4 client-resources-num-cpus=1 init-args-num-cpus=2"
        out = self.flwr(
            "run", str(app), "t", "--stream", "--federation-config", sim,
            "--run-config", run_config,
        )  # fmt: skip
        found = re.search(r"Successfully started run (\d+)", out)
        assert found, out
        listing = self.flwr("ls", "t", "--run-id", found.group(1), "--format", "json")
        status = json.loads(listing[listing.index("{") :])["runs"][0]["status"]
        assert status == "finished:completed", out
        return out

    def close(self) -> None:
        owned = [self.superlink.pid, *_descendants(self.superlink.pid)]
        self.superlink.send_signal(signal.SIGTERM)
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.superlink.wait(20)
        time.sleep(2)
        for pid in owned:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        self.log.close()


@pytest.fixture
def local_flower(tmp_path: Path) -> Iterator[LocalFlower]:
    flower = LocalFlower(tmp_path / "flwr-home")
    try:
        yield flower
    finally:
        flower.close()


def test_flwr_run_the_flower_app_with_fedpipe_matches_it_without(
    local_flower: LocalFlower, tmp_path: Path
) -> None:
    """Same app, 4 simulated SuperNodes, 10 rounds: with fedpipe's mod and wrapper (int4
    + error feedback) the replies are fedpipe-encoded (about 4.9 bits per parameter of
    this 19,210-parameter MLP) and the final accuracy is within 0.5 pt of plain Flower's."""
    app = tmp_path / "app"
    shutil.copytree(EXAMPLE, app, ignore=shutil.ignore_patterns("__pycache__"))
    final: dict[bool, float] = {}
    for fedpipe in (True, False):
        metrics = tmp_path / f"metrics-{fedpipe}.jsonl"
        flag = str(fedpipe).lower()
        local_flower.run(app, f'num-server-rounds=10 use-fedpipe={flag} metrics-path="{metrics}"')
        rounds = [json.loads(line) for line in metrics.read_text().splitlines()]
        assert rounds[-1]["round"] == 10
        final[fedpipe] = rounds[-1]["accuracy"]
        if fedpipe:
            assert all(4.0 < r["bits_up"] < 5.0 for r in rounds if r["round"] > 0)
        else:
            assert all(r["bits_up"] is None for r in rounds)
    print(f"final accuracy: with fedpipe {final[True]:.4f}, plain Flower {final[False]:.4f}")
    assert final[False] > 0.9
    assert abs(final[True] - final[False]) <= 0.005
