"""The round engine: exact streaming sums, reproducible samples, the bounds reference."""

from __future__ import annotations

import math
import random
import time

import numpy as np
import pytest
from flwr.app import (
    Array,
    ArrayRecord,
    ConfigRecord,
    Context,
    Message,
    MetricRecord,
    RecordDict,
)
from flwr.serverapp.strategy import FedAvg, FedAvgM
from grids import ReplyGrid
from hypothesis import given, settings
from hypothesis import strategies as st

from fedpipe.boundary import decode_identity
from fedpipe.client_app import make_client_app
from fedpipe.codec import CastCodec, Encoded
from fedpipe.config import BoundsConfig, RunConfig
from fedpipe.grid import NotEnoughNodes
from fedpipe.influence import Reference, ReferenceGate
from fedpipe.metrics import RoundRecord
from fedpipe.records import (
    CLIENT_ID,
    ENCODE_SECONDS,
    IDENTIFY,
    IDENTITY,
    NUM_EXAMPLES,
    TRAIN_LOSS,
    TRAIN_SECONDS,
    train_content,
)
from fedpipe.rounds.accumulate import ExactSum, OutOfRange, scale_bits
from fedpipe.rounds.engine import RoundPlan
from fedpipe.rounds.sampling import sample_nodes, sample_size
from fedpipe.rounds.stage import run_stage
from fedpipe.strategy import CodecStrategy

pytestmark = pytest.mark.usefixtures("task_identity")

# --- the exact sum ---------------------------------------------------------------------


def _updates(n: int, seed: int) -> list[dict[str, np.ndarray]]:
    rng = np.random.default_rng(seed)
    return [
        {
            "w": rng.normal(0, 0.05, (40, 7)).astype(np.float32),
            "b": rng.normal(0, 1e-4, 7).astype(np.float32),
            "n": np.array(rng.normal(), np.float32),  # 0-d, like BatchNorm's counters
        }
        for _ in range(n)
    ]


@settings(max_examples=25, deadline=None)
@given(st.integers(0, 2**32 - 1), st.integers(2, 40))
def test_exact_sum_is_bit_identical_in_any_order(seed: int, n: int) -> None:
    ups = _updates(n, seed)
    factors = [float(f) for f in np.random.default_rng(seed).uniform(0, 1, n)]
    order = list(range(n))
    totals = []
    for _ in range(3):
        s = ExactSum(ups[0], n, 8.0)
        for i in order:
            s.add(ups[i], factors[i])
        totals.append(s.total())
        random.Random(seed).shuffle(order)
    for t in totals[1:]:
        assert all(np.array_equal(t[k], totals[0][k]) for k in t)
    ref = {
        k: sum(np.float64(f) * u[k].astype(np.float64) for f, u in zip(factors, ups, strict=True))
        for k in ups[0]
    }
    for k in ref:  # and it is the sum, to float64 precision
        np.testing.assert_allclose(totals[0][k], ref[k], rtol=1e-12, atol=1e-15)


def test_exact_sum_refuses_what_its_grid_cannot_hold() -> None:
    s = ExactSum({"w": np.zeros(3, np.float32)}, max_terms=2, max_abs=1.0)
    with pytest.raises(OutOfRange, match="exceeds"):
        s.add({"w": np.array([0.0, 1.5, 0.0], np.float32)}, 1.0)
    with pytest.raises(OutOfRange, match="factor"):
        s.add({"w": np.zeros(3, np.float32)}, 1.5)
    s.add({"w": np.ones(3, np.float32)}, 1.0)
    s.add({"w": -np.ones(3, np.float32)}, 1.0)
    with pytest.raises(OutOfRange, match="terms"):
        s.add({"w": np.ones(3, np.float32)}, 1.0)
    np.testing.assert_array_equal(s.total()["w"], np.zeros(3))


def test_the_largest_sums_do_not_wrap() -> None:
    """max_terms terms of +max_abs (and of -max_abs) at factor 1: exact, no overflow."""
    n, bound = 5000, 3.0
    s = ExactSum({"w": np.zeros(2, np.float32)}, n, bound)
    for _ in range(n):
        s.add({"w": np.array([bound, -bound], np.float32)}, 1.0)
    np.testing.assert_array_equal(s.total()["w"], [n * bound, -n * bound])
    assert scale_bits(1000, 1.0) >= 80  # resolution of the grid: 2^-80 of the bound


