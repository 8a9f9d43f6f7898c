"""The decode wrapper around any Flower Message-API strategy.

`CodecStrategy` sits between Flower's round loop (`Strategy.start`, reused as is) and
the real strategy (FedAvg by default). Each training reply carries an *encoded update*;
the wrapper decodes it against the global model it broadcast, validates it, turns it
into the full float32 weights `global + update` that every Flower strategy expects, and
drops anything that fails, with the reason logged and counted, so one bad client never
stops a round. It also measures what each round cost on the wire.
"""

from __future__ import annotations

import logging
import math
import time
from collections import Counter
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict
from flwr.serverapp import Grid
from flwr.serverapp.strategy import (
    FedAvg,
    FedAvgM,
    FedMedian,
    FedTrimmedAvg,
    Result,
    Strategy,
)

from fedpipe.codec import Codec, Encoded, PayloadError, Update, check_update
from fedpipe.config import FederationConfig
from fedpipe.crypto.seal import SEAL_META
from fedpipe.metrics import RoundRecord
from fedpipe.records import (
    ARRAYS,
    CLIENT_ID,
    ENCODE_SECONDS,
    INFO,
    METRICS,
    NUM_EXAMPLES,
    SEAL_REQUIRED,
    SEAL_SECONDS,
    TRAIN_SECONDS,
    decode_records,
    record_int,
    wire_bytes,
)

__all__ = ["CodecStrategy", "apply_update", "build_strategy", "cast_like", "compress_broadcast"]

log = logging.getLogger(__name__)

EvaluateFn = Callable[[int, ArrayRecord], MetricRecord | None]
Opener = Callable[[Encoded, int, int], Encoded]  # (payload, server round, node id)


def build_strategy(cfg: FederationConfig) -> Strategy:
    """The configured Flower strategy; fedpipe wraps it, never replaces it."""
    common: dict[str, Any] = {
        "fraction_train": cfg.fraction_train,
        "fraction_evaluate": cfg.fraction_evaluate,
        "min_train_nodes": cfg.min_nodes,
        "min_evaluate_nodes": cfg.min_nodes if cfg.fraction_evaluate > 0 else 0,
        "min_available_nodes": cfg.min_nodes,
    }
    if cfg.strategy == "fedavgm":
        return FedAvgM(**common, server_momentum=cfg.server_momentum)
    if cfg.strategy == "fedmedian":
        return FedMedian(**common)
    if cfg.strategy == "fedtrimmedavg":
        return FedTrimmedAvg(**common, beta=cfg.trim_beta)
    return FedAvg(**common)


def cast_like(values: Mapping[str, np.ndarray], like: Update) -> ArrayRecord:
    """`values` as an ArrayRecord in the dtypes of `like` (integer buffers are rounded).

    Flower's weighted mean returns float64 for integer buffers such as BatchNorm's
    num_batches_tracked; the global model keeps its own dtypes.
    """
    out: dict[str, Array] = {}
    for name, ref in like.items():
        value = np.rint(values[name]) if ref.dtype.kind in "iu" else values[name]
        out[name] = Array(np.asarray(value, dtype=ref.dtype, order="C"))
    return ArrayRecord(out)


def apply_update(global_arrays: Update, update: Update) -> ArrayRecord:
    """global + update, in the global model's dtypes."""
    return cast_like({k: g + update[k] for k, g in global_arrays.items()}, global_arrays)


def compress_broadcast(arrays: ArrayRecord, dtype: str) -> ArrayRecord:
    """The global model as broadcast: float32 arrays cast to `dtype` where they fit.

    An array with a value beyond the target's range stays float32 rather than become Inf.
    Integer buffers are untouched. The server keeps its float32 copy; clients send
    updates relative to what they received, so the rounding never reaches the aggregate.
    """
    if dtype == "float32":
        return arrays
    target = np.dtype(dtype)
    limit = float(np.finfo(target).max)
    out: dict[str, Array] = {}
    for name, arr in arrays.items():
        a = arr.numpy()
        if a.dtype == np.float32 and (a.size == 0 or float(np.abs(a).max()) <= limit):
            a = a.astype(target)
        out[name] = Array(np.asarray(a, order="C"))
    return ArrayRecord(out)


def _check_metrics(content: RecordDict) -> MetricRecord:
    if METRICS not in content.metric_records:
        raise PayloadError(f"reply has no {METRICS!r} MetricRecord")
    metrics = content.metric_records[METRICS]
    weight = metrics.get(NUM_EXAMPLES)
    if not isinstance(weight, int | float) or not math.isfinite(weight) or weight <= 0:
        raise PayloadError(f"{NUM_EXAMPLES}={weight!r} must be a positive number")
    loss = metrics.get("train_loss")
    if not isinstance(loss, int | float) or not math.isfinite(loss):
        raise PayloadError(f"train_loss={loss!r} must be a finite number")
    return metrics


