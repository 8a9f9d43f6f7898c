"""CodecStrategy: decoding, validation and accounting around a real Flower FedAvg."""

from __future__ import annotations

import io
from collections.abc import Callable

import numpy as np
import pytest
from flwr.app import (
    Array,
    ArrayRecord,
    ConfigRecord,
    Error,
    Message,
    MessageType,
    MetricRecord,
    RecordDict,
)
from flwr.serverapp.strategy import FedAvg
from flwr.supercore.inflatable.inflatable_object import get_all_nested_objects
from grids import ReplyGrid

from fedpipe.codec import CastCodec, Codec, Encoded, UniformCodec
from fedpipe.config import DownlinkConfig, FederationConfig
from fedpipe.downlink import HEADER
from fedpipe.downlink.wire import diff_names
from fedpipe.metrics import RoundRecord
from fedpipe.records import (
    ARRAYS,
    CLIENT_ID,
    CODEC,
    ENCODE_SECONDS,
    METRICS,
    NUM_EXAMPLES,
    TRAIN_LOSS,
    TRAIN_SECONDS,
    UPDATE,
    train_content,
    wire_bytes,
)
from fedpipe.rounds.engine import RoundPlan
from fedpipe.strategy import CodecStrategy, build_strategy

pytestmark = pytest.mark.usefixtures("task_identity")


GLOBAL = {"w": np.array([1.0, 2.0], np.float32), "count": np.array(5, np.int64)}


def _global_record() -> ArrayRecord:
    return ArrayRecord({k: Array(v) for k, v in GLOBAL.items()})


FLOAT32 = CastCodec(np.float32)


def _content(
    update: dict[str, np.ndarray], n: int, cid: int, codec: Codec = FLOAT32, **claims: object
) -> RecordDict:
    return _wrap(codec.encode(update, np.random.default_rng(0)), n, cid, **claims)


def _wrap(encoded: Encoded, n: int, cid: int, **claims: object) -> RecordDict:
    """A reply as a device makes it: the claims in the update's header."""
    header = {
        NUM_EXAMPLES: n,
        TRAIN_LOSS: float(cid),
        CLIENT_ID: cid,
        TRAIN_SECONDS: 1.5,
        ENCODE_SECONDS: 0.25,
        **claims,
    }
    header = {k: v for k, v in header.items() if v is not None}
    return train_content(Encoded(encoded.arrays, {**encoded.meta, **header}))  # type: ignore[dict-item]


def _update(w: list[float], count: float = 1.0) -> dict[str, np.ndarray]:
    return {"w": np.array(w, np.float32), "count": np.array(count, np.float32)}


def _run(
    respond: Callable[[Message], Message | None],
    nodes: list[int],
    codec: Codec = FLOAT32,
    downlink: DownlinkConfig | None = None,
    num_rounds: int = 1,
) -> tuple[dict[str, np.ndarray], RoundRecord]:
    """The last round's global arrays and record."""
    records: list[RoundRecord] = []
    strategy = CodecStrategy(
        FedAvg(fraction_evaluate=0.0, min_train_nodes=1, min_available_nodes=1),
        codec,
        on_round_end=records.append,
        downlink=downlink,
    )
    result = strategy.start(
        ReplyGrid(nodes, respond),
        _global_record(),
        num_rounds=num_rounds,
        timeout=1.0,  # a silent node is waited for this long
        evaluate_fn=lambda rnd, arrays: MetricRecord({"accuracy": 0.5, "loss": 1.0}),
    )
    return {k: a.numpy() for k, a in result.arrays.items()}, records[-1]


HONEST = {
    1: (_update([1.0, 1.0], 1.0), 1),  # node -> (update, num-examples)
    2: (_update([4.0, -2.0], 2.0), 2),
}


def _honest_reply(msg: Message) -> Message | None:
    node = msg.metadata.dst_node_id
    if node not in HONEST:
        return None
    update, n = HONEST[node]
    return Message(_content(update, n, node), reply_to=msg)


def _expected_honest() -> dict[str, np.ndarray]:
    # Hand-computed FedAvg: global + (1*u1 + 2*u2) / 3
    w = np.array([1.0, 2.0]) + (1 * np.array([1.0, 1.0]) + 2 * np.array([4.0, -2.0])) / 3
    return {"w": w.astype(np.float32), "count": np.array(5 + round((1 * 1 + 2 * 2) / 3), np.int64)}


