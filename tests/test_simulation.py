"""End to end: the fedpipe-sim CLI on cohort workers (Ray, or in-process), for real."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from fedpipe.cli.sim import main
from fedpipe.config import load_config
from fedpipe.metrics import read_metrics
from fedpipe.rundir import CONFIG_FILE, METRICS_FILE, MODEL_FILE, PARTITION_FILE, SUMMARY_FILE
from fedpipe.simulation import offline_env, run_simulation

TINY = [
    "partition.num_clients=3",
    "federation.rounds=2",
    "model.hidden=16",
    "train.epochs=1",
    "federation.fraction_evaluate=1.0",
]
FIELDS = {
    "round",
    "accuracy",
    "loss",
    "train_loss",
    "clients_sampled",
    "clients_replied",
    "clients_failed",
    "bytes_up",
    "bytes_down",
    "seconds",
    "bits_per_param_up",
    "encode_seconds",
    "decode_seconds",
    "train_seconds",
}


def _only_run_dir(out: Path) -> Path:
    (run_dir,) = list(out.iterdir())
    return run_dir


@pytest.mark.usefixtures("no_leftover_processes")
def test_cli_runs_two_rounds_counts_a_failing_client_and_leaves_no_process(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # Client 2 raises during training every round: the rounds go on without it.
    code = main([*TINY, f"output_dir={tmp_path}", "simulation.fail_clients=[2]"])
    assert code == 0
    run_dir = _only_run_dir(tmp_path)
    for name in (CONFIG_FILE, METRICS_FILE, MODEL_FILE, SUMMARY_FILE, PARTITION_FILE):
        assert (run_dir / name).is_file(), name

    rounds = read_metrics(run_dir / METRICS_FILE)
    assert [r["round"] for r in rounds] == [1, 2]
    for r in rounds:
        assert set(r) >= FIELDS
        assert (r["clients_sampled"], r["clients_replied"], r["clients_failed"]) == (3, 2, 1)
        assert r["bytes_up"] > 0 and r["bytes_down"] > 0
        assert 32 <= r["bits_per_param_up"] < 64  # float32 plus per-message records
        assert r["train_seconds"] > 0 and r["encode_seconds"] > 0
        assert 0.0 <= r["accuracy"] <= 1.0
    summary = json.loads((run_dir / SUMMARY_FILE).read_text())
    assert summary["rounds"] == 2 and summary["final_accuracy"] == rounds[-1]["accuracy"]
    assert summary["total_bytes_up"] == sum(r["bytes_up"] for r in rounds)

    assert load_config(run_dir / CONFIG_FILE).simulation.fail_clients == (2,)
    saved = torch.load(run_dir / MODEL_FILE)
    assert saved["config"]["model"]["hidden"] == 16 and saved["input_shape"] == [1, 8, 8]
    assert json.loads((run_dir / PARTITION_FILE).read_text())["num_clients"] == 3

    stdout = capsys.readouterr().out
    assert "round   2/2" in stdout and "1 failed" in stdout


@pytest.mark.usefixtures("no_leftover_processes")
def test_same_seed_gives_same_metrics(tmp_path: Path) -> None:
    def run(sub: str, seed: int) -> list[dict[str, float]]:
        cfg = load_config(None, [*TINY, f"output_dir={tmp_path / sub}", f"seed={seed}"])
        result = run_simulation(cfg)
        keep = ("accuracy", "loss", "train_loss", "bytes_up")
        return [{k: r[k] for k in keep} for r in read_metrics(result.run_dir / METRICS_FILE)]

    first, second, other = run("a", 3), run("b", 3), run("c", 4)
    assert first == second
    assert first != other


SAMPLED = [
    "seed=7",
    "partition.num_clients=10",
    "federation.min_nodes=2",
    "federation.rounds=3",
    "federation.fraction_train=0.3",
    "model.hidden=16",
    "train.epochs=1",
]
# Everything a round records except wall-clock times, which no two runs share.
OUTCOME = {f for f in FIELDS if not f.endswith("seconds")}


def _outcome(run_dir: Path) -> list[dict[str, object]]:
    """Each round's record without its timings (any field ending in "seconds")."""
    rounds = read_metrics(run_dir / METRICS_FILE)
    out = [{k: v for k, v in r.items() if not k.endswith("seconds")} for r in rounds]
    for r in out:
        assert set(r) >= OUTCOME, sorted(r)
    return out


@pytest.mark.slow  # about 21-24 s on 2 CPUs: two Ray runs and one in-process run
@pytest.mark.usefixtures("no_leftover_processes")
def test_sampled_rounds_repeat_exactly_and_do_not_depend_on_the_backend(tmp_path: Path) -> None:
    """fraction_train=0.3 of 10 clients: the engine draws 3 client ids per round from
    (seed, round), so two runs train the same clients on the same data, and the folded
    aggregate does not depend on which worker, or in which order, the replies came from.

    Both Ray runs share one local Ray (two CPUs: two workers on any machine) that the
    test starts, which saves a Ray start and stop; run_simulation leaves it connected.
    """
    import ray

    def run(sub: str, *extra: str) -> list[dict[str, object]]:
        cfg = load_config(None, [*SAMPLED, f"output_dir={tmp_path / sub}", *extra])
        result = run_simulation(cfg)
        assert len(result.summary["workers"]) == (1 if extra else 2)
        return _outcome(result.run_dir)

    offline_env()
    ray.init(num_cpus=2, include_dashboard=False)
    try:
        first, second = run("ray-a"), run("ray-b")
        assert ray.is_initialized()  # not its Ray to stop
    finally:
        ray.shutdown()
    inprocess = run("inprocess", 'simulation.backend="inprocess"')

    assert [r["round"] for r in first] == [1, 2, 3]
    for r in first:
        assert (r["clients_sampled"], r["clients_replied"], r["clients_failed"]) == (3, 3, 0)
    assert first == second
    assert inprocess == first


def test_cli_bad_input_exits_non_zero_with_a_clear_message(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["train.lrr=0.1"]) == 2
    assert "unknown config key 'train.lrr'" in capsys.readouterr().err
    assert main(["federation.fraction_train=2"]) == 2
    assert "federation.fraction_train" in capsys.readouterr().err
    assert (
        main(
            [
                "data.dataset=fashion_mnist",
                f"data.root={tmp_path}",
                f"output_dir={tmp_path / 'runs'}",
            ]
        )
        == 1
    )
    err = capsys.readouterr().err
    assert "not found" in err and str(tmp_path) in err
    assert not (tmp_path / "runs").exists()  # failed before creating a run directory
