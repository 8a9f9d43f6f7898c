"""The task API: a user's task package (tests/user_task, outside fedpipe) through the
whole pipeline, and each way a task can go wrong named in its error."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
import torch

from fedpipe.config import ConfigError, load_config
from fedpipe.export import export_run
from fedpipe.metrics import read_metrics
from fedpipe.rundir import METRICS_FILE, MODEL_FILE
from fedpipe.simulation import run_simulation
from fedpipe.task import TaskContext, TaskError, load_task

BASE = [
    "partition.num_clients=4",
    'simulation.backend="inprocess"',
    "federation.rounds=5",
]


def _run(tmp_path: Path, *extra: str) -> tuple[Path, list[dict[str, object]]]:
    cfg = load_config(None, [*BASE, f"output_dir='{tmp_path}'", *extra])
    run_dir = run_simulation(cfg).run_dir
    return run_dir, read_metrics(run_dir / METRICS_FILE)


def test_a_user_task_trains_with_its_own_model_data_and_loop_then_exports(
    tmp_path: Path,
) -> None:
    """user_task.task: its own Dataset per client, its own Adam loop, its own evaluate;
    int4 + error feedback up, hadamard1 down; then fedpipe export of its model."""
    codec = ["codec.scheme='int4'", "codec.error_feedback=true", "downlink.scheme='hadamard1'"]
    run_dir, rounds = _run(tmp_path, "task='user_task.task'", *codec)
    assert all(r["clients_replied"] == 4 for r in rounds)
    assert rounds[-1]["accuracy"] > 0.9 and rounds[-1]["accuracy"] > rounds[0]["accuracy"]
    assert torch.load(run_dir / MODEL_FILE, weights_only=True)["input_shape"] == [6]
    rows = export_run(run_dir)
    fp32 = next(r for r in rows if r.artifact == "torchscript-fp32")
    assert fp32.accuracy == pytest.approx(rounds[-1]["accuracy"], abs=1e-6)


def test_each_failing_task_function_is_named_and_the_round_goes_on(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """user_task.broken: client 2's train_data raises; clients 1 and 3 build a model of
    the wrong shape. Client 0 still trains every round."""
    with caplog.at_level(logging.WARNING, logger="fedpipe.strategy"):
        _, rounds = _run(tmp_path, "task='user_task.broken'", "federation.rounds=2")
    assert [(r["clients_replied"], r["clients_failed"]) for r in rounds] == [(1, 3)] * 2
    text = caplog.text
    assert "task function user_task.broken.train_data raised FileNotFoundError" in text
    assert "no shard on this device" in text
    assert "user_task.broken.model builds a model that does not fit the global model" in text


def test_a_task_that_cannot_be_used_says_why() -> None:
    with pytest.raises(TaskError, match="cannot be imported"):
        load_task("user_task.nowhere")
    with pytest.raises(TaskError, match="has no function model or train_data"):
        load_task("user_task")  # the package itself: no task functions
    with pytest.raises(ConfigError, match="module name"):
        load_config(None, ["task='user_task/task.py'"])
    task = load_task("user_task.task")
    ctx = TaskContext(load_config(None, []), 0, {})
    model = task.model(ctx)
    with pytest.raises(TaskError, match="does not fit the global model"):
        task.load_weights(model, {"0.weight": torch.zeros(2, 2)})


def test_fedpipe_builtins_are_a_task_on_the_same_api() -> None:
    task = load_task("")
    assert task.name == "fedpipe.builtin_task"
    cfg = load_config(None, ["model.hidden=8"])
    server = TaskContext(cfg, None, {})
    model = task.model(server)
    test = task.test_data(server)
    assert test is not None and len(test) == 360  # digits' held-out fifth
    data = task.train_data(TaskContext(cfg, 3, {}))
    loss, acc = task.evaluate(model, data, server)
    assert loss > 0 and 0 <= acc <= 1
