"""The aggregator's decode boundary: a device's reply in, a valid update or a rejection out.

Everything a device sends is hostile, the inside of a valid seal included (every device
holds the aggregator's public key). A reply is taken apart in an order that bounds the
work before any of it is done: record layout and types, entry counts and string
validity, array byte counts and `.npy` headers (no `np.load`), the header's claims, then
the seal, the codec and the update's shape and values. Any failure, and any exception
at all, becomes a `Rejection` with a reason: nothing a device sends raises past here.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable
from dataclasses import dataclass

from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict

from fedpipe.boundary._records import (
    ReplyLimits,
    Scalar,
    check_layout,
    config_values,
    metric_values,
    parse_arrays,
    safe_text,
)
from fedpipe.codec import Codec, Encoded, PayloadError, Update, check_update
from fedpipe.crypto.seal import SEAL_META
from fedpipe.records import (
    CLIENT_ID,
    CODEC,
    ENCODE_SECONDS,
    EVAL_ACCURACY,
    IDENTITY,
    METRICS,
    NUM_EXAMPLES,
    PROFILE,
    SEAL_SECONDS,
    TRAIN_LOSS,
    TRAIN_SECONDS,
    UPDATE,
    wire_bytes,
)

__all__ = [
    "Claims",
    "DecodeBoundary",
    "DecodedReply",
    "Opener",
    "Rejection",
    "decode_identity",
]

log = logging.getLogger(__name__)

Opener = Callable[[Encoded, int, int], Encoded]  # (payload, server round, node id)
MAX_CLIENT_ID = 2**31 - 1


@dataclass(frozen=True)
class Claims:
    """What a client states about its update; bound by the seal when sealed."""

    num_examples: int
    train_loss: float
    client_id: int
    train_seconds: float
    encode_seconds: float


@dataclass(frozen=True)
class DecodedReply:
    node_id: int
    claims: Claims
    update: Update  # the decoded delta, shaped like the global model, all finite
    wire_bytes: int
    seal_seconds: float  # the client's own report: telemetry only
    open_seconds: float  # the aggregator's time to open the seal


@dataclass(frozen=True)
class Rejection:
    node_id: int
    reason: str
    wire_bytes: int = 0


def _int(values: dict[str, Scalar], key: str, lo: int, hi: int) -> int:
    value = values.get(key)
    if isinstance(value, bool) or not isinstance(value, int) or not lo <= value <= hi:
        raise PayloadError(f"{key}={safe_text(value, 40)} must be an integer in [{lo}, {hi}]")
    return value


def _number(values: dict[str, Scalar], key: str, lo: float, hi: float) -> float:
    value = values.get(key)
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise PayloadError(f"{key}={safe_text(value, 40)} must be a number")
    number = float(value)
    if not (math.isfinite(number) and lo <= number <= hi):
        raise PayloadError(f"{key}={safe_text(value, 40)} must be in [{lo}, {hi}]")
    return number


class DecodeBoundary:
    """Turns replies into updates for one round's global model, or into rejections."""

    def __init__(
        self,
        codec: Codec,
        like: Update,
        opener: Opener | None = None,
        limits: ReplyLimits | None = None,
        max_examples: int = 10**9,
        max_seconds: float = 7 * 24 * 3600.0,
    ) -> None:
        self.codec, self.like, self.opener = codec, like, opener
        self.limits = limits or ReplyLimits.for_model(like)
        self.max_examples, self.max_seconds = max_examples, max_seconds

    # -- training replies ---------------------------------------------------------------

    def train(self, msg: Message, server_round: int) -> DecodedReply | Rejection:
        """A training reply's update, or why it was dropped. Never raises."""
        node = _node(msg)
        try:
            return self._train(msg, server_round, node)
        except PayloadError as exc:
            return Rejection(node, f"bad payload: {safe_text(str(exc))}", _size(msg))
        except Exception as exc:  # noqa: BLE001 - the boundary is total by design
            log.error("reply from node %d raised %s inside the decoder", node, type(exc).__name__)
            reason = f"undecodable reply ({type(exc).__name__}: {safe_text(str(exc), 200)})"
            return Rejection(node, reason, _size(msg))

    def _train(self, msg: Message, server_round: int, node: int) -> DecodedReply | Rejection:
        if msg.has_error():
            return Rejection(node, f"client error: {_last_line(msg.error.reason)}")
        content = msg.content
        check_layout(content, {UPDATE: ArrayRecord, CODEC: ConfigRecord}, {METRICS: MetricRecord})
        meta = config_values(content.config_records[CODEC], self.limits, CODEC)
        arrays = parse_arrays(content.array_records[UPDATE], self.limits, UPDATE)
        telemetry = (
            metric_values(content.metric_records[METRICS], self.limits, METRICS)
            if METRICS in content.metric_records
            else {}
        )
        size = wire_bytes(content)  # safe now: every string and number has been checked
        claims = self.claims(meta)
        encoded = Encoded(arrays, meta)
        t0 = time.perf_counter()
        if self.opener is not None:
            encoded = self.opener(encoded, server_round, node)
        elif SEAL_META in meta:
            raise PayloadError("the update is sealed but this aggregator has security.seal off")
        opened = time.perf_counter() - t0
        update = self.codec.decode(encoded, like=self.like)
        check_update(update, self.like)
        seal_s = float(telemetry.get(SEAL_SECONDS, 0.0))
        seal_s = seal_s if 0.0 <= seal_s <= self.max_seconds else 0.0
        return DecodedReply(node, claims, update, size, seal_s, opened)

    def claims(self, meta: dict[str, Scalar]) -> Claims:
        """A reply header's claims, each within its bounds (PayloadError otherwise)."""
        return Claims(
            num_examples=_int(meta, NUM_EXAMPLES, 1, self.max_examples),
            train_loss=_number(meta, TRAIN_LOSS, -math.inf, math.inf),
            client_id=_int(meta, CLIENT_ID, 0, MAX_CLIENT_ID),
            train_seconds=_number(meta, TRAIN_SECONDS, 0.0, self.max_seconds),
            encode_seconds=_number(meta, ENCODE_SECONDS, 0.0, self.max_seconds),
        )

    # -- evaluation replies -------------------------------------------------------------

    def evaluate(self, msg: Message) -> RecordDict | Rejection:
        """An evaluation reply as the metrics Flower averages, or why it was dropped.

        Any app's metrics pass (at most `limits.max_entries` single finite numbers), the
        example count they are weighted by is bounded, and an accuracy, when there is
        one under fedpipe's name, must be a fraction."""
        node = _node(msg)
        try:
            if msg.has_error():
                return Rejection(node, f"client error: {_last_line(msg.error.reason)}")
            check_layout(msg.content, {METRICS: MetricRecord}, {PROFILE: ArrayRecord})
            values = metric_values(msg.content.metric_records[METRICS], self.limits, METRICS)
            values[NUM_EXAMPLES] = _int(values, NUM_EXAMPLES, 1, self.max_examples)
            if EVAL_ACCURACY in values:
                values[EVAL_ACCURACY] = _number(values, EVAL_ACCURACY, 0.0, 1.0)
            out = RecordDict({METRICS: MetricRecord(values)})  # type: ignore[arg-type]
            if PROFILE in msg.content:  # histograms: checked against the bins by the strategy
                parsed = parse_arrays(msg.content.array_records[PROFILE], PROFILE_LIMITS, PROFILE)
                out[PROFILE] = ArrayRecord({k: Array(v) for k, v in parsed.items()})
            return out
        except PayloadError as exc:
            return Rejection(node, f"bad evaluation reply: {safe_text(str(exc))}")
        except Exception as exc:  # noqa: BLE001 - the boundary is total by design
            return Rejection(node, f"undecodable evaluation reply ({type(exc).__name__})")


