"""Bounded influence and the simulated attacks, with hand-computed expectations."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import pytest
import torch
from flwr.app import Array, ArrayRecord, Message, MetricRecord
from flwr.serverapp.strategy import FedAvg
from grids import ReplyGrid

from fedpipe.attacks import Attack, attacker_ids, build_attack
from fedpipe.codec import CastCodec, Encoded
from fedpipe.config import BoundsConfig, ConfigError, FederationConfig, load_config
from fedpipe.data import Split
from fedpipe.influence import InfluenceGuard, Reference, update_norm
from fedpipe.metrics import RoundRecord
from fedpipe.records import (
    CLIENT_ID,
    ENCODE_SECONDS,
    NUM_EXAMPLES,
    TRAIN_LOSS,
    TRAIN_SECONDS,
    train_content,
)
from fedpipe.strategy import CodecStrategy, build_strategy

pytestmark = pytest.mark.usefixtures("task_identity")


def _u(*values: float) -> dict[str, np.ndarray]:
    return {"w": np.array(values, np.float32)}


# --- the guard, one reply at a time -------------------------------------------------------


def test_weight_is_capped_at_a_multiple_of_the_reference_median() -> None:
    guard = InfluenceGuard(BoundsConfig(weight_ratio=3.0, norm_ratio=0.0))
    ref = Reference(weight=100.0, norm=1.0)
    assert guard.admit(250.0, _u(1.0), 1.0, ref).weight == 250.0
    capped = guard.admit(1e6, _u(1.0), 1.0, ref)
    assert capped.weight == 300.0 and capped.capped and not capped.clipped


def test_norm_is_clipped_to_a_multiple_of_the_reference_median() -> None:
    guard = InfluenceGuard(BoundsConfig(weight_ratio=0.0, norm_ratio=2.0, norm_action="clip"))
    ref = Reference(weight=1.0, norm=5.0)
    update = _u(30.0, 40.0)  # norm 50 -> clipped to 10
    out = guard.admit(1.0, update, update_norm(update), ref)
    assert out.clipped and out.weight == 1.0
    np.testing.assert_allclose(out.update["w"], [6.0, 8.0], rtol=1e-6)
    assert update_norm(out.update) == pytest.approx(10.0)
    small = _u(3.0, 4.0)
    assert guard.admit(1.0, small, 5.0, ref).update is small  # within the bound: untouched


def test_norm_action_reject_drops_the_reply() -> None:
    guard = InfluenceGuard(BoundsConfig(norm_ratio=2.0, norm_action="reject"))
    out = guard.admit(1.0, _u(30.0, 40.0), 50.0, Reference(1.0, 5.0))
    assert out.rejected is not None and "exceeds the bound 10" in out.rejected


def test_reference_is_the_previous_rounds_median_else_the_rounds_own() -> None:
    guard = InfluenceGuard(BoundsConfig())
    first = guard.reference_for([10.0, 20.0, 1e9], [1.0, 2.0, 1e9])
    assert first == Reference(weight=20.0, norm=2.0)  # no history: this round's medians
    guard.end_round([10.0, 20.0, 1e9], [1.0, 2.0, 1e9])
    assert guard.reference_for([1e9] * 5, [1e9] * 5) == Reference(20.0, 2.0)


def test_norm_is_exact_in_float64_for_huge_float32_values() -> None:
    big = {"a": np.full(4, 3e38, np.float32)}  # squares overflow float32
    assert update_norm(big) == pytest.approx(6e38, rel=1e-6)


def test_bounds_config_is_validated() -> None:
    with pytest.raises(ConfigError, match="weight_ratio"):
        BoundsConfig(weight_ratio=0.5)
    with pytest.raises(ConfigError, match="norm_action"):
        BoundsConfig(norm_action="scale")


# --- through the strategy: poisoning no longer moves the model --------------------------


class Grid(ReplyGrid):
    def __init__(self, respond: Callable[[int], tuple[dict[str, np.ndarray], int]]) -> None:
        super().__init__(range(1, 11))
        self.answer = respond

    def exchange(self, messages: list[Message]) -> list[Message]:
        out = []
        for m in messages:
            node = m.metadata.dst_node_id
            update, n = self.answer(node)
            enc = CastCodec(np.float32).encode(update, np.random.default_rng(0))
            claims = {NUM_EXAMPLES: n, TRAIN_LOSS: 0.1, CLIENT_ID: node}
            claims |= {TRAIN_SECONDS: 1.0, ENCODE_SECONDS: 0.0}
            out.append(
                Message(train_content(Encoded(enc.arrays, {**enc.meta, **claims})), reply_to=m)
            )
        return out


def _round(
    bounds: BoundsConfig, respond: Callable[[int], tuple[dict[str, np.ndarray], int]]
) -> tuple[np.ndarray, RoundRecord]:
    records: list[RoundRecord] = []
    strategy = CodecStrategy(
        FedAvg(fraction_evaluate=0.0, min_train_nodes=1, min_available_nodes=1),
        CastCodec(np.float32),
        on_round_end=records.append,
        bounds=bounds,
    )
    result = strategy.start(
        Grid(respond),  # type: ignore[arg-type]
        ArrayRecord({"w": Array(np.zeros(2, np.float32))}),
        num_rounds=1,
        evaluate_fn=lambda rnd, arrays: MetricRecord({"accuracy": 0.5, "loss": 1.0}),
    )
    return result.arrays["w"].numpy(), records[0]


def _poisoned(node: int) -> tuple[dict[str, np.ndarray], int]:
    """Nine honest devices move w by (1, 1) with 100 examples; device 10 claims 1e6
    examples and sends +1000."""
    return (_u(1000.0, 1000.0), 10**6) if node == 10 else (_u(1.0, 1.0), 100)


def test_plain_fedavg_is_moved_by_one_device() -> None:
    w, _ = _round(BoundsConfig(weight_ratio=0.0, norm_ratio=0.0), _poisoned)
    assert w[0] > 900  # the finding: one device moved the model by ~1000


def test_default_bounds_drop_the_outlier() -> None:
    w, rec = _round(BoundsConfig(), _poisoned)
    np.testing.assert_allclose(w, [1.0, 1.0], rtol=1e-6)  # the honest mean
    assert (rec.clients_replied, rec.clients_rejected, rec.weights_capped) == (9, 1, 0)


def test_clipping_bounds_keep_one_device_to_its_share() -> None:
    w, rec = _round(BoundsConfig(norm_action="clip"), _poisoned)
    # weight capped to 3 x 100, update clipped to 2 x sqrt(2): at most (9 + 3*2)/12 = 1.25
    assert w[0] == pytest.approx((9 * 100 * 1.0 + 300 * 2.0) / 1200, rel=1e-5)
    assert (rec.weights_capped, rec.updates_clipped, rec.clients_replied) == (1, 1, 10)


def test_claims_that_would_overflow_the_total_weight_are_rejected() -> None:
    def overflow(node: int) -> tuple[dict[str, np.ndarray], int]:
        return (_u(1.0, 1.0), 10**15) if node in (9, 10) else (_u(1.0, 1.0), 100)

    w, rec = _round(BoundsConfig(weight_ratio=0.0, norm_ratio=0.0), overflow)
    np.testing.assert_allclose(w, [1.0, 1.0])  # the model is the honest mean, not zero
    assert (rec.clients_replied, rec.clients_rejected) == (8, 2)


# --- attacks ---------------------------------------------------------------------------


def test_attackers_are_the_listed_ids_or_a_seeded_draw() -> None:
    listed = load_config(None, ["simulation.attack=scale", "simulation.attackers=[1, 3]"])
    assert attacker_ids(listed) == {1, 3}
    drawn = [
        "partition.num_clients=20",
        "simulation.attack=noise",
        "simulation.attacker_fraction=0.2",
    ]
    a, b = attacker_ids(load_config(None, drawn)), attacker_ids(load_config(None, drawn))
    assert a == b and len(a) == 4 and all(0 <= c < 20 for c in a)
    assert attacker_ids(load_config(None, [*drawn, "seed=1"])) != a
    assert build_attack(load_config(None, [])) is None


def test_attack_config_needs_attackers_and_refuses_both_forms() -> None:
    with pytest.raises(ConfigError, match="needs simulation.attackers"):
        load_config(None, ["simulation.attack=scale"])
    with pytest.raises(ConfigError, match="not both"):
        load_config(None, ["simulation.attackers=[1]", "simulation.attacker_fraction=0.1"])
    with pytest.raises(ConfigError, match="attackers"):
        load_config(None, ["simulation.attack=scale", "simulation.attackers=[10]"])


def test_each_attack_does_what_its_table_says() -> None:
    u, rng = _u(1.0, -2.0), np.random.default_rng(0)
    data = Split(torch.zeros(3, 1), torch.tensor([0, 1, 9]))

    def hit(kind: str) -> tuple[dict[str, np.ndarray], int]:
        return Attack(kind, frozenset({7}), 10.0).on_update(7, u, 50, rng)

    np.testing.assert_allclose(hit("sign_flip")[0]["w"], [-10.0, 20.0])
    np.testing.assert_allclose(hit("scale")[0]["w"], [10.0, -20.0])
    assert hit("inflate") == (u, 50_000)
    noise = hit("noise")[0]["w"]
    assert noise.shape == (2,) and not np.allclose(noise, u["w"])
    flipped = Attack("label_flip", frozenset({7}), 10.0).on_data(7, data, 10)
    assert flipped.y.tolist() == [9, 8, 0]
    honest = Attack("sign_flip", frozenset({7}), 10.0)
    assert honest.on_update(3, u, 50, rng) == (u, 50) and honest.on_data(7, data, 10) is data


def test_robust_strategies_are_built_from_config() -> None:
    for name in ("krum", "multikrum", "bulyan"):
        cfg = FederationConfig(strategy=name, num_malicious=2, krum_select=3)
        strategy = build_strategy(cfg)
        assert type(strategy).__name__.lower() == name
        assert strategy.num_malicious_nodes == 2  # type: ignore[attr-defined]
    assert (
        build_strategy(FederationConfig(strategy="multikrum", krum_select=3)).num_nodes_to_select
        == 3
    )  # type: ignore[attr-defined]
