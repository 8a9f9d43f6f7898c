"""Tasks that go wrong the ways a user's task can, each named in the error it causes."""

from __future__ import annotations

import torch
from torch import nn

from fedpipe.task import TaskContext
from user_task.task import Blobs, test_data, train

__all__ = ["test_data", "train"]


def model(ctx: TaskContext) -> nn.Module:
    # The server's model has 3 outputs; a device's has 4 (an out-of-date package).
    return nn.Linear(6, 3 if ctx.client_id is None or ctx.client_id % 2 == 0 else 4)


def train_data(ctx: TaskContext) -> Blobs:
    if ctx.client_id == 2:
        raise FileNotFoundError("no shard on this device")
    return Blobs(60, seed=ctx.client_id or 0)


def evaluate(model: nn.Module, data: Blobs, ctx: TaskContext) -> tuple[float, float]:
    with torch.no_grad():
        return nn.functional.cross_entropy(model(data.x), data.y).item(), 0.5
