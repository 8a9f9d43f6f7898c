"""The same federated job as fedpipe's, written as a plain Flower 1.42 app (the baseline).

Stock FedAvg, float32 weights both ways, Flower's own polling; the local work (data
shard, model, training loop, central evaluation) is fedpipe's, so that the benchmark
compares only what happens around the training.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import torch
from flwr.app import ArrayRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp
from flwr.serverapp import Grid, ServerApp
from flwr.serverapp.strategy import FedAvg

from fedpipe.config import DataConfig, ModelConfig, TrainConfig
from fedpipe.data import load_dataset
from fedpipe.models import build_model
from fedpipe.training import evaluate, train

MODEL = ModelConfig(name="mlp", hidden=64)
TRAIN = TrainConfig(epochs=1, batch_size=16, lr=0.05)

server_app = ServerApp()
client_app = ClientApp()


@client_app.train()
def _train(msg: Message, context: Context) -> Message:
    ds = load_dataset(DataConfig(dataset="file", path=str(context.node_config["data-path"])))
    model = build_model(MODEL, ds.input_shape, ds.num_classes)
    model.load_state_dict(msg.content.array_records["arrays"].to_torch_state_dict())
    t0 = time.perf_counter()
    result = train(model, ds.train, TRAIN, torch.Generator().manual_seed(0), torch.device("cpu"))
    metrics = {"num-examples": result.num_examples, "train-seconds": time.perf_counter() - t0}
    content = RecordDict(
        {"arrays": ArrayRecord(model.state_dict()), "metrics": MetricRecord(metrics)}
    )
    return Message(content, reply_to=msg)


class _Timed(FedAvg):
    """FedAvg that remembers the slowest client's training time of each round."""

    slowest: list[float]

    def aggregate_train(self, server_round, replies):  # type: ignore[no-untyped-def]
        replies = list(replies)
        times = [
            float(m.content.metric_records["metrics"]["train-seconds"])  # type: ignore[arg-type]
            for m in replies
            if not m.has_error()
        ]
        self.slowest.append(max(times, default=0.0))
        return super().aggregate_train(server_round, replies)


@server_app.main()
def _main(grid: Grid, context: Context) -> None:
    cfg = context.run_config
    test = load_dataset(DataConfig(dataset="digits"))
    torch.manual_seed(0)
    model = build_model(MODEL, test.input_shape, test.num_classes)
    strategy = _Timed(
        fraction_evaluate=0.0,
        min_train_nodes=int(cfg["min-nodes"]),  # type: ignore[arg-type]
        min_available_nodes=int(cfg["min-nodes"]),  # type: ignore[arg-type]
    )
    strategy.slowest = []
    marks: list[float] = []
    accuracy: list[float] = []

    def central(server_round: int, arrays: ArrayRecord) -> MetricRecord:
        model.load_state_dict(arrays.to_torch_state_dict())
        loss, acc = evaluate(model, test.test)
        marks.append(time.perf_counter())
        accuracy.append(acc)
        return MetricRecord({"accuracy": acc, "loss": loss})

    strategy.start(
        grid,
        ArrayRecord(model.state_dict()),
        num_rounds=int(cfg["rounds"]),  # type: ignore[arg-type]
        timeout=120.0,
        evaluate_fn=central,
    )
    rounds = [
        {
            "round": i + 1,
            "seconds": marks[i + 1] - marks[i],
            "slowest_train_seconds": s,
            "accuracy": accuracy[i + 1],
        }
        for i, s in enumerate(strategy.slowest)
    ]
    Path(str(cfg["out"])).write_text(json.dumps(rounds, indent=2))
