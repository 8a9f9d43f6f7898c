"""Drift: do the inputs a served model sees still look like the data it was trained for?

The coordinator never sees a device's training data, so the reference is built from
what it may see: its own validation data, and histograms devices report over their
held-out splits (counts in bins the coordinator fixed, never examples). Each example is
summarised by a few descriptors: its input's mean, standard deviation, minimum and
maximum, the model's confidence (largest probability) and its predicted class. The
reference holds each descriptor's distribution over bins; a service counts the same
bins over a sliding window of recent inputs and scores each descriptor with the
population stability index (PSI = sum (o - r) ln(o / r) over bins of the observed and
reference fractions). Rules of thumb read PSI < 0.1 as stable and > 0.25 as a shift.

Bins of the input descriptors are the deciles of the coordinator's validation data
(equal reference mass per bin is what makes PSI sensitive in the tails); confidence
has fixed bins; the predicted class has one bin per class.
"""

from __future__ import annotations

import json
import logging
import math
import threading
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

__all__ = [
    "DESCRIPTORS",
    "PROFILE_EXAMPLES",
    "PROFILE_FILE",
    "DeviceProfiles",
    "DriftError",
    "DriftMonitor",
    "Profile",
    "describe",
    "histograms",
    "observe_split",
    "probabilities",
    "parse_bins",
    "psi",
]

log = logging.getLogger(__name__)

PROFILE_FILE = "profile.json"
PROFILE_EXAMPLES = 10_000  # coordinator examples a reference is built from, at most
INPUTS = ("input_mean", "input_std", "input_min", "input_max")
DESCRIPTORS = (*INPUTS, "confidence", "predicted")
CONFIDENCE_EDGES = (0.5, 0.7, 0.8, 0.9, 0.95, 0.98, 0.99, 0.995, 0.999)
_FLOOR = 1e-4  # fraction given to an empty bin, so that PSI stays finite
_MAX_BINS = 4096  # a profile file (or device) naming more bins than this is refused


class DriftError(ValueError):
    """A profile, or histograms a device reported, do not have the expected form."""


def describe(x: torch.Tensor, probs: torch.Tensor) -> dict[str, np.ndarray]:
    """Per-example descriptors of a batch: inputs (N, ...) and probabilities (N, classes)."""
    flat = x.detach().reshape(len(x), -1).float()
    p = probs.detach().float()
    out = {
        "input_mean": flat.mean(1),
        "input_std": flat.std(1, correction=0),
        "input_min": flat.amin(1),
        "input_max": flat.amax(1),
        "confidence": p.amax(1),
        "predicted": p.argmax(1).float(),
    }
    return {k: v.cpu().numpy().astype(np.float64) for k, v in out.items()}


def _bins(edges: Mapping[str, np.ndarray], classes: int, name: str) -> int:
    return classes if name == "predicted" else len(edges[name]) + 1


def _bin_of(
    edges: Mapping[str, np.ndarray], classes: int, values: Mapping[str, np.ndarray], name: str
) -> np.ndarray:
    """The bin of each value of descriptor `name`: bin i of a continuous descriptor holds
    edges[i-1] <= v < edges[i]; predicted classes outside [0, classes) are clipped into
    the end bins (they cannot occur with a model of that many outputs)."""
    v = values[name]
    if name == "predicted":
        return np.clip(v.astype(np.int64), 0, classes - 1)
    return np.searchsorted(edges[name], v, side="right")


def histograms(
    edges: Mapping[str, np.ndarray], classes: int, values: Mapping[str, np.ndarray]
) -> dict[str, np.ndarray]:
    """Counts of `values` (from `describe`) in the profile's bins, int64 per descriptor."""
    return {
        n: np.bincount(
            _bin_of(edges, classes, values, n), minlength=_bins(edges, classes, n)
        ).astype(np.int64)
        for n in DESCRIPTORS
    }


def parse_bins(text: str) -> tuple[dict[str, np.ndarray], int]:
    """The bins an evaluate config announces (JSON: classes and edges), checked like
    a profile's: a device computes nothing from bins it cannot trust to be bins."""
    try:
        return _checked_bins(json.loads(text))
    except (KeyError, TypeError, ValueError) as exc:  # DriftError is a ValueError
        raise DriftError(f"not the bins of a drift profile: {exc}") from exc


def _checked_bins(data: Mapping[str, Any]) -> tuple[dict[str, np.ndarray], int]:
    classes = int(data["classes"])
    if not 1 <= classes <= _MAX_BINS:
        raise DriftError(f"classes={classes} out of range")
    edges = {n: np.asarray(data["edges"][n], np.float64) for n in (*INPUTS, "confidence")}
    for n, e in edges.items():
        if e.ndim != 1 or len(e) >= _MAX_BINS or not np.all(np.diff(e) > 0):
            raise DriftError(f"edges of {n} are not increasing numbers")
    return edges, classes


@torch.no_grad()
def probabilities(model: torch.nn.Module, x: torch.Tensor, batch: int = 1024) -> torch.Tensor:
    """Softmax of `model` over `x` in batches, (N, classes)."""
    model.eval()
    return torch.cat(
        [torch.softmax(model(x[i : i + batch]).float(), 1) for i in range(0, len(x), batch)]
    )


