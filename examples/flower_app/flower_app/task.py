"""flower_app: the model, the data and the training loop (plain PyTorch)."""

from __future__ import annotations

from functools import lru_cache

import numpy as np
import torch
from torch import nn


class Net(nn.Module):
    """A two-layer MLP for 8x8 digits (19,210 parameters)."""

    def __init__(self) -> None:
        super().__init__()
        self.fc1 = nn.Linear(64, 256)
        self.fc2 = nn.Linear(256, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(torch.relu(self.fc1(x)))


@lru_cache(maxsize=1)
def _digits() -> tuple[torch.Tensor, torch.Tensor]:
    from sklearn.datasets import load_digits

    bunch = load_digits()
    return torch.tensor(bunch.data / 16.0, dtype=torch.float32), torch.tensor(bunch.target)


def _order() -> np.ndarray:
    return np.random.default_rng(0).permutation(len(_digits()[1]))


def load_data(partition_id: int, num_partitions: int) -> tuple[torch.Tensor, torch.Tensor]:
    """This client's IID share of the training 80 %."""
    x, y = _digits()
    train = _order()[: int(0.8 * len(y))]
    part = np.array_split(train, num_partitions)[partition_id]
    return x[part], y[part]


def load_test() -> tuple[torch.Tensor, torch.Tensor]:
    x, y = _digits()
    held = _order()[int(0.8 * len(y)) :]
    return x[held], y[held]


def train(net: nn.Module, x: torch.Tensor, y: torch.Tensor, epochs: int, seed: int) -> float:
    torch.manual_seed(seed)
    opt = torch.optim.SGD(net.parameters(), lr=0.1)
    total, steps = 0.0, 0
    for _ in range(epochs):
        for batch in torch.randperm(len(y)).split(16):
            opt.zero_grad()
            loss = nn.functional.cross_entropy(net(x[batch]), y[batch])
            loss.backward()
            opt.step()
            total, steps = total + loss.item(), steps + 1
    return total / steps


@torch.no_grad()
def test(net: nn.Module, x: torch.Tensor, y: torch.Tensor) -> tuple[float, float]:
    out = net(x)
    return nn.functional.cross_entropy(out, y).item(), (out.argmax(1) == y).float().mean().item()
