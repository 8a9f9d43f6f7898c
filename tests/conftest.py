"""Shared fixtures: real MNIST copied to a temporary root when the files exist."""

from __future__ import annotations

import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
from flwr.supercore.task_identity import TaskIdentity

SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
PROCESS_PATTERN = (
    "raylet|gcs_server|flower-superlink|flower-supernode|flwr-clientapp|flwr-serverapp"
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


@pytest.fixture
def task_identity() -> Iterator[None]:
    """Flower's runtime sets who is sending messages; an in-process test must do it itself."""
    TaskIdentity.run_id, TaskIdentity.task_id, TaskIdentity.node_id = 1, 1, 0
    yield
    TaskIdentity.run_id = TaskIdentity.task_id = TaskIdentity.node_id = None  # type: ignore[assignment]


def flower_processes() -> list[str]:
    """Ray/Flower processes currently running (a run must leave none behind)."""
    out = subprocess.run(["pgrep", "-fa", PROCESS_PATTERN], capture_output=True, text=True)
    return [ln for ln in out.stdout.splitlines() if "pgrep" not in ln]
