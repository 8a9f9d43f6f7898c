"""The ClientApp's train/evaluate handlers, called in-process with real Flower records."""

from __future__ import annotations

import numpy as np
import pytest
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MessageType, RecordDict

from fedpipe.attacks import fault_mod
from fedpipe.client_app import RESIDUAL, STATE, client_evaluate, client_train, load_residual
from fedpipe.config import load_config
from fedpipe.data import client_shard, load_dataset
from fedpipe.models import build_model
from fedpipe.records import ARRAYS, CODEC, CONFIG, METRICS, NUM_EXAMPLES, UPDATE

pytestmark = pytest.mark.usefixtures("task_identity")
CFG_OVERRIDES = ["partition.num_clients=4", "model.hidden=8", "train.epochs=1"]
CFG = load_config(None, CFG_OVERRIDES)


def _instruction(kind: str, server_round: int) -> Message:
    ds = load_dataset(CFG.data)
    model = build_model(CFG.model, ds.input_shape, ds.num_classes)
    content = RecordDict(
        {
            ARRAYS: ArrayRecord(model.state_dict()),
            CONFIG: ConfigRecord({"server-round": server_round}),
        }
    )
    return Message(content, dst_node_id=7, message_type=kind)


def _context(client_id: int) -> Context:
    return Context(
        run_id=1,
        node_id=7,
        node_config={"partition-id": client_id},
        state=RecordDict(),
        run_config={},
    )


def test_train_replies_with_an_encoded_update_and_keeps_state_across_rounds() -> None:
    ctx = _context(2)
    for rnd in (1, 2):
        msg = _instruction(MessageType.TRAIN, rnd)
        reply = client_train(msg, ctx, CFG)
        c = reply.content
        sent = msg.content.array_records[ARRAYS]
        update = c.array_records[UPDATE]
        assert list(update) == list(sent)
        assert all(update[k].numpy().shape == sent[k].numpy().shape for k in sent)
        assert np.abs(update["1.weight"].numpy()).sum() > 0  # training moved the weights
        assert c.config_records[CODEC]["scheme"] == "float32"
        header = c.config_records[CODEC]  # the claims travel in the update's header
        assert header["client-id"] == 2
        assert header[NUM_EXAMPLES] == len(client_shard(CFG.data, CFG.partition, 0, 2))
        assert set(c.metric_records[METRICS]) == {"seal-seconds"}
    state = ctx.state.config_records[STATE]
    assert state["rounds-trained"] == 2 and state["last-round"] == 2


def test_injected_failure_is_a_mod_that_raises_on_training_only() -> None:
    cfg = load_config(None, [*CFG_OVERRIDES, "simulation.fail_clients=[1]"])
    mod = fault_mod(cfg.simulation)
    assert mod is not None and fault_mod(CFG.simulation) is None

    def app(msg: Message, ctx: Context) -> Message:
        return client_train(msg, ctx, cfg)

    with pytest.raises(RuntimeError, match="injected failure"):
        mod(_instruction(MessageType.TRAIN, 1), _context(1), app)
    assert mod(_instruction(MessageType.TRAIN, 1), _context(2), app).has_content()
    evaluate = mod(_instruction(MessageType.EVALUATE, 1), _context(1), lambda m, c: m)
    assert evaluate.metadata.message_type == MessageType.EVALUATE


def test_evaluate_reports_metrics_on_the_local_shard() -> None:
    reply = client_evaluate(_instruction(MessageType.EVALUATE, 1), _context(0), CFG)
    m = reply.content.metric_records[METRICS]
    assert 0.0 <= m["eval_accuracy"] <= 1.0 and m["eval_loss"] > 0  # type: ignore[operator]
    assert m["num-examples"] == len(client_shard(CFG.data, CFG.partition, 0, 0))


