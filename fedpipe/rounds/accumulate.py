"""Running aggregates of a round's updates: exact streaming sums, or every update held.

Streaming FedAvg must not depend on the order replies arrive in, or two runs of the same
seed differ in the last bits and then in everything after. Float sums are not
associative, so `ExactSum` rounds each term w_i * u_i (one float64 product, rounded the
same way whatever came before) onto a fixed-point grid and adds the integers, which is
associative: any order gives the same bits. Two int64 limbs per coordinate give about
94 bits of range, so the grid can be fine (about 2^-80 of the largest term for a round
of 1,000 clients) without overflow. Memory: two int64 copies of the model, whatever the
number of clients.

The grid is fixed before the round's first term arrives, from what the server already
knows: how many replies can come (the sample size), the largest weight it admits, and
the largest coordinate it admits (the norm bound, or an absolute cap when that is off).
A term beyond those is refused, never wrapped.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field

import numpy as np

from fedpipe.codec import Update

__all__ = ["BufferedUpdates", "ExactSum", "HeldUpdate", "OutOfRange", "scale_bits"]

_LIMB = 2.0**32
_INV_LIMB = 2.0**-32
# Bits the high limb's sum may use: int64 with one bit of headroom.
_HI_BITS = 62


class OutOfRange(ValueError):
    """A term the round's fixed-point grid cannot hold (it would wrap)."""


def scale_bits(max_terms: int, max_abs: float) -> int:
    """Fractional bits S of the grid for up to `max_terms` terms of |value| <= `max_abs`.

    Each term's integer x = rint(value * 2^S) has |x| <= max_abs * 2^S; its high limb
    floor(x / 2^32) summed over every term must stay below 2^62.
    """
    if max_terms < 1 or not (max_abs > 0 and math.isfinite(max_abs)):
        raise ValueError(f"no grid for {max_terms} terms of magnitude {max_abs}")
    headroom = _HI_BITS + 32 - math.ceil(math.log2(max_terms)) - 1
    return headroom - math.ceil(math.log2(max_abs))


class ExactSum:
    """sum_i factor_i * u_i over updates shaped like `like`, exact and order-independent."""

    def __init__(self, like: Mapping[str, np.ndarray], max_terms: int, max_abs: float) -> None:
        self.bits = scale_bits(max_terms, max_abs)
        self.max_abs = max_abs
        self.max_terms = max_terms
        self.terms = 0
        self._hi = {k: np.zeros(np.shape(v), np.int64) for k, v in like.items()}
        self._lo = {k: np.zeros(np.shape(v), np.int64) for k, v in like.items()}

    def add(self, update: Update, factor: float) -> None:
        """Fold factor * update in; `factor` in [0, 1], every |coordinate| <= max_abs."""
        if not 0.0 <= factor <= 1.0:
            raise OutOfRange(f"weight factor {factor} outside [0, 1]")
        if self.terms >= self.max_terms:
            raise OutOfRange(f"more than the {self.max_terms} terms this round's grid holds")
        if update.keys() != self._hi.keys():
            raise OutOfRange("update keys differ from the model's")
        for value in update.values():
            if value.size and float(np.max(np.abs(value))) > self.max_abs:
                raise OutOfRange(f"a coordinate exceeds the round's bound {self.max_abs:.4g}")
        c = math.ldexp(factor, self.bits)  # exact: a power-of-two scaling
        for name, value in update.items():
            x = np.array(value, dtype=np.float64)  # exact: float32 -> float64, and 0-d stays
            x *= c  # one rounding, the same every time
            np.rint(x, out=x)
            hi = np.floor(x * _INV_LIMB)
            x -= hi * _LIMB  # the low 32 bits, exactly, in [0, 2^32)
            self._hi[name] += hi.astype(np.int64)
            self._lo[name] += x.astype(np.int64)
        self.terms += 1

    def total(self) -> dict[str, np.ndarray]:
        """The sum in float64 (rounded once from the exact integers)."""
        out: dict[str, np.ndarray] = {}
        for name, hi in self._hi.items():
            lo = self._lo[name]
            carry = lo >> 32  # lo < terms * 2^32: no overflow below 2^31 terms
            hi_f = (hi + carry).astype(np.float64)
            lo_f = (lo - (carry << 32)).astype(np.float64)
            out[name] = np.ldexp(hi_f * _LIMB + lo_f, -self.bits)
        return out


@dataclass(frozen=True)
class HeldUpdate:
    """One admitted update held for a strategy that needs all of them at once."""

    client_id: int
    node_id: int
    weight: float
    train_loss: float
    update: Update


@dataclass
class BufferedUpdates:
    """Every admitted update of the round: O(clients x model) memory, by design."""

    held: list[HeldUpdate] = field(default_factory=list)

    def add(self, item: HeldUpdate) -> None:
        self.held.append(item)

    def in_client_order(self) -> list[HeldUpdate]:
        """Sorted by (client id, node): the strategy's float sums then do not depend on
        arrival order."""
        return sorted(self.held, key=lambda h: (h.client_id, h.node_id))
