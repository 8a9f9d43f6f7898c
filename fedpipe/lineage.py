"""Where a model came from: each run's `lineage.json`, and warm starts from a parent run.

A run started with `model.init=RUN_DIR` (`fedpipe-server --init-from RUN_DIR`) begins
from that run's global model instead of a fresh one. Every run records the hash of the
model it started from, the hash of the model it ended with, its config and data
partition (hashes of `config.toml` and `partition.json`, and the settings that decide
who holds which examples), and, when it has a parent, the parent's whole lineage: a
served model's `lineage.json` walks back through every run that shaped it.
"""

from __future__ import annotations

import hashlib
import json
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from fedpipe.config import RunConfig, config_to_dict
from fedpipe.rundir import CONFIG_FILE, MODEL_FILE, PARTITION_FILE, write_json

__all__ = [
    "LINEAGE_FILE",
    "LineageError",
    "Parent",
    "finish_lineage",
    "load_parent",
    "model_sha256",
    "start_lineage",
]

LINEAGE_FILE = "lineage.json"


class LineageError(RuntimeError):
    """A parent run cannot be used to start from; the message says why."""


def model_sha256(state: Mapping[str, torch.Tensor]) -> str:
    """SHA-256 of a state dict: names, dtypes, shapes and bytes, in name order (the same
    weights give the same hash wherever they were saved)."""
    h = hashlib.sha256()
    for name in sorted(state):
        t = state[name].detach().cpu().contiguous()
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def _file_sha256(path: Path) -> str | None:
    return hashlib.sha256(path.read_bytes()).hexdigest() if path.is_file() else None


@dataclass(frozen=True)
class Parent:
    run_dir: Path
    state_dict: dict[str, torch.Tensor]
    lineage: dict[str, Any] | None  # the parent's own lineage.json (None: older runs)


def load_parent(path: str | Path) -> Parent:
    """The final global model of the run at `path`, and its lineage."""
    run_dir = Path(path).resolve()
    if not (run_dir / MODEL_FILE).is_file():
        raise LineageError(
            f"model.init={str(path)!r}: {run_dir} holds no {MODEL_FILE} (a finished run "
            "directory is needed)"
        )
    try:
        saved = torch.load(run_dir / MODEL_FILE, map_location="cpu", weights_only=True)
        state = dict(saved["state_dict"])
    except Exception as exc:  # noqa: BLE001 - any unreadable file: say which
        raise LineageError(f"model.init: cannot read {run_dir / MODEL_FILE}: {exc}") from exc
    lineage_path = run_dir / LINEAGE_FILE
    lineage = json.loads(lineage_path.read_text()) if lineage_path.is_file() else None
    return Parent(run_dir, state, lineage)


def start_lineage(
    run_dir: Path,
    cfg: RunConfig,
    initial: Mapping[str, torch.Tensor],
    parent: Parent | None,
    initial_accuracy: float | None,
) -> None:
    """Write the run's lineage.json as it starts (a killed run keeps it)."""
    settings = config_to_dict(cfg)
    record = {
        "run": run_dir.name,
        "run_dir": str(run_dir.resolve()),
        "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "config_sha256": _file_sha256(run_dir / CONFIG_FILE),
        "partition_sha256": _file_sha256(run_dir / PARTITION_FILE),
        # what decides which examples each client trains on
        "data": {k: settings[k] for k in ("task", "seed", "data", "partition")},
        "initial_model_sha256": model_sha256(initial),
        "initial_accuracy": initial_accuracy,
        "parent": None
        if parent is None
        else {
            "run_dir": str(parent.run_dir),
            "model_sha256": model_sha256(parent.state_dict),
            "lineage": parent.lineage,
        },
        "final_model_sha256": None,
    }
    write_json(run_dir / LINEAGE_FILE, record)


def finish_lineage(run_dir: Path, final: Mapping[str, torch.Tensor]) -> str:
    """Add the final model's hash (what export and serving report); returns it."""
    path = run_dir / LINEAGE_FILE
    record = json.loads(path.read_text()) if path.is_file() else {"run": run_dir.name}
    record["final_model_sha256"] = digest = model_sha256(final)
    write_json(path, record)
    return digest
