"""A request body to a batch the model can take, or a reason why not.

This is the only place that parses what a client sends. Every failure is a `BadRequest`
with the HTTP status and a sentence for the client, so nothing a client sends reaches the
model unchecked or surfaces as a server error:

- 400: malformed JSON or .npy, `inputs` missing or not a list, ragged lists, a shape
  that is neither the model's input shape nor its flattened size, an empty batch,
  values that are not finite in float32 (NaN, inf, or too large);
- 413: more inputs than the service takes in one request;
- 422: values of the wrong kind (strings, booleans, null, objects, complex numbers):
  the same rule for JSON and .npy, which may hold signed or unsigned integers or floats.
"""

from __future__ import annotations

import functools
import io
import json
import math

import numpy as np

__all__ = ["BadRequest", "decode_json", "decode_npy", "to_batch"]

# dtype kinds a batch may arrive in: signed and unsigned integers, floats.
NUMERIC_KINDS = "iuf"
NPY_MAGIC = b"\x93NUMPY"


class BadRequest(ValueError):
    """A request the service refuses: its HTTP status, a metrics label, and the reason."""

    def __init__(self, status: int, label: str, detail: str) -> None:
        super().__init__(detail)
        self.status, self.label, self.detail = status, label, detail


def decode_json(body: bytes, max_inputs: int) -> np.ndarray:
    """`{"inputs": [...]}` to an array of the numbers as sent (not yet shape-checked)."""
    try:
        doc = json.loads(body)
    except (ValueError, RecursionError) as exc:  # bad UTF-8 or JSON; absurd nesting
        raise BadRequest(400, "malformed", f"the body is not JSON: {exc}") from None
    if not isinstance(doc, dict) or not isinstance(doc.get("inputs"), list):
        raise BadRequest(400, "malformed", 'the body must be {"inputs": [input, ...]}')
    inputs = doc["inputs"]
    _check_count(len(inputs), max_inputs)
    try:
        return np.array(inputs)
    except (ValueError, RecursionError) as exc:
        raise BadRequest(400, "shape", f"inputs are ragged or too deeply nested: {exc}") from None


def decode_npy(body: bytes, shape: tuple[int, ...], max_inputs: int) -> np.ndarray:
    """A raw .npy file, read without pickle; the header is checked before the data."""
    end = _header_end(body)
    try:
        dims, fortran, dtype = _parse_header(body[:end])
    except (ValueError, EOFError, SyntaxError) as exc:
        raise BadRequest(400, "malformed", f"the body is not a .npy file: {exc}") from None
    _check_kind(dtype)
    _check_count(dims[0] if dims else 0, max_inputs)
    _check_shape(dims, shape)
    data = body[end:]
    if len(data) != math.prod(dims) * dtype.itemsize:
        reason = f"{len(data)} bytes of data for an array of {dims} {dtype}"
        raise BadRequest(400, "malformed", f"the .npy file is truncated or padded: {reason}")
    return np.frombuffer(data, dtype=dtype).reshape(dims, order="F" if fortran else "C")


def _header_end(body: bytes) -> int:
    """Where the data starts: magic (6 bytes), version (2), header length (2 or 4), header."""
    if body[:6] != NPY_MAGIC or body[6:8] not in (b"\x01\x00", b"\x02\x00"):
        raise BadRequest(400, "malformed", "the body is not a .npy file (format 1.0 or 2.0)")
    size = 2 if body[6] == 1 else 4
    return 8 + size + int.from_bytes(body[8 : 8 + size], "little")


@functools.lru_cache(maxsize=64)
def _parse_header(raw: bytes) -> tuple[tuple[int, ...], bool, np.dtype]:
    """numpy's own header parser, remembered: it evaluates the header as Python literals
    (about 0.1 ms), and a client sends the same header with every request."""
    fp = io.BytesIO(raw)
    version = np.lib.format.read_magic(fp)
    read = np.lib.format.read_array_header_1_0
    if version == (2, 0):
        read = np.lib.format.read_array_header_2_0
    dims, fortran, dtype = read(fp)
    return tuple(dims), bool(fortran), dtype


def to_batch(values: np.ndarray, shape: tuple[int, ...], max_inputs: int) -> np.ndarray:
    """(N, *shape) or (N, prod(shape)) numbers to a float32 (N, *shape) array."""
    _check_kind(values.dtype)
    _check_count(len(values) if values.ndim else 0, max_inputs)
    _check_shape(values.shape, shape)
    with np.errstate(over="ignore"):  # beyond float32 becomes inf, refused just below
        batch = values.astype(np.float32).reshape(len(values), *shape)
    if not np.isfinite(batch).all():
        raise BadRequest(400, "non_finite", "inputs must be finite float32 numbers (no NaN/inf)")
    return batch


def _check_kind(dtype: np.dtype) -> None:
    if dtype.kind not in NUMERIC_KINDS:
        raise BadRequest(422, "dtype", f"inputs must be integers or floats, not {dtype} values")


def _check_count(count: int, max_inputs: int) -> None:
    if count > max_inputs:
        raise BadRequest(413, "too_large", f"{count} inputs; at most {max_inputs} a request")


def _check_shape(got: tuple[int, ...], shape: tuple[int, ...]) -> None:
    """One batch dimension, then the input shape or its flattened size."""
    if len(got) == 0:
        raise BadRequest(400, "shape", "a batch needs a first (batch) dimension")
    if got[0] == 0:
        raise BadRequest(400, "empty", "the batch is empty: send at least one input")
    if got[1:] not in (shape, (math.prod(shape),)):
        raise BadRequest(
            400,
            "shape",
            f"each input must have shape {list(shape)} or {math.prod(shape)} values, "
            f"got a batch of shape {list(got)}",
        )
