"""The server's side of a compressed broadcast: the public model and its versions.

The *public* model is exactly what devices can rebuild. Each time the global model
changes, the server codes the change `global - public` (with error feedback: what
earlier broadcasts rounded away is still in that difference, so it is sent later
instead of lost), applies the decoded change to the public model and calls the result
the next version. Devices train from the public model; their updates are added to
the server's global model, so the global model keeps everything and the public model
follows it within one broadcast's rounding.

Each device gets, per message, what it is missing: nothing (it holds the current
version), the coded changes since the version it holds (kept while together they are
smaller than the whole model, so memory is at most one model's worth), or the whole
public model in float32 (a new device, one too far behind, or one whose last answer
was an error). A device's version is what the server last sent it *and got an answer
to*; a device that applied a message but whose answer was lost holds a newer version
than the server thinks, and skips the changes it already has.
"""

from __future__ import annotations

import secrets
import time
from collections import deque
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, RecordDict

from fedpipe.codec import Encoded, build_codec
from fedpipe.config import DownlinkConfig
from fedpipe.downlink.wire import HEADER, advance, coded, diff_names, digest
from fedpipe.records import ARRAYS, encode_records, wire_bytes

__all__ = ["Broadcaster", "Decisions"]


@dataclass(frozen=True)
class _Diff:
    """One coded change of the public model: the one that made `version`."""

    version: int
    records: tuple[tuple[str, ArrayRecord | ConfigRecord], ...]
    wire_bytes: int


@dataclass
class Decisions:
    """What the devices of one stage were sent (counted in the round's metrics)."""

    full: int = 0  # the whole public model: new, too far behind, or after an error
    diff: int = 0  # the one change since the version they hold
    catchup: int = 0  # several changes: they missed rounds
    current: int = 0  # nothing: they hold the current version
    behind: int = 0  # rounds missed, summed over catchup devices


