"""`fedpipe_mod`: fedpipe's compression, error feedback and sealing for any ClientApp.

A Flower app's `@app.train()` handler replies with the trained weights (`"arrays"`) and
its metrics (`"metrics"` with `"num-examples"`, optionally `"train_loss"`). Added to the
app (`ClientApp(mods=[fedpipe_mod])`), the mod:

- rebuilds a compressed broadcast into the plain model before the handler sees it
  (the public model is kept in `context.state`, as on a fedpipe device);
- turns the handler's reply into fedpipe's: the update (trained weights minus the
  weights received), encoded with the codec the aggregator announced (`fedpipe.spec`),
  error feedback in `context.state`, claims in the header, sealed to the aggregator
  when the node config holds its key (`aggregator-key`).

The handler's own code does not change. What it gets wrong (no weights, other shapes,
no example count) is an error naming the handler, sent back as Flower's error reply.
Messages from a server that announces no fedpipe codec (plain Flower) pass through
untouched, so the same ClientApp serves both.
"""

from __future__ import annotations

import time
from collections.abc import Mapping

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message, MessageType, RecordDict
from flwr.clientapp.typing import ClientAppCallable

from fedpipe.client_app import OWN_COPY, Trained, client_id_of, encoded_reply
from fedpipe.codec import build_codec
from fedpipe.config import DownlinkConfig
from fedpipe.downlink import HEADER, receive
from fedpipe.downlink.wire import DIFF
from fedpipe.flower.spec import PREFIX, announced
from fedpipe.records import ARRAYS, CONFIG, METRICS, NUM_EXAMPLES, SERVER_ROUND
from fedpipe.seed import client_seed

__all__ = ["AppReplyError", "fedpipe_mod"]

HANDLER = "the ClientApp's @app.train() handler"


class AppReplyError(RuntimeError):
    """The app's train handler replied with something fedpipe cannot encode."""


def _plain(msg: Message, context: Context, downlink: DownlinkConfig) -> dict[str, np.ndarray]:
    """The model the message brings; a compressed broadcast is rebuilt and put back as
    the plain `"arrays"` record the handler expects."""
    content = msg.content
    if HEADER not in content.config_records:
        return {k: a.numpy() for k, a in content.array_records[ARRAYS].items()}
    codec = build_codec(downlink.codec())
    model = dict(receive(content, context.state, OWN_COPY, codec))
    kept = {k: v for k, v in content.items() if k != HEADER and not k.startswith(DIFF)}
    kept[ARRAYS] = ArrayRecord({k: Array(np.asarray(v)) for k, v in model.items()})
    msg.content = RecordDict(kept)
    return model


def _trained(
    msg: Message, context: Context, reply: Message, sent: Mapping[str, np.ndarray], seconds: float
) -> Trained:
    """The handler's reply as an update against the weights it was sent."""
    content = reply.content
    if ARRAYS not in content.array_records:
        raise AppReplyError(f"{HANDLER} must reply with the trained weights as {ARRAYS!r}")
    weights = {k: a.numpy() for k, a in content.array_records[ARRAYS].items()}
    if list(weights) != list(sent):
        raise AppReplyError(
            f"{HANDLER} replied with arrays {list(weights)[:4]}..., not the model's "
            f"{list(sent)[:4]}...: reply with the whole state_dict"
        )
    for name, w in weights.items():
        if w.shape != sent[name].shape:
            raise AppReplyError(
                f"{HANDLER} replied with {name!r} of shape {w.shape}; the model's is "
                f"{sent[name].shape}"
            )
    metrics = content.metric_records.get(METRICS)
    examples = metrics.get(NUM_EXAMPLES) if metrics is not None else None
    if isinstance(examples, bool) or not isinstance(examples, int | float) or examples < 1:
        raise AppReplyError(f"{HANDLER} must reply with {METRICS!r} holding {NUM_EXAMPLES!r}")
    loss = metrics.get("train_loss", 0.0) if metrics is not None else 0.0
    update = {k: w.astype(np.float32) - sent[k].astype(np.float32) for k, w in weights.items()}
    cid = client_id_of(context)
    config = msg.content.config_records.get(CONFIG, ConfigRecord())
    server_round = int(config.get(SERVER_ROUND, 0))  # type: ignore[arg-type]
    rng = np.random.default_rng([client_seed(0, cid), server_round])
    loss = float(loss) if isinstance(loss, int | float) and np.isfinite(loss) else 0.0
    return Trained(cid, server_round, update, int(examples), loss, seconds, rng)


def fedpipe_mod(msg: Message, context: Context, call_next: ClientAppCallable) -> Message:
    """A Flower mod: see the module docstring."""
    kind = msg.metadata.message_type
    config = msg.content.config_records.get(CONFIG, ConfigRecord()) if msg.has_content() else {}
    if kind not in (MessageType.TRAIN, MessageType.EVALUATE) or not any(
        k.startswith(PREFIX) for k in config
    ):  # not fedpipe's business, or a plain Flower server: the app answers as it is
        return call_next(msg, context)
    codec, downlink = announced(config)
    sent = _plain(msg, context, downlink)
    if kind == MessageType.EVALUATE:
        return call_next(msg, context)
    t0 = time.perf_counter()
    reply = call_next(msg, context)
    if reply.has_error():
        return reply
    trained = _trained(msg, context, reply, sent, time.perf_counter() - t0)
    return encoded_reply(msg, context, codec, trained, seal_key=None)
