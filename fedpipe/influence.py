"""Bounded influence: how far one device can move the global model in a round.

FedAvg weights each update by the device's own claim of how many examples it trained on,
and takes the update at whatever size it comes. A device claiming 1e6 examples, or
sending its update times 1000, then moves the model as it likes. Two bounds stop that,
both decided one reply at a time against a *reference*, so they keep working when
replies are folded into a running sum as they arrive:

- weight: min(claim, `weight_ratio` x the reference median weight);
- norm: an update longer than `norm_ratio` x the reference median L2 norm is rejected
  (or, `norm_action = "clip"`, scaled down to that length).

The reference is the median over the previous round's decoded replies. A round with
none (the run's first) takes the medians of the first `reference_clients` valid replies
in *sample order* (`ReferenceGate`): replies that arrive before those have settled are
held, so the reference depends on the sample, never on the order replies arrived in,
and memory holds a few updates, not the round. Medians move little while fewer than
half the replies are hostile. Every weight is also below the
absolute `max_examples` (the boundary rejects claims above it), so the total weight of
a round cannot overflow.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Generic, TypeVar

import numpy as np

from fedpipe.codec import Update
from fedpipe.config import BoundsConfig

__all__ = [
    "ABS_CAP",
    "Admission",
    "InfluenceGuard",
    "Reference",
    "ReferenceGate",
    "update_norm",
]

_TINY = 1e-12  # a norm bound never reaches zero: all-zero rounds stay harmless
# With the norm bound off (or no reference at all), no coordinate of an admitted update
# may exceed this: an exact fixed-point sum needs some bound, and no honest update of
# weights moves one by 65,536.
ABS_CAP = 65536.0

T = TypeVar("T")


def update_norm(update: Update) -> float:
    """L2 norm over every coordinate, accumulated in float64 (float32 squares overflow)."""
    total = 0.0
    for value in update.values():
        flat = np.asarray(value, np.float64).ravel()
        # square-and-sum, not np.dot: BLAS threads spin against the workers' cores
        total += float(np.square(flat).sum())
    return float(np.sqrt(total))


@dataclass(frozen=True)
class Reference:
    """Medians of a round's decoded replies."""

    weight: float
    norm: float

    @classmethod
    def of(cls, weights: Sequence[float], norms: Sequence[float]) -> Reference | None:
        if not weights:
            return None
        return cls(float(np.median(weights)), float(np.median(norms)))


@dataclass(frozen=True)
class Admission:
    """What a reply contributes after the bounds, or why it contributes nothing."""

    weight: float
    update: Update
    capped: bool = False  # weight lowered to the cap
    clipped: bool = False  # update scaled down to the norm bound
    rejected: str | None = None


class InfluenceGuard:
    """Holds the reference between rounds and applies the bounds to each reply."""

    def __init__(self, cfg: BoundsConfig) -> None:
        self.cfg = cfg
        self.reference: Reference | None = None

    def reference_for(self, weights: Sequence[float], norms: Sequence[float]) -> Reference | None:
        """The round's reference: the previous round's, else this round's own."""
        return self.reference or Reference.of(weights, norms)

    def admit(self, weight: float, update: Update, norm: float, ref: Reference | None) -> Admission:
        """The bounded contribution of one reply (pure: the same inputs, the same result)."""
        if ref is None:
            return Admission(weight, update)
        capped = False
        if self.cfg.weight_ratio > 0 and weight > self.cfg.weight_ratio * ref.weight:
            weight, capped = self.cfg.weight_ratio * ref.weight, True
        if self.cfg.norm_ratio <= 0:
            return Admission(weight, update, capped=capped)
        bound = max(self.cfg.norm_ratio * ref.norm, _TINY)
        if norm <= bound:
            return Admission(weight, update, capped=capped)
        if self.cfg.norm_action == "reject":
            reason = f"update norm {norm:.4g} exceeds the bound {bound:.4g}"
            return Admission(0.0, update, capped=capped, rejected=reason)
        scale = np.float32(bound / norm)
        clipped = {k: (v * scale).astype(v.dtype, copy=False) for k, v in update.items()}
        return Admission(weight, clipped, capped=capped, clipped=True)

    def end_round(self, weights: Sequence[float], norms: Sequence[float]) -> None:
        """Remember this round's medians as the next round's reference."""
        self.reference = Reference.of(weights, norms) or self.reference

    def max_weight(self, ref: Reference | None) -> float:
        """The largest weight `admit` can return against `ref`."""
        if ref is None or self.cfg.weight_ratio <= 0:
            return float(self.cfg.max_examples)
        return self.cfg.weight_ratio * ref.weight

    def max_coordinate(self, ref: Reference | None) -> float:
        """A bound on |coordinate| of an admitted update (the norm bound, with room for
        the float32 rounding of a clipped update), or ABS_CAP without one."""
        if ref is None or self.cfg.norm_ratio <= 0:
            return ABS_CAP
        return min(max(self.cfg.norm_ratio * ref.norm, _TINY) * 1.001, ABS_CAP)


@dataclass
class ReferenceGate(Generic[T]):
    """Holds a round's replies until its reference is known, then releases them.

    `order` is the sample in draw order. With a `known` reference (the previous round's)
    every reply passes at once. Otherwise the reference is the medians of the first
    `size` valid replies in `order`; it is fixed as soon as every node before the
    size-th valid one has settled (replied validly, or failed), or at `close()`.
    """

    order: Sequence[int]
    size: int
    reference: Reference | None = None
    _settled: dict[int, tuple[float, float] | None] = field(default_factory=dict)
    _held: list[T] = field(default_factory=list)
    _open: bool = False

    def __post_init__(self) -> None:
        self._open = self.reference is not None

    def offer(self, node: int, item: T | None, weight: float = 0.0, norm: float = 0.0) -> list[T]:
        """Settle `node` (item None: no valid reply); returns the items now released."""
        if self._open:
            return [] if item is None else [item]
        self._settled[node] = None if item is None else (weight, norm)
        if item is not None:
            self._held.append(item)
        self._decide(final=False)
        return self._release() if self._open else []

    def close(self) -> list[T]:
        """End of the stage: nodes still unsettled will not reply; release what is held."""
        if not self._open:
            self._decide(final=True)
        return self._release()

    def _decide(self, final: bool) -> None:
        weights: list[float] = []
        norms: list[float] = []
        for node in self.order:
            if node not in self._settled:
                if final:
                    continue
                return  # an earlier node may still be among the first `size` valid
            stats = self._settled[node]
            if stats is not None:
                weights.append(stats[0])
                norms.append(stats[1])
                if len(weights) == self.size:
                    break
        self.reference = Reference.of(weights, norms)
        self._open = True

    def _release(self) -> list[T]:
        out, self._held = self._held, []
        return out
