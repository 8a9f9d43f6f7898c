"""What a run's partition looks like: one log line and a compact partition.json.

A line per client in the log and an indented object per client in partition.json read
fine with 10 clients; with 10,000 they buried the log and made a 1.9 MB file. So INFO
gets one summary line (per-client lines only at DEBUG) and the file holds two flat
arrays, `sizes` and `labels`, written without indentation. `fedpipe report` plots it.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import numpy as np

from fedpipe.config import RunConfig
from fedpipe.data import label_histograms, load_dataset, partition_indices
from fedpipe.rundir import PARTITION_FILE, write_json

__all__ = ["partition_info", "summary_line", "write_partition_info"]

log = logging.getLogger(__name__)


def partition_info(cfg: RunConfig) -> dict[str, Any]:
    """The content of partition.json: client i holds `sizes[i]` examples, `labels[i][c]`
    of them of class c (so `labels` is num_clients x num_classes)."""
    data = load_dataset(cfg.data)
    parts = partition_indices(cfg.data, cfg.partition, cfg.seed)
    labels = label_histograms(data.train.y.numpy(), list(parts), data.num_classes)
    return {
        "dataset": data.name,
        "scheme": cfg.partition.scheme,
        "num_clients": len(parts),
        "num_classes": data.num_classes,
        "sizes": [len(p) for p in parts],
        "labels": labels,
    }


def summary_line(info: dict[str, Any]) -> str:
    """One line that says how even the split is: shard sizes and classes per client."""
    sizes = np.asarray(info["sizes"])
    held = (np.asarray(info["labels"]).reshape(len(sizes), -1) > 0).sum(axis=1)
    empty = int((sizes == 0).sum())
    return (
        f"partition: {info['num_clients']} clients, {info['scheme']} split of "
        f"{info['dataset']} ({int(sizes.sum())} training examples); shard size "
        f"{_spread(sizes)}{f', {empty} empty' if empty else ''}; "
        f"{info['num_classes']} classes, {_spread(held)} per client"
    )


def _spread(values: np.ndarray) -> str:
    return f"min {values.min()} / median {np.median(values):g} / max {values.max()}"


def write_partition_info(cfg: RunConfig, run_dir: Path) -> None:
    """Log the partition (one INFO line; each client at DEBUG) and save partition.json."""
    info = partition_info(cfg)
    log.info("%s", summary_line(info))
    if log.isEnabledFor(logging.DEBUG):  # skip building 10,000 lines nobody will see
        for cid, (size, hist) in enumerate(zip(info["sizes"], info["labels"], strict=True)):
            log.debug("client %d: %d examples, labels %s", cid, size, hist)
    write_json(run_dir / PARTITION_FILE, info, compact=True)