def test_aggregate_equals_hand_computed_weighted_mean() -> None:
    arrays, rec = _run(_honest_reply, [1, 2])
    expected = _expected_honest()
    np.testing.assert_allclose(arrays["w"], expected["w"], rtol=1e-6)
    assert arrays["w"].dtype == np.float32
    assert arrays["count"].dtype == np.int64  # integer buffers keep their dtype
    assert rec.clients_sampled == 2 and rec.clients_replied == 2 and rec.clients_failed == 0
    assert rec.train_loss == pytest.approx((1 * 1 + 2 * 2) / 3)
    assert rec.bytes_up > 2 * 2 * 4 and rec.bytes_down > 0
    assert rec.accuracy == 0.5 and rec.seconds > 0
    assert rec.bits_per_param_up == pytest.approx(8 * rec.bytes_up / (2 * 3))  # 2 replies, 3 params
    assert rec.encode_seconds == pytest.approx(2 * 0.25) and rec.train_seconds == pytest.approx(3.0)


def _without(key: str) -> RecordDict:
    c = _content(_update([9.0, 9.0]), 1, 3)
    del c[key]
    return c


def _bad_scheme() -> RecordDict:
    c = _content(_update([9.0, 9.0]), 1, 3)
    c[CODEC] = ConfigRecord({"scheme": "int3"})
    return c


def _wrong_dtype() -> RecordDict:
    c = _content(_update([9.0, 9.0]), 1, 3)
    c[UPDATE] = ArrayRecord(
        {"w": Array(np.array([9, 9], np.int32)), "count": Array(np.array(0, np.float32))}
    )
    return c


def _npz_bytes() -> bytes:
    buf = io.BytesIO()
    np.savez(buf, w=np.zeros(2, np.float32))
    return buf.getvalue()


def _with_array_bytes(data: bytes) -> RecordDict:
    """Flower's Array.numpy() would np.load these bytes and hand back an NpzFile."""
    c = _content(_update([9.0, 9.0]), 1, 3)
    c[UPDATE]["w"] = Array(dtype="float32", shape=(2,), stype="numpy.ndarray", data=data)
    return c


def _claiming(**claims: object) -> Callable[[], RecordDict]:
    return lambda: _content(_update([9.0, 9.0]), 1, 3, **claims)


BAD_CONTENT: dict[str, Callable[[], RecordDict]] = {
    "bad-client-id": _claiming(**{CLIENT_ID: "three"}),
    "negative-client-id": _claiming(**{CLIENT_ID: -1}),
    "nan": lambda: _content(_update([np.nan, 0.0]), 1, 3),
    "inf": lambda: _content(_update([np.inf, 0.0]), 1, 3),
    "wrong-shape": lambda: _content(
        {"w": np.zeros(3, np.float32), "count": np.zeros((), np.float32)}, 1, 3
    ),
    "missing-key": lambda: _content({"w": np.zeros(2, np.float32)}, 1, 3),
    "extra-key": lambda: _content({**_update([0.0, 0.0]), "x": np.zeros(1, np.float32)}, 1, 3),
    "unknown-scheme": _bad_scheme,
    "npz-archive-array": lambda: _with_array_bytes(_npz_bytes()),
    "wrong-dtype": _wrong_dtype,
    "no-update": lambda: _without(UPDATE),
    "no-header": lambda: _without(CODEC),
    "zero-weight": _claiming(**{NUM_EXAMPLES: 0}),
    "nan-weight": _claiming(**{NUM_EXAMPLES: float("nan")}),
    "fractional-weight": _claiming(**{NUM_EXAMPLES: 1.5}),
    "overflowing-weight": _claiming(**{NUM_EXAMPLES: 10**13}),
    "no-weight": _claiming(**{NUM_EXAMPLES: None}),
    "no-train-loss": _claiming(**{TRAIN_LOSS: None}),
    "inf-train-loss": _claiming(**{TRAIN_LOSS: float("inf")}),
    "negative-seconds": _claiming(**{TRAIN_SECONDS: -1.0}),
}


