"""Structure checks on a reply's records, before anything in them is deserialized.

A reply is a Flower `RecordDict`. Each record a fedpipe reply may hold is named with its
type; anything else, a value of the wrong type, a string that is not valid Unicode (a
lone surrogate ends Flower's serialization with UnicodeEncodeError), a number that is
not finite, or more entries or bytes than the bounds allow, is a PayloadError here.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, MetricRecord, RecordDict

from fedpipe.boundary._inflate import oversized
from fedpipe.codec import PayloadError, parse_npy

__all__ = [
    "ReplyLimits",
    "Scalar",
    "check_layout",
    "config_values",
    "metric_values",
    "parse_arrays",
    "safe_text",
]

Scalar = str | int | float | bool | bytes
_KINDS: dict[type, str] = {
    ArrayRecord: "ArrayRecord",
    ConfigRecord: "ConfigRecord",
    MetricRecord: "MetricRecord",
}


@dataclass(frozen=True)
class ReplyLimits:
    """What one reply may hold; derived from the model so that no reply is unbounded."""

    max_array_bytes: int  # all arrays of a reply together
    max_arrays: int
    max_entries: int = 64  # per config or metric record
    max_text: int = 256  # characters in a key or string value, bytes in a bytes value

    @classmethod
    def for_model(cls, like: Mapping[str, np.ndarray]) -> ReplyLimits:
        """A float32 copy of the model with .npy headers, plus room for the seal."""
        params = sum(int(v.size) for v in like.values())
        return cls(
            max_array_bytes=4 * params + 256 * (len(like) + 8) + 4096, max_arrays=len(like) + 8
        )


def safe_text(value: object, limit: int = 300) -> str:
    """A device's string as something safe to log: escaped, one line, bounded."""
    text = value if isinstance(value, str) else repr(value)
    text = text[: 4 * limit].encode("utf-8", "backslashreplace").decode("utf-8")
    return text.replace("\n", " ")[:limit]


def _text(value: str, limits: ReplyLimits, what: str) -> str:
    if len(value) > limits.max_text:
        raise PayloadError(f"{what} is {len(value)} characters (at most {limits.max_text})")
    try:
        value.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise PayloadError(f"{what} {safe_text(value, 40)!r} is not valid Unicode") from exc
    return value


def check_layout(
    content: RecordDict, required: Mapping[str, type], optional: Mapping[str, type]
) -> None:
    """Exactly the `required` records, any of the `optional` ones, each of its type."""
    allowed = {**required, **optional}
    for name, record in content.items():
        if not isinstance(name, str) or name not in allowed:
            raise PayloadError(f"unexpected record {safe_text(name, 40)!r}")
        if type(record) is not allowed[name]:
            want = _KINDS.get(allowed[name], "?")
            raise PayloadError(f"record {name!r} is a {type(record).__name__}, not a {want}")
    missing = sorted(set(required) - set(content.keys()))
    if missing:
        raise PayloadError(f"reply lacks the record(s) {missing}")


def _scalar(value: object, limits: ReplyLimits, what: str) -> Scalar:
    if isinstance(value, bool | int):
        return value
    if isinstance(value, float):
        if not math.isfinite(value):
            raise PayloadError(f"{what}={value!r} is not finite")
        return value
    if isinstance(value, str):
        return _text(value, limits, what)
    if isinstance(value, bytes):
        if len(value) > limits.max_text:
            raise PayloadError(f"{what} holds {len(value)} bytes (at most {limits.max_text})")
        return value
    raise PayloadError(f"{what} is a {type(value).__name__}; only single values are accepted")


def config_values(record: ConfigRecord, limits: ReplyLimits, name: str) -> dict[str, Scalar]:
    """A ConfigRecord's entries as plain scalars, each checked."""
    if len(record) > limits.max_entries:
        raise PayloadError(
            f"record {name!r} has {len(record)} entries (at most {limits.max_entries})"
        )
    out: dict[str, Scalar] = {}
    for key, value in record.items():
        if not isinstance(key, str):
            raise PayloadError(f"record {name!r} has a non-string key")
        key = _text(key, limits, f"a key of {name!r}")
        out[key] = _scalar(value, limits, f"{name}.{key}")
    return out


def metric_values(record: MetricRecord, limits: ReplyLimits, name: str) -> dict[str, Scalar]:
    """A MetricRecord's entries as single finite numbers (lists and other types refused)."""
    values = config_values(record, limits, name)  # type: ignore[arg-type]
    for key, value in values.items():
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise PayloadError(f"{name}.{key}={safe_text(value, 40)} is not a number")
    return values


def parse_arrays(record: ArrayRecord, limits: ReplyLimits, name: str) -> dict[str, np.ndarray]:
    """An ArrayRecord's arrays through the strict .npy reader, all within the byte bound."""
    if len(record) > limits.max_arrays:
        raise PayloadError(
            f"record {name!r} has {len(record)} arrays (at most {limits.max_arrays})"
        )
    budget = limits.max_array_bytes
    out: dict[str, np.ndarray] = {}
    for key, array in record.items():
        what = f"{name}[{safe_text(key, 40)!r}]"
        if not isinstance(key, str) or not isinstance(array, Array):
            raise PayloadError(f"{what} is not a named Array")
        key = _text(key, limits, f"an array name in {name!r}")
        inflated = oversized(array)
        if inflated is not None:
            raise PayloadError(f"{what} would inflate to {inflated} bytes (bound {budget})")
        data = array.data
        if not isinstance(data, bytes) or len(data) > budget:
            size = len(data) if isinstance(data, bytes) else "?"
            raise PayloadError(f"{what} holds {size} bytes; {budget} left in this reply's bound")
        budget -= len(data)
        out[key] = parse_npy(data, limits.max_array_bytes)
    return out
