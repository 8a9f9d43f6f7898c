"""The codec seam: how an update is turned into bytes on a device and back at the server.

A codec is a pair of pure functions over NumPy arrays with an explicit RNG. The client
encodes its update (local minus global weights); the server decodes it against the
global model it sent. Nothing here knows about Flower: `fedpipe.records` moves the
encoded arrays and metadata in and out of Flower records.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np

__all__ = [
    "Codec",
    "Encoded",
    "PayloadError",
    "Update",
    "check_header",
    "check_update",
    "expect_arrays",
    "expect_meta",
    "flatten",
    "unflatten",
]

# name -> array, in the model's state_dict order
Update = dict[str, np.ndarray]
MetaValue = str | int | float | bytes | bool


class PayloadError(ValueError):
    """A reply's payload cannot be turned into a valid update; the reply is dropped."""


@dataclass(frozen=True)
class Encoded:
    """What a codec puts on the wire: arrays (any dtype) plus small metadata."""

    arrays: dict[str, np.ndarray]
    meta: dict[str, MetaValue] = field(default_factory=dict)


class Codec(Protocol):
    """encode on the device, decode at the aggregator."""

    name: str

    def encode(self, update: Update, rng: np.random.Generator) -> Encoded: ...

    def decode(self, encoded: Encoded, like: Mapping[str, np.ndarray]) -> Update: ...


def check_update(update: Mapping[str, np.ndarray], like: Mapping[str, np.ndarray]) -> None:
    """Reject an update that does not fit the global model, or carries NaN/Inf.

    Runs on every decoded reply, whatever the codec, before any strategy sees it.
    """
    if list(update) != list(like):
        missing = sorted(set(like) - set(update))
        extra = sorted(set(update) - set(like))
        raise PayloadError(f"update keys differ from the model: missing {missing}, extra {extra}")
    for name, ref in like.items():
        arr = update[name]
        if arr.shape != ref.shape:
            raise PayloadError(f"{name}: shape {arr.shape} != model shape {ref.shape}")
        if not np.all(np.isfinite(arr)):
            raise PayloadError(f"{name}: update contains NaN or Inf")


def flatten(update: Mapping[str, np.ndarray]) -> np.ndarray:
    """All arrays of an update as one float32 vector, in key order."""
    if not update:
        return np.zeros(0, np.float32)
    return np.concatenate([np.asarray(v, np.float32).ravel() for v in update.values()])


def unflatten(flat: np.ndarray, like: Mapping[str, np.ndarray]) -> Update:
    """Inverse of `flatten`, shaped like the global model."""
    out: Update = {}
    start = 0
    for name, ref in like.items():
        out[name] = flat[start : start + ref.size].reshape(ref.shape)
        start += ref.size
    return out


def expect_meta(encoded: Encoded, key: str, expected: MetaValue) -> None:
    """A metadata field must equal what the server's own config says."""
    value = encoded.meta.get(key)
    if value != expected:
        raise PayloadError(f"payload {key}={value!r} but the server expects {expected!r}")


def expect_arrays(encoded: Encoded, spec: Mapping[str, tuple[np.dtype[Any], int]]) -> None:
    """The payload holds exactly these 1-d arrays with these dtypes and lengths."""
    if set(encoded.arrays) != set(spec):
        raise PayloadError(f"payload arrays {sorted(encoded.arrays)} != {sorted(spec)}")
    for name, (dtype, length) in spec.items():
        arr = encoded.arrays[name]
        if arr.dtype != dtype or arr.ndim != 1 or len(arr) != length:
            raise PayloadError(
                f"{name}: got {arr.dtype}{list(arr.shape)}, expected {np.dtype(dtype)}[{length}]"
            )


def check_header(encoded: Encoded, scheme: str, chunk: int, like: Mapping[str, np.ndarray]) -> int:
    """Scheme, chunk and count must match the server's config and model; returns the count."""
    count = sum(int(v.size) for v in like.values())
    expect_meta(encoded, "scheme", scheme)
    expect_meta(encoded, "chunk", chunk)
    expect_meta(encoded, "count", count)
    return count