def _seconds(content: RecordDict, key: str) -> float:
    value = content.metric_records[METRICS].get(key, 0.0)
    return float(value) if isinstance(value, int | float) and math.isfinite(value) else 0.0


@dataclass
class _Round:
    """What one round has cost so far."""

    started: float
    sampled: int = 0
    replied: int = 0
    bytes_up: int = 0
    bytes_down: int = 0
    decode_seconds: float = 0.0
    rejected: int = 0  # replies that arrived but were dropped
    payloads: int = 0  # training replies that arrived with content
    payload_bytes: int = 0  # their serialized size
    encode_seconds: float = 0.0  # summed over accepted clients
    train_seconds: float = 0.0
    slowest_train_seconds: float = 0.0
    crypto_seconds: float = 0.0  # server opening + accepted clients' sealing
    train_loss: float | None = None


class CodecStrategy(Strategy):
    """Decode, validate and account for replies, then delegate to `inner`."""

    def __init__(
        self,
        inner: Strategy,
        codec: Codec,
        on_round_end: Callable[[RoundRecord], None] | None = None,
        downlink: str = "float32",
        checkpoint: Callable[[int, ArrayRecord], None] | None = None,
        round_offset: int = 0,
        opener: Opener | None = None,
    ) -> None:
        self.inner = inner
        self.codec = codec
        self.downlink = downlink
        self.checkpoint = checkpoint
        # Rounds already done before this start() (a resumed run): Flower's loop counts
        # from 1, clients and records see the run's own round numbers.
        self.round_offset = round_offset
        # Sealed updates: opens each payload for (round, node) or raises PayloadError.
        self.opener = opener
        self.on_round_end = on_round_end
        self._global: Update = {}
        self._round = _Round(started=time.perf_counter())

    # -- sending ----------------------------------------------------------------------

    def _send(self, messages: Iterable[Message]) -> list[Message]:
        """Compress the broadcast (if configured) and count what goes down."""
        messages = list(messages)
        # Strategies share one RecordDict across all messages of a round: do it once.
        sizes: dict[int, int] = {}
        for m in messages:
            key = id(m.content)
            if key not in sizes:
                if ARRAYS in m.content.array_records:
                    model = m.content.array_records[ARRAYS]
                    m.content[ARRAYS] = compress_broadcast(model, self.downlink)
                sizes[key] = wire_bytes(m.content)
            self._round.bytes_down += sizes[key]
        return messages

    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        self._round = _Round(started=time.perf_counter())
        self._global = {k: a.numpy() for k, a in arrays.items()}
        server_round += self.round_offset
        if self.opener is not None:  # tells devices without the key why they are refused
            config = ConfigRecord({**config, SEAL_REQUIRED: True})
        messages = self._send(self.inner.configure_train(server_round, arrays, config, grid))
        self._round.sampled = len(messages)
        return messages

    def configure_evaluate(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        server_round += self.round_offset
        return self._send(self.inner.configure_evaluate(server_round, arrays, config, grid))

    # -- receiving --------------------------------------------------------------------

    def _decode(self, content: RecordDict, server_round: int, node: int) -> RecordDict:
        metrics = _check_metrics(content)
        encoded = decode_records(content)
        if self.opener is not None:
            t0 = time.perf_counter()
            try:
                encoded = self.opener(encoded, server_round, node)
            finally:
                self._round.crypto_seconds += time.perf_counter() - t0
        elif SEAL_META in encoded.meta:
            raise PayloadError("the update is sealed but this aggregator has security.seal off")
        update = self.codec.decode(encoded, like=self._global)
        check_update(update, self._global)
        # Only what Flower's strategies aggregate: devices running other fedpipe versions may
        # report other metrics, and Flower refuses to average records with unequal keys.
        kept = MetricRecord({k: metrics[k] for k in (NUM_EXAMPLES, "train_loss")})
        return RecordDict({ARRAYS: apply_update(self._global, update), METRICS: kept})

    def _fail(self, node_id: int, reason: str) -> None:
        # Ray wraps a client's exception in a full traceback; its last line says why.
        lines = [ln.strip(" '>") for ln in reason.strip().splitlines() if ln.strip(" '>")]
        reason = (lines[-1] if lines else reason)[:300]
        self._round.rejected += 1
        log.warning("round reply from node %d dropped: %s", node_id, reason)

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        server_round += self.round_offset
        accepted: list[tuple[int, Message]] = []
        replies = list(replies)
        # A node that answers twice in a round (a replay, or a confused device) is dropped
        # altogether: which of its replies is genuine cannot be told.
        counts = Counter(m.metadata.src_node_id for m in replies if not m.has_error())
        for msg in replies:
            node = msg.metadata.src_node_id
            if msg.has_error():
                self._fail(node, f"client error: {msg.error.reason}")
                continue
            if counts[node] > 1:
                self._fail(node, f"{counts[node]} replies from node {node} in round {server_round}")
                continue
            size = wire_bytes(msg.content)
            self._round.bytes_up += size
            self._round.payload_bytes += size
            self._round.payloads += 1
            t0 = time.perf_counter()
            try:
                info = msg.content.config_records.get(INFO, ConfigRecord())
                client_id = record_int(info, CLIENT_ID, node)
                decoded = self._decode(msg.content, server_round, node)
            except PayloadError as exc:
                self._fail(node, f"bad payload: {exc}")
                continue
            finally:
                self._round.decode_seconds += time.perf_counter() - t0
            self._round.encode_seconds += _seconds(msg.content, ENCODE_SECONDS)
            self._round.crypto_seconds += _seconds(msg.content, SEAL_SECONDS)
            trained = _seconds(msg.content, TRAIN_SECONDS)
            self._round.train_seconds += trained
            self._round.slowest_train_seconds = max(self._round.slowest_train_seconds, trained)
            msg.content = decoded
            accepted.append((client_id, msg))
        # Aggregate in client order: float sums then do not depend on arrival order.
        accepted.sort(key=lambda pair: pair[0])
        self._round.replied = len(accepted)
        lost = self._round.sampled - len(accepted) - self._round.rejected
        if lost > 0:
            log.warning("round %d: %d sampled client(s) did not reply in time", server_round, lost)
        if not accepted:
            log.warning("round %d: no valid update; the global model is unchanged", server_round)
            return None, None
        arrays, metrics = self.inner.aggregate_train(server_round, [m for _, m in accepted])
        if arrays is not None:
            arrays = cast_like({k: a.numpy() for k, a in arrays.items()}, self._global)
        loss = metrics.get("train_loss") if metrics is not None else None
        if isinstance(loss, int | float):
            self._round.train_loss = float(loss)
        return arrays, metrics

    def aggregate_evaluate(
        self, server_round: int, replies: Iterable[Message]
    ) -> MetricRecord | None:
        replies = list(replies)
        self._round.bytes_up += sum(wire_bytes(m.content) for m in replies if not m.has_error())
        return self.inner.aggregate_evaluate(server_round + self.round_offset, replies)

    def summary(self) -> None:
        log.info("fedpipe codec %r around %s", self.codec.name, type(self.inner).__name__)
        self.inner.summary()

    # -- the round loop ---------------------------------------------------------------

    def _finish_round(self, server_round: int, central: MetricRecord | None) -> None:
        r = self._round
        central = central or MetricRecord()
        params = sum(int(v.size) for v in self._global.values())
        bits = 8 * r.payload_bytes / (r.payloads * params) if r.payloads and params else None
        rec = RoundRecord(
            round=server_round,
            accuracy=float(central.get("accuracy", math.nan)),  # type: ignore[arg-type]
            loss=float(central.get("loss", math.nan)),  # type: ignore[arg-type]
            train_loss=r.train_loss,
            clients_sampled=r.sampled,
            clients_replied=r.replied,
            clients_failed=r.sampled - r.replied,
            bytes_up=r.bytes_up,
            bytes_down=r.bytes_down,
            seconds=time.perf_counter() - r.started,
            bits_per_param_up=bits,
            encode_seconds=r.encode_seconds,
            decode_seconds=r.decode_seconds,
            train_seconds=r.train_seconds,
            slowest_train_seconds=r.slowest_train_seconds,
            crypto_seconds=r.crypto_seconds,
        )
        if self.on_round_end is not None:
            self.on_round_end(rec)

    def start(  # noqa: PLR0913 - mirrors Strategy.start
        self,
        grid: Grid,
        initial_arrays: ArrayRecord,
        num_rounds: int = 3,
        timeout: float = 3600,
        train_config: ConfigRecord | None = None,
        evaluate_config: ConfigRecord | None = None,
        evaluate_fn: EvaluateFn | None = None,
    ) -> Result:
        """Flower's own round loop; centralized evaluation closes each round's record."""

        def evaluate_and_record(local_round: int, arrays: ArrayRecord) -> MetricRecord | None:
            server_round = local_round + self.round_offset
            res = evaluate_fn(server_round, arrays) if evaluate_fn else None
            if local_round > 0:
                self._finish_round(server_round, res)
                if self.checkpoint is not None:  # after the metrics line: no gap on resume
                    self.checkpoint(server_round, arrays)
            return res

        result = super().start(
            grid,
            initial_arrays,
            num_rounds,
            timeout,
            train_config,
            evaluate_config,
            evaluate_and_record,
        )
        if len(result.arrays) == 0:  # Flower leaves it empty if no round aggregated
            result.arrays = initial_arrays
        return result
