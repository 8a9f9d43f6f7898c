"""The device's side of a compressed broadcast: rebuild the public model, check it.

A device records the lineage and version of the public model it holds in its
`context.state`. A message brings either the whole public model or the coded changes
since some version; the device applies the ones it lacks (with the same arithmetic
as the server, `fedpipe.downlink.wire.advance`) and checks the digest. Anything it
cannot rebuild exactly is refused with an error answer, after which the server sends
it the whole model.

Where the model itself is kept is the store's business:
- `StateStore` (a deployed device): one copy in `context.state`, beside the
  error-feedback residual, surviving rounds like it.
- `SharedStore` (simulation): thousands of virtual clients share a worker, so the
  worker keeps a few recent versions once and each client's state keeps only its
  version number. Every version of one lineage is the same model for everyone, so a
  client that holds version h may start from any cached version in [h, target].
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Protocol

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, RecordDict

from fedpipe.codec import Codec, Encoded, PayloadError
from fedpipe.downlink.wire import HEADER, advance, coded, diff_names, digest
from fedpipe.records import ARRAYS

__all__ = ["DownlinkRefusal", "Held", "ModelStore", "SharedStore", "StateStore", "receive"]

STATE = "fedpipe-downlink"  # ConfigRecord in context.state: lineage and version held
MODEL = "fedpipe-public"  # ArrayRecord in context.state (StateStore): the model held


class DownlinkRefusal(RuntimeError):
    """The broadcast cannot be rebuilt into the server's public model on this device."""


@dataclass(frozen=True)
class Held:
    """A public model: its lineage (the run that made it), version and arrays."""

    lineage: str
    version: int
    model: Mapping[str, np.ndarray]


class ModelStore(Protocol):
    """Where a device's public model lives between rounds."""

    def start(self, state: RecordDict, lineage: str, lo: int, hi: int) -> Held | None:
        """A held model of `lineage` with lo <= version <= hi, if there is one."""
        ...

    def keep(self, state: RecordDict, held: Held) -> None:
        """Hold `held` from now on."""
        ...


def _held_version(state: RecordDict, lineage: str) -> int | None:
    rec = state.config_records.get(STATE)
    if rec is None or rec.get("lineage") != lineage:
        return None
    version = rec.get("version")
    return version if isinstance(version, int) else None


def _record(state: RecordDict, held: Held) -> None:
    state[STATE] = ConfigRecord({"lineage": held.lineage, "version": held.version})


class StateStore:
    """One copy of the public model in the device's own `context.state`."""

    def start(self, state: RecordDict, lineage: str, lo: int, hi: int) -> Held | None:
        version = _held_version(state, lineage)
        if version is None or not lo <= version <= hi or MODEL not in state.array_records:
            return None
        model = {k: a.numpy() for k, a in state.array_records[MODEL].items()}
        return Held(lineage, version, model)

    def keep(self, state: RecordDict, held: Held) -> None:
        state[MODEL] = ArrayRecord({k: Array(np.asarray(v)) for k, v in held.model.items()})
        _record(state, held)


class SharedStore:
    """A worker's few recent versions, shared by every virtual client it runs."""

    def __init__(self, capacity: int = 3) -> None:
        self.capacity = capacity
        self._models: OrderedDict[tuple[str, int], Mapping[str, np.ndarray]] = OrderedDict()

    def start(self, state: RecordDict, lineage: str, lo: int, hi: int) -> Held | None:
        version = _held_version(state, lineage)
        if version is None or not lo <= version <= hi:
            return None  # this client could not rebuild it on a real device either
        for (lin, v), model in reversed(self._models.items()):
            if lin == lineage and version <= v <= hi:
                return Held(lin, v, model)
        return None

    def keep(self, state: RecordDict, held: Held) -> None:
        key = (held.lineage, held.version)
        self._models[key] = held.model
        self._models.move_to_end(key)
        while len(self._models) > self.capacity:
            self._models.popitem(last=False)
        _record(state, held)

    def verified(self, lineage: str, version: int) -> Mapping[str, np.ndarray] | None:
        """The model of that version if this worker already rebuilt and checked it."""
        return self._models.get((lineage, version))


@dataclass(frozen=True)
class _Header:
    lineage: str
    version: int
    digest: str
    base: int


def _header(content: RecordDict) -> _Header:
    rec = content.config_records[HEADER]
    lineage, version = rec.get("lineage"), rec.get("version")
    expected, base = rec.get("digest"), rec.get("base")
    if not (
        isinstance(lineage, str)
        and isinstance(expected, str)
        and isinstance(version, int)
        and isinstance(base, int)
        and -1 <= base <= version
    ):
        raise DownlinkRefusal("the broadcast's header is malformed")
    return _Header(lineage, version, expected, base)


def _apply(held: Held, target: int, content: RecordDict, codec: Codec) -> dict[str, np.ndarray]:
    model = dict(held.model)
    floats = coded(model)
    for version in range(held.version + 1, target + 1):
        arrays_name, meta_name, exact_name = diff_names(version)
        if arrays_name not in content.array_records or meta_name not in content.config_records:
            raise DownlinkRefusal(f"the broadcast lacks the change to version {version}")
        arrays = {k: a.numpy() for k, a in content.array_records[arrays_name].items()}
        meta = content.config_records[meta_name]
        header = {k: v for k, v in meta.items() if isinstance(v, str | int | float | bytes)}
        encoded = Encoded(arrays, header)  # the codec checks the header's values
        ints = content.array_records.get(exact_name, ArrayRecord())
        exact = {k: a.numpy() for k, a in ints.items()}
        if set(exact) != set(model) - set(floats):
            raise DownlinkRefusal(f"the change to version {version} has other buffers")
        try:
            step = codec.decode(encoded, {k: model[k] for k in floats})
        except PayloadError as exc:
            raise DownlinkRefusal(f"the change to version {version}: {exc}") from exc
        model = advance(model, step, exact)
    return model


def receive(
    content: RecordDict, state: RecordDict, store: ModelStore, codec: Codec
) -> Mapping[str, np.ndarray]:
    """The public model a compressed broadcast brings (whole or as changes), checked
    against its digest and kept in `store`.

    Raises DownlinkRefusal when the result would not be the server's public model.
    """
    h = _header(content)
    if isinstance(store, SharedStore):
        cached = store.verified(h.lineage, h.version)
        known = _held_version(state, h.lineage)
        if cached is not None and (h.base < 0 or (known is not None and known >= h.base)):
            store.keep(state, Held(h.lineage, h.version, cached))
            return cached
    if h.base < 0:
        if ARRAYS not in content.array_records:
            raise DownlinkRefusal("the broadcast announces the whole model but has none")
        model = {k: a.numpy() for k, a in content.array_records[ARRAYS].items()}
    else:
        start = store.start(state, h.lineage, h.base, h.version)
        if start is None:
            held = _held_version(state, h.lineage)
            have = "nothing of this run" if held is None else f"version {held}"
            raise DownlinkRefusal(
                f"the broadcast continues version {h.base}; this device holds {have}"
            )
        model = _apply(start, h.version, content, codec)
    if digest(model) != h.digest:
        state.config_records.pop(STATE, None)  # whatever it holds, the server resends all
        raise DownlinkRefusal(f"the rebuilt model of version {h.version} fails its digest")
    store.keep(state, Held(h.lineage, h.version, model))
    return model
