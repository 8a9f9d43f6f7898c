"""The run directory: everything a run leaves behind, in one folder per run."""

from __future__ import annotations

import contextlib
import json
import shutil
import time
from pathlib import Path
from typing import Any

import torch
from torch import nn

from fedpipe.config import RunConfig, config_to_dict, config_to_toml

__all__ = [
    "CONFIG_FILE",
    "DEVICE_PROFILE_FILE",
    "METRICS_FILE",
    "MODEL_FILE",
    "PARTITION_FILE",
    "SUMMARY_FILE",
    "create_run_dir",
    "discard_run_dir",
    "save_model",
    "write_json",
]

CONFIG_FILE = "config.toml"
METRICS_FILE = "metrics.jsonl"
MODEL_FILE = "model.pt"
SUMMARY_FILE = "summary.json"
PARTITION_FILE = "partition.json"
# The devices' histograms of their held-out data in the last federated evaluation
# (fedpipe.drift.DeviceProfiles): half of the exported model's drift reference.
DEVICE_PROFILE_FILE = "device_profile.json"


def create_run_dir(cfg: RunConfig) -> Path:
    """`<output_dir>/<name>-<timestamp>[-n]/` with the resolved config written into it."""
    base = Path(cfg.output_dir)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    for n in range(1000):
        path = base / (f"{cfg.name}-{stamp}" + (f"-{n}" if n else ""))
        try:
            path.mkdir(parents=True)
        except FileExistsError:
            continue
        (path / CONFIG_FILE).write_text(config_to_toml(cfg))
        return path
    raise FileExistsError(f"could not create a fresh run directory under {base}")


def discard_run_dir(run_dir: Path, made_output_dir: bool) -> None:
    """Remove the folder of a run that never got going, and the output folder too when
    that run made it and it is now empty: a failed start leaves nothing behind."""
    shutil.rmtree(run_dir, ignore_errors=True)
    if made_output_dir:
        with contextlib.suppress(OSError):  # not empty: other runs live there
            run_dir.parent.rmdir()


def write_json(path: Path, data: Any, compact: bool = False) -> None:
    """Indented for small files a person opens; `compact` for ones that grow with the number
    of clients (indenting a 10,000-client list costs more bytes than its numbers)."""
    text = json.dumps(data, separators=(",", ":")) if compact else json.dumps(data, indent=2)
    path.write_text(text + "\n")


def save_model(path: Path, model: nn.Module, cfg: RunConfig, input_shape: tuple[int, ...]) -> None:
    """State dict plus what rebuilds the model: the config (its task builds it, as
    nanoGPT keeps its config inside) and one input's shape (for export)."""
    torch.save(
        {
            "state_dict": model.state_dict(),
            "config": config_to_dict(cfg),
            "input_shape": list(input_shape),
        },
        path,
    )
