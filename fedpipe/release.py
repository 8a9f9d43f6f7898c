"""The release gate: the bar a run's model must clear before `fedpipe export` writes it.

Two criteria (`[release]` in the run's config, or `release.*=...` on the command line):
- `min_accuracy`: the float32 model's accuracy on the coordinator's test set, measured
  by export itself (not copied from the run's logs);
- `max_worst_client_drop`: the centralized accuracy minus the worst device's accuracy
  on its own held-out split, in the last round with federated evaluation. On non-IID
  data a model can be good on average and useless on some devices; this bar says how
  much worse than average any device may be.
A criterion that is configured but cannot be checked (no federated evaluation in the
run) fails: a gate that passes for lack of evidence is no gate.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from fedpipe.config import ReleaseConfig
from fedpipe.metrics import read_metrics
from fedpipe.rundir import METRICS_FILE

__all__ = ["Criterion", "GateResult", "check_release"]


@dataclass(frozen=True)
class Criterion:
    name: str  # the config key
    bar: float
    value: float | None  # None: the run holds nothing to check it against
    passed: bool
    reason: str


@dataclass(frozen=True)
class GateResult:
    criteria: list[Criterion]

    @property
    def passed(self) -> bool:
        return all(c.passed for c in self.criteria)

    def failures(self) -> str:
        return "; ".join(c.reason for c in self.criteria if not c.passed)

    def to_json(self, forced: bool) -> dict[str, Any]:
        return {
            "passed": self.passed,
            "forced": forced,
            "criteria": [asdict(c) for c in self.criteria],
        }


def _last_federated(run_dir: Path) -> dict[str, Any] | None:
    path = run_dir / METRICS_FILE
    rounds = read_metrics(path) if path.is_file() else []
    with_devices = [r for r in rounds if r.get("fed_devices")]
    return with_devices[-1] if with_devices else None


def _worst_drop(run_dir: Path, bar: float) -> Criterion:
    name = "release.max_worst_client_drop"
    last = _last_federated(run_dir)
    if last is None or last.get("fed_accuracy_min") is None:
        return Criterion(
            name,
            bar,
            None,
            False,
            f"{name}={bar} cannot be checked: the run has no federated evaluation (set "
            "federation.fraction_evaluate > 0 and partition.holdout > 0)",
        )
    drop = float(last["accuracy"]) - float(last["fed_accuracy_min"])
    ok = drop <= bar
    return Criterion(
        name,
        bar,
        drop,
        ok,
        f"{name}: in round {last['round']} the worst of {last['fed_devices']} devices scored "
        f"{last['fed_accuracy_min']:.4f}, {drop:.4f} below the centralized "
        f"{last['accuracy']:.4f} ({'within' if ok else 'over'} the bar {bar})",
    )


def check_release(run_dir: Path, cfg: ReleaseConfig, accuracy: float) -> GateResult:
    """Each configured criterion (a bar left at its default is not checked)."""
    criteria: list[Criterion] = []
    if cfg.min_accuracy > 0:
        ok = accuracy >= cfg.min_accuracy
        criteria.append(
            Criterion(
                "release.min_accuracy",
                cfg.min_accuracy,
                accuracy,
                ok,
                f"release.min_accuracy: test accuracy {accuracy:.4f} is "
                f"{'at or above' if ok else 'below'} the bar {cfg.min_accuracy}",
            )
        )
    if cfg.max_worst_client_drop < 1:
        criteria.append(_worst_drop(run_dir, cfg.max_worst_client_drop))
    return GateResult(criteria)
