"""The model a service answers with: one artifact of `fedpipe export`, and what it knows.

The service reads only `RUN_DIR/export/` (and the run's lineage.json, if any), never the
training checkpoint, so it serves exactly the bytes that were checked and timed.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fedpipe.drift import PROFILE_FILE, DriftError, Profile
from fedpipe.export import EXPORT_DIR, load_artifact
from fedpipe.lineage import LINEAGE_FILE
from fedpipe.serve.batcher import Model

__all__ = ["ALIASES", "ServeError", "ServedModel", "load_served_model"]

EXPORT_FILE = "export.json"
# Short names for the two artifacts every export has.
ALIASES = {"fp32": "torchscript-fp32", "int8": "torchscript-int8"}


class ServeError(RuntimeError):
    """The run cannot be served; the message says what is missing and how to get it."""


@dataclass(frozen=True)
class ServedModel:
    name: str  # the artifact's name in export.json
    path: Path
    model: Model
    input_shape: tuple[int, ...]
    lineage: Any  # the run's lineage.json, or None
    profile: Profile | None  # the export's drift reference, if it has one


def load_served_model(run_dir: Path, artifact: str) -> ServedModel:
    """The named artifact of an exported run, loaded and ready to call."""
    info = _export_info(run_dir)
    rows = {row["artifact"]: row for row in info.get("artifacts", [])}
    name = ALIASES.get(artifact, artifact)
    if name not in rows:
        raise ServeError(
            f"{run_dir / EXPORT_DIR / EXPORT_FILE} has no artifact {artifact!r}; "
            f"available: {', '.join(rows) or 'none'}"
        )
    path = run_dir / EXPORT_DIR / rows[name]["path"]
    if not path.is_file():
        raise ServeError(f"{path} is missing; re-export with `fedpipe export --force {run_dir}`")
    shape = tuple(int(d) for d in info["input_shape"])
    model = load_artifact(path)
    return ServedModel(name, path, model, shape, _lineage(run_dir), _profile(run_dir))


def _export_info(run_dir: Path) -> dict[str, Any]:
    path = run_dir / EXPORT_DIR / EXPORT_FILE
    if not path.is_file():
        raise ServeError(f"{run_dir} is not exported ({path} is missing): run `fedpipe export`")
    try:
        info: dict[str, Any] = json.loads(path.read_text())
    except ValueError as exc:
        raise ServeError(f"{path} is not valid JSON: {exc}") from exc
    if "input_shape" not in info:
        raise ServeError(f"{path} has no input_shape: re-export with `fedpipe export --force`")
    return info


def _lineage(run_dir: Path) -> Any:
    path = run_dir / LINEAGE_FILE
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text())
    except ValueError as exc:
        raise ServeError(f"{path} is not valid JSON: {exc}") from exc


def _profile(run_dir: Path) -> Profile | None:
    path = run_dir / EXPORT_DIR / PROFILE_FILE
    if not path.is_file():
        return None
    try:
        return Profile.load(path)
    except (DriftError, ValueError) as exc:
        raise ServeError(f"{path} is not a drift profile: {exc}") from exc
