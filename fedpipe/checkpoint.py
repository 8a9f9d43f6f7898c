"""Per-round checkpoints of the coordinator, so a killed run resumes where it stopped.

A checkpoint holds the global model, the last completed round and the inner Flower
strategy's array state (e.g. FedAvgM's momentum). It is written to a temporary file and
renamed, so a crash mid-write leaves the previous checkpoint intact.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from flwr.app import Array, ArrayRecord
from flwr.serverapp.strategy import Strategy

__all__ = [
    "CHECKPOINT_FILE",
    "Checkpoint",
    "load_checkpoint",
    "restore_strategy",
    "save_checkpoint",
]

CHECKPOINT_FILE = "checkpoint.npz"


@dataclass
class Checkpoint:
    round: int
    arrays: dict[str, np.ndarray]
    strategy_state: dict[str, Any]  # attribute -> ArrayRecord | list[np.ndarray] | None


def _strategy_state(strategy: Strategy) -> dict[str, Any]:
    """The inner strategy's array-valued attributes (FedAvgM: current arrays, momentum)."""
    state: dict[str, Any] = {}
    for name, value in vars(strategy).items():
        if isinstance(value, ArrayRecord) or (
            isinstance(value, list) and value and all(isinstance(v, np.ndarray) for v in value)
        ):
            state[name] = value
    return state


def save_checkpoint(path: Path, server_round: int, arrays: ArrayRecord, strategy: Strategy) -> None:
    blobs: dict[str, np.ndarray] = {f"model/{k}": a.numpy() for k, a in arrays.items()}
    kinds: dict[str, str] = {}
    for name, value in _strategy_state(strategy).items():
        if isinstance(value, ArrayRecord):
            kinds[name] = "record:" + json.dumps(list(value))
            blobs.update({f"state/{name}/{i}": a.numpy() for i, a in enumerate(value.values())})
        else:
            kinds[name] = "list"
            blobs.update({f"state/{name}/{i}": a for i, a in enumerate(value)})
    meta = {"round": server_round, "model": list(arrays), "state": kinds}
    tmp = path.with_suffix(".tmp.npz")
    blobs["__meta__"] = np.frombuffer(json.dumps(meta).encode(), np.uint8)
    payload: dict[str, Any] = blobs  # savez's **kwds are arrays; mypy mixes in allow_pickle
    np.savez(tmp, **payload)
    os.replace(tmp, path)


def load_checkpoint(path: Path) -> Checkpoint:
    """Read a checkpoint; a missing or unreadable file says which and why."""
    if not path.is_file():
        raise FileNotFoundError(f"no checkpoint at {path}: the run did not complete a round")
    with np.load(path) as npz:
        meta = json.loads(npz["__meta__"].tobytes())
        arrays = {k: npz[f"model/{k}"] for k in meta["model"]}
        state: dict[str, Any] = {}
        for name, kind in meta["state"].items():
            items = sorted(
                (int(key.rsplit("/", 1)[1]), npz[key])
                for key in npz.files
                if key.startswith(f"state/{name}/")
            )
            values = [a for _, a in items]
            if kind.startswith("record:"):
                keys = json.loads(kind.removeprefix("record:"))
                state[name] = ArrayRecord({k: Array(v) for k, v in zip(keys, values, strict=True)})
            else:
                state[name] = values
    return Checkpoint(int(meta["round"]), arrays, state)


def restore_strategy(strategy: Strategy, state: dict[str, Any]) -> None:
    for name, value in state.items():
        setattr(strategy, name, value)
