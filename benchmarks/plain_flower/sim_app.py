"""The scale benchmark's baseline: the same federated job as a plain Flower 1.42 simulation.

Message API throughout: a `ServerApp` running stock `flwr.serverapp.strategy.FedAvg`
(float32 weights both ways, `strategy.start`), a `ClientApp` with `@app.train()`, both
run by `flwr.simulation.run_simulation` on Ray with one CPU per client. The local work is
fedpipe's (the client's IID MNIST shard, the MLP, the training loop, the centralized test
evaluation), so a comparison with fedpipe measures only what happens around training.

    run_plain_flower(num_clients=100, fraction=1.0, rounds=3, hidden=500, epochs=1)

returns one row per round: wall seconds (from one centralized evaluation to the next,
so it includes the evaluation, as fedpipe's `seconds` does), nodes connected when the
round sampled, clients sampled, replies, the clients' summed and slowest training
seconds, and the test accuracy after the round.

Sampling: FedAvg samples max(int(connected * fraction_train), min_train_nodes) nodes,
counting the connected ones when the round is configured, and only then waits for
min_available_nodes. `run_simulation` starts the ServerApp thread before it registers
the SuperNodes: the ServerApp starts with 0 connected, and registering 10,000 takes about
0.35 s on the 2-core machine, as long as the round-0 central evaluation here (at 30,000
nodes, 21,709 were connected after it). With Flower's defaults an early round can thus
sample far fewer than intended (2, with nothing before the first round).
`min_train_nodes` = the intended per-round count and `min_available_nodes` = all nodes
pin the sample; `min_train_nodes=2` gives the stock behaviour. The rows say what was
connected and sampled either way.
"""

from __future__ import annotations

import os
import time
from collections.abc import Iterable
from typing import Any

import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp
from flwr.serverapp import Grid, ServerApp
from flwr.serverapp.strategy import FedAvg
from flwr.simulation import run_simulation

from benchmarks._measure import peak_rss_mb, reset_peak_rss
from fedpipe.config import DataConfig, ModelConfig, PartitionConfig, TrainConfig
from fedpipe.data import DatasetNotFoundError, client_shard, load_dataset, search_roots
from fedpipe.models import build_model
from fedpipe.seed import round_generator
from fedpipe.simulation import quiet_flower
from fedpipe.training import evaluate, train

__all__ = ["BACKEND_CONFIG", "OFFLINE_ENV", "client_app", "mnist_root", "run_plain_flower"]

OFFLINE_ENV = {
    "FLWR_TELEMETRY_ENABLED": "0",
    "FLWR_DISABLE_UPDATE_CHECK": "1",
    "RAY_USAGE_STATS_ENABLED": "0",
    "RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO": "0",  # silences a FutureWarning; no GPUs used
}
# Flower's simulation engine as both baselines run it: one CPU per client, every core.
BACKEND_CONFIG: dict[str, Any] = {
    "client_resources": {"num_cpus": 1, "num_gpus": 0.0},
    "init_args": {"include_dashboard": False, "num_cpus": os.cpu_count() or 1},
}
BATCH_SIZE = 16
LR = 0.05
# Generous: a 1,000-client round on two 1-CPU workers took under a minute here.
ROUND_TIMEOUT = 3600.0

client_app = ClientApp()


def mnist_root() -> str:
    """The absolute data root holding MNIST/raw, searched as fedpipe searches."""
    for root in search_roots(DataConfig(dataset="mnist")):
        if next(iter(root.glob("MNIST/raw/train-images-idx3-ubyte*")), None) is not None:
            return str(root.resolve())
    # Let fedpipe raise its own error, which says where it looked.
    load_dataset(DataConfig(dataset="mnist"))
    raise DatasetNotFoundError("MNIST not found")  # pragma: no cover (load_dataset raised)


def _int(value: object) -> int:
    if isinstance(value, int):
        return value
    raise TypeError(f"expected an integer, got {value!r}")


def _float(value: object) -> float:
    if isinstance(value, int | float):
        return float(value)
    raise TypeError(f"expected a number, got {value!r}")


@client_app.train()
def _train(msg: Message, context: Context) -> Message:
    job = msg.content.config_records["config"]
    data = DataConfig(dataset="mnist", root=str(job["data-root"]))
    seed, server_round = _int(job["seed"]), _int(job["server-round"])
    pid = _int(context.node_config["partition-id"])
    shard = client_shard(data, PartitionConfig(num_clients=_int(job["num-clients"])), seed, pid)
    model = build_model(
        ModelConfig(name="mlp", hidden=_int(job["hidden"])),
        tuple(shard.x.shape[1:]),
        load_dataset(data).num_classes,
    )
    model.load_state_dict(msg.content.array_records["arrays"].to_torch_state_dict())
    cfg = TrainConfig(epochs=_int(job["epochs"]), batch_size=BATCH_SIZE, lr=LR)
    t0 = time.perf_counter()
    result = train(model, shard, cfg, round_generator(seed, pid, server_round), torch.device("cpu"))
    seconds = time.perf_counter() - t0
    metrics = MetricRecord({"num-examples": result.num_examples, "train-seconds": seconds})
    content = RecordDict({"arrays": ArrayRecord(model.state_dict()), "metrics": metrics})
    return Message(content, reply_to=msg)


