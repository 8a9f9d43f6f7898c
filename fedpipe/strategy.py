"""The decode wrapper around any Flower Message-API strategy.

`CodecStrategy` wraps the real strategy (FedAvg by default): the inner strategy
configures each round's messages and computes the aggregate; fedpipe's round engine
(`fedpipe.rounds`, reached through `start`) runs the rounds. Each training reply
carries an *encoded update*; the wrapper decodes it against the global model it
broadcast, validates it, bounds its influence, and folds it in as it arrives, dropping
anything that fails with the reason logged and counted, so one bad client never stops
a round. It also measures what each round cost on the wire.

Two ways to combine a round's updates (`federation.aggregation`):
- streaming (FedAvg, FedAvgM): each update goes into an exact fixed-point running sum
  (`fedpipe.rounds.accumulate.ExactSum`) and is released; server memory is O(model).
  The inner strategy then sees a single reply, the weighted mean with the round's total
  weight, which for a weighted-mean strategy aggregates to the same thing.
- buffered (FedMedian, FedTrimmedAvg, Krum, MultiKrum, Bulyan, or when asked): every
  admitted update is held until the round ends, O(clients x model) memory (one float32
  model per reply), then handed to the inner strategy in client order.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from flwr.app import (
    Array,
    ArrayRecord,
    ConfigRecord,
    ConfigRecordValues,
    Message,
    MetricRecord,
    RecordDict,
)
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
from fedpipe.codec import Codec, Update, unflatten
from fedpipe.config import (
    BUFFERED_STRATEGIES,
    BoundsConfig,
    DownlinkConfig,
    FederationConfig,
    SecAggConfig,
)
from fedpipe.downlink import Broadcaster, Decisions
from fedpipe.drift import DeviceProfiles, Profile
from fedpipe.influence import InfluenceGuard, ReferenceGate, update_norm
from fedpipe.metrics import RoundRecord
from fedpipe.records import ARRAYS, METRICS, NUM_EXAMPLES, SEAL_REQUIRED, TRAIN_LOSS, wire_bytes
from fedpipe.rounds.accumulate import BufferedUpdates, ExactSum, HeldUpdate, OutOfRange
from fedpipe.rounds.engine import RoundEngine, RoundPlan
from fedpipe.rounds.evaluation import EvaluationIntake, EvaluationResult, profile_config
from fedpipe.secagg.keys import RoundId
from fedpipe.secagg.quant import dequantize_sum
from fedpipe.secagg.server import SecAggRound
from fedpipe.validation import round_fields

__all__ = [
    "CodecStrategy",
    "apply_update",
    "build_strategy",
    "cast_like",
    "streams",
]

log = logging.getLogger(__name__)

EvaluateFn = Callable[[int, ArrayRecord], MetricRecord | None]


def streams(cfg: FederationConfig) -> bool:
    """Whether rounds fold updates as they arrive (else every update is held)."""
    return cfg.aggregation != "buffered" and cfg.strategy not in BUFFERED_STRATEGIES


def build_strategy(cfg: FederationConfig) -> Strategy:
    """The configured Flower strategy; fedpipe wraps it, never replaces it.

    fedpipe's engine samples the round (reproducibly, `fedpipe.rounds.sampling`) and
    shows the inner strategy only the sampled nodes, so the inner strategy takes all of
    them: fraction 1 and no minimum of its own (the engine enforces min_nodes).
    """
    common: dict[str, Any] = {
        "fraction_train": 1.0,
        "fraction_evaluate": 1.0 if cfg.fraction_evaluate > 0 else 0.0,
        "min_train_nodes": 1,
        "min_evaluate_nodes": 1 if cfg.fraction_evaluate > 0 else 0,
        "min_available_nodes": 1,
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


def _mean_reply(
    mean: Mapping[str, np.ndarray], like: Update, weight: float, loss: float
) -> Message:
    """A round's aggregate as the single reply a weighted-mean strategy averages to it."""
    metrics = MetricRecord({NUM_EXAMPLES: weight, TRAIN_LOSS: loss})
    content = RecordDict({ARRAYS: cast_like(mean, like), METRICS: metrics})
    return Message(content, dst_node_id=0, message_type="train")


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
    secure: bool = False  # a SecAgg round: only the sum was decoded
    masked_bytes: int = 0  # SecAgg: the masked inputs' bytes (payload_bytes: all stages)
    abandoned: bool = False
    secagg_replies: list[int] | None = None  # valid replies per SecAgg stage
    downlink: Decisions = field(default_factory=Decisions)  # what each message carried
    broadcast_seconds: float = 0.0
    evaluation: EvaluationResult | None = None  # federated evaluation, when it ran


