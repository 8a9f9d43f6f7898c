"""Masks modulo 2^m: a device adds them, the aggregator removes what does not cancel.

A device i adds its self mask PRG(b_i) and, for each live neighbour j, +PRG(s_ij) if
i < j else -PRG(s_ij): over a set of devices that all survive, the pairwise masks cancel
in the sum. Words are uint32 and wrap modulo 2^32, which 2^m divides, so reducing with
`& (2^m - 1)` at the end gives the sum modulo 2^m exactly.
"""

from __future__ import annotations

from collections.abc import Iterable

import numpy as np

from fedpipe.secagg.keys import mask_stream

__all__ = ["apply_masks", "modulus_mask"]


def modulus_mask(m: int) -> np.uint32:
    return np.uint32((1 << m) - 1)


def apply_masks(
    words: np.ndarray,
    seed: bytes | None,
    pairs: Iterable[tuple[bytes, bool]],
    m: int,
    sign: int = 1,
) -> np.ndarray:
    """(words + sign * (PRG(seed) + sum of +-PRG(key))) mod 2^m, uint32 (count,).

    `pairs` are (pairwise key, True if this device adds it, False if it subtracts it).
    The device masks with sign=+1; the aggregator removes masks with sign=-1.
    """
    out = np.array(words, dtype=np.uint32, copy=True)
    count = len(out)
    if seed is not None:
        _add(out, mask_stream(seed, count), sign > 0)
    for key, plus in pairs:
        _add(out, mask_stream(key, count), plus == (sign > 0))
    out &= modulus_mask(m)
    return out


def _add(out: np.ndarray, stream: np.ndarray, plus: bool) -> None:
    if plus:
        np.add(out, stream, out=out)
    else:
        np.subtract(out, stream, out=out)