def observe_split(
    model: torch.nn.Module, x: torch.Tensor, edges: Mapping[str, np.ndarray], classes: int
) -> dict[str, np.ndarray]:
    """A device's histograms of its held-out inputs under `model` (what it reports)."""
    return histograms(edges, classes, describe(x, probabilities(model, x)))


def _all_bins(edges: Mapping[str, np.ndarray], classes: int) -> dict[str, int]:
    return {n: _bins(edges, classes, n) for n in DESCRIPTORS}


def psi(reference: np.ndarray, observed: np.ndarray) -> float:
    """Population stability index of two histograms over the same bins (counts or
    fractions); empty bins count as a small fraction so that it stays finite."""
    r = np.maximum(reference / max(reference.sum(), 1e-12), _FLOOR)
    o = np.maximum(observed / max(observed.sum(), 1e-12), _FLOOR)
    return float(np.sum((o - r) * np.log(o / r)))


def _quantile_edges(v: np.ndarray, bins: int) -> np.ndarray:
    """Interior deciles (for bins=10), repeated values merged: a constant descriptor
    (e.g. every image's minimum is the background) gets one edge at that value."""
    qs = np.quantile(v, np.linspace(0, 1, bins + 1)[1:-1])
    return np.unique(qs)


@dataclass(frozen=True)
class Profile:
    """The reference: each descriptor's bins and the fraction of reference data in each.

    `sources` says what it was built from (examples of coordinator data, devices and
    their examples) so that a served model's profile can be traced."""

    classes: int
    edges: dict[str, np.ndarray]  # interior bin edges of the continuous descriptors
    fractions: dict[str, np.ndarray]  # per descriptor, summing to 1
    sources: dict[str, int]

    @classmethod
    def reference(cls, x: torch.Tensor, probs: torch.Tensor, bins: int = 10) -> Profile:
        """From the coordinator's own data and the model's probabilities on it (see
        `probabilities`)."""
        if len(x) == 0:
            raise DriftError("a profile needs at least one example")
        values = describe(x, probs)
        edges = {n: _quantile_edges(values[n], bins) for n in INPUTS}
        edges["confidence"] = np.asarray(CONFIDENCE_EDGES)
        counts = histograms(edges, probs.shape[1], values)
        fractions = {k: c / c.sum() for k, c in counts.items()}
        return cls(int(probs.shape[1]), edges, fractions, {"coordinator_examples": len(x)})

    def bins(self) -> dict[str, int]:
        return _all_bins(self.edges, self.classes)

    def with_devices(self, devices: DeviceProfiles) -> Profile:
        """The coordinator's and the devices' distributions weighed equally, so that
        neither the coordinator's data nor the devices' claims drown the other."""
        merged = devices.fractions()
        if merged is None:
            return self
        fractions = {n: 0.5 * (self.fractions[n] + merged[n]) for n in DESCRIPTORS}
        sources = {**self.sources, "devices": devices.devices, "device_examples": devices.examples}
        return Profile(self.classes, self.edges, fractions, sources)

    def to_json(self) -> dict[str, Any]:
        return {
            "classes": self.classes,
            "edges": {k: v.tolist() for k, v in self.edges.items()},
            "fractions": {k: v.tolist() for k, v in self.fractions.items()},
            "sources": self.sources,
        }

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> Profile:
        """A profile as saved, checked: bins per descriptor and fractions that sum to 1."""
        try:
            edges, classes = _checked_bins(data)
            fractions = {n: np.asarray(data["fractions"][n], np.float64) for n in DESCRIPTORS}
            for n, f in fractions.items():
                if f.shape != (_bins(edges, classes, n),) or abs(f.sum() - 1) > 1e-6:
                    raise DriftError(f"fractions of {n} do not fit its bins or sum to 1")
            sources = {str(k): int(v) for k, v in dict(data.get("sources", {})).items()}
        except (KeyError, TypeError, ValueError) as exc:
            raise DriftError(f"not a drift profile: {exc}") from exc
        return cls(classes, edges, fractions, sources)

    def save(self, path: Path) -> None:
        path.write_text(json.dumps(self.to_json(), indent=1) + "\n")

    @classmethod
    def load(cls, path: Path) -> Profile:
        return cls.from_json(json.loads(path.read_text()))