Pending = tuple[DecodedReply, float]  # a decoded reply and its update's L2 norm


@dataclass
class _Intake:
    """One training stage's replies on their way into the aggregate."""

    server_round: int
    gate: ReferenceGate[Pending]
    clients: Mapping[int, int]  # node -> client id it identified as (when known)
    max_terms: int
    weights: list[float] = field(default_factory=list)  # every decoded reply's claim
    norms: list[float] = field(default_factory=list)  # ... and norm: next reference
    factors: list[float] = field(default_factory=list)  # admitted weight / max weight
    losses: list[float] = field(default_factory=list)  # admitted weight x train loss
    admitted: list[float] = field(default_factory=list)  # admitted weights
    exact: ExactSum | None = None
    max_weight: float = 1.0
    held: BufferedUpdates = field(default_factory=BufferedUpdates)


class CodecStrategy(Strategy):
    """Decode, validate, bound and fold replies; the inner strategy aggregates."""

    def __init__(  # noqa: PLR0913 - every part is configured by the caller
        self,
        inner: Strategy,
        codec: Codec,
        on_round_end: Callable[[RoundRecord], None] | None = None,
        downlink: DownlinkConfig | None = None,
        checkpoint: Callable[[int, ArrayRecord], None] | None = None,
        round_offset: int = 0,
        opener: Opener | None = None,
        bounds: BoundsConfig | None = None,
        streaming: bool = True,
        plan: RoundPlan | None = None,
        on_progress: Callable[[int, int, int], None] | None = None,
        secagg: SecAggConfig | None = None,
        announce: Mapping[str, ConfigRecordValues] | None = None,
        profile: Profile | None = None,
    ) -> None:
        self.inner = inner
        self.codec = codec
        self.checkpoint = checkpoint
        # Rounds already done before this start() (a resumed run).
        self.round_offset = round_offset
        # Sealed updates: opens each payload for (round, node) or raises PayloadError.
        self.opener = opener
        self.on_round_end = on_round_end
        self.on_progress = on_progress  # (round, replies so far, sent) within a stage
        self.bounds = bounds or BoundsConfig()
        self.guard = InfluenceGuard(self.bounds)
        self.streaming = streaming
        self.plan = plan or RoundPlan()
        # Compressed broadcast: the public model devices hold, and who holds which version.
        self.broadcaster = (
            Broadcaster(downlink, self.plan.seed)
            if downlink is not None and downlink.compressed
            else None
        )
        self._global: Update = {}
        self._boundary = DecodeBoundary(codec, {}, opener, max_examples=self.bounds.max_examples)
        self._round = _Round(started=time.perf_counter())
        self._intake: _Intake | None = None
        # Secure aggregation: the protocol's config and the next round's clipping range.
        self.secagg = secagg
        self._clip = secagg.clip if secagg is not None else 0.0
        # Settings every train and evaluate config carries (fedpipe.flower.spec: how a
        # device's fedpipe_mod learns the codecs).
        self.announce = dict(announce or {})
        # Drift: federated evaluation asks devices for histograms in this profile's bins;
        # the last round's, merged, are kept for the exported model's reference profile.
        self.profile = profile
        self.device_profiles: DeviceProfiles | None = None

    # -- sending ----------------------------------------------------------------------

    def _send(self, messages: Iterable[Message]) -> list[Message]:
        """Compress the broadcast (if configured) and count what goes down."""
        messages = list(messages)
        if self.broadcaster is not None:
            self._broadcast(messages)
        # Messages share RecordDicts (a strategy's one per round, the broadcaster's one
        # per starting version): measure each once.
        sizes: dict[int, int] = {}
        for m in messages:
            key = id(m.content)
            if key not in sizes:
                sizes[key] = wire_bytes(m.content)
            self._round.bytes_down += sizes[key]
        return messages

    def _broadcast(self, messages: list[Message]) -> None:
        """Give each message what its device misses of the public model, not the model."""
        assert self.broadcaster is not None
        b = self.broadcaster
        by_content: dict[int, tuple[RecordDict, list[Message]]] = {}
        before = b.encode_seconds
        for m in messages:  # strategies share one content, but do not have to
            by_content.setdefault(id(m.content), (m.content, []))[1].append(m)
        for content, group in by_content.values():
            if ARRAYS not in content.array_records:
                continue
            b.publish({k: a.numpy() for k, a in content.array_records[ARRAYS].items()})
            nodes = [m.metadata.dst_node_id for m in group]
            per_node = b.contents(content, nodes, self._round.downlink)
            for m in group:
                m.content = per_node[m.metadata.dst_node_id]
        self._round.broadcast_seconds += b.encode_seconds - before

    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        """Messages for the nodes `grid` offers, in its order (the engine's sample order:
        the first of them set the bounds reference when there is no earlier one)."""
        self._round = _Round(started=time.perf_counter())
        self._global = {k: a.numpy() for k, a in arrays.items()}
        limits = ReplyLimits.for_model(self._global)
        self._boundary = DecodeBoundary(
            self.codec, self._global, self.opener, limits, self.bounds.max_examples
        )
        # Flower's Grid inflates each reply before fedpipe sees it: bound that too.
        limit_array_inflation(limits.max_array_bytes)
        config = ConfigRecord({**config, **self.announce})
        if self.opener is not None:  # tells devices without the key why they are refused
            config = ConfigRecord({**config, SEAL_REQUIRED: True})
        order = {node: i for i, node in enumerate(grid.get_node_ids())}
        messages = self._send(self.inner.configure_train(server_round, arrays, config, grid))
        messages.sort(key=lambda m: order.get(m.metadata.dst_node_id, len(order)))
        self._round.sampled = len(messages)
        nodes = [m.metadata.dst_node_id for m in messages]
        self._intake = _Intake(
            server_round=server_round,
            gate=ReferenceGate(nodes, self.bounds.reference_clients, self.guard.reference),
            # who each node said it is; without identify, devices' claims go unchecked
            clients=dict(getattr(grid, "clients", {})) if self.plan.identify else {},
            max_terms=max(1, len(messages)),
        )
        return messages

    def configure_evaluate(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        extra = profile_config(self.profile) if self.profile is not None else {}
        config = ConfigRecord({**config, **self.announce, **extra})
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

    def receive_train(self, msg: Message) -> None:
        """One training reply: decode, check, then fold (or hold until the round's bounds
        reference is known). Never raises for anything the reply contains."""
        intake = self._intake
        if intake is None:
            raise RuntimeError("receive_train before configure_train")
        node = msg.metadata.src_node_id
        self._answered(msg)
        t0 = time.perf_counter()  # decode_seconds: boundary, norm and fold together
        out = self._boundary.train(msg, intake.server_round)
        if isinstance(out, DecodedReply):
            said = intake.clients.get(node)
            if said is not None and out.claims.client_id != said:
                reason = f"claims client {out.claims.client_id} but identified as {said}"
                out = Rejection(node, reason, out.wire_bytes)
        if isinstance(out, Rejection):
            self._reject(out)
            released = intake.gate.offer(node, None)
        else:
            self._account(out)
            weight, norm = float(out.claims.num_examples), update_norm(out.update)
            intake.weights.append(weight)
            intake.norms.append(norm)
            released = intake.gate.offer(node, (out, norm), weight, norm)
        for pending in released:
            self._fold(intake, *pending)
        self._round.decode_seconds += time.perf_counter() - t0

    def _answered(self, msg: Message) -> None:
        """A device answered: it holds what it was sent, unless it answered an error
        (perhaps it could not rebuild the broadcast: it gets the whole model next)."""
        if self.broadcaster is not None:
            node = msg.metadata.src_node_id
            if msg.has_error():
                self.broadcaster.failed(node)
            else:
                self.broadcaster.answered(node)

    def lost_train(self, node: int) -> None:
        """A sampled node that will not answer: it no longer holds up the reference."""
        if self._intake is not None:
            for pending in self._intake.gate.offer(node, None):
                self._fold(self._intake, *pending)

    def secure_train(
        self,
        grid: Grid,
        server_round: int,
        messages: list[Message],
        clients: Mapping[int, int],
        deadline: float,
    ) -> ArrayRecord | None:
        """A SecAgg round (fedpipe.secagg.server) instead of the training stage: the
        aggregate from the exact sum of the devices' quantized updates, or None when the
        round is abandoned. No single update is ever decoded, so the influence bounds
        cannot look at one: the grid's clipping range and weight cap bound it instead."""
        assert self.secagg is not None
        self._intake = None
        run_id = getattr(getattr(grid, "run", None), "run_id", 0)
        protocol = SecAggRound(
            self.secagg,
            RoundId(int(run_id), server_round),
            self.plan.seed,
            self._clip,
            self.bounds.weight_ratio,
            self.bounds.max_examples,
            self.plan.poll_s,
        )
        count = sum(int(v.size) for v in self._global.values())
        out = protocol.run(
            grid, messages, clients, deadline, count, self._boundary.limits, self._boundary.claims
        )
        r = self._round
        r.secure, r.abandoned = True, out.total is None
        r.bytes_up, r.bytes_down = out.bytes_up, out.bytes_down
        r.payloads, r.payload_bytes, r.masked_bytes = out.devices, out.bytes_up, out.masked_bytes
        r.rejected = sum(s.rejected for s in out.stages.values())
        r.replied = out.devices
        for claims in out.claims:
            r.encode_seconds += claims.encode_seconds
            r.train_seconds += claims.train_seconds
            r.slowest_train_seconds = max(r.slowest_train_seconds, claims.train_seconds)
        # the aggregator's own work (decoding and folding replies, rebuilding secrets,
        # removing masks), not the stages' waits for devices
        r.decode_seconds = out.seconds.get("decode", 0.0) + out.seconds.get("reconstruct", 0.0)
        r.secagg_replies = out.replies
        if self.broadcaster is not None:  # a masked input says the device rebuilt the model
            masked = {c.client_id for c in out.claims}
            for m in messages:
                node = m.metadata.dst_node_id
                if clients.get(node) in masked:
                    self.broadcaster.answered(node)
                else:
                    self.broadcaster.failed(node)
        if out.total is None:
            return None
        values, weight = dequantize_sum(out.total, out.devices, out.clip, out.bits)
        if weight <= 0:
            log.warning("round %d: the secure sum carries no weight; model unchanged", server_round)
            r.abandoned = True
            return None
        mean = values / weight  # (count,) float64: the weighted mean update
        peak = float(np.abs(mean).max()) if mean.size else 0.0
        self._clip = max(self.secagg.clip / 16, self.secagg.clip_ratio * peak)
        update = unflatten(mean, self._global)
        examples = [float(c.num_examples) for c in out.claims]
        loss = math.fsum(e * c.train_loss for e, c in zip(examples, out.claims, strict=True))
        reply = _mean_reply(
            {k: g.astype(np.float64) + update[k] for k, g in self._global.items()},
            self._global,
            weight * out.max_weight,
            loss / max(math.fsum(examples), 1.0),
        )
        return self._aggregate(server_round, [reply])[0]

    def _fold(self, intake: _Intake, reply: DecodedReply, norm: float) -> None:
        """Bound one reply against the round's reference and add it to the aggregate."""
        ref = intake.gate.reference
        admitted = self.guard.admit(float(reply.claims.num_examples), reply.update, norm, ref)
        if admitted.rejected is not None:
            self._reject(Rejection(reply.node_id, admitted.rejected))
            return
        if self.streaming:
            if intake.exact is None:  # the grid is fixed by the reference, before any term
                intake.max_weight = self.guard.max_weight(ref)
                intake.exact = ExactSum(
                    self._global, intake.max_terms, self.guard.max_coordinate(ref)
                )
            factor = admitted.weight / intake.max_weight
            try:
                intake.exact.add(admitted.update, factor)
            except OutOfRange as exc:
                self._reject(Rejection(reply.node_id, str(exc)))
                return
            intake.factors.append(factor)
        else:
            intake.held.add(
                HeldUpdate(
                    reply.claims.client_id,
                    reply.node_id,
                    admitted.weight,
                    reply.claims.train_loss,
                    admitted.update,
                )
            )
        self._round.capped += admitted.capped
        self._round.clipped += admitted.clipped
        intake.admitted.append(admitted.weight)
        intake.losses.append(admitted.weight * reply.claims.train_loss)

    def finish_train(self, server_round: int) -> tuple[ArrayRecord | None, MetricRecord | None]:
        """The round's aggregate from what was folded (None if nothing was)."""
        intake, self._intake = self._intake, None
        if intake is None:
            return None, None
        for pending in intake.gate.close():
            self._fold(intake, *pending)
        self.guard.end_round(intake.weights, intake.norms)
        self._round.replied = len(intake.admitted)
        lost = self._round.sampled - self._round.replied - self._round.rejected
        if lost > 0:
            log.warning("round %d: %d sampled client(s) did not reply in time", server_round, lost)
        if not intake.admitted:
            log.warning("round %d: no valid update; the global model is unchanged", server_round)
            return None, None
        replies = self._streamed(intake) if self.streaming else self._buffered(intake)
        return self._aggregate(server_round, replies)

    def _aggregate(
        self, server_round: int, replies: list[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        """The inner strategy's aggregate of `replies`, in the global model's dtypes."""
        arrays, metrics = self.inner.aggregate_train(server_round, replies)
        if arrays is not None:
            arrays = cast_like({k: a.numpy() for k, a in arrays.items()}, self._global)
        loss = metrics.get(TRAIN_LOSS) if metrics is not None else None
        if isinstance(loss, int | float):
            self._round.train_loss = float(loss)
        return arrays, metrics

    def _streamed(self, intake: _Intake) -> list[Message]:
        """The round as one reply: the exact weighted mean, with the round's total weight.

        Sums of the weights use math.fsum (correctly rounded, so order-independent).
        """
        assert intake.exact is not None
        total = intake.exact.total()
        scale = 1.0 / math.fsum(intake.factors)
        weight = math.fsum(intake.admitted)
        mean = {k: g.astype(np.float64) + total[k] * scale for k, g in self._global.items()}
        return [_mean_reply(mean, self._global, weight, math.fsum(intake.losses) / weight)]

    def _buffered(self, intake: _Intake) -> list[Message]:
        """Every admitted update as the full weights Flower's strategies average."""
        replies: list[Message] = []
        for held in intake.held.in_client_order():
            metrics = MetricRecord({NUM_EXAMPLES: held.weight, TRAIN_LOSS: held.train_loss})
            content = RecordDict(
                {ARRAYS: apply_update(self._global, held.update), METRICS: metrics}
            )
            replies.append(Message(content, dst_node_id=held.node_id, message_type="train"))
        return replies

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        """Flower's Strategy API: every reply at once, through the same streaming path."""
        for msg in replies:
            self.receive_train(msg)
        return self.finish_train(server_round)

    def aggregate_evaluate(
        self, server_round: int, replies: Iterable[Message]
    ) -> MetricRecord | None:
        """Federated evaluation replies through the same boundary, then what Flower
        averages (fedpipe.rounds.evaluation: one set of metric names for all), the
        spread across devices and the devices' histograms for the drift profile."""
        intake = EvaluationIntake(self.profile)
        for msg in replies:
            self._answered(msg)
            out = self._boundary.evaluate(msg)
            if isinstance(out, Rejection):
                intake.reject(out.node_id, out.reason)
                continue
            self._round.bytes_up += wire_bytes(msg.content)  # checked: safe to serialize
            intake.add(msg.metadata.src_node_id, out)
        kept = intake.kept()
        self._round.evaluation = intake.result()
        if intake.profiles is not None and intake.profiles.devices:
            self.device_profiles = intake.profiles
        if not kept:
            return None
        return self.inner.aggregate_evaluate(server_round, kept)

    def summary(self) -> None:
        log.info("fedpipe codec %r around %s", self.codec.name, type(self.inner).__name__)
        self.inner.summary()

    # -- the round loop ---------------------------------------------------------------

    def finish_round(self, server_round: int, central: MetricRecord | None) -> RoundRecord:
        """The round's record (after centralized evaluation), handed to on_round_end."""
        r = self._round
        central = central or MetricRecord()
        params = sum(int(v.size) for v in self._global.values())
        bits = 8 * r.payload_bytes / (r.payloads * params) if r.payloads and params else None
        masked = 8 * r.masked_bytes / (r.payloads * params) if r.secure and bits else None
        down = 8 * r.bytes_down / (r.sampled * params) if r.sampled and params else None
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
            bits_per_param_masked=masked,
            bits_per_param_down=down,
            secagg_abandoned=r.abandoned,
            secagg_dropped=r.sampled - r.replied if r.secure else 0,
            secagg_replies=r.secagg_replies,
            downlink_full=r.downlink.full,
            downlink_diff=r.downlink.diff,
            downlink_catchup=r.downlink.catchup,
            downlink_current=r.downlink.current,
            downlink_behind=r.downlink.behind,
            broadcast_seconds=r.broadcast_seconds,
            **round_fields(central),
            **(r.evaluation.fields() if r.evaluation is not None else {}),
        )
        if self.on_round_end is not None:
            self.on_round_end(rec)
        return rec

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
        """fedpipe's round engine (stages, streaming replies) instead of Flower's loop."""
        try:
            return RoundEngine(self).run(
                grid,
                initial_arrays,
                num_rounds,
                timeout,
                train_config or ConfigRecord(),
                evaluate_config or ConfigRecord(),
                evaluate_fn,
            )
        finally:  # the inflation bound is this run's (configure_train sets it per round)
            limit_array_inflation(None)