@pytest.mark.parametrize("case", sorted(BAD_CONTENT))
def test_bad_payload_is_dropped_and_the_round_completes(case: str) -> None:
    def respond(msg: Message) -> Message | None:
        if msg.metadata.dst_node_id == 3:
            return Message(BAD_CONTENT[case](), reply_to=msg)
        return _honest_reply(msg)

    arrays, rec = _run(respond, [1, 2, 3])
    np.testing.assert_allclose(arrays["w"], _expected_honest()["w"], rtol=1e-6)
    assert (rec.clients_sampled, rec.clients_replied, rec.clients_failed) == (3, 2, 1)


def test_client_error_and_silent_client_are_counted() -> None:
    def respond(msg: Message) -> Message | None:
        node = msg.metadata.dst_node_id
        if node == 3:
            return Message(Error(code=0, reason="Traceback...\nRuntimeError: boom"), reply_to=msg)
        if node == 4:
            return None  # never answers before the timeout
        return _honest_reply(msg)

    arrays, rec = _run(respond, [1, 2, 3, 4])
    np.testing.assert_allclose(arrays["w"], _expected_honest()["w"], rtol=1e-6)
    assert (rec.clients_sampled, rec.clients_replied, rec.clients_failed) == (4, 2, 2)


def test_round_without_valid_updates_keeps_the_model() -> None:
    arrays, rec = _run(lambda msg: Message(BAD_CONTENT["nan"](), reply_to=msg), [1, 2])
    np.testing.assert_array_equal(arrays["w"], GLOBAL["w"])
    assert rec.clients_failed == 2 and rec.train_loss is None


def test_devices_reporting_other_metrics_are_still_aggregated() -> None:
    # e.g. a device on another fedpipe version; Flower refuses unequal metric keys
    def respond(msg: Message) -> Message | None:
        reply = _honest_reply(msg)
        if reply is not None and msg.metadata.dst_node_id == 2:
            reply.content.metric_records[METRICS]["newer-metric"] = 1.0
        return reply

    arrays, rec = _run(respond, [1, 2])
    np.testing.assert_allclose(arrays["w"], _expected_honest()["w"], rtol=1e-6)
    assert rec.clients_replied == 2


def test_aggregation_order_does_not_depend_on_arrival() -> None:
    def run(order: list[int]) -> np.ndarray:
        updates = {n: _update(list(np.random.default_rng(n).normal(size=2))) for n in order}

        def respond(msg: Message) -> Message:
            node = msg.metadata.dst_node_id
            return Message(_content(updates[node], 1 + node % 3, node), reply_to=msg)

        return _run(respond, order)[0]["w"]

    nodes = list(range(1, 9))
    assert np.array_equal(run(nodes), run(nodes[::-1]))


INT8 = UniformCodec(8, chunk=8)


def _int8_payload(**changes: object) -> Encoded:
    enc = INT8.encode(_update([9.0, 9.0]), np.random.default_rng(0))
    arrays = {**enc.arrays, **{k: v for k, v in changes.items() if isinstance(v, np.ndarray)}}
    meta = {**enc.meta, **{k: v for k, v in changes.items() if not isinstance(v, np.ndarray)}}
    return Encoded(arrays, meta)  # type: ignore[arg-type]


BAD_INT8 = {
    "truncated": _int8_payload(codes=np.zeros(2, np.uint8)),
    "unknown-scheme": _int8_payload(scheme="int3"),
    "nan-scale": _int8_payload(step=np.full(1, np.nan, np.float32)),
    "inf-offset": _int8_payload(lo=np.full(1, np.inf, np.float32)),
    "count-mismatch": _int8_payload(count=4),
}


@pytest.mark.parametrize("case", sorted(BAD_INT8))
def test_bad_quantized_payload_is_dropped_and_the_round_completes(case: str) -> None:
    def respond(msg: Message) -> Message | None:
        node = msg.metadata.dst_node_id
        if node == 3:
            return Message(_wrap(BAD_INT8[case], 1, 3), reply_to=msg)
        update, n = HONEST[node]
        return Message(_content(update, n, node, INT8), reply_to=msg)

    arrays, rec = _run(respond, [1, 2, 3], codec=INT8)
    # int8 over a chunk spanning 6.0: each value within one step (6/255) of the truth
    np.testing.assert_allclose(arrays["w"], _expected_honest()["w"], atol=6 / 255)
    assert (rec.clients_sampled, rec.clients_replied, rec.clients_failed) == (3, 2, 1)


