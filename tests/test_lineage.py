"""Warm starts (model.init / --init-from) and every run's lineage.json."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from test_resume import InProcessGrid

from fedpipe.cli.server import main as server_main
from fedpipe.cli.sim import main as sim_main
from fedpipe.config import RunConfig, load_config
from fedpipe.lineage import LINEAGE_FILE, LineageError, load_parent, model_sha256
from fedpipe.metrics import read_metrics
from fedpipe.rundir import create_run_dir
from fedpipe.server_app import run_server

pytestmark = pytest.mark.usefixtures("task_identity")


def _run(tmp_path: Path, name: str, rounds: int, *extra: str) -> tuple[Path, RunConfig]:
    cfg = load_config(
        None,
        [
            f"output_dir='{tmp_path}'",
            f"name='{name}'",
            "partition.num_clients=3",
            "federation.min_nodes=3",
            f"federation.rounds={rounds}",
            "train.epochs=1",
            *extra,
        ],
    )
    run_dir = create_run_dir(cfg)
    run_server(InProcessGrid(cfg), cfg, run_dir)  # type: ignore[arg-type]
    return run_dir, cfg


def _lineage(run_dir: Path) -> dict[str, object]:
    data: dict[str, object] = json.loads((run_dir / LINEAGE_FILE).read_text())
    return data


def test_a_warm_started_run_begins_at_its_parents_accuracy_and_records_its_lineage(
    tmp_path: Path,
) -> None:
    parent, _ = _run(tmp_path, "parent", 3)
    child, _ = _run(tmp_path, "child", 1, f"model.init='{parent}'")
    scratch, _ = _run(tmp_path, "scratch", 1)
    grandchild, _ = _run(tmp_path, "grandchild", 1, f"model.init='{child}'")
    p, c, s, g = (_lineage(d) for d in (parent, child, scratch, grandchild))
    parent_final = read_metrics(parent / "metrics.jsonl")[-1]["accuracy"]
    # It starts where the parent ended: the same weights, so the same test accuracy.
    assert c["initial_model_sha256"] == p["final_model_sha256"]
    assert c["initial_accuracy"] == parent_final
    assert s["initial_accuracy"] < parent_final - 0.3  # a fresh model is near chance
    child_first = read_metrics(child / "metrics.jsonl")[0]["accuracy"]
    scratch_first = read_metrics(scratch / "metrics.jsonl")[0]["accuracy"]
    assert child_first >= parent_final - 0.02 and child_first > scratch_first
    # Its record: the parent's run and model, and the parent's own lineage, to the root.
    assert c["parent"] == {
        "run_dir": str(parent.resolve()),
        "model_sha256": p["final_model_sha256"],
        "lineage": p,
    }
    assert g["parent"]["lineage"]["parent"]["lineage"]["run"] == parent.name  # type: ignore[index]
    assert p["parent"] is None and s["parent"] is None
    saved = torch.load(child / "model.pt", weights_only=True)["state_dict"]
    assert c["final_model_sha256"] == model_sha256(saved)
    assert c["config_sha256"] and c["partition_sha256"] is None  # no partition.json in-process
    assert c["data"]["partition"]["num_clients"] == 3  # type: ignore[index]


def test_model_hash_sees_every_bit() -> None:
    state = {"b": torch.zeros(3), "a": torch.arange(4, dtype=torch.int64)}
    same = {"a": torch.arange(4, dtype=torch.int64), "b": torch.zeros(3)}
    assert model_sha256(state) == model_sha256(same)  # order of names does not matter
    flipped = {**state, "b": torch.tensor([0.0, -0.0, 0.0])}  # one sign bit
    assert model_sha256(flipped) != model_sha256(state)
    assert model_sha256({**state, "b": torch.zeros(3, dtype=torch.float64)}) != model_sha256(state)


def test_a_bad_parent_fails_before_anything_starts(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(LineageError, match="holds no model.pt"):
        load_parent(tmp_path)
    (tmp_path / "model.pt").write_bytes(b"not a model")
    with pytest.raises(LineageError, match="cannot read"):
        load_parent(tmp_path)
    out = tmp_path / "runs"
    assert sim_main([f"model.init={tmp_path}", f"output_dir={out}"]) == 1
    assert "cannot read" in capsys.readouterr().err and not out.exists()
    assert server_main(["--insecure", "--init-from", str(tmp_path / "none")]) == 2
    assert "holds no model.pt" in capsys.readouterr().err
    assert server_main(["--insecure", "--init-from", str(tmp_path), "--resume", str(out)]) == 2
