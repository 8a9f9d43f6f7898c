"""fedpipe in a Flower app written Flower's way: `fedpipe_mod` on its ClientApp and
`compress` around its strategy; nothing else in the app changes.

The app is examples/flower_app (Flower's project layout), called in-process for each
node through a Grid that hands every message to the ClientApp with its mods, as
Flower's runtime does.
"""

from __future__ import annotations

import sys
from collections.abc import Iterable
from pathlib import Path
from uuid import uuid4

import numpy as np
import pytest
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey
from flwr.app import (
    Array,
    ArrayRecord,
    ConfigRecord,
    Context,
    Error,
    Message,
    MessageType,
    MetricRecord,
    RecordDict,
)
from flwr.clientapp import ClientApp
from flwr.common.constant import ErrorCode
from flwr.serverapp.strategy import FedAvg

from fedpipe.client_app import AGGREGATOR_KEY
from fedpipe.config import CodecConfig, DownlinkConfig
from fedpipe.crypto.seal import SEALED, public_bytes
from fedpipe.flower import compress, fedpipe_mod
from fedpipe.metrics import RoundRecord
from fedpipe.records import ARRAYS, CODEC, CONFIG, UPDATE

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "examples" / "flower_app"))
from flower_app.client_app import app as example_app  # noqa: E402
from flower_app.task import Net, load_data, load_test  # noqa: E402
from flower_app.task import test as evaluate_net  # noqa: E402

pytestmark = pytest.mark.usefixtures("task_identity")
NODES = 4


class AppGrid:
    """Every message to the ClientApp of its node, each node with its own Context."""

    def __init__(self, app: ClientApp, nodes: int = NODES) -> None:
        self.app = app
        run_config = {"local-epochs": 2}
        self.contexts = {
            n: Context(1, n, {"partition-id": n, "num-partitions": nodes}, RecordDict(), run_config)
            for n in range(nodes)
        }
        self._waiting: list[Message] = []
        self.replies: list[Message] = []

    def get_node_ids(self) -> list[int]:
        return list(self.contexts)

    def push_messages(self, messages: Iterable[Message]) -> list[str]:
        ids = []
        for m in messages:
            m.metadata.__dict__["_message_id"] = uuid4().hex
            ids.append(m.metadata.message_id)
            try:
                reply = self.app(m, self.contexts[m.metadata.dst_node_id])
            except Exception as exc:  # noqa: BLE001 - as Flower's runtime does
                reply = Message(Error(ErrorCode.CLIENT_APP_RAISED_EXCEPTION, str(exc)), reply_to=m)
            self._waiting.append(reply)
            self.replies.append(reply)
        return ids

    def pull_messages(self, message_ids: Iterable[str]) -> list[Message]:
        wanted = set(message_ids)
        ready = [r for r in self._waiting if r.metadata.reply_to_message_id in wanted]
        for r in ready:
            self._waiting.remove(r)
        return ready


def _central(rnd: int, arrays: ArrayRecord) -> MetricRecord:
    model = Net()
    model.load_state_dict(arrays.to_torch_state_dict())
    loss, acc = evaluate_net(model, *load_test())
    return MetricRecord({"accuracy": acc, "loss": loss})


def test_a_flower_app_with_the_mod_and_the_wrapper_sends_int4_updates_and_learns() -> None:
    """int4 + error feedback up, hadamard1 down, fraction_evaluate 0.5: the replies are
    fedpipe-encoded (measured bits per parameter), the app's own evaluation metrics are
    averaged, and the model learns digits (MLP, 4 clients, 4 rounds)."""
    records: list[RoundRecord] = []
    grid = AppGrid(example_app)
    strategy = compress(
        FedAvg(fraction_train=1.0, fraction_evaluate=0.5),
        CodecConfig(scheme="int4", error_feedback=True),
        DownlinkConfig(scheme="hadamard1", chunk_size=256),
        on_round_end=records.append,
        wait_s=5,
    )
    result = strategy.start(
        grid,  # type: ignore[arg-type]
        ArrayRecord(Net().state_dict()),
        num_rounds=4,
        timeout=60,
        evaluate_fn=_central,
    )
    assert [r.clients_replied for r in records] == [NODES] * 4
    # int4 plus per-chunk scales, .npy headers and the claims: 4.9 on these 19,210 params
    assert all(4.0 < r.bits_per_param_up < 5.0 for r in records)  # type: ignore[operator]
    # round 1: every device new; the 2 evaluated after training get the one change
    assert (records[0].downlink_full, records[0].downlink_diff) == (NODES, 2)
    assert records[-1].downlink_full == 0
    assert records[-1].bits_per_param_down < 3  # type: ignore[operator]
    trained = [r for r in grid.replies if UPDATE in r.content.array_records]
    assert len(trained) == 4 * NODES
    assert {r.content.config_records[CODEC]["scheme"] for r in trained} == {"int4"}
    assert set(result.evaluate_metrics_clientapp[4]) == {"eval_loss", "eval_acc"}
    assert result.evaluate_metrics_serverapp[4]["accuracy"] > 0.85