def test_compressed_downlink_sends_whole_models_while_they_are_smaller_than_a_change() -> None:
    """Round 1: every device is new and gets the whole public model. Round 2: this
    model has 3 parameters, so one coded change (its scale, its header) costs more than
    the model itself and the whole model goes again. (tests/test_downlink_sim.py sees
    changes and catch-up chains on a real model.) The server's global model is float32
    and untouched by the coding: updates are added to it, not to the public model."""
    seen: list[tuple[int, bool, bool]] = []  # (base, whole model, change to version 2)

    def respond(msg: Message) -> Message | None:
        c = msg.content
        base = c.config_records[HEADER]["base"]
        change = diff_names(2)[0] in c.array_records
        seen.append((base, ARRAYS in c.array_records, change))  # type: ignore[arg-type]
        return _honest_reply(msg)

    arrays, rec = _run(respond, [1, 2], downlink=DownlinkConfig(scheme="int8"), num_rounds=2)
    assert seen == [(-1, True, False)] * 4
    assert (rec.downlink_full, rec.downlink_diff) == (2, 0)
    assert rec.bits_per_param_down is not None and rec.broadcast_seconds > 0
    once = _expected_honest()["w"] - np.array([1.0, 2.0], np.float32)  # one round's mean
    np.testing.assert_allclose(arrays["w"], np.array([1.0, 2.0]) + 2 * once, rtol=1e-6)
    assert arrays["w"].dtype == np.float32


@pytest.mark.parametrize("name", ["fedavg", "fedavgm", "fedmedian", "fedtrimmedavg"])
def test_build_strategy(name: str) -> None:
    strategy = build_strategy(FederationConfig(strategy=name, min_nodes=3, fraction_train=0.3))
    assert type(strategy).__name__.lower() == name
    # fedpipe's engine samples; the inner strategy configures every node it is shown
    assert strategy.fraction_train == 1.0  # type: ignore[attr-defined]
    assert strategy.min_available_nodes == 1  # type: ignore[attr-defined]


def test_federated_evaluation_survives_odd_replies() -> None:
    """One device reporting an extra metric used to end the round in Flower's aggregation
    (InconsistentMessageReplies); another sends a key that is not valid Unicode; a
    fourth lacks a metric the majority reports."""
    records: list[RoundRecord] = []

    def respond(msg: Message) -> Message | None:
        node = msg.metadata.dst_node_id
        if msg.metadata.message_type == MessageType.TRAIN:
            return _honest_reply(msg) if node in HONEST else None
        metrics = {"num-examples": 10, "eval_loss": 0.5, "eval_accuracy": 0.1 * node}
        if node == 2:
            metrics["newer-metric"] = 1.0
        if node == 3:
            metrics["\ud800"] = 1.0
        if node == 4:
            del metrics["eval_loss"]
        return Message(RecordDict({METRICS: MetricRecord(metrics)}), reply_to=msg)

    strategy = CodecStrategy(
        FedAvg(fraction_evaluate=1.0, min_train_nodes=1, min_available_nodes=1),
        FLOAT32,
        on_round_end=records.append,
        plan=RoundPlan(fraction_evaluate=1.0),
    )
    result = strategy.start(
        ReplyGrid([1, 2, 3, 4], respond),
        _global_record(),
        num_rounds=1,
        timeout=1.0,
        evaluate_fn=lambda rnd, arrays: MetricRecord({"accuracy": 0.5, "loss": 1.0}),
    )
    federated = result.evaluate_metrics_clientapp[1]
    assert federated["eval_accuracy"] == pytest.approx(0.15)  # nodes 1 and 2; 3, 4 dropped
    assert set(federated) == {"eval_loss", "eval_accuracy"}
    assert records[0].clients_replied == 2


@pytest.mark.parametrize(
    "shapes",
    [[(3,)], [()], [(64, 784), (64,), (64, 64), (64,), (10, 64), (10,)], [(300, 700), (7,)]],
)
def test_wire_bytes_equal_what_flower_serializes(shapes: list[tuple[int, ...]]) -> None:
    """Counted from stand-ins per structure, equal to deflating (and hashing) the real thing."""
    rng = np.random.default_rng(len(shapes))
    arrays = {f"a{i}": rng.normal(size=s).astype(np.float32) for i, s in enumerate(shapes)}
    content = train_content(Encoded(arrays, {"scheme": "float32", "n": 3}), 0.25)
    flower = sum(len(o.deflate()) for o in get_all_nested_objects(content).values())
    assert wire_bytes(content) == flower
