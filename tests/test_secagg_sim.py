"""Secure aggregation through the whole stack in simulation: the ClientApp's stage
handlers, the engine's SecAgg round, the metrics; dropouts and abandoned rounds."""

from __future__ import annotations

from pathlib import Path

import pytest

from fedpipe.config import load_config
from fedpipe.metrics import read_metrics
from fedpipe.rundir import METRICS_FILE
from fedpipe.secagg.quant import modulus_bits
from fedpipe.simulation import run_simulation

BASE = [
    "partition.num_clients=6",
    "federation.rounds=3",
    "federation.min_nodes=6",
    'simulation.backend="inprocess"',
    "codec.error_feedback=true",
]
SECURE = ['security.secagg="on"', "secagg.bits=8"]


def _rounds(tmp_path: Path, name: str, *extra: str) -> list[dict[str, object]]:
    cfg = load_config(None, [*BASE, f"output_dir='{tmp_path / name}'", *extra])
    result = run_simulation(cfg)
    return read_metrics(result.run_dir / METRICS_FILE)


def test_secure_rounds_learn_like_plain_ones_at_m_bits_a_parameter(tmp_path: Path) -> None:
    plain = _rounds(tmp_path, "plain")
    secure = _rounds(tmp_path, "secure", *SECURE)
    m = modulus_bits(6, 8)  # 11 bits
    for r in secure:
        assert r["clients_replied"] == 6 and not r["secagg_abandoned"]
        assert m <= r["bits_per_param_masked"] < m + 1  # type: ignore[operator]
        assert r["bits_per_param_up"] > r["bits_per_param_masked"]  # type: ignore[operator]
    assert plain[-1]["bits_per_param_masked"] is None
    # the float32 broadcast, counted per sampled client; the key stages add to it
    assert 32 < plain[-1]["bits_per_param_down"] < 40  # type: ignore[operator]
    assert secure[-1]["bits_per_param_down"] > plain[-1]["bits_per_param_down"]  # type: ignore[operator]
    # digits MLP, 6 IID clients, 3 rounds: the quantized secure sum keeps up with float32
    assert secure[-1]["accuracy"] >= plain[-1]["accuracy"] - 0.03  # type: ignore[operator]
    assert secure[-1]["accuracy"] > secure[0]["accuracy"]  # type: ignore[operator]


def test_a_third_of_devices_failing_to_train_still_gives_a_round(tmp_path: Path) -> None:
    rounds = _rounds(tmp_path, "drop", *SECURE, "simulation.fail_clients=[1, 4]")
    for r in rounds:
        assert not r["secagg_abandoned"]
        assert (r["clients_replied"], r["secagg_dropped"]) == (4, 2)
        assert r["secagg_replies"] == [6, 6, 4, 4]  # advertise, share, masked, unmask
    assert rounds[-1]["accuracy"] > 0.8  # type: ignore[operator]


def test_below_threshold_rounds_are_abandoned_and_the_model_kept(tmp_path: Path) -> None:
    rounds = _rounds(tmp_path, "abandon", *SECURE, "simulation.fail_clients=[0, 1, 2, 3]")
    assert all(r["secagg_abandoned"] and r["clients_replied"] == 0 for r in rounds)
    assert len({r["accuracy"] for r in rounds}) == 1  # the initial model, every round


@pytest.mark.parametrize("neighbours", [2, 4])
def test_secagg_plus_graph_in_simulation(tmp_path: Path, neighbours: int) -> None:
    rounds = _rounds(tmp_path, f"k{neighbours}", *SECURE, f"secagg.neighbours={neighbours}")
    assert all(r["clients_replied"] == 6 for r in rounds)
    assert rounds[-1]["accuracy"] > 0.8  # type: ignore[operator]
