"""A strict `.npy` reader for bytes that came from a device.

Flower's `Array.numpy()` hands the bytes to `np.load`, which also accepts `.npz` archives
(returning an `NpzFile`, not an array), parses the header with `ast.literal_eval`, and
trusts the declared shape. Here nothing is allocated or evaluated before the header has
been matched against one fixed pattern, the dtype against a short list, and the declared
size against both a caller's bound and the exact number of bytes present. The result is
a read-only view of the input: no copy, so memory stays a bounded multiple of the input.
"""

from __future__ import annotations

import io
import re

import numpy as np

from fedpipe.codec._base import PayloadError

__all__ = ["DTYPES", "MAX_NDIM", "parse_npy", "to_npy"]

_MAGIC = b"\x93NUMPY"
_MAX_HEADER = 1024  # numpy writes ~118 bytes for any array fedpipe sends
MAX_NDIM = 8
# Every dtype a fedpipe codec or the seal puts on the wire (little-endian or byte-sized).
DTYPES = frozenset({"|u1", "|i1", "|b1", "<f2", "<f4", "<f8", "<i2", "<i4", "<i8", "<u2", "<u4"})
# numpy's own header, keys in the sorted order numpy always writes; nothing else matches.
_HEADER = re.compile(
    r"\{'descr': '(?P<descr>[<>|=][a-z]\d{1,2})', "
    r"'fortran_order': (?P<fortran>False|True), "
    r"'shape': \((?P<shape>(?:\d{1,12}, ?)*(?:\d{1,12})?)\), \} *\n"
)


def _header(data: bytes) -> tuple[str, bool, tuple[int, ...], int]:
    """(descr, fortran, shape, offset of the data) or PayloadError."""
    if len(data) < 10 or data[:6] != _MAGIC:
        kind = "a zip/npz archive" if data[:2] == b"PK" else "not a .npy array"
        raise PayloadError(f"array bytes are {kind}")
    major = data[6]
    if major == 1:
        size, start = int.from_bytes(data[8:10], "little"), 10
    elif major in (2, 3) and len(data) >= 12:
        size, start = int.from_bytes(data[8:12], "little"), 12
    else:
        raise PayloadError(f".npy version {major} is not supported")
    if size > _MAX_HEADER or start + size > len(data):
        raise PayloadError(f".npy header of {size} bytes is too long or truncated")
    try:
        text = data[start : start + size].decode("ascii")
    except UnicodeDecodeError as exc:
        raise PayloadError(".npy header is not ASCII") from exc
    match = _HEADER.fullmatch(text)
    if match is None:
        raise PayloadError(f".npy header {text[:80]!r} is not a plain array header")
    shape = tuple(int(d) for d in match["shape"].replace(" ", "").split(",") if d)
    return match["descr"], match["fortran"] == "True", shape, start + size


def parse_npy(data: bytes, max_bytes: int) -> np.ndarray:
    """The array stored in `data`, or PayloadError; never more than `max_bytes` of data."""
    descr, fortran, shape, offset = _header(data)
    if descr not in DTYPES:
        raise PayloadError(f"dtype {descr!r} is not accepted")
    if fortran:
        raise PayloadError("Fortran-ordered arrays are not accepted")
    if len(shape) > MAX_NDIM:
        raise PayloadError(f"{len(shape)} dimensions (at most {MAX_NDIM})")
    dtype = np.dtype(descr)
    count = 1
    for dim in shape:  # Python ints: no overflow, and stop as soon as it is too large
        count *= dim
        if count * dtype.itemsize > max_bytes:
            raise PayloadError(f"declared shape {shape} exceeds the {max_bytes}-byte bound")
    if len(data) - offset != count * dtype.itemsize:
        raise PayloadError(
            f"shape {shape} {descr} needs {count * dtype.itemsize} bytes, "
            f"{len(data) - offset} present"
        )
    return np.frombuffer(data, dtype, count, offset).reshape(shape)


def to_npy(array: np.ndarray) -> bytes:
    """`array` in the `.npy` form `parse_npy` reads (exactly what `np.save` writes)."""
    buf = io.BytesIO()
    np.lib.format.write_array(buf, np.asarray(array, order="C"), allow_pickle=False)
    return buf.getvalue()
