"""What a round's evaluation says beyond one accuracy: per-class quality and the spread
of accuracy across devices.

On non-IID data the global model can be good on average and bad for the classes, or
the devices, that are rare: per-class precision, recall and F1 (from the coordinator's
confusion matrix) and the worst device's accuracy on its own held-out split show it.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np

__all__ = [
    "ClassMetrics",
    "DeviceSpread",
    "MAX_CONFUSION_CLASSES",
    "class_metrics",
    "class_record",
    "round_fields",
    "spread",
]

# metrics.jsonl keeps a confusion matrix per round up to this many classes (100 x 100
# counts a round); per-class metrics are kept for any number.
MAX_CONFUSION_CLASSES = 100


@dataclass(frozen=True)
class ClassMetrics:
    precision: list[float]
    recall: list[float]
    f1: list[float]
    macro_f1: float


def _ratio(num: np.ndarray, den: np.ndarray) -> np.ndarray:
    """num / den, 0 where den is 0 (a class never predicted, or absent from the data:
    scikit-learn's zero_division=0)."""
    out = np.zeros_like(num, dtype=np.float64)
    np.divide(num, den, out=out, where=den > 0)
    return out


def class_metrics(confusion: np.ndarray) -> ClassMetrics:
    """Per-class precision, recall and F1 of a (true, predicted) confusion matrix."""
    hits = np.diag(confusion).astype(np.float64)
    precision = _ratio(hits, confusion.sum(0).astype(np.float64))
    recall = _ratio(hits, confusion.sum(1).astype(np.float64))
    f1 = _ratio(2 * precision * recall, precision + recall)
    return ClassMetrics(precision.tolist(), recall.tolist(), f1.tolist(), float(f1.mean()))


@dataclass(frozen=True)
class DeviceSpread:
    """Accuracy of the global model on devices' own held-out data, across devices."""

    devices: int
    mean: float  # weighted by each device's held-out examples
    minimum: float  # the worst device
    p10: float  # the 10th percentile over devices (unweighted)
    maximum: float
    std: float  # unweighted, across devices


def spread(accuracies: list[float], examples: list[int]) -> DeviceSpread | None:
    """The spread of per-device accuracies (None without any)."""
    if not accuracies:
        return None
    acc = np.asarray(accuracies, np.float64)
    w = np.asarray(examples, np.float64)
    return DeviceSpread(
        devices=len(acc),
        mean=float(np.average(acc, weights=w)) if w.sum() > 0 else float(acc.mean()),
        minimum=float(acc.min()),
        p10=float(np.percentile(acc, 10)),
        maximum=float(acc.max()),
        std=float(acc.std()),
    )


def class_record(confusion: np.ndarray) -> dict[str, list[float] | list[int]]:
    """Per-class metrics as MetricRecord entries (lists), confusion flattened."""
    m = class_metrics(confusion)
    out: dict[str, list[float] | list[int]] = {
        "class_precision": m.precision,
        "class_recall": m.recall,
        "class_f1": m.f1,
    }
    if len(confusion) <= MAX_CONFUSION_CLASSES:
        out["confusion"] = [int(v) for v in confusion.ravel()]
    return out


def round_fields(central: Mapping[str, Any]) -> dict[str, Any]:
    """The RoundRecord's per-class fields from centralized evaluation's metrics (as
    `class_record` wrote them; absent ones stay None)."""
    f1 = central.get("class_f1")
    if not isinstance(f1, list) or not f1:
        return {}
    flat = central.get("confusion")
    n = len(f1)
    confusion = (
        [list(map(int, flat[i * n : (i + 1) * n])) for i in range(n)]
        if isinstance(flat, list) and len(flat) == n * n
        else None
    )
    return {
        "class_precision": list(central["class_precision"]),
        "class_recall": list(central["class_recall"]),
        "class_f1": list(f1),
        "macro_f1": float(np.mean(f1)),
        "confusion": confusion,
    }