def test_error_feedback_residual_survives_rounds_and_expires_when_stale() -> None:
    cfg = load_config(
        None,
        [
            "partition.num_clients=4",
            "model.hidden=8",
            "codec.scheme=sign",
            "codec.error_feedback=true",
            "codec.max_staleness=2",
        ],
    )
    ctx = _context(1)
    client_train(_instruction(MessageType.TRAIN, 1), ctx, cfg)
    stored = ctx.state.array_records[RESIDUAL]
    assert list(stored) == list(_instruction(MessageType.TRAIN, 1).content[ARRAYS].keys())
    assert any(np.abs(a.numpy()).sum() > 0 for a in stored.values())  # sign drops a lot
    residual = load_residual(ctx, 2, cfg.codec)
    assert residual is not None and np.array_equal(residual["1.weight"], stored["1.weight"].numpy())
    assert load_residual(ctx, 4, cfg.codec) is not None  # missed rounds 2 and 3: allowed
    assert load_residual(ctx, 5, cfg.codec) is None  # missed 3 > max_staleness=2
    assert load_residual(ctx, 2, CFG.codec) is None  # feedback off


def test_no_residual_is_kept_without_error_feedback() -> None:
    ctx = _context(0)
    client_train(_instruction(MessageType.TRAIN, 1), ctx, CFG)
    assert RESIDUAL not in ctx.state.array_records


def test_client_trains_from_a_compressed_broadcast_and_keeps_one_copy_of_the_model() -> None:
    """A deployed device: round 1 brings the whole public model, round 2 only its coded
    change; the device's context.state holds the rebuilt model, the server's exactly."""
    from fedpipe.config import DownlinkConfig
    from fedpipe.downlink import Broadcaster, Decisions
    from fedpipe.downlink.device import MODEL

    server, ctx = Broadcaster(DownlinkConfig(scheme="hadamard2"), seed=0), _context(1)
    cfg = load_config(None, [*CFG_OVERRIDES, "downlink.scheme=hadamard2"])
    model = {k: a.numpy() for k, a in _instruction(MessageType.TRAIN, 1).content[ARRAYS].items()}
    for rnd in (1, 2):
        msg = _instruction(MessageType.TRAIN, rnd)
        model = {k: v + 0.01 * rnd for k, v in model.items()}  # the global model moved
        server.publish(model)
        msg.content = server.contents(msg.content, [7], Decisions())[7]
        assert (ARRAYS in msg.content.array_records) == (rnd == 1)
        update = client_train(msg, ctx, cfg).content.array_records[UPDATE]
        server.answered(7)
        assert all(np.all(np.isfinite(a.numpy())) for a in update.values())
        held = {k: a.numpy() for k, a in ctx.state.array_records[MODEL].items()}
        assert all(held[k].tobytes() == server.public[k].tobytes() for k in model)


def test_secagg_request_is_refused_before_any_training(monkeypatch: pytest.MonkeyPatch) -> None:
    """A masked-input request with a grid the device's config would not give, or for
    another round than the training round, is refused without training."""
    import fedpipe.client_app as app
    from fedpipe.secagg.device import SecAggRefusal
    from fedpipe.secagg.wire import MASKED, PARAMS

    def no_training(*args: object) -> None:
        raise AssertionError("trained before checking the request")

    monkeypatch.setattr(app, "_local_update", no_training)
    cfg = load_config(None, [*CFG_OVERRIDES, 'security.secagg="on"'])
    for params in (
        {
            "server-round": 1,
            "devices": 4,
            "clip": 0.1,
            "bits": 4,
            "modulus-bits": 6,
            "max-weight": 10,
        },  # 4 bits where the device's config says 8
        {
            "server-round": 2,
            "devices": 4,
            "clip": 0.1,
            "bits": 8,
            "modulus-bits": 10,
            "max-weight": 10,
        },  # a round other than the training round
    ):
        msg = _instruction(MASKED, 1)
        msg.content[PARAMS] = ConfigRecord(params)
        with pytest.raises(SecAggRefusal):
            app.client_secagg_train(msg, _context(1), cfg)