# An evaluation reply's histograms (fedpipe.drift): a few descriptors of at most a few
# thousand bins each.
PROFILE_LIMITS = ReplyLimits(max_array_bytes=1 << 20, max_arrays=16)


def decode_identity(msg: Message) -> int | Rejection:
    """The client id a node states in its identify reply, or why it was dropped.

    Hostile input like any reply; the id only orders the sample (and must match the
    client id its updates claim later), so a lying node gains a sampling position at most.
    """
    node = _node(msg)
    try:
        if msg.has_error():
            return Rejection(node, f"client error: {_last_line(msg.error.reason)}")
        check_layout(msg.content, {IDENTITY: ConfigRecord}, {})
        limits = ReplyLimits(max_array_bytes=0, max_arrays=0)
        values = config_values(msg.content.config_records[IDENTITY], limits, IDENTITY)
        return _int(values, CLIENT_ID, 0, MAX_CLIENT_ID)
    except PayloadError as exc:
        return Rejection(node, f"bad identify reply: {safe_text(str(exc))}")
    except Exception as exc:  # noqa: BLE001 - the boundary is total by design
        return Rejection(node, f"undecodable identify reply ({type(exc).__name__})")


def _node(msg: Message) -> int:
    node = msg.metadata.src_node_id
    return node if isinstance(node, int) else -1


def _size(msg: Message) -> int:
    """A dropped reply's serialized size, where it can be measured at all."""
    try:
        return 0 if msg.has_error() else wire_bytes(msg.content)
    except Exception:  # noqa: BLE001 - e.g. a string Flower cannot serialize
        return 0


def _last_line(reason: object) -> str:
    """Ray wraps a client's exception in a full traceback; its last line says why."""
    text = reason if isinstance(reason, str) else repr(reason)
    lines = [ln.strip(" '>") for ln in text[-4000:].strip().splitlines() if ln.strip(" '>")]
    return safe_text(lines[-1] if lines else text)
