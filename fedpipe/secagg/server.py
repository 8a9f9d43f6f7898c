"""The aggregator's side of a SecAgg round: four stages on the Grid, then the exact sum.

1. advertise: each sampled device sends two fresh public keys, a commitment to its
   self-mask seed and its example count (the weight Flower's FedAvg sees too);
2. share: each device gets its neighbours' keys (the graph, `graph.neighbour_graph`)
   and returns one encrypted box of shares per neighbour; devices left with fewer than
   t live neighbours are dropped before anyone masks with them;
3. masked input: each device gets the model, the round's grid (clip, bits, modulus,
   weight cap) and the boxes addressed to it; it trains and returns its masked,
   bit-packed codes, which are added into a running sum modulo 2^m as they arrive;
4. unmask: each device that sent a masked input is told which of its neighbours
   survived and which dropped, and returns the matching shares.
The aggregator rebuilds each survivor's seed and each dropped device's mask key from t
shares (checked against the commitment and the advertised public key), removes the
masks that did not cancel and is left with exactly the sum of the quantized updates.
Below t at any point the round is abandoned: the model stays as it was.
"""

from __future__ import annotations

import logging
import statistics
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TypeVar

import numpy as np
from flwr.app import ArrayRecord, ConfigRecord, Message, RecordDict
from flwr.serverapp import Grid

from fedpipe.boundary import (
    Advertised,
    Claims,
    MaskedInput,
    Rejection,
    ReplyLimits,
    Revealed,
    decode_advertise,
    decode_masked,
    decode_shares,
    decode_unmask,
)
from fedpipe.boundary._records import Scalar
from fedpipe.config import SecAggConfig
from fedpipe.records import wire_bytes
from fedpipe.rounds.stage import run_stage
from fedpipe.secagg import keys, shamir
from fedpipe.secagg.graph import neighbour_graph, threshold
from fedpipe.secagg.keys import RoundId
from fedpipe.secagg.masks import apply_masks, modulus_mask
from fedpipe.secagg.quant import modulus_bits
from fedpipe.secagg.records import id_array, row_array
from fedpipe.secagg.wire import ADVERTISE, BOX_BYTES, MASKED, PARAMS, SHARE, TABLE, UNMASK

__all__ = ["SecAggOutcome", "SecAggRound", "StageCost"]

log = logging.getLogger(__name__)


@dataclass
class StageCost:
    """One stage's traffic and who answered."""

    sent: int = 0
    replied: int = 0  # valid replies
    rejected: int = 0
    bytes_down: int = 0
    bytes_up: int = 0


@dataclass
class SecAggOutcome:
    """What a round of the protocol gave: the exact code sum, or why there is none."""

    stages: dict[str, StageCost] = field(default_factory=dict)
    total: np.ndarray | None = None  # (count + 1,) uint32: the sum of the quantized codes
    devices: int = 0  # masked inputs in the sum
    claims: list[Claims] = field(default_factory=list)
    clip: float = 0.0
    bits: int = 0
    modulus: int = 0
    max_weight: int = 1
    masked_bytes: int = 0  # the masked inputs' arrays alone (bit-packed words, .npy header)
    shares_rejected: int = 0  # share boxes that devices reported would not open
    abandoned: str | None = None
    seconds: dict[str, float] = field(default_factory=dict)  # aggregator time per stage

    @property
    def replies(self) -> list[int]:
        """Valid replies per stage, in stage order (advertise, share, masked, unmask)."""
        return [s.replied for s in self.stages.values()]

    @property
    def bytes_up(self) -> int:
        return sum(s.bytes_up for s in self.stages.values())

    @property
    def bytes_down(self) -> int:
        return sum(s.bytes_down for s in self.stages.values())


class _Abandon(Exception):
    """The round cannot finish securely; the reason goes into the outcome."""


ClaimsFn = Callable[[dict[str, Scalar]], Claims]


