"""Compact coding of sorted, distinct indices: gaps, Golomb-Rice coded in two streams.

Top-k keeps a few coordinates out of millions; sending each index as int32 would cost
more than the quantized values. The gaps between sorted indices are roughly geometric,
for which Rice coding is near optimal: gap = q * 2**b + r, r in b plain bits, q in unary.
Keeping quotients and remainders in separate streams makes both directions vectorized
NumPy (no bit-by-bit loop): quotient i ends at the i-th zero of the unary stream.
"""

from __future__ import annotations

import math

import numpy as np

__all__ = ["decode_indices", "encode_indices", "max_quotient_bytes", "remainder_bytes", "rice_bits"]


def rice_bits(count: int, k: int) -> int:
    """Rice parameter for k indices among count: log2 of ln2 times the mean gap.

    Both ends derive it from (count, k), so it is never sent.
    """
    mean_gap = (count - k) / max(k, 1)
    return max(0, math.floor(math.log2(max(1.0, math.log(2) * mean_gap))))


def remainder_bytes(k: int, b: int) -> int:
    return -(-k * b // 8)


def max_quotient_bytes(count: int, k: int, b: int) -> int:
    """Upper bound of the unary stream: the quotients sum to at most count / 2**b."""
    return -(-(k + (count >> b)) // 8)


def encode_indices(idx: np.ndarray, b: int) -> tuple[np.ndarray, np.ndarray]:
    """Strictly increasing indices -> (unary quotient bytes, packed b-bit remainders)."""
    idx = np.asarray(idx, np.int64)
    gaps = np.diff(idx, prepend=-1) - 1  # >= 0 because indices are distinct
    q, r = gaps >> b, gaps & ((1 << b) - 1)
    ends = np.cumsum(q + 1) - 1  # position of each code's terminating zero
    total = int(ends[-1]) + 1 if len(ends) else 0
    unary = np.ones(-(-total // 8) * 8, np.uint8)  # pad with ones: padding has no zeros
    unary[ends] = 0
    rbits = ((r[:, None] >> np.arange(b)) & 1).astype(np.uint8)
    return np.packbits(unary, bitorder="little"), np.packbits(rbits.ravel(), bitorder="little")


def decode_indices(
    quotients: np.ndarray, remainders: np.ndarray, k: int, b: int, count: int
) -> np.ndarray:
    """Inverse of `encode_indices`; ValueError unless it yields k indices in [0, count)."""
    ends = np.flatnonzero(np.unpackbits(quotients, bitorder="little") == 0)
    if len(ends) != k:
        raise ValueError(f"index stream holds {len(ends)} codes, expected {k}")
    if 8 * len(quotients) - (int(ends[-1]) + 1 if k else 0) >= 8:
        raise ValueError("index stream has trailing bytes")
    q = np.diff(ends, prepend=-1) - 1
    rbits = np.unpackbits(remainders, count=k * b, bitorder="little").reshape(k, b)
    r = rbits.astype(np.int64) @ (np.int64(1) << np.arange(b, dtype=np.int64))
    idx = np.cumsum((q << b) + r + 1) - 1
    if k and (idx[-1] >= count):
        raise ValueError(f"index {int(idx[-1])} out of range for {count} coordinates")
    return idx
