"""One federated-evaluation stage's checked replies: what Flower averages, the spread of
accuracy across devices, and the devices' histograms for the drift profile.

Every reply here has passed the decode boundary (bounded, finite numbers, an accuracy
that is a fraction); this is where replies that are well-formed but do not fit the
stage are dropped, each counted with its reason.
"""

from __future__ import annotations

import json
import logging
from collections import Counter
from dataclasses import dataclass
from typing import Any

import numpy as np
from flwr.app import ConfigRecordValues, Message, MetricRecord, RecordDict

from fedpipe.drift import DeviceProfiles, Profile
from fedpipe.records import (
    EVAL_ACCURACY,
    EVAL_LOSS,
    METRICS,
    NUM_EXAMPLES,
    PROFILE,
    PROFILE_EDGES,
)
from fedpipe.validation import DeviceSpread, spread

__all__ = ["EvaluationIntake", "EvaluationResult", "profile_config"]

log = logging.getLogger(__name__)


def profile_config(profile: Profile) -> dict[str, ConfigRecordValues]:
    """The evaluate config entry that asks devices for histograms in `profile`'s bins."""
    edges = {k: v.tolist() for k, v in profile.edges.items()}
    return {PROFILE_EDGES: json.dumps({"classes": profile.classes, "edges": edges})}


@dataclass(frozen=True)
class EvaluationResult:
    devices: DeviceSpread | None  # accuracy across the devices that reported one
    loss: float | None  # eval loss weighted by examples
    rejected: int  # replies dropped at the boundary or here

    def fields(self) -> dict[str, Any]:
        """The RoundRecord's federated-evaluation fields."""
        out: dict[str, Any] = {"fed_rejected": self.rejected}
        d = self.devices
        if d is not None:
            out.update(
                fed_devices=d.devices,
                fed_accuracy=d.mean,
                fed_accuracy_min=d.minimum,
                fed_accuracy_p10=d.p10,
                fed_accuracy_max=d.maximum,
                fed_accuracy_std=d.std,
                fed_loss=self.loss,
            )
        return out


class EvaluationIntake:
    """Collects one evaluation stage's replies (boundary-checked RecordDicts)."""

    def __init__(self, profile: Profile | None) -> None:
        self._checked: list[tuple[int, MetricRecord]] = []
        self._kept: list[MetricRecord] = []  # what kept() passed on
        self.rejected = 0
        self.profiles = DeviceProfiles(profile.edges, profile.classes) if profile else None

    def reject(self, node: int, reason: str) -> None:
        self.rejected += 1
        log.warning("evaluation reply from node %d dropped: %s", node, reason)

    def add(self, node: int, content: RecordDict) -> None:
        metrics = content.metric_records[METRICS]
        if PROFILE in content and self.profiles is not None:
            counts = {k: a.numpy() for k, a in content.array_records[PROFILE].items()}
            reason = self.profiles.add(counts, int(metrics[NUM_EXAMPLES]))  # type: ignore[arg-type]
            if reason is not None:
                self.reject(node, reason)
                return
        self._checked.append((node, metrics))

    def kept(self) -> list[Message]:
        """One set of metric names for all (Flower ends the round on replies that
        differ): the names a strict majority of the replies report. Other names are
        dropped; a reply without all of them is dropped, so one odd reply can neither end
        the round nor decide what the others report."""
        counts = Counter(name for _, metrics in self._checked for name in metrics)
        names = sorted(k for k, c in counts.items() if 2 * c > len(self._checked))
        kept: list[Message] = []
        for node, metrics in self._checked:
            missing = sorted(set(names) - set(metrics))
            if missing:
                self.reject(node, f"lacks {missing}")
                continue
            self._kept.append(metrics)
            content = RecordDict({METRICS: MetricRecord({k: metrics[k] for k in names})})
            kept.append(Message(content, dst_node_id=node, message_type="evaluate"))
        return kept

    def result(self) -> EvaluationResult:
        """Over the replies kept(), by fedpipe's own metric names where they carry them
        (any Flower app's evaluation still aggregates through the inner strategy)."""
        rows = [
            (float(m[EVAL_ACCURACY]), int(m[NUM_EXAMPLES]), m.get(EVAL_LOSS))  # type: ignore[arg-type]
            for m in self._kept
            if EVAL_ACCURACY in m
        ]
        devices = spread([a for a, _, _ in rows], [n for _, n, _ in rows])
        with_loss = [(float(loss), n) for _, n, loss in rows if isinstance(loss, int | float)]
        loss = (
            float(np.average([v for v, _ in with_loss], weights=[n for _, n in with_loss]))
            if with_loss
            else None
        )
        return EvaluationResult(devices, loss, self.rejected)