class Broadcaster:
    """The public model, its recent changes, and which version each device holds."""

    def __init__(self, cfg: DownlinkConfig, seed: int) -> None:
        self.cfg = cfg
        self.codec = build_codec(cfg.codec())
        self.seed = seed
        # A fresh lineage per run (and per resume): versions of another run never match.
        self.lineage = secrets.token_hex(8)
        self.version = 0
        self.public: dict[str, np.ndarray] = {}
        self.digest = ""
        self._source: dict[str, np.ndarray] = {}  # the global model last published
        self._full: ArrayRecord | None = None  # the public model as a record, when asked
        self._full_bytes = 0
        self._history: deque[_Diff] = deque()
        self._held: dict[int, int] = {}  # node -> version it answered with
        self._sent: dict[int, int] = {}  # node -> version it was last sent
        self.encode_seconds = 0.0

    # -- the public model ---------------------------------------------------------------

    def publish(self, model: Mapping[str, np.ndarray]) -> None:
        """Make `model` (the new global model) the target of the next broadcasts.

        A no-op for the model last published (a stage after another with no training
        between, or a round that changed nothing).
        """
        if self._source and all(np.array_equal(model[k], v) for k, v in self._source.items()):
            return
        t0 = time.perf_counter()
        if not self.public:
            self._set_public({k: np.array(v) for k, v in model.items()})
        else:
            base = self.public if self.cfg.error_feedback else self._source
            change = {
                k: model[k].astype(np.float32) - base[k].astype(np.float32)
                for k in coded(self.public)
            }
            exact = {k: np.array(v) for k, v in model.items() if k not in change}
            rng = np.random.default_rng([self.seed, self.version + 1, 0xD0])
            encoded = self.codec.encode(change, rng)
            step = self.codec.decode(encoded, change)
            self._set_public(advance(self.public, step, exact))
            self._remember(encoded, exact)
        self._source = {k: np.array(v) for k, v in model.items()}
        self.encode_seconds += time.perf_counter() - t0

    def _set_public(self, public: dict[str, np.ndarray]) -> None:
        self.public, self.version = public, self.version + 1
        self.digest, self._full = digest(public), None

    def _remember(self, encoded: Encoded, exact: Mapping[str, np.ndarray]) -> None:
        """Keep the change while the kept changes are smaller than the whole model: a
        longer chain is never sent, so memory stays within one model's worth."""
        arrays, meta = encode_records(encoded)
        names = diff_names(self.version)
        records: tuple[tuple[str, ArrayRecord | ConfigRecord], ...] = (
            (names[0], arrays),
            (names[1], meta),
        )
        if exact:
            ints = ArrayRecord({k: Array(np.asarray(v, order="C")) for k, v in exact.items()})
            records = (*records, (names[2], ints))
        size = wire_bytes(RecordDict(dict(records)))
        self._history.append(_Diff(self.version, records, size))
        full = self._full_record_bytes()
        while sum(d.wire_bytes for d in self._history) >= full:
            self._history.popleft()

    def _full_record(self) -> ArrayRecord:
        if self._full is None:
            self._full = ArrayRecord({k: Array(v) for k, v in self.public.items()})
        return self._full

    def _full_record_bytes(self) -> int:
        if not self._full_bytes:  # the model's structure never changes within a run
            self._full_bytes = wire_bytes(RecordDict({ARRAYS: self._full_record()}))
        return self._full_bytes

    @property
    def residual(self) -> dict[str, np.ndarray]:
        """What the broadcasts have not delivered yet: global - public (error feedback)."""
        return {
            k: v.astype(np.float32) - self.public[k].astype(np.float32)
            for k, v in self._source.items()
        }

    # -- what each device gets ----------------------------------------------------------

    def _start(self, held: int | None) -> int:
        """The version a message to a device holding `held` starts from (-1: the whole
        model): nothing new, the chain of changes, or the model when that is smaller."""
        if held is None or held > self.version:
            return -1
        if held == self.version:
            return held
        oldest = self._history[0].version if self._history else self.version + 1
        if held < oldest - 1:
            return -1
        chain = sum(d.wire_bytes for d in self._history if d.version > held)
        return held if chain < self._full_record_bytes() else -1

    def contents(
        self, base: RecordDict, nodes: Iterable[int], counts: Decisions
    ) -> dict[int, RecordDict]:
        """Each node's message content: `base` (without a model) plus what it misses,
        each decision counted in `counts`.

        Nodes that start from the same version share one RecordDict (Flower serializes
        each message on its own either way; the server builds each content once).
        """
        by_start: dict[int, RecordDict] = {}
        starts: dict[int | None, int] = {}  # held version -> start: one chain sum each
        out: dict[int, RecordDict] = {}
        common = {k: v for k, v in base.items() if k != ARRAYS}
        for node in nodes:
            held = self._held.get(node)
            if held not in starts:
                starts[held] = self._start(held)
            start = starts[held]
            self._count(start, counts)
            if start not in by_start:
                by_start[start] = self._content(common, start)
            out[node] = by_start[start]
            self._sent[node] = self.version
        return out

    def _content(self, common: Mapping[str, object], start: int) -> RecordDict:
        header = ConfigRecord(
            {"lineage": self.lineage, "version": self.version, "digest": self.digest, "base": start}
        )
        content = RecordDict({**common, HEADER: header})  # type: ignore[dict-item]
        if start < 0:
            content[ARRAYS] = self._full_record()
        else:
            for d in self._history:
                if d.version > start:
                    for name, record in d.records:
                        content[name] = record
        return content

    def _count(self, start: int, d: Decisions) -> None:
        if start < 0:
            d.full += 1
        elif start == self.version:
            d.current += 1
        elif start == self.version - 1:
            d.diff += 1
        else:
            d.catchup += 1
            d.behind += self.version - start

    # -- what devices answered ----------------------------------------------------------

    def answered(self, node: int) -> None:
        """The node answered its last message: it holds the version sent."""
        if node in self._sent:
            self._held[node] = self._sent[node]

    def failed(self, node: int) -> None:
        """The node answered with an error: what it holds is unknown, send it everything."""
        self._held.pop(node, None)
