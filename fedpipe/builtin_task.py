"""fedpipe's own models and datasets as a task (fedpipe.task): the default `task`.

- model: the `[model]` registry model for the data's shape and classes. A client reuses
  one module per shape for every client its process runs (each loads every weight from
  the broadcast; building and initializing a fresh module per client cost about 1 ms of
  a 5 ms MLP client); the server builds a fresh, seeded one.
- train_data: a deployed device's own shard file (`fedpipe-client --data`, node config
  `data-path`), else the client's partition of `[data]` (simulation), less what
- eval_data returns: the `partition.holdout` fraction of that shard the client keeps
  back for federated evaluation (the whole shard when holdout is 0).
- test_data: the dataset's test split, for the server's central evaluation.
- calibration_data: the dataset's training split (the coordinator of a simulation, or
  one that holds the public dataset), for the int8 export.
- train, evaluate: fedpipe's loops (fedpipe.training).
"""

from __future__ import annotations

from functools import lru_cache

import torch

from fedpipe.config import DataConfig, ModelConfig
from fedpipe.data import Split, TensorDataset, client_shard, load_dataset
from fedpipe.models import build_model
from fedpipe.task import TaskContext

__all__ = ["DATA_PATH", "calibration_data", "eval_data", "model", "test_data", "train_data"]

DATA_PATH = "data-path"  # node config: a deployed device's own shard file


def _device_data(ctx: TaskContext) -> TensorDataset | None:
    path = ctx.node_config.get(DATA_PATH)
    return load_dataset(DataConfig(dataset="file", path=str(path))) if path else None


def _dataset(ctx: TaskContext) -> TensorDataset:
    """The device's shard when it has one (it may not hold the dataset), else [data]."""
    return _device_data(ctx) or load_dataset(ctx.config.data)


@lru_cache(maxsize=2)
def _module(cfg: ModelConfig, input_shape: tuple[int, ...], num_classes: int) -> torch.nn.Module:
    return build_model(cfg, input_shape, num_classes)


def model(ctx: TaskContext) -> torch.nn.Module:
    ds = _dataset(ctx)
    shape = tuple(ds.input_shape)
    if ctx.client_id is None:
        return build_model(ctx.config.model, shape, ds.num_classes)
    return _module(ctx.config.model, shape, ds.num_classes)


def _shard(ctx: TaskContext) -> Split:
    own = _device_data(ctx)
    if own is not None:
        return own.train
    assert ctx.client_id is not None
    cfg = ctx.config
    return client_shard(cfg.data, cfg.partition, cfg.seed, ctx.client_id)


def _parts(ctx: TaskContext) -> tuple[Split, Split]:
    """The shard as (what the client trains on, what it keeps back): a fixed, seeded
    draw of `partition.holdout` of it per client, the same every round, so the held-out
    part is never trained on (with no holdout, both are the whole shard)."""
    shard = _shard(ctx)
    fraction = ctx.config.partition.holdout
    if not fraction or len(shard) < 2:
        return shard, shard
    keep = min(max(int(round(fraction * len(shard))), 1), len(shard) - 1)
    seed = ctx.config.seed * 1_000_003 + (ctx.client_id or 0)
    order = torch.randperm(len(shard), generator=torch.Generator().manual_seed(seed))
    held = torch.zeros(len(shard), dtype=torch.bool)
    held[order[:keep]] = True
    return Split(shard.x[~held], shard.y[~held]), Split(shard.x[held], shard.y[held])


def train_data(ctx: TaskContext) -> Split:
    return _parts(ctx)[0]


def eval_data(ctx: TaskContext) -> Split:
    return _parts(ctx)[1]


def test_data(ctx: TaskContext) -> Split | None:
    test = load_dataset(ctx.config.data).test
    return test if len(test) else None


def calibration_data(ctx: TaskContext) -> Split:
    return load_dataset(ctx.config.data).train
