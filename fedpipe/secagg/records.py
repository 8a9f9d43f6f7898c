"""SecAgg tables in Flower records, read strictly on both sides.

Each side treats the other's records as hostile: arrays are read with the strict `.npy`
parser within a byte bound, ids must be 1-d int64 in [0, 2^31), byte rows must have the
exact width, and every count is bounded before anything is allocated.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord

from fedpipe.codec import PayloadError, parse_npy

__all__ = ["float_param", "id_array", "ids_of", "int_param", "row_array", "rows_of"]

MAX_ID = 2**31 - 1
MAX_ROWS = 1 << 17  # no table holds more rows than this (neighbours of one device)


def id_array(ids: Sequence[int]) -> Array:
    return Array(np.asarray(ids, dtype="<i8").reshape(-1))


def row_array(rows: Sequence[bytes], width: int) -> Array:
    """Fixed-width byte strings as one (rows, width) uint8 array."""
    joined = b"".join(rows)
    if len(joined) != width * len(rows):
        raise ValueError(f"rows must all be {width} bytes")
    return Array(np.frombuffer(joined, np.uint8).reshape(len(rows), width).copy())


def _array(record: ArrayRecord, name: str, max_bytes: int) -> np.ndarray:
    if name not in record:
        raise PayloadError(f"table lacks {name!r}")
    array = record[name]
    data = array.data if isinstance(array, Array) else None
    if not isinstance(data, bytes) or len(data) > max_bytes + 256:
        raise PayloadError(f"{name!r} is not an array within {max_bytes} bytes")
    return parse_npy(data, max_bytes)


def ids_of(record: ArrayRecord, name: str, max_rows: int = MAX_ROWS) -> list[int]:
    """A 1-d int64 column of client ids, each in [0, 2^31)."""
    arr = _array(record, name, 8 * max_rows)
    if arr.dtype != np.dtype("<i8") or arr.ndim != 1:
        raise PayloadError(f"{name!r} must be 1-d int64, not {arr.dtype}{list(arr.shape)}")
    if len(arr) and (int(arr.min()) < 0 or int(arr.max()) > MAX_ID):
        raise PayloadError(f"{name!r} holds an id outside [0, {MAX_ID}]")
    return [int(v) for v in arr]


def rows_of(record: ArrayRecord, name: str, count: int, width: int) -> list[bytes]:
    """Exactly `count` byte strings of `width` bytes."""
    arr = _array(record, name, max(1, count * width))
    if arr.dtype != np.uint8 or arr.shape != (count, width):
        raise PayloadError(
            f"{name!r} must be uint8[{count}, {width}], not {arr.dtype}{list(arr.shape)}"
        )
    return [bytes(row) for row in arr]


def int_param(record: ConfigRecord, key: str, lo: int, hi: int) -> int:
    value = record.get(key)
    if isinstance(value, bool) or not isinstance(value, int) or not lo <= value <= hi:
        raise PayloadError(f"{key}={value!r:.40} must be an integer in [{lo}, {hi}]")
    return value


def float_param(record: ConfigRecord, key: str, lo: float, hi: float) -> float:
    value = record.get(key)
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise PayloadError(f"{key}={value!r:.40} must be a number")
    if not (math.isfinite(float(value)) and lo <= float(value) <= hi):
        raise PayloadError(f"{key}={value!r:.40} must be in [{lo}, {hi}]")
    return float(value)
