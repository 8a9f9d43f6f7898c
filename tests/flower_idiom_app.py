"""A ClientApp written the way Flower's quickstart writes one, and nothing else.

Its train handler replies with the trained weights ("arrays") and its metrics
("metrics": "train_loss", "num-examples"); its evaluate handler with "eval_loss",
"eval_acc" and "num-examples". It knows nothing of fedpipe: tests add `fedpipe_mod`.
The data: scikit-learn's digits, split IID by `partition-id` across `num-partitions`.
"""

from __future__ import annotations

from functools import lru_cache

import numpy as np
import torch
from flwr.app import ArrayRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp
from flwr.clientapp.typing import Mod
from torch import nn


class Net(nn.Module):
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
    x = torch.tensor(bunch.data / 16.0, dtype=torch.float32)
    return x, torch.tensor(bunch.target, dtype=torch.long)


def load_data(partition_id: int, num_partitions: int) -> tuple[torch.Tensor, torch.Tensor]:
    x, y = _digits()
    idx = np.random.default_rng(0).permutation(len(y))[: int(0.8 * len(y))]
    part = np.array_split(idx, num_partitions)[partition_id]
    return x[part], y[part]


def held_out() -> tuple[torch.Tensor, torch.Tensor]:
    x, y = _digits()
    idx = np.random.default_rng(0).permutation(len(y))[int(0.8 * len(y)) :]
    return x[idx], y[idx]


def evaluate_model(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> tuple[float, float]:
    with torch.no_grad():
        out = model(x)
        loss = nn.functional.cross_entropy(out, y).item()
        return loss, (out.argmax(1) == y).float().mean().item()


def make_app(mods: list[Mod] | None = None) -> ClientApp:
    app = ClientApp(mods=mods or [])

    def shard(context: Context) -> tuple[torch.Tensor, torch.Tensor]:
        return load_data(
            int(context.node_config["partition-id"]), int(context.node_config["num-partitions"])
        )

    @app.train()
    def train(msg: Message, context: Context) -> Message:
        model = Net()
        model.load_state_dict(msg.content["arrays"].to_torch_state_dict())  # type: ignore[union-attr]
        x, y = shard(context)
        opt = torch.optim.SGD(model.parameters(), lr=0.1)
        torch.manual_seed(int(context.node_config["partition-id"]))
        total = 0.0
        for _ in range(2):
            for batch in torch.randperm(len(y)).split(16):
                opt.zero_grad()
                loss = nn.functional.cross_entropy(model(x[batch]), y[batch])
                loss.backward()
                opt.step()
                total += loss.item()
        metrics = MetricRecord({"train_loss": total / max(1, len(y) // 16), "num-examples": len(y)})
        content = RecordDict({"arrays": ArrayRecord(model.state_dict()), "metrics": metrics})
        return Message(content=content, reply_to=msg)

    @app.evaluate()
    def evaluate(msg: Message, context: Context) -> Message:
        model = Net()
        model.load_state_dict(msg.content["arrays"].to_torch_state_dict())  # type: ignore[union-attr]
        loss, acc = evaluate_model(model, *shard(context))
        metrics = MetricRecord({"eval_loss": loss, "eval_acc": acc, "num-examples": 100})
        return Message(content=RecordDict({"metrics": metrics}), reply_to=msg)

    return app
