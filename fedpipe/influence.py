"""Bounded influence: how far one device can move the global model in a round.

FedAvg weights each update by the device's own claim of how many examples it trained on,
and takes the update at whatever size it comes. A device claiming 1e6 examples, or
sending its update times 1000, then moves the model as it likes. Two bounds stop that,
both decided one reply at a time against a *reference*, so they keep working when
replies are folded into a running sum as they arrive:

- weight: min(claim, `weight_ratio` x the reference median weight);
- norm: an update longer than `norm_ratio` x the reference median L2 norm is rejected
  (or, `norm_action = "clip"`, scaled down to that length).

The reference is the median over the previous round's decoded replies; a round with no
previous round (the run's first, or the first after a resume) uses its own. Medians
move little while fewer than half the replies are hostile, and depend on the set of
replies only, never on the order they arrived in. Every weight is also below the
absolute `max_examples` (the boundary rejects claims above it), so the total weight of
a round cannot overflow.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from fedpipe.codec import Update
from fedpipe.config import BoundsConfig

__all__ = ["Admission", "InfluenceGuard", "Reference", "update_norm"]

_TINY = 1e-12  # a norm bound never reaches zero: all-zero rounds stay harmless


def update_norm(update: Update) -> float:
    """L2 norm over every coordinate, accumulated in float64 (float32 squares overflow)."""
    total = 0.0
    for value in update.values():
        flat = np.asarray(value, np.float64).ravel()
        total += float(np.dot(flat, flat))
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