class DeviceProfiles:
    """Histograms devices reported in one evaluation round, merged with equal weight
    per device: a device can skew its own 1/n share of the reference, no more."""

    def __init__(self, edges: Mapping[str, np.ndarray], classes: int) -> None:
        self.edges = dict(edges)
        self.classes = classes
        self.devices = 0
        self.examples = 0
        self._sum = {n: np.zeros(b) for n, b in self.bins().items()}

    def bins(self) -> dict[str, int]:
        return _all_bins(self.edges, self.classes)

    def add(self, counts: Mapping[str, np.ndarray], examples: int) -> str | None:
        """One device's histograms (hostile input); None, or why they were refused.

        Every descriptor must be counts over its bins summing to the device's example
        count: anything else is not what a fedpipe device computes."""
        bins = self.bins()
        if set(counts) != set(bins):
            return f"profile names {sorted(counts)[:8]}, not {sorted(bins)}"
        for name, c in counts.items():
            if c.shape != (bins[name],) or c.dtype.kind not in "iu":
                return f"profile {name} is {c.dtype}{list(c.shape)}, not {bins[name]} counts"
            # Each count within [0, examples] first: int64 sums of huge counts wrap
            # around, and could otherwise be made to "sum" to anything.
            if c.min() < 0 or c.max() > examples or int(c.sum()) != examples:
                return f"profile {name} counts do not sum to the {examples} examples"
        for name, c in counts.items():
            self._sum[name] += c / examples
        self.devices += 1
        self.examples += examples
        return None

    def fractions(self) -> dict[str, np.ndarray] | None:
        if not self.devices:
            return None
        return {n: s / self.devices for n, s in self._sum.items()}

    def to_json(self) -> dict[str, Any]:
        merged = self.fractions() or {}
        return {
            "devices": self.devices,
            "examples": self.examples,
            "fractions": {k: v.tolist() for k, v in merged.items()},
        }

    @classmethod
    def from_json(cls, profile: Profile, data: Mapping[str, Any]) -> DeviceProfiles:
        """Saved device histograms on `profile`'s bins (the run wrote both)."""
        out = cls(profile.edges, profile.classes)
        devices = int(data.get("devices", 0))
        if devices:
            for name, b in out.bins().items():
                f = np.asarray(data["fractions"][name], np.float64)
                if f.shape != (b,):
                    raise DriftError(f"device fractions of {name} do not fit the profile's bins")
                out._sum[name] = f * devices
            out.devices, out.examples = devices, int(data.get("examples", 0))
        return out


class DriftMonitor:
    """PSI of the last `window` examples against a profile, per descriptor.

    Bounded: it keeps the bin index of each descriptor for `window` examples and running
    counts, so memory does not grow with traffic. Thread-safe (a service observes from
    its inference thread and scores from a request handler). An alarm is logged once
    when the score first exceeds `threshold`, and its end once when it falls back."""

    def __init__(
        self,
        profile: Profile,
        window: int = 1000,
        threshold: float = 0.25,
        min_examples: int = 200,
    ) -> None:
        if window < 1 or not 1 <= min_examples <= window or not threshold > 0:
            raise DriftError("need window >= min_examples >= 1 and threshold > 0")
        self.profile = profile
        self.window, self.threshold, self.min_examples = window, threshold, min_examples
        self._bins = profile.bins()
        # The window's bin indices, (window, descriptors), as a ring: _next is the slot
        # the next example takes, _filled how many slots hold one.
        self._ring = np.zeros((window, len(DESCRIPTORS)), np.int64)
        self._next, self._filled = 0, 0
        self._counts = {n: np.zeros(b, np.int64) for n, b in self._bins.items()}
        self._lock = threading.Lock()
        self.alarm = False
        self.seen = 0

    def observe(self, x: torch.Tensor, probs: torch.Tensor) -> None:
        """Count a batch's examples (inputs as the model saw them, its probabilities)."""
        values = describe(x, probs)
        edges, classes = self.profile.edges, self.profile.classes
        idx = np.stack([_bin_of(edges, classes, values, n) for n in DESCRIPTORS], axis=1)
        idx = idx[-self.window :]  # (k, descriptors)
        with self._lock:
            slots = (self._next + np.arange(len(idx))) % self.window
            # A slot still holds a counted example once the ring has filled, or when it
            # wraps around onto the examples at its start.
            old = self._ring[slots[slots < self._filled]]
            for j, n in enumerate(DESCRIPTORS):
                np.subtract.at(self._counts[n], old[:, j], 1)
                np.add.at(self._counts[n], idx[:, j], 1)
            self._ring[slots] = idx
            self._next = int((self._next + len(idx)) % self.window)
            self._filled = min(self.window, self._filled + len(idx))
            self.seen += len(x)
        self._check()

    def scores(self) -> dict[str, float]:
        """PSI per descriptor over the window (0 until min_examples have been seen)."""
        with self._lock:
            if self._filled < self.min_examples:
                return dict.fromkeys(DESCRIPTORS, 0.0)
            counts = {n: c.copy() for n, c in self._counts.items()}
        return {n: psi(self.profile.fractions[n], counts[n]) for n in DESCRIPTORS}

    def score(self) -> float:
        """The largest descriptor's PSI: one number to alert on."""
        return max(self.scores().values())

    def _check(self) -> None:
        scores = self.scores()
        worst = max(scores, key=lambda n: scores[n])
        high = scores[worst] > self.threshold and math.isfinite(scores[worst])
        if high and not self.alarm:
            log.warning(
                "input drift: PSI %.3f on %s > %.3f over the last %d examples",
                scores[worst],
                worst,
                self.threshold,
                min(self.seen, self.window),
            )
        elif self.alarm and not high:
            log.warning("input drift over: PSI %.3f <= %.3f", scores[worst], self.threshold)
        self.alarm = high
