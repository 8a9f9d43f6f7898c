"""A user's own task: its own model, its own Dataset, its own training loop.

Three Gaussian blobs in six features; each client draws its own examples from a seed
of its id (its private data); the server holds a separate test set.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset

from fedpipe.task import TaskContext
from fedpipe.training import TrainResult

CENTRES = torch.tensor([[3.0, 0, 0, 0, 0, 0], [0, 3.0, 0, 0, 0, 0], [0, 0, 3.0, 0, 0, 0]])


class Blobs(Dataset[tuple[torch.Tensor, int]]):
    def __init__(self, n: int, seed: int) -> None:
        g = torch.Generator().manual_seed(seed)
        self.y = torch.randint(0, 3, (n,), generator=g)
        self.x = CENTRES[self.y] + torch.randn(n, 6, generator=g)

    def __len__(self) -> int:
        return len(self.y)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        return self.x[i], int(self.y[i])


def model(ctx: TaskContext) -> nn.Module:
    return nn.Sequential(nn.Linear(6, 16), nn.ReLU(), nn.Linear(16, 3))


def train_data(ctx: TaskContext) -> Dataset[tuple[torch.Tensor, int]]:
    assert ctx.client_id is not None
    return Blobs(120, seed=ctx.client_id)


def test_data(ctx: TaskContext) -> Dataset[tuple[torch.Tensor, int]]:
    return Blobs(300, seed=10_000)


def train(model: nn.Module, data: Blobs, ctx: TaskContext) -> TrainResult:
    opt = torch.optim.Adam(model.parameters(), lr=0.02)
    loader = DataLoader(data, batch_size=20, shuffle=True, generator=ctx.generator)
    total, steps = 0.0, 0
    for x, y in loader:
        opt.zero_grad()
        loss = nn.functional.cross_entropy(model(x), y)
        loss.backward()
        opt.step()
        total, steps = total + loss.item(), steps + 1
    return TrainResult(loss=total / steps, num_examples=len(data), steps=steps)


def evaluate(model: nn.Module, data: Blobs, ctx: TaskContext) -> tuple[float, float]:
    with torch.no_grad():
        out = model(data.x)
        return nn.functional.cross_entropy(out, data.y).item(), (
            out.argmax(1) == data.y
        ).float().mean().item()