# --- sampling ----------------------------------------------------------------------------


def test_sample_size_is_the_configured_fraction() -> None:
    assert sample_size(100, 0.29, 2) == 29  # 0.29 * 100 = 28.999999999999996 in floats
    assert sample_size(10_000, 0.1, 2) == 1000
    assert sample_size(10, 0.3, 2) == 3
    assert sample_size(10, 0.05, 2) == 2  # at least min_nodes
    assert sample_size(3, 0.5, 5) == 3  # never more than there are


def test_same_seed_same_clients_whatever_the_node_ids() -> None:
    """Node ids are random per run (simulation) or per connection (deployment)."""
    run_a = {1000 + c: c for c in range(50)}
    run_b = {987_654 - 3 * c: c for c in range(50)}
    for rnd in (1, 2, 3):
        a = [run_a[n] for n in sample_nodes(run_a, 15, seed=7, server_round=rnd)]
        b = [run_b[n] for n in sample_nodes(run_b, 15, seed=7, server_round=rnd)]
        assert a == b and len(set(a)) == 15
    r1 = sample_nodes(run_a, 15, 7, 1)
    assert r1 != sample_nodes(run_a, 15, 7, 2) and r1 != sample_nodes(run_a, 15, 8, 1)
    assert r1 != sample_nodes(run_a, 15, 7, 1, purpose="evaluate")


# --- the bounds reference of a round without an earlier one ------------------------------


def test_reference_gate_depends_on_the_sample_not_on_arrival() -> None:
    order = list(range(10))
    stats = {n: (float(10 + n), float(n)) for n in order}
    failed = {2}
    refs, released = [], []
    for seed in range(5):
        arrival = order[:]
        random.Random(seed).shuffle(arrival)
        gate: ReferenceGate[int] = ReferenceGate(order, size=4)
        out: list[int] = []
        for n in arrival:
            item = None if n in failed else n
            out += gate.offer(n, item, *stats[n])
        out += gate.close()
        refs.append(gate.reference)
        released.append(sorted(out))
    # the first 4 valid in sample order: 0, 1, 3, 4
    assert (
        refs == [Reference(float(np.median([10, 11, 13, 14])), float(np.median([0, 1, 3, 4])))] * 5
    )
    assert released == [[n for n in order if n not in failed]] * 5


def test_reference_gate_releases_as_soon_as_the_reference_is_known() -> None:
    gate: ReferenceGate[str] = ReferenceGate([1, 2, 3, 4], size=2)
    assert gate.offer(3, "c", 1.0, 1.0) == []  # held: 1 and 2 come first
    assert gate.offer(1, "a", 1.0, 1.0) == []
    assert sorted(gate.offer(2, "b", 3.0, 3.0)) == ["a", "b", "c"]
    assert gate.offer(4, "d", 9.0, 9.0) == ["d"]
    assert gate.reference == Reference(2.0, 2.0)
    known: ReferenceGate[str] = ReferenceGate([1], size=1, reference=Reference(1.0, 1.0))
    assert known.offer(1, "x", 5.0, 5.0) == ["x"]


# --- through the engine --------------------------------------------------------------------

GLOBAL = {
    "w": np.linspace(-1, 1, 280, dtype=np.float32).reshape(40, 7),
    "b": np.zeros(7, np.float32),
    "n": np.array(3.0, np.float32),
}
NODES = list(range(11, 41))  # 30 nodes; node n is client n - 10


def _reply(msg: Message, update: dict[str, np.ndarray], n: int, cid: int) -> Message:
    enc = CastCodec(np.float32).encode(update, np.random.default_rng(0))
    claims = {NUM_EXAMPLES: n, TRAIN_LOSS: 0.5 + cid / 100, CLIENT_ID: cid}
    claims |= {TRAIN_SECONDS: 0.01, ENCODE_SECONDS: 0.0}
    return Message(train_content(Encoded(enc.arrays, {**enc.meta, **claims})), reply_to=msg)


