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
    Bulyan,
    FedAvg,
    FedAvgM,
    FedMedian,
    FedTrimmedAvg,
    Krum,
    MultiKrum,
    Result,
    Strategy,
)

from fedpipe.boundary import (
    DecodeBoundary,
    DecodedReply,
    Opener,
    Rejection,
    ReplyLimits,
    limit_array_inflation,
)
from fedpipe.codec import Codec, Update
from fedpipe.config import BoundsConfig, FederationConfig
from fedpipe.influence import InfluenceGuard, update_norm
from fedpipe.metrics import RoundRecord
from fedpipe.records import ARRAYS, METRICS, NUM_EXAMPLES, SEAL_REQUIRED, TRAIN_LOSS, wire_bytes

__all__ = ["CodecStrategy", "apply_update", "build_strategy", "cast_like", "compress_broadcast"]

log = logging.getLogger(__name__)

EvaluateFn = Callable[[int, ArrayRecord], MetricRecord | None]


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
    if cfg.strategy == "krum":
        return Krum(**common, num_malicious_nodes=cfg.num_malicious)
    if cfg.strategy == "multikrum":
        return MultiKrum(
            **common, num_malicious_nodes=cfg.num_malicious, num_nodes_to_select=cfg.krum_select
        )
    if cfg.strategy == "bulyan":
        return Bulyan(**common, num_malicious_nodes=cfg.num_malicious)
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


@dataclass
class _Round:
    """What one round has cost so far."""

    started: float
    sampled: int = 0
    replied: int = 0
    bytes_up: int = 0
    bytes_down: int = 0
    decode_seconds: float = 0.0
    rejected: int = 0  # replies that arrived but were dropped (boundary or bounds)
    capped: int = 0  # accepted replies whose weight was lowered to the cap
    clipped: int = 0  # accepted replies whose update was scaled down to the norm bound
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
        bounds: BoundsConfig | None = None,
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
        self.bounds = bounds or BoundsConfig()
        self.guard = InfluenceGuard(self.bounds)
        self._global: Update = {}
        self._boundary = DecodeBoundary(codec, {}, opener, max_examples=self.bounds.max_examples)
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
        limits = ReplyLimits.for_model(self._global)
        self._boundary = DecodeBoundary(
            self.codec, self._global, self.opener, limits, self.bounds.max_examples
        )
        # Flower's Grid inflates each reply before fedpipe sees it: bound that too.
        limit_array_inflation(limits.max_array_bytes)
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

    def _reject(self, rejection: Rejection) -> None:
        self._round.rejected += 1
        self._round.bytes_up += rejection.wire_bytes
        log.warning("round reply from node %d dropped: %s", rejection.node_id, rejection.reason)

    def _account(self, reply: DecodedReply) -> None:
        r, claims = self._round, reply.claims
        r.bytes_up += reply.wire_bytes
        r.payload_bytes += reply.wire_bytes
        r.payloads += 1
        r.encode_seconds += claims.encode_seconds + reply.seal_seconds
        r.crypto_seconds += reply.open_seconds + reply.seal_seconds
        r.train_seconds += claims.train_seconds
        r.slowest_train_seconds = max(r.slowest_train_seconds, claims.train_seconds)

    def _decode_all(
        self, server_round: int, replies: list[Message]
    ) -> list[tuple[DecodedReply, Message]]:
        """Every reply through the decode boundary; rejections are logged and counted."""
        # A node that answers twice in a round (a replay, or a confused device) is dropped
        # altogether: which of its replies is genuine cannot be told.
        counts = Counter(m.metadata.src_node_id for m in replies if not m.has_error())
        decoded: list[tuple[DecodedReply, Message]] = []
        for msg in replies:
            node = msg.metadata.src_node_id
            if counts[node] > 1 and not msg.has_error():
                reason = f"{counts[node]} replies from node {node} in round {server_round}"
                self._reject(Rejection(node, reason))
                continue
            t0 = time.perf_counter()
            out = self._boundary.train(msg, server_round)
            self._round.decode_seconds += time.perf_counter() - t0
            if isinstance(out, Rejection):
                self._reject(out)
            else:
                self._account(out)
                decoded.append((out, msg))
        # Aggregate in client order: float sums then do not depend on arrival order.
        decoded.sort(key=lambda pair: (pair[0].claims.client_id, pair[0].node_id))
        return decoded

    def _bounded(self, decoded: list[tuple[DecodedReply, Message]]) -> list[Message]:
        """Each update within the influence bounds, as the full weights Flower averages."""
        norms = [update_norm(d.update) for d, _ in decoded]
        weights = [float(d.claims.num_examples) for d, _ in decoded]
        ref = self.guard.reference_for(weights, norms)
        self.guard.end_round(weights, norms)
        bounded: list[Message] = []
        for (reply, msg), norm, weight in zip(decoded, norms, weights, strict=True):
            admitted = self.guard.admit(weight, reply.update, norm, ref)
            if admitted.rejected is not None:
                self._reject(Rejection(reply.node_id, admitted.rejected))
                continue
            self._round.capped += admitted.capped
            self._round.clipped += admitted.clipped
            metrics = MetricRecord(
                {NUM_EXAMPLES: admitted.weight, TRAIN_LOSS: reply.claims.train_loss}
            )
            full = apply_update(self._global, admitted.update)
            msg.content = RecordDict({ARRAYS: full, METRICS: metrics})
            bounded.append(msg)
        return bounded

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        server_round += self.round_offset
        accepted = self._bounded(self._decode_all(server_round, list(replies)))
        self._round.replied = len(accepted)
        lost = self._round.sampled - len(accepted) - self._round.rejected
        if lost > 0:
            log.warning("round %d: %d sampled client(s) did not reply in time", server_round, lost)
        if not accepted:
            log.warning("round %d: no valid update; the global model is unchanged", server_round)
            return None, None
        arrays, metrics = self.inner.aggregate_train(server_round, accepted)
        if arrays is not None:
            arrays = cast_like({k: a.numpy() for k, a in arrays.items()}, self._global)
        loss = metrics.get(TRAIN_LOSS) if metrics is not None else None
        if isinstance(loss, int | float):
            self._round.train_loss = float(loss)
        return arrays, metrics

    def aggregate_evaluate(
        self, server_round: int, replies: Iterable[Message]
    ) -> MetricRecord | None:
        """Federated evaluation replies through the same boundary: exactly the metrics
        Flower averages, each checked, so one odd reply cannot end the round."""
        kept: list[Message] = []
        for msg in replies:
            out = self._boundary.evaluate(msg)
            if isinstance(out, Rejection):
                log.warning("evaluation reply from node %d dropped: %s", out.node_id, out.reason)
                continue
            self._round.bytes_up += wire_bytes(msg.content)  # checked: safe to serialize
            msg.content = out
            kept.append(msg)
        if not kept:
            return None
        return self.inner.aggregate_evaluate(server_round + self.round_offset, kept)

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
            clients_rejected=r.rejected,
            updates_clipped=r.clipped,
            weights_capped=r.capped,
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

        try:
            result = super().start(
                grid,
                initial_arrays,
                num_rounds,
                timeout,
                train_config,
                evaluate_config,
                evaluate_and_record,
            )
        finally:  # the inflation bound is this run's (configure_train sets it per round)
            limit_array_inflation(None)
        if len(result.arrays) == 0:  # Flower leaves it empty if no round aggregated
            result.arrays = initial_arrays
        return result
