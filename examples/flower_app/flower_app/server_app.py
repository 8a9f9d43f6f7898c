"""flower_app: a Flower / PyTorch app. The ServerApp, as Flower's quickstart writes it;
with `use-fedpipe` the strategy is wrapped by fedpipe's `compress` (the fedpipe lines)."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, MetricRecord
from flwr.serverapp import Grid, ServerApp
from flwr.serverapp.strategy import FedAvg, Strategy

from fedpipe.config import CodecConfig, DownlinkConfig
from fedpipe.flower import compress
from fedpipe.metrics import RoundRecord
from flower_app.task import Net, load_test
from flower_app.task import test as test_fn

app = ServerApp()


def central_evaluate(server_round: int, arrays: ArrayRecord) -> MetricRecord:
    model = Net()
    model.load_state_dict(arrays.to_torch_state_dict())
    loss, acc = test_fn(model, *load_test())
    return MetricRecord({"accuracy": acc, "loss": loss})


@app.main()
def main(grid: Grid, context: Context) -> None:
    cfg = context.run_config
    strategy: Strategy = FedAvg(fraction_train=float(cfg["fraction-train"]), fraction_evaluate=0.0)
    records: list[RoundRecord] = []
    if cfg["use-fedpipe"]:
        codec = CodecConfig(str(cfg["codec"]), error_feedback=bool(cfg["error-feedback"]))
        strategy = compress(
            strategy, codec, DownlinkConfig(str(cfg["downlink"])), on_round_end=records.append
        )
    torch.manual_seed(int(cfg["seed"]))  # the same initial model in every run
    result = strategy.start(
        grid=grid,
        initial_arrays=ArrayRecord(Net().state_dict()),
        train_config=ConfigRecord({"lr": 0.1}),
        num_rounds=int(cfg["num-server-rounds"]),
        evaluate_fn=central_evaluate,
    )
    accuracy = {rnd: float(m["accuracy"]) for rnd, m in result.evaluate_metrics_serverapp.items()}
    print(f"final accuracy {accuracy[max(accuracy)]:.4f}")
    if cfg["metrics-path"]:
        bits = {r.round: (r.bits_per_param_up, r.bits_per_param_down) for r in records}
        with Path(str(cfg["metrics-path"])).open("w") as f:
            for rnd in sorted(accuracy):
                up, down = bits.get(rnd, (None, None))
                f.write(
                    json.dumps(
                        {"round": rnd, "accuracy": accuracy[rnd], "bits_up": up, "bits_down": down}
                    )
                    + "\n"
                )
