"""The examples run as their READMEs say (their packages put on the import path as
`pip install -e` would)."""

from __future__ import annotations

from pathlib import Path

import pytest

from fedpipe.config import load_config
from fedpipe.metrics import read_metrics
from fedpipe.rundir import METRICS_FILE
from fedpipe.simulation import run_simulation

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"


def test_my_task_trains_its_own_cnn_with_its_own_augmentation(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """examples/my_task: digits, a small CNN and random shifts, int4 + error feedback;
    5 clients, 6 rounds of 2 local epochs (float32: 0.917 after the same rounds)."""
    monkeypatch.syspath_prepend(str(EXAMPLES / "my_task"))
    overrides = [
        "task=my_task.task",
        "partition.num_clients=5",
        "federation.rounds=6",
        "train.epochs=2",
        "codec.scheme=int4",
        "codec.error_feedback=true",
        'simulation.backend="inprocess"',
        f"output_dir='{tmp_path}'",
    ]
    rounds = read_metrics(run_simulation(load_config(None, overrides)).run_dir / METRICS_FILE)
    assert all(r["clients_failed"] == 0 for r in rounds)
    assert rounds[-1]["accuracy"] > 0.9
    # int4 plus headers and claims: about 10 bits on this 2,730-parameter model
    assert rounds[-1]["bits_per_param_up"] < 12  # type: ignore[operator]
