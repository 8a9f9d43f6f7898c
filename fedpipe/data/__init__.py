"""Datasets, partitioners and a client's view of its shard."""

from __future__ import annotations

from functools import lru_cache

import numpy as np
import torch

from fedpipe.config import DataConfig, PartitionConfig
from fedpipe.data._datasets import (
    DatasetNotFoundError,
    Split,
    TensorDataset,
    load_dataset,
    search_roots,
)
from fedpipe.data._partition import dirichlet, iid, label_histograms, partition, shards
from fedpipe.data._shardfiles import shard_path, write_shards
from fedpipe.data._userdata import DataFormatError

__all__ = [
    "DataFormatError",
    "DatasetNotFoundError",
    "Split",
    "TensorDataset",
    "client_shard",
    "dirichlet",
    "iid",
    "label_histograms",
    "load_dataset",
    "partition",
    "partition_indices",
    "search_roots",
    "shard_path",
    "shards",
    "write_shards",
]


@lru_cache(maxsize=4)
def partition_indices(data: DataConfig, part: PartitionConfig, seed: int) -> tuple[np.ndarray, ...]:
    """Every client's training indices; cached because each simulated client asks for it."""
    labels = load_dataset(data).train.y.numpy()
    return tuple(partition(labels, part, seed))


def client_shard(data: DataConfig, part: PartitionConfig, seed: int, client_id: int) -> Split:
    """The training examples that client `client_id` holds."""
    if not 0 <= client_id < part.num_clients:
        raise ValueError(f"client id {client_id} outside 0..{part.num_clients - 1}")
    train = load_dataset(data).train
    idx = torch.from_numpy(partition_indices(data, part, seed)[client_id])
    return Split(train.x[idx], train.y[idx])