class _Recorded(FedAvg):
    """Stock FedAvg that notes, per round, who was sampled and what the replies report."""

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.connected: list[int] = []
        self.sampled: list[int] = []
        self.replies: list[int] = []
        self.failed: list[int] = []
        self.train_seconds: list[float] = []
        self.slowest: list[float] = []

    def configure_train(  # type: ignore[no-untyped-def]
        self, server_round, arrays, config, grid
    ) -> Iterable[Message]:
        self.connected.append(len(list(grid.get_node_ids())))
        messages = list(super().configure_train(server_round, arrays, config, grid))
        self.sampled.append(len(messages))
        return messages

    def aggregate_train(self, server_round, replies):  # type: ignore[no-untyped-def]
        replies = list(replies)
        ok = [m for m in replies if not m.has_error()]
        times = [_float(m.content.metric_records["metrics"]["train-seconds"]) for m in ok]
        self.replies.append(len(ok))
        self.failed.append(len(replies) - len(ok))
        self.train_seconds.append(sum(times))
        self.slowest.append(max(times, default=0.0))
        return super().aggregate_train(server_round, replies)


def _stop_ray() -> None:
    import ray

    if ray.is_initialized():
        ray.shutdown()


def run_plain_flower(
    num_clients: int,
    fraction: float,
    rounds: int,
    hidden: int,
    epochs: int,
    seed: int = 0,
    min_train_nodes: int | None = None,
) -> dict[str, Any]:
    """Run the job on Flower's simulation engine; per-round rows (see the module doc).

    `min_train_nodes` defaults to the intended per-round count, int(num_clients *
    fraction); pass 2 for Flower's default.
    """
    os.environ.update(OFFLINE_ENV)
    quiet_flower()
    root = mnist_root()
    test = load_dataset(DataConfig(dataset="mnist", root=root))
    per_round = max(1, int(num_clients * fraction))
    strategy = _Recorded(
        fraction_train=fraction,
        fraction_evaluate=0.0,
        min_train_nodes=per_round if min_train_nodes is None else min_train_nodes,
        min_available_nodes=num_clients,
    )
    marks: list[float] = []
    accuracy: list[float] = []
    server_app = ServerApp()

    @server_app.main()
    def _main(grid: Grid, context: Context) -> None:
        torch.manual_seed(seed)
        model = build_model(ModelConfig(name="mlp", hidden=hidden), test.input_shape, 10)

        def central(server_round: int, arrays: ArrayRecord) -> MetricRecord:
            model.load_state_dict(arrays.to_torch_state_dict())
            loss, acc = evaluate(model, test.test)
            marks.append(time.perf_counter())
            accuracy.append(acc)
            return MetricRecord({"accuracy": acc, "loss": loss})

        job = ConfigRecord(
            {
                "data-root": root,
                "num-clients": num_clients,
                "hidden": hidden,
                "epochs": epochs,
                "seed": seed,
            }
        )
        strategy.start(
            grid,
            ArrayRecord(model.state_dict()),
            num_rounds=rounds,
            timeout=ROUND_TIMEOUT,
            train_config=job,
            evaluate_fn=central,
        )

    setup_peak = peak_rss_mb()
    reset = reset_peak_rss()
    rss_at_start = peak_rss_mb()
    t0 = time.perf_counter()
    try:
        run_simulation(
            server_app=server_app,
            client_app=client_app,
            num_supernodes=num_clients,
            backend_config=BACKEND_CONFIG,
        )
    finally:
        _stop_ray()
    wall = time.perf_counter() - t0
    if len(marks) != rounds + 1:
        raise RuntimeError(f"the ServerApp finished {max(len(marks) - 1, 0)} of {rounds} rounds")
    shape = ModelConfig(name="mlp", hidden=hidden)
    params = sum(p.numel() for p in build_model(shape, test.input_shape, 10).parameters())
    return {
        "system": "flower",
        "num_clients": num_clients,
        "fraction": fraction,
        "per_round_target": per_round,
        "hidden": hidden,
        "params": params,
        "epochs": epochs,
        "seed": seed,
        "workers": os.cpu_count() or 1,  # Ray runs one 1-CPU ClientAppActor per core
        "setup_peak_rss_mb": setup_peak,
        "rss_mb_before_simulation": rss_at_start if reset else None,
        "simulation_peak_rss_mb": peak_rss_mb() if reset else None,
        "wall_seconds": wall,
        "rounds": [
            {
                "round": i + 1,
                "seconds": marks[i + 1] - marks[i],
                "connected": strategy.connected[i],
                "sampled": strategy.sampled[i],
                "replies": strategy.replies[i],
                "failed": strategy.failed[i],
                "train_seconds": strategy.train_seconds[i],
                "slowest_train_seconds": strategy.slowest[i],
                "accuracy": accuracy[i + 1],
            }
            for i in range(rounds)
        ],
    }
