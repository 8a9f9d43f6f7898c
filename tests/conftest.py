"""Shared fixtures: real MNIST copied to a temporary root when the files exist."""

from __future__ import annotations

import shutil
import subprocess
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

import pytest
from flwr.supercore.task_identity import TaskIdentity

SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
PROCESS_PATTERN = (
    "raylet|gcs_server|flower-superlink|flower-supernode|flower-superexec|flwr-clientapp"
    "|flwr-serverapp|fedpipe.deploy.supernode|fedpipe.deploy.warm"
)


@pytest.fixture(scope="session")
def mnist_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A writable root holding MNIST/raw/*.gz; skips when the verified files are absent."""
    src = SHARED_DATA / "MNIST" / "raw"
    if not any(src.glob("*.gz")):
        pytest.skip(f"MNIST .gz files not found in {src}")
    root = tmp_path_factory.mktemp("data")
    dst = root / "MNIST" / "raw"
    dst.mkdir(parents=True)
    for f in src.glob("*.gz"):
        shutil.copyfile(f, dst / f.name)
    return root


RunFactory = Callable[[Sequence[str]], Path]


@pytest.fixture(scope="session")
def finished_run(tmp_path_factory: pytest.TempPathFactory) -> RunFactory:
    """Makes runs of 3 real in-process rounds on the digits data (default MLP, 3 clients),
    with extra ``key=value`` overrides."""
    from test_resume import InProcessGrid

    from fedpipe.config import load_config
    from fedpipe.rundir import create_run_dir
    from fedpipe.server_app import run_server

    def make(overrides: Sequence[str]) -> Path:
        TaskIdentity.run_id, TaskIdentity.task_id, TaskIdentity.node_id = 1, 1, 0
        out = tmp_path_factory.mktemp("run")
        base = ["partition.num_clients=3", "federation.rounds=3", "federation.min_nodes=3"]
        cfg = load_config(None, [f"output_dir='{out}'", *base, *overrides])
        run_dir = create_run_dir(cfg)
        run_server(InProcessGrid(cfg), cfg, run_dir)  # type: ignore[arg-type]
        return run_dir

    return make


@pytest.fixture(scope="session")
def digits_run(finished_run: RunFactory) -> Path:
    """One finished float32 MLP run with federated evaluation on devices' held-out fifth,
    shared by the report and export tests (read-only: a test that writes into it takes a
    private_copy)."""
    return finished_run(["federation.fraction_evaluate=1.0", "partition.holdout=0.2"])


@pytest.fixture
def private_copy(tmp_path: Path) -> Callable[[Path], Path]:
    """Copies a shared run into this test's folder (without another test's export or
    report), for a test that writes into it."""

    def copy(run: Path) -> Path:
        ignore = shutil.ignore_patterns("export", "report")
        return Path(shutil.copytree(run, tmp_path / run.name, ignore=ignore))

    return copy


@pytest.fixture
def task_identity() -> Iterator[None]:
    """Flower's runtime sets who is sending messages; an in-process test must do it itself."""
    TaskIdentity.run_id, TaskIdentity.task_id, TaskIdentity.node_id = 1, 1, 0
    yield
    TaskIdentity.run_id = TaskIdentity.task_id = TaskIdentity.node_id = None  # type: ignore[assignment]


def flower_processes() -> dict[int, str]:
    """Ray/Flower processes currently running, by PID."""
    out = subprocess.run(["pgrep", "-fa", PROCESS_PATTERN], capture_output=True, text=True)
    procs = (ln.split(" ", 1) for ln in out.stdout.splitlines() if "pgrep" not in ln)
    return {int(pid): cmd for pid, cmd in procs}


@pytest.fixture
def no_leftover_processes() -> Iterator[None]:
    """Fail if the test leaves a Ray/Flower process behind that was not running before."""
    before = set(flower_processes())
    yield
    for _ in range(20):  # Ray reaps its workers asynchronously after shutdown
        left = {p: c for p, c in flower_processes().items() if p not in before}
        if not left:
            return
        time.sleep(0.5)
    pytest.fail(f"processes left behind: {left}")