class Clients(ReplyGrid):
    """Each client's update depends on (client, round) only; replies come shuffled."""

    def __init__(self, order_seed: int | None, nodes: list[int] = NODES) -> None:
        super().__init__(nodes, order_seed=order_seed, client_of=lambda node: node - 10)
        self.round = 0
        self.sampled: list[list[int]] = []  # client ids sent to, per round

    def exchange(self, messages: list[Message]) -> list[Message]:
        self.round += 1
        self.sampled.append(sorted(m.metadata.dst_node_id - 10 for m in messages))
        out = []
        for m in messages:
            cid = m.metadata.dst_node_id - 10
            rng = np.random.default_rng([cid, self.round])
            update = {k: rng.normal(0, 0.02, v.shape).astype(np.float32) for k, v in GLOBAL.items()}
            out.append(_reply(m, update, int(rng.integers(20, 200)), cid))
        return out


def _train(
    grid: ReplyGrid,
    streaming: bool = True,
    rounds: int = 3,
    bounds: BoundsConfig | None = None,
    momentum: bool = False,
    plan: RoundPlan | None = None,
) -> tuple[dict[str, np.ndarray], list[RoundRecord]]:
    records: list[RoundRecord] = []
    inner = (
        FedAvgM(fraction_evaluate=0.0, min_available_nodes=1, min_train_nodes=1)
        if momentum
        else FedAvg(fraction_evaluate=0.0, min_available_nodes=1, min_train_nodes=1)
    )
    strategy = CodecStrategy(
        inner,
        CastCodec(np.float32),
        on_round_end=records.append,
        bounds=bounds or BoundsConfig(reference_clients=4),
        streaming=streaming,
        plan=plan,
    )
    result = strategy.start(
        grid,  # type: ignore[arg-type]
        ArrayRecord({k: Array(v) for k, v in GLOBAL.items()}),
        num_rounds=rounds,
        timeout=5.0,
        evaluate_fn=lambda rnd, arrays: MetricRecord({"accuracy": 0.5, "loss": 1.0}),
    )
    return {k: a.numpy() for k, a in result.arrays.items()}, records


@pytest.mark.parametrize("momentum", [False, True])
def test_streaming_equals_buffered_fedavg(momentum: bool) -> None:
    streamed, rs = _train(Clients(None), streaming=True, momentum=momentum)
    buffered, rb = _train(Clients(None), streaming=False, momentum=momentum)
    for k in GLOBAL:
        np.testing.assert_allclose(streamed[k], buffered[k], rtol=1e-6, atol=1e-7)
    assert [r.clients_replied for r in rs] == [r.clients_replied for r in rb] == [30] * 3
    assert [r.train_loss for r in rs] == pytest.approx([r.train_loss for r in rb], rel=1e-9)


def test_streaming_is_bit_identical_whatever_the_reply_order() -> None:
    """Replies pulled one at a time in shuffled orders; bounds on (round 1 takes its
    reference from the first 4 clients of the sample), an outlier is clipped."""
    bounds = BoundsConfig(reference_clients=4, norm_action="clip", norm_ratio=1.05)
    runs = [_train(Clients(seed), bounds=bounds) for seed in (1, 2, 3)]
    first, records = runs[0]
    assert sum(r.updates_clipped for r in records) > 0
    for arrays, recs in runs[1:]:
        assert all(np.array_equal(arrays[k], first[k]) for k in GLOBAL)
        assert [r.train_loss for r in recs] == [r.train_loss for r in records]
        assert [r.updates_clipped for r in recs] == [r.updates_clipped for r in records]


def test_fraction_samples_the_same_clients_whatever_the_node_ids() -> None:
    plan = RoundPlan(fraction_train=0.3, min_nodes=2, seed=11)
    grids = [Clients(None), Clients(5, nodes=NODES[::-1])]
    picked = []
    for grid in grids:
        _, records = _train(grid, plan=plan)
        assert [r.clients_sampled for r in records] == [9, 9, 9]  # 0.3 x 30
        per_round = grid.sampled
        picked.append(per_round)
        assert per_round[0] != per_round[1]
    assert picked[0] == picked[1]


def test_a_node_whose_updates_claim_another_client_is_dropped() -> None:
    class Liar(Clients):
        def exchange(self, messages: list[Message]) -> list[Message]:
            out = super().exchange(messages)
            for reply in out:
                if reply.metadata.src_node_id == 11:  # identified as client 1
                    reply.content.config_records["codec"][CLIENT_ID] = 29
            return out

    _, records = _train(Liar(None), rounds=1)
    assert (records[0].clients_replied, records[0].clients_rejected) == (29, 1)


