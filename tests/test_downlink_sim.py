"""Compressed broadcast through the whole stack in simulation: the strategy's sends,
the ClientApp rebuilding the model in a worker's shared store, the metrics."""

from __future__ import annotations

from pathlib import Path

from fedpipe.config import load_config
from fedpipe.metrics import read_metrics
from fedpipe.rundir import METRICS_FILE
from fedpipe.simulation import run_simulation

BASE = [
    "partition.num_clients=6",
    "federation.rounds=6",
    'simulation.backend="inprocess"',
    'codec.scheme="hadamard1"',
    "codec.error_feedback=true",
]
DOWN = ['downlink.scheme="hadamard1"', "downlink.chunk_size=256"]


def _rounds(tmp_path: Path, name: str, *extra: str) -> list[dict[str, object]]:
    cfg = load_config(None, [*BASE, f"output_dir='{tmp_path / name}'", *extra])
    return read_metrics(run_simulation(cfg).run_dir / METRICS_FILE)


def test_partial_participation_learns_like_a_float32_broadcast_at_a_fraction_of_it(
    tmp_path: Path,
) -> None:
    """Half the clients a round, and federated evaluation on another half: devices
    come back after missed rounds (catch-up chains) and no device ever fails to rebuild
    the model (a failure is an error reply: clients_failed)."""
    sample = ["federation.fraction_train=0.5", "federation.fraction_evaluate=0.5"]
    plain = _rounds(tmp_path, "plain", *sample)
    down = _rounds(tmp_path, "down", *sample, *DOWN)
    assert all(r["clients_failed"] == 0 for r in down)
    # round 1: the 3 trained devices are new; the evaluated ones are new, or got the
    # one change since they trained
    assert down[0]["downlink_full"] >= 3
    assert down[0]["downlink_full"] + down[0]["downlink_diff"] == 6  # type: ignore[operator]
    later = down[1:]
    assert sum(r["downlink_diff"] for r in later) > 0  # type: ignore[misc]
    assert sum(r["downlink_catchup"] for r in later) > 0  # type: ignore[misc]
    assert sum(r["downlink_current"] for r in later) > 0  # evaluated, then trained
    for r in down:  # 3 train + 3 evaluate messages a round, each one decision
        decisions = ("full", "diff", "catchup", "current")
        assert sum(r[f"downlink_{d}"] for d in decisions) == 6  # type: ignore[misc]
    # the last rounds' broadcasts are a fraction of the float32 one (digits MLP, 6
    # IID clients, 6 rounds: every client has been seen by then)
    assert down[-1]["bits_per_param_down"] < plain[-1]["bits_per_param_down"] / 3  # type: ignore[operator]
    assert down[-1]["accuracy"] >= plain[-1]["accuracy"] - 0.03  # type: ignore[operator]


def test_a_device_that_answers_an_error_gets_the_whole_model_next(tmp_path: Path) -> None:
    """Client 2 raises every round (before its handler runs): the server never counts
    it as holding a version, so it is sent the whole model each time; the others get
    one change a round."""
    rounds = _rounds(tmp_path, "fail", *DOWN, "simulation.fail_clients=[2]")
    for r in rounds[1:]:
        assert (r["downlink_full"], r["downlink_diff"], r["clients_failed"]) == (1, 5, 1)


def test_secure_rounds_take_the_compressed_broadcast_too(tmp_path: Path) -> None:
    """SecAgg's masked-input stage carries the broadcast like a training message; a
    masked input in the sum is the device's answer that it rebuilt the model."""
    secure = ['security.secagg="on"', 'codec.scheme="float32"', "federation.min_nodes=6"]
    rounds = _rounds(tmp_path, "secure", *DOWN, *secure, "federation.rounds=3")
    assert [r["clients_replied"] for r in rounds] == [6, 6, 6]
    assert [(r["downlink_full"], r["downlink_diff"]) for r in rounds] == [(6, 0), (0, 6), (0, 6)]
    assert rounds[-1]["accuracy"] > 0.8  # type: ignore[operator]
