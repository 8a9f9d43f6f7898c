"""A fedpipe task: your own model, your own data, your own training loop.

fedpipe imports this module by name (`task = "my_task.task"`) on every device and on
the coordinator, from their own environments (`pip install -e examples/my_task`), and
calls only these functions; fedpipe's compression, error feedback, sealing, secure
aggregation and compressed broadcast then apply unchanged.

The data: scikit-learn's handwritten digits (bundled, offline), each client holding the
examples whose index falls to it (a device would open its own files here instead:
`ctx.node_config` holds its settings, `ctx.client_id` its id). Training shifts each
image by a random pixel in each direction: an augmentation fedpipe's own loop does
not have.
"""

from __future__ import annotations

from functools import lru_cache

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset, TensorDataset

from fedpipe.task import TaskContext
from fedpipe.training import TrainResult


class SmallCNN(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(1, 16, 3, padding=1)
        self.fc = nn.Linear(16 * 4 * 4, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = nn.functional.max_pool2d(torch.relu(self.conv(x)), 2)
        return self.fc(x.flatten(1))


@lru_cache(maxsize=1)
def _digits() -> tuple[torch.Tensor, torch.Tensor]:
    from sklearn.datasets import load_digits

    bunch = load_digits()
    x = torch.tensor(bunch.images / 16.0, dtype=torch.float32).unsqueeze(1)
    return x, torch.tensor(bunch.target, dtype=torch.long)


def _split() -> tuple[np.ndarray, np.ndarray]:
    order = np.random.default_rng(7).permutation(len(_digits()[1]))
    cut = int(0.8 * len(order))
    return order[:cut], order[cut:]


def model(ctx: TaskContext) -> nn.Module:
    return SmallCNN()


def train_data(ctx: TaskContext) -> Dataset[tuple[torch.Tensor, torch.Tensor]]:
    assert ctx.client_id is not None
    x, y = _digits()
    mine = _split()[0][ctx.client_id :: ctx.config.partition.num_clients]
    return TensorDataset(x[mine], y[mine])


def test_data(ctx: TaskContext) -> Dataset[tuple[torch.Tensor, torch.Tensor]]:
    x, y = _digits()
    held = _split()[1]
    return TensorDataset(x[held], y[held])


def _shift(x: torch.Tensor, g: torch.Generator) -> torch.Tensor:
    dx, dy = (int(v) for v in torch.randint(-1, 2, (2,), generator=g))
    return torch.roll(x, shifts=(dy, dx), dims=(2, 3))


def train(
    model: nn.Module, data: Dataset[tuple[torch.Tensor, torch.Tensor]], ctx: TaskContext
) -> TrainResult:
    g = ctx.generator or torch.Generator().manual_seed(0)
    opt = torch.optim.Adam(model.parameters(), lr=0.01)
    model.train()
    total, steps, seen = 0.0, 0, 0
    for _ in range(ctx.config.train.epochs):
        for x, y in DataLoader(data, batch_size=32, shuffle=True, generator=g):
            opt.zero_grad()
            loss = nn.functional.cross_entropy(model(_shift(x, g)), y)
            loss.backward()
            opt.step()
            total, steps, seen = total + loss.item() * len(y), steps + 1, seen + len(y)
    return TrainResult(loss=total / seen, num_examples=len(data), steps=steps)  # type: ignore[arg-type]


@torch.no_grad()
def evaluate(
    model: nn.Module, data: Dataset[tuple[torch.Tensor, torch.Tensor]], ctx: TaskContext
) -> tuple[float, float]:
    model.eval()
    x, y = data.tensors  # type: ignore[attr-defined]
    out = model(x)
    return nn.functional.cross_entropy(out, y).item(), (out.argmax(1) == y).float().mean().item()