def test_invalid_identify_replies_leave_the_node_out() -> None:
    class BadIdentity(Clients):
        def push_messages(self, messages):  # type: ignore[no-untyped-def]
            messages = list(messages)
            ids = super().push_messages(messages)
            for reply in self._waiting:
                if reply.metadata.src_node_id == 12 and IDENTITY in reply.content.config_records:
                    reply.content = RecordDict({IDENTITY: ConfigRecord({CLIENT_ID: "x" * 300})})
            return ids

    grid = BadIdentity(None)
    _, records = _train(grid, rounds=2)
    assert [r.clients_sampled for r in records] == [29, 29]
    asked = [m for m in grid.pushed if m.metadata.dst_node_id == 12]
    assert asked == []  # never sampled
    assert math.isfinite(records[-1].train_loss or math.nan)


def test_the_client_app_answers_identify_with_its_client_id() -> None:
    """Flower routes "query.identify" to the ClientApp's @app.query("identify"), and the
    answer passes the decode boundary as the node's client id."""
    app = make_client_app(RunConfig())
    ctx = Context(1, 42, {"partition-id": 7}, RecordDict(), {})
    msg = Message(RecordDict(), dst_node_id=42, message_type=IDENTIFY)
    msg.metadata.__dict__["_message_id"] = "m1"
    reply = app(msg, ctx)
    reply.metadata.__dict__["_src_node_id"] = 42  # as the SuperLink stamps it
    assert decode_identity(reply) == 7


def test_rounds_wait_for_min_nodes_identified_clients_but_not_forever() -> None:
    class Arriving(Clients):
        """Devices connect one per node-list check, as deployed devices come up."""

        def __init__(self) -> None:
            super().__init__(None)
            self.visible = 0

        def get_node_ids(self) -> list[int]:
            self.visible = min(len(self.nodes), self.visible + 1)
            return self.nodes[: self.visible]

    plan = RoundPlan(min_nodes=5, poll_s=0.001, wait_s=10.0)
    _, records = _train(Arriving(), rounds=1, plan=plan)
    assert records[0].clients_sampled >= 5

    with pytest.raises(NotEnoughNodes, match="min_nodes=31"):
        _train(Clients(None), rounds=1, plan=RoundPlan(min_nodes=31, poll_s=0.01, wait_s=0.1))


def test_a_node_silent_to_identify_is_left_out_and_asked_again_rarely() -> None:
    class Mute(Clients):
        asked: list[int]

        def push_messages(self, messages):  # type: ignore[no-untyped-def]
            messages = list(messages)
            ids = super().push_messages(messages)
            if any(m.metadata.message_type == IDENTIFY for m in messages):
                self.asked.append(self.round)
                self._waiting = [r for r in self._waiting if r.metadata.src_node_id != 12]
            return ids

    grid = Mute(None)
    grid.asked = []
    plan = RoundPlan(min_nodes=2, poll_s=0.01, wait_s=0.2)
    _, records = _train(grid, rounds=7, plan=plan)
    assert [r.clients_sampled for r in records] == [29] * 7
    assert grid.asked == [0, 5]  # round 1 (before any training), then round 6
    assert all(2 not in clients for clients in grid.sampled)  # node 12 is client 2


def test_a_stage_streams_replies_and_never_waits_past_its_deadline() -> None:
    """Replies are handed on as they are pulled; a silent node ends the stage at the
    deadline, not at Flower's 3 s polls; polling is prompt."""
    grid = ReplyGrid(
        [1, 2, 3],
        respond=lambda m: (
            None if m.metadata.dst_node_id == 3 else Message(RecordDict(), reply_to=m)
        ),
    )
    pulls = 0
    pull = grid.pull_messages

    def counted(ids):  # type: ignore[no-untyped-def]
        nonlocal pulls
        pulls += 1
        return pull(ids)

    grid.pull_messages = counted  # type: ignore[method-assign]
    got: list[int] = []
    messages = [Message(RecordDict(), dst_node_id=n, message_type="train") for n in (1, 2, 3)]
    t0 = time.monotonic()
    result = run_stage(grid, messages, lambda r: got.append(r.metadata.src_node_id), t0 + 0.3, 0.02)  # type: ignore[arg-type]
    waited = time.monotonic() - t0
    assert sorted(got) == [1, 2] and result.silent == [3] and result.replied == 2
    assert 0.3 <= waited < 1.5 and pulls > 5