def test_a_handler_that_replies_with_the_wrong_shape_is_a_clear_counted_error() -> None:
    broken = ClientApp(mods=[fedpipe_mod])

    @broken.train()
    def train(msg: Message, context: Context) -> Message:
        arrays = ArrayRecord(Net().state_dict())
        arrays["fc2.bias"] = Array(np.zeros(3, np.float32))  # one array cut short
        metrics = MetricRecord({"num-examples": 10})
        return Message(RecordDict({"arrays": arrays, "metrics": metrics}), reply_to=msg)

    grid = AppGrid(broken, nodes=3)
    records: list[RoundRecord] = []
    strategy = compress(FedAvg(fraction_evaluate=0.0), on_round_end=records.append, wait_s=5)
    strategy.start(grid, ArrayRecord(Net().state_dict()), num_rounds=1, timeout=30)  # type: ignore[arg-type]
    assert records[0].clients_failed == 3 and records[0].clients_replied == 0
    errors = [r.error.reason for r in grid.replies if r.has_error()]
    assert len(errors) == 3
    assert all("@app.train() handler" in e and "'fc2.bias' of shape (3,)" in e for e in errors)


def test_with_a_plain_flower_server_the_mod_passes_messages_through() -> None:
    """No fedpipe codec announced: the app answers exactly as it would without the mod."""
    content = RecordDict(
        {ARRAYS: ArrayRecord(Net().state_dict()), CONFIG: ConfigRecord({"server-round": 1})}
    )
    msg = Message(content, dst_node_id=0, message_type=MessageType.TRAIN)
    reply = example_app(msg, AppGrid(example_app).contexts[0])
    assert set(reply.content.array_records) == {ARRAYS}
    assert reply.content.metric_records["metrics"]["num-examples"] == len(load_data(0, NODES)[1])


def test_sealed_updates_from_a_flower_app_open_only_at_the_aggregator() -> None:
    """compress(seal=(run_id, key)); each device's node config holds the public key: the
    replies on the wire are sealed (no update arrays in clear) and the round aggregates."""
    key = X25519PrivateKey.generate()
    grid = AppGrid(example_app, nodes=3)
    for ctx in grid.contexts.values():
        ctx.node_config[AGGREGATOR_KEY] = public_bytes(key.public_key()).hex()
    records: list[RoundRecord] = []
    strategy = compress(
        FedAvg(fraction_evaluate=0.0),
        CodecConfig(scheme="int8"),
        on_round_end=records.append,
        wait_s=5,
        seal=(1, key),
    )
    strategy.start(grid, ArrayRecord(Net().state_dict()), num_rounds=2, timeout=30)  # type: ignore[arg-type]
    assert [r.clients_replied for r in records] == [3, 3]
    trained = [r for r in grid.replies if UPDATE in r.content.array_records]
    assert trained and all(set(r.content.array_records[UPDATE]) == {SEALED} for r in trained)
    # the same devices without the key are refused with the reason, not accepted in clear
    for ctx in grid.contexts.values():
        del ctx.node_config[AGGREGATOR_KEY]
    grid.replies.clear()
    strategy = compress(FedAvg(fraction_evaluate=0.0), wait_s=5, seal=(1, key))
    strategy.start(grid, ArrayRecord(Net().state_dict()), num_rounds=1, timeout=30)  # type: ignore[arg-type]
    assert all("no aggregator public key" in r.error.reason for r in grid.replies)