class SecAggRound:
    """One round of the protocol for a sample of nodes (see the module docstring)."""

    def __init__(  # noqa: PLR0913 - each is a fixed part of the round
        self,
        cfg: SecAggConfig,
        rid: RoundId,
        seed: int,
        clip: float,
        weight_ratio: float,
        max_examples: int,
        poll_s: float = 0.1,
    ) -> None:
        self.cfg, self.rid, self.seed, self.poll_s = cfg, rid, seed, poll_s
        self.clip, self.weight_ratio, self.max_examples = clip, weight_ratio, max_examples
        self.out = SecAggOutcome(clip=clip, bits=cfg.bits)
        self._pub: dict[int, Advertised] = {}  # client -> its stage-1 reply
        self._node: dict[int, int] = {}  # client -> node
        self._graph: dict[int, list[int]] = {}
        self._boxes: dict[int, dict[int, bytes]] = {}  # sender -> receiver -> box
        self._alive: dict[int, list[int]] = {}  # client -> neighbours it masks with
        self._sum: np.ndarray | None = None
        self._masked: dict[int, Claims] = {}  # client -> its claims, input in the sum
        self._revealed: dict[int, Revealed] = {}

    # -- the stages ---------------------------------------------------------------------

    def run(
        self,
        grid: Grid,
        train: Sequence[Message],
        clients: Mapping[int, int],
        deadline: float,
        count: int,
        limits: ReplyLimits,
        claims: ClaimsFn,
    ) -> SecAggOutcome:
        """All four stages for the nodes `train` goes to; `count` = model parameters."""
        try:
            self._advertise(grid, [m.metadata.dst_node_id for m in train], clients, deadline)
            self._share(grid, deadline)
            self._masked_input(grid, train, deadline, count + 1, limits, claims)
            self._unmask(grid, deadline)
            t0 = time.perf_counter()
            self.out.total = self._unmasked_sum()
            self.out.seconds["reconstruct"] = time.perf_counter() - t0
        except _Abandon as exc:
            self.out.abandoned = str(exc)
            log.warning("round %d: secure aggregation abandoned: %s", self.rid.round, exc)
        return self.out

    def _stage(
        self,
        name: str,
        grid: Grid,
        messages: list[Message],
        on_reply: Callable[[Message], bool],
        deadline: float,
    ) -> None:
        cost = self.out.stages.setdefault(name, StageCost())
        cost.sent = len(messages)
        cost.bytes_down = sum(wire_bytes(m.content) for m in messages)
        t0 = time.perf_counter()

        def handle(reply: Message) -> None:
            t = time.perf_counter()
            if on_reply(reply):
                cost.replied += 1
            else:
                cost.rejected += 1
            self.out.seconds["decode"] = self.out.seconds.get("decode", 0.0) + (
                time.perf_counter() - t
            )

        result = run_stage(grid, messages, handle, deadline, self.poll_s)
        self.out.seconds[name] = time.perf_counter() - t0
        log.info(
            "round %d secagg %s: %d of %d replied, %d rejected, %d silent",
            self.rid.round,
            name,
            cost.replied,
            cost.sent,
            cost.rejected,
            len(result.silent),
        )

    def _deadline(self, deadline: float) -> float:
        return min(deadline, time.monotonic() + self.cfg.stage_timeout)

    def _msg(
        self, client: int, kind: str, params: dict[str, Scalar], table: ArrayRecord | None
    ) -> Message:
        content = RecordDict({PARAMS: ConfigRecord({"server-round": self.rid.round, **params})})
        if table is not None:
            content[TABLE] = table
        return Message(
            content, dst_node_id=self._node[client], message_type=kind, group_id=str(self.rid.round)
        )

    def _reject(self, out: Rejection, stage: str) -> bool:
        self.out.stages[stage].bytes_up += out.wire_bytes
        log.warning("secagg %s reply from node %d dropped: %s", stage, out.node_id, out.reason)
        return False

    def _advertise(
        self, grid: Grid, nodes: list[int], clients: Mapping[int, int], deadline: float
    ) -> None:
        by_node: dict[int, int] = {}
        for n in nodes:  # one node per client: a client id is a protocol identity
            if n in clients and clients[n] not in self._node:
                by_node[n] = clients[n]
                self._node[clients[n]] = n
            elif n in clients:
                log.warning("node %d is a second node of client %d: left out", n, clients[n])
        messages = [
            self._msg(c, ADVERTISE, {"devices": len(by_node)}, None) for c in sorted(self._node)
        ]

        def on_reply(reply: Message) -> bool:
            out = decode_advertise(reply, self.max_examples)
            if isinstance(out, Advertised):
                out = _as_identified(reply, out, out.client_id, by_node)
            if isinstance(out, Rejection):
                return self._reject(out, "advertise")
            self.out.stages["advertise"].bytes_up += out.wire_bytes
            self._pub[out.client_id] = out
            return True

        self._stage("advertise", grid, messages, on_reply, self._deadline(deadline))
        if len(self._pub) < self.cfg.min_devices:
            raise _Abandon(
                f"{len(self._pub)} device(s) advertised keys; at least "
                f"secagg.min_devices={self.cfg.min_devices} needed"
            )
        weights = [a.num_examples for a in self._pub.values()]
        cap = max(weights)
        if self.weight_ratio > 0:
            cap = min(cap, int(self.weight_ratio * statistics.median(weights)))
        self.out.max_weight = max(1, cap)

    @property
    def _devices(self) -> int:
        return len(self._graph)

    def _t(self) -> int:
        return threshold(self.cfg.threshold, self.cfg.neighbours, self._devices)

    def _share(self, grid: Grid, deadline: float) -> None:
        self._graph = neighbour_graph(
            list(self._pub), self.cfg.neighbours, self.seed, self.rid.round
        )
        messages = []
        for c, nbrs in self._graph.items():
            table = ArrayRecord(
                {
                    "ids": id_array(nbrs),
                    "pk-s": row_array([self._pub[j].pk_s for j in nbrs], 32),
                    "pk-c": row_array([self._pub[j].pk_c for j in nbrs], 32),
                }
            )
            messages.append(self._msg(c, SHARE, {"devices": self._devices}, table))
        client_of = {n: c for c, n in self._node.items()}

        def on_reply(reply: Message) -> bool:
            c = client_of.get(reply.metadata.src_node_id, -1)
            out = decode_shares(reply, self._graph.get(c, []))
            if isinstance(out, Rejection):
                return self._reject(out, "share")
            self._boxes[c], size = out
            self.out.stages["share"].bytes_up += size
            return True

        self._stage("share", grid, messages, on_reply, self._deadline(deadline))
        live = set(self._boxes)
        t = self._t()
        while True:  # a device with fewer than t live neighbours could not be recovered
            short = {c for c in live if len(live.intersection(self._graph[c])) < t}
            if not short:
                break
            live -= short
        self._alive = {c: sorted(live.intersection(self._graph[c])) for c in sorted(live)}
        if len(self._alive) < self.cfg.min_devices:
            raise _Abandon(f"{len(self._alive)} device(s) left after sharing keys; threshold {t}")

    def _masked_input(
        self,
        grid: Grid,
        train: Sequence[Message],
        deadline: float,
        count: int,
        limits: ReplyLimits,
        claims: ClaimsFn,
    ) -> None:
        m = modulus_bits(self._devices, self.cfg.bits)
        self.out.modulus = m
        params: dict[str, Scalar] = {
            "devices": self._devices,
            "clip": self.clip,
            "bits": self.cfg.bits,
            "modulus-bits": m,
            "max-weight": self.out.max_weight,
        }
        by_node = {msg.metadata.dst_node_id: msg for msg in train}
        messages = []
        for c, alive in self._alive.items():
            base = by_node[self._node[c]]
            table = ArrayRecord(
                {
                    "ids": id_array(alive),
                    "boxes": row_array([self._boxes[j][c] for j in alive], BOX_BYTES),
                }
            )
            content = RecordDict(dict(base.content.items()))  # the model, shared
            content[PARAMS] = ConfigRecord({"server-round": self.rid.round, **params})
            content[TABLE] = table
            messages.append(
                Message(
                    content,
                    dst_node_id=self._node[c],
                    message_type=MASKED,
                    group_id=str(self.rid.round),
                )
            )
        client_of = {n: c for c, n in self._node.items()}
        mask = modulus_mask(m)

        def on_reply(reply: Message) -> bool:
            c = client_of.get(reply.metadata.src_node_id, -1)
            out = decode_masked(reply, count, m, limits, claims)
            if isinstance(out, MaskedInput):
                out = _as_identified(reply, out, out.claims.client_id, client_of)
            if isinstance(out, Rejection):
                return self._reject(out, "masked")
            self.out.stages["masked"].bytes_up += out.wire_bytes
            self.out.masked_bytes += out.payload_bytes
            self.out.shares_rejected += out.shares_rejected
            self._sum = (
                out.words.copy()
                if self._sum is None
                else np.add(self._sum, out.words, out=self._sum)
            )
            self._sum &= mask
            self._masked[c] = out.claims  # the words are in the sum: only claims are kept
            return True

        self._stage("masked", grid, messages, on_reply, deadline)
        if not self._masked:
            raise _Abandon("no masked input arrived")

    def _unmask(self, grid: Grid, deadline: float) -> None:
        messages = []
        lists: dict[int, tuple[list[int], list[int]]] = {}
        for c in self._masked:
            alive = self._alive[c]
            survivors = [j for j in alive if j in self._masked]
            dropped = [j for j in alive if j not in self._masked]
            lists[c] = (survivors, dropped)
            table = ArrayRecord({"survivors": id_array(survivors), "dropped": id_array(dropped)})
            messages.append(self._msg(c, UNMASK, {"devices": self._devices}, table))
        client_of = {n: c for c, n in self._node.items()}

        def on_reply(reply: Message) -> bool:
            c = client_of.get(reply.metadata.src_node_id, -1)
            out = decode_unmask(reply, *lists.get(c, ([], [])))
            if isinstance(out, Rejection):
                return self._reject(out, "unmask")
            self.out.stages["unmask"].bytes_up += out.wire_bytes
            self._revealed[c] = out
            return True

        self._stage("unmask", grid, messages, on_reply, self._deadline(deadline))

    # -- recovery -----------------------------------------------------------------------

    def _recover(self, owner: int, kind: str) -> bytes:
        """A device's seed ("seed") or mask key ("key") from t neighbours' shares.

        Each result is checked (the seed against its commitment, the key against the
        advertised public key). When more than t shares came back, a failed check is
        retried without one share at a time, so one neighbour's bad share does not
        abandon the round; more bad shares than that do."""
        t = self._t()
        points = sorted(
            (holder + 1, share)
            for holder, rev in self._revealed.items()
            for share in [(rev.seeds if kind == "seed" else rev.keys).get(owner)]
            if share is not None
        )
        if len(points) < t:
            raise _Abandon(f"{len(points)} {kind} share(s) of client {owner} returned; {t} needed")
        tries = [points] + [points[:i] + points[i + 1 :] for i in range(len(points))]
        for use in tries if len(points) > t else tries[:1]:
            secret = self._checked(owner, kind, use, t)
            if secret is not None:
                return secret
        raise _Abandon(f"client {owner}'s {kind} fails its check (bad shares)")

    def _checked(
        self, owner: int, kind: str, points: Sequence[tuple[int, bytes]], t: int
    ) -> bytes | None:
        try:
            secret = shamir.combine(points, t).to_bytes(keys.KEY_BYTES, "big")
        except (shamir.ShareError, OverflowError):
            return None
        pub = self._pub[owner]
        if kind == "seed":
            return secret if keys.commit(secret, self.rid) == pub.commit else None
        return secret if _public_or_none(secret) == pub.pk_s else None

    def _unmasked_sum(self) -> np.ndarray:
        assert self._sum is not None
        m = self.out.modulus
        total = self._sum
        for c in sorted(self._masked):
            total = apply_masks(total, self._recover(c, "seed"), [], m, sign=-1)
        for j in sorted(set(self._alive) - set(self._masked)):
            sk = self._recover(j, "key")
            pairs = [
                (keys.agree(sk, self._pub[i].pk_s, self.rid, "mask"), i < j)
                for i in self._alive[j]
                if i in self._masked
            ]
            total = apply_masks(total, None, pairs, m, sign=-1)
        self.out.devices = len(self._masked)
        self.out.claims = [self._masked[c] for c in sorted(self._masked)]
        return total


R = TypeVar("R", Advertised, MaskedInput)


def _as_identified(
    reply: Message, out: R, claimed: int, clients: Mapping[int, int]
) -> R | Rejection:
    """`out`, unless it speaks for another client than its node identified as."""
    node = reply.metadata.src_node_id
    if clients.get(node) == claimed:
        return out
    said = clients.get(node)
    return Rejection(node, f"speaks for client {claimed}, identified as {said}", out.wire_bytes)


def _public_or_none(private: bytes) -> bytes | None:
    try:
        return keys.public_of(private)
    except ValueError:
        return None
