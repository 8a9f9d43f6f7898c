"""The secure-aggregation benchmark's baseline: Flower 1.42's own SecAgg+, as shipped.

Flower's SecAgg+ exists only in the legacy API, so this baseline is built the way
Flower's docs build it: a `ServerApp` whose main runs `DefaultWorkflow(fit_workflow=
SecAggPlusWorkflow(...))` on a `LegacyContext` holding a legacy
`flwr.server.strategy.FedAvg`, and a `ClientApp(client_fn, mods=[..., secaggplus_mod])`
whose `client_fn` returns a `NumPyClient` (`.to_client()`). Both run under
`flwr.simulation.run_simulation` on Ray, one CPU per client, every client every round.
The local work is fedpipe's (the client's shard, the model, the training loop, the
centralized test evaluation), so a comparison with fedpipe measures only the
aggregation.

    run_flower_secaggplus("digits", "mlp", PartitionConfig(num_clients=5), rounds=2,
                          epochs=1, num_shares=5, reconstruction_threshold=3,
                          clipping_range=8.0, quantization_range=2**22)

One round of SecAgg+ is four request/reply exchanges with every sampled client:
setup (the protocol's parameters down; two public keys up), share keys (the
neighbours' public keys down; Shamir shares of the mask seed and of a private key,
encrypted to each neighbour, up), collect masked vectors (the shares addressed to the
client plus the legacy FitIns, i.e. the float32 global model and the fit config, down;
the masked update up) and unmask (lists of live and dropped neighbours down; their
shares up). The server relays every share, so all of it crosses the server's links.

Bytes on the wire. An extra mod, outermost in `mods=[...]`, sizes every message the
ClientApp receives and every reply it returns, so each message is counted once per
direction and nothing the server side adds or drops in between is missed. Two sizes:

- `bytes`: what Flower 1.42 transmits. Its transport (gRPC, and the SuperLink's
  object store) moves a Message as a tree of content-addressed objects (the Message
  with its metadata, the RecordDict, each record, each Array and each of its array
  chunks, identical chunks once), each object as `obj.deflate()`; the size is the sum
  of the deflated objects of the message. This is also what `fedpipe.records.wire_bytes`
  counts, so the numbers compare with fedpipe's directly. gRPC's own framing (a few
  bytes per object) is not included.
- `proto_bytes`: `flwr.common.serde.message_to_proto(msg).ByteSize()`, the single
  protobuf Message that earlier Flower versions sent; within a fraction of a percent
  of `bytes` for large messages, larger in relative terms for tiny ones.

The mod reads the stage from the ConfigRecord "secaggplus_configs" ("stage" key), as
`secaggplus_mod` does, and must read it before calling on: `secaggplus_mod` pops the
key from the incoming message. It also times the rest of the chain with
`time.process_time()` (the Ray worker's CPU, one client at a time; torch uses one
thread), and the NumPyClient times its training the same way, so the client's SecAgg+
overhead in the collect stage is that stage's CPU minus training. Ray workers are other
processes: each appends JSON lines to a file of its own (named by pid) in a temporary
folder, whose path the mod carries (a frozen dataclass that Ray pickles with the
ClientApp), so no environment variable has to reach the workers.

Per round the result gives: wall seconds (from one centralized evaluation to the next,
so including one evaluation, as fedpipe's and sim_app's `seconds`), the server's wall
seconds per stage, the test accuracy after the round, the L2 norm of the change of the
global model, bytes down/up per stage, totals, the collect-stage replies alone
(`masked_vector_bytes`, of which `masked_payload_bytes` are the masked arrays' .npy
bytes), bits per parameter per client (8 * bytes / (clients * params)) for each, and
each client's CPU seconds per stage.

What Flower 1.42's SecAgg+ does, read in its source and checked by the runs below:

- The legacy API works in 1.42 (ServerApp + LegacyContext + DefaultWorkflow +
  SecAggPlusWorkflow, NumPyClient + secaggplus_mod): every round completes.
- The masked vector is int64: `quantize` gives int32 in [0, quantization_range], the
  pseudo-random masks are drawn as int64 (`np.random.RandomState.randint(...,
  dtype=np.int64)`), their sum is reduced mod `modulus_range` (2**32 by default) but
  kept as int64 and sent with `ndarray_to_bytes` (.npy, ~128 bytes of header per
  array) in a ConfigRecord's bytes list: 64 bits per parameter on the wire although
  only log2(modulus_range) = 32 carry information, twice the float32 model it hides.
  A one-element int64 array (the quantized weight num_examples / max_weight) leads it.
- The download of the collect stage is the legacy FitIns (the global model and the fit
  config) plus the relayed ciphertexts. The model is float32 in round 1 only:
  `dequantize` returns float64, FedAvg keeps that dtype, so from round 2 on the global
  model, and the download, is float64 (64 bits per parameter per client).
- `SecAggPlusWorkflow(timeout=None)` by default: each of the four stages waits until
  every reply has arrived, with no limit (and so does `DefaultWorkflow`'s own fit).
  Here every stage waits at most `ROUND_TIMEOUT` seconds, so a lost client ends the
  stage instead of hanging the benchmark; with all clients alive nothing changes.
- Weighting: each client sends (num_examples / max_weight) * params, clipped to
  [-clipping_range, clipping_range] before quantization, with max_weight = 1000 by
  default. A client holding more than max_weight examples only gets a warning
  ("Potential overflow warning"), and its parameters larger than clipping_range *
  max_weight / num_examples in magnitude are clipped. The result says how many clients
  exceeded max_weight (all 10 in the MNIST run; they clipped at most 7e-5 of their
  parameters there).
- Wrap-around: the server sums the quantized values mod 2**32, each in
  [0, quantization_range], so more than modulus_range / quantization_range = 1024
  clients in a round (about 2048 for parameters near 0) wrap silently with the
  defaults. Flower's warning for this compares `num_shares`, not the number of
  sampled clients, with that ratio.
- The mask seeds: `pseudo_rand_gen` folds the 32-byte seed (or shared key) into 32 bits
  by XOR and seeds NumPy's legacy Mersenne Twister with it, so a mask has 2**32
  possible values whatever the key length; stochastic rounding draws from NumPy's
  global RNG.
- The aggregate does change the model: the workflow writes the unmasked weighted mean
  into each FitRes and calls the strategy's `aggregate_fit`, whose weighted mean of
  identical arrays is that mean. The per-round accuracy and `update_l2` show it.

Measured (2-core machine, other jobs running beside it, so wall times are loose):

- digits, MLP (8,970 parameters), 5 IID clients, 1 epoch, num_shares=5, threshold=3:
  test accuracy 0.125 -> 0.647 -> 0.861 over 2 rounds; the round-1 aggregate equals
  plaintext FedAvg of the same local models (trained again outside Flower) within
  8.3e-6. Masked payload 64.8 bits/parameter/client (65.8 with the reply around it,
  69.8 for everything up); down 40.6 bits in round 1, 72.6 in round 2 (float64).
  Round 2 took 0.55 s (round 1 9-11 s: Ray workers start and load the data).
- MNIST, CNN (1,663,370 parameters), Dirichlet(0.5), 10 clients, 1 epoch, num_shares=5,
  threshold=3: per round setup 4.9 kB down / 8.1 kB up, share keys 26.8 / 28.9 kB,
  collect 66.6 MB down (133.1 MB from round 2) / 133.1 MB up, unmask 4.2 / 7.1 kB:
  64.01 bits/parameter/client for the masked vectors, 64.03 for all of up, 32.05
  (then 64.05) down. Round 1 took 45-53 s (85 s with tests running beside it), round 2
  61 s, nearly all of it training (66-68 CPU s over 2 workers); SecAgg+'s own client
  CPU in the collect stage is ~0.1 s a client, setup/share keys/unmask ~1-10 ms.
  Accuracy 0.095 -> 0.1135 -> 0.210: after round 1 the model predicts one class, and
  so does plaintext FedAvg of the same local models (one client with 11,814 examples
  diverges and dominates the weighted mean); that is the training setup, not SecAgg+.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import time
from collections import defaultdict
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from flwr.app import Array, Context, Message
from flwr.app.message_type import MessageType
from flwr.client import Client, NumPyClient
from flwr.client.mod import secaggplus_mod
from flwr.clientapp import ClientApp
from flwr.clientapp.typing import ClientAppCallable
from flwr.common import NDArrays, Scalar, bytes_to_ndarray, ndarrays_to_parameters
from flwr.common.secure_aggregation.secaggplus_constants import RECORD_KEY_CONFIGS, Key, Stage
from flwr.common.serde import message_to_proto
from flwr.server import LegacyContext, ServerConfig
from flwr.server.strategy import FedAvg
from flwr.server.workflow import DefaultWorkflow, SecAggPlusWorkflow
from flwr.server.workflow.secure_aggregation.secaggplus_workflow import WorkflowState
from flwr.serverapp import Grid, ServerApp
from flwr.simulation import run_simulation
from flwr.supercore.inflatable.inflatable_object import get_all_nested_objects

from benchmarks.plain_flower.sim_app import (
    BACKEND_CONFIG,
    BATCH_SIZE,
    LR,
    OFFLINE_ENV,
    ROUND_TIMEOUT,
    _stop_ray,
    mnist_root,
)
from fedpipe.config import DataConfig, ModelConfig, PartitionConfig, TrainConfig
from fedpipe.data import (
    DatasetNotFoundError,
    client_shard,
    load_dataset,
    partition_indices,
    search_roots,
)
from fedpipe.models import build_model
from fedpipe.seed import round_generator, set_seed
from fedpipe.simulation import quiet_flower
from fedpipe.training import evaluate, train

__all__ = ["FLOWER_MAX_WEIGHT", "STAGES", "run_flower_secaggplus"]

STAGES: tuple[str, ...] = Stage.all()
# SecAggPlusWorkflow's default max_weight: the largest num_examples it weights exactly.
FLOWER_MAX_WEIGHT = 1000.0


# --- sizes ---------------------------------------------------------------------------


def _message_sizes(msg: Message) -> tuple[int, int]:
    """(Flower 1.42's transmitted bytes, the single-protobuf bytes) of one message.

    Deflating an Array caches its chunks as memoryviews, which Ray cannot pickle; the
    caches are dropped again so that the measured message travels on unchanged.
    """
    objects = get_all_nested_objects(msg)
    deflated = sum(len(obj.deflate()) for obj in objects.values())
    for obj in objects.values():
        if isinstance(obj, Array):
            obj.__dict__.pop("_chunks", None)
    return deflated, message_to_proto(msg).ByteSize()


def _stage_of(msg: Message) -> str:
    """The SecAgg+ stage a server message asks for, as `secaggplus_mod` reads it."""
    if msg.metadata.message_type != MessageType.TRAIN or not msg.has_content():
        return str(msg.metadata.message_type)
    configs = msg.content.config_records.get(RECORD_KEY_CONFIGS)
    return str(configs.get(Key.STAGE, "train")) if configs is not None else "train"


# --- client side ---------------------------------------------------------------------


@dataclass(frozen=True)
class _Meter:
    """Where the ClientApp's measurements go: one JSON-lines file per worker process.

    Frozen and holding only a path, so Ray pickles it with the ClientApp into every
    worker; appending to a per-process file needs no locking.
    """

    log_dir: str

    def write(self, row: dict[str, Any]) -> None:
        path = Path(self.log_dir) / f"{os.getpid()}.jsonl"
        with path.open("a", encoding="utf-8") as f:
            f.write(json.dumps(row) + "\n")

    def mod(self, msg: Message, ctxt: Context, call_next: ClientAppCallable) -> Message:
        """Outermost mod: size what comes in and goes out, time the rest of the chain."""
        stage = _stage_of(msg)  # before secaggplus_mod pops the key
        down, down_proto = _message_sizes(msg)
        cpu0, wall0 = time.process_time(), time.perf_counter()
        reply = call_next(msg, ctxt)
        cpu, wall = time.process_time() - cpu0, time.perf_counter() - wall0
        up, up_proto = _message_sizes(reply)
        row: dict[str, Any] = {
            "kind": "message",
            "round": int(msg.metadata.group_id or 0),
            "client": int(str(ctxt.node_config["partition-id"])),
            "stage": stage,
            "down": down,
            "up": up,
            "down_proto": down_proto,
            "up_proto": up_proto,
            "cpu": cpu,
            "wall": wall,
            "error": reply.has_error(),
        }
        if stage == Stage.COLLECT_MASKED_VECTORS and reply.has_content():
            masked = reply.content.config_records[RECORD_KEY_CONFIGS][Key.MASKED_PARAMETERS]
            assert isinstance(masked, list)
            arrays = [bytes_to_ndarray(b) for b in masked if isinstance(b, bytes)]
            row["masked_payload"] = sum(len(b) for b in masked if isinstance(b, bytes))
            row["masked_dtypes"] = sorted({str(a.dtype) for a in arrays})
            row["masked_elements"] = sum(int(a.size) for a in arrays)
        self.write(row)
        return reply

    def client_fn(self, context: Context) -> Client:
        return _FedpipeClient(self, int(str(context.node_config["partition-id"]))).to_client()


def _cfg_int(config: dict[str, Scalar], key: str) -> int:
    value = config[key]
    if isinstance(value, int) and not isinstance(value, bool):
        return value
    raise TypeError(f"fit config {key!r}: expected an integer, got {value!r}")


def _cfg_float(config: dict[str, Scalar], key: str) -> float:
    value = config[key]
    if isinstance(value, int | float) and not isinstance(value, bool):
        return float(value)
    raise TypeError(f"fit config {key!r}: expected a number, got {value!r}")


class _FedpipeClient(NumPyClient):
    """fedpipe's local training behind the legacy NumPyClient interface SecAgg+ needs."""

    def __init__(self, meter: _Meter, partition_id: int) -> None:
        self.meter = meter
        self.partition_id = partition_id

    def fit(
        self, parameters: NDArrays, config: dict[str, Scalar]
    ) -> tuple[NDArrays, int, dict[str, Scalar]]:
        fit_cpu0 = time.process_time()
        data = DataConfig(dataset=str(config["dataset"]), root=str(config["data-root"]))
        part = PartitionConfig(
            scheme=str(config["scheme"]),
            num_clients=_cfg_int(config, "num-clients"),
            alpha=_cfg_float(config, "alpha"),
            min_size=_cfg_int(config, "min-size"),
            classes_per_client=_cfg_int(config, "classes-per-client"),
        )
        seed, server_round = _cfg_int(config, "seed"), _cfg_int(config, "server-round")
        shard = client_shard(data, part, seed, self.partition_id)
        model = build_model(
            ModelConfig(name=str(config["model"]), hidden=_cfg_int(config, "hidden")),
            tuple(shard.x.shape[1:]),
            load_dataset(data).num_classes,
        )
        _load(model, parameters)
        cfg = TrainConfig(
            epochs=_cfg_int(config, "epochs"),
            batch_size=_cfg_int(config, "batch-size"),
            optimizer=str(config["optimizer"]),
            lr=_cfg_float(config, "lr"),
            momentum=_cfg_float(config, "momentum"),
        )
        gen = round_generator(seed, self.partition_id, server_round)
        cpu0, wall0 = time.process_time(), time.perf_counter()
        result = train(model, shard, cfg, gen, torch.device("cpu"))
        cpu, wall = time.process_time() - cpu0, time.perf_counter() - wall0
        arrays = _arrays(model)
        self.meter.write(
            {
                "kind": "train",
                "round": server_round,
                "client": self.partition_id,
                "cpu": cpu,
                "wall": wall,
                # All of fit: also loading the data (the first time in a worker) and
                # building the model, which are no part of SecAgg+'s cost.
                "fit_cpu": time.process_time() - fit_cpu0,
                "examples": result.num_examples,
            }
        )
        return arrays, result.num_examples, {}


def _arrays(model: torch.nn.Module) -> NDArrays:
    return [v.detach().cpu().numpy() for v in model.state_dict().values()]


def _load(model: torch.nn.Module, arrays: NDArrays) -> None:
    keys = list(model.state_dict().keys())
    model.load_state_dict(
        {k: torch.from_numpy(np.asarray(a)) for k, a in zip(keys, arrays, strict=True)}
    )


# --- server side ---------------------------------------------------------------------


class _TimedSecAggPlus(SecAggPlusWorkflow):
    """Flower's SecAgg+ workflow, unchanged, with each stage's wall time and outcome noted.

    A halted stage makes the workflow skip aggregation silently (the round's model
    stays as it was), so the outcome is what tells a failed round from a slow one.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.stage_seconds: list[dict[str, float]] = []
        self.completed: list[bool] = []
        self.failures: list[str] = []

    def _timed(self, stage: str, step: Callable[[], bool], state: WorkflowState) -> bool:
        t0 = time.perf_counter()
        ok = step()
        self.stage_seconds[-1][stage] = time.perf_counter() - t0
        if not ok:
            self.failures += [f"{stage}: halted"] + [str(e) for e in state.failures]
        return ok

    def setup_stage(self, grid: Grid, context: LegacyContext, state: WorkflowState) -> bool:
        self.stage_seconds.append({})
        self.completed.append(False)
        step = super().setup_stage
        return self._timed(Stage.SETUP, lambda: step(grid, context, state), state)

    def share_keys_stage(self, grid: Grid, context: LegacyContext, state: WorkflowState) -> bool:
        step = super().share_keys_stage
        return self._timed(Stage.SHARE_KEYS, lambda: step(grid, context, state), state)

    def collect_masked_vectors_stage(
        self, grid: Grid, context: LegacyContext, state: WorkflowState
    ) -> bool:
        step = super().collect_masked_vectors_stage
        stage = Stage.COLLECT_MASKED_VECTORS
        return self._timed(stage, lambda: step(grid, context, state), state)

    def unmask_stage(self, grid: Grid, context: LegacyContext, state: WorkflowState) -> bool:
        step = super().unmask_stage
        ok = self._timed(Stage.UNMASK, lambda: step(grid, context, state), state)
        self.completed[-1] = ok
        return ok


def _no_metrics(_: list[tuple[int, dict[str, Scalar]]]) -> dict[str, Scalar]:
    return {}


def _data_config(dataset: str) -> DataConfig:
    """The dataset with an absolute root, so Ray workers find it whatever their cwd."""
    if dataset == "digits":
        return DataConfig(dataset="digits")
    if dataset == "mnist":
        return DataConfig(dataset="mnist", root=mnist_root())
    if dataset == "file":
        raise ValueError("dataset='file' is a deployment shard; use a named dataset")
    for root in search_roots(DataConfig(dataset=dataset)):
        cfg = DataConfig(dataset=dataset, root=str(root.resolve()))
        try:
            load_dataset(cfg)
        except DatasetNotFoundError:
            continue
        return cfg
    load_dataset(DataConfig(dataset=dataset))  # raises, saying where it looked
    raise DatasetNotFoundError(dataset)  # pragma: no cover (load_dataset raised)


def _read_rows(log_dir: Path) -> list[dict[str, Any]]:
    rows: list[dict[str, Any]] = []
    for path in sorted(log_dir.glob("*.jsonl")):
        rows += [json.loads(line) for line in path.read_text().splitlines() if line]
    return rows


def _bits(nbytes: float, clients: int, params: int) -> float:
    return 8.0 * nbytes / (clients * params)


def _summary(values: Iterable[float]) -> dict[str, float]:
    v = list(values)
    return {"sum": sum(v), "mean": sum(v) / len(v), "max": max(v)} if v else {}


def _round_traffic(
    rows: list[dict[str, Any]], server_round: int, clients: int, params: int
) -> dict[str, Any]:
    """One round's bytes per stage and direction, and each client's CPU per stage."""
    msgs = [r for r in rows if r["kind"] == "message" and r["round"] == server_round]
    trains = [r for r in rows if r["kind"] == "train" and r["round"] == server_round]
    stages: dict[str, dict[str, Any]] = {}
    for stage in STAGES:
        mine = [r for r in msgs if r["stage"] == stage]
        per_client: dict[int, float] = defaultdict(float)
        for r in mine:
            per_client[r["client"]] += r["cpu"]
        stages[stage] = {
            "messages": len(mine),
            "bytes_down": sum(r["down"] for r in mine),
            "bytes_up": sum(r["up"] for r in mine),
            "proto_bytes_down": sum(r["down_proto"] for r in mine),
            "proto_bytes_up": sum(r["up_proto"] for r in mine),
            "client_cpu_seconds": _summary(per_client.values()),
            "client_cpu_seconds_per_client": [per_client[c] for c in sorted(per_client)],
        }
    others = sorted({r["stage"] for r in msgs} - set(STAGES))
    down = sum(r["down"] for r in msgs)
    up = sum(r["up"] for r in msgs)
    collect = [r for r in msgs if r["stage"] == Stage.COLLECT_MASKED_VECTORS]
    masked = sum(r["up"] for r in collect)
    payload = sum(r.get("masked_payload", 0) for r in collect)
    elements = [r["masked_elements"] for r in collect if "masked_elements" in r]
    train_cpu = {r["client"]: r["cpu"] for r in trains}
    fit_cpu = {r["client"]: r["fit_cpu"] for r in trains}
    collect_cpu: dict[int, float] = defaultdict(float)
    for r in collect:
        collect_cpu[r["client"]] += r["cpu"]
    return {
        "bytes_down": down,
        "bytes_up": up,
        "masked_vector_bytes": masked,
        "masked_payload_bytes": payload,
        "bits_per_param_per_client": {
            "down": _bits(down, clients, params),
            "up": _bits(up, clients, params),
            "masked_vector": _bits(masked, clients, params),
            "masked_payload": _bits(payload, clients, params),
        },
        "masked_dtypes": sorted({d for r in collect for d in r.get("masked_dtypes", [])}),
        # params + 1: the quantized weight travels as a leading one-element array.
        "masked_elements_per_client": max(elements, default=0),
        "stages": stages,
        "other_messages": others,
        "client_errors": sum(1 for r in msgs if r["error"]),
        "train_cpu_seconds": _summary(train_cpu.values()),
        "fit_cpu_seconds": _summary(fit_cpu.values()),
        # The collect stage's CPU less the whole NumPyClient.fit: SecAgg+'s own work on
        # the client (share decryption, weighting, quantization, masks) and the legacy
        # Parameters conversions around fit.
        "secagg_collect_cpu_seconds": _summary(
            collect_cpu[c] - fit_cpu.get(c, 0.0) for c in sorted(collect_cpu)
        ),
    }


def run_flower_secaggplus(
    dataset: str,
    model: str,
    partition: PartitionConfig,
    rounds: int,
    epochs: int,
    num_shares: int,
    reconstruction_threshold: int,
    clipping_range: float,
    quantization_range: int,
    seed: int = 0,
    *,
    max_weight: float = FLOWER_MAX_WEIGHT,
    train_cfg: TrainConfig | None = None,
) -> dict[str, Any]:
    """Train with Flower's SecAgg+ on Flower's simulation engine; rows per round.

    Every client takes part in every round (`partition.num_clients` SuperNodes, one CPU
    each). `num_shares` and `reconstruction_threshold` go to `SecAggPlusWorkflow` as
    given (an int num_shares must be > 2, the threshold below it); `max_weight` keeps
    Flower's default unless the caller wants no client's weight to be clipped;
    `train_cfg` is the local training (batch size, optimizer, learning rate, momentum;
    default batch 16, SGD lr 0.05 as in sim_app). The initial model is fedpipe's for the
    same seed (`fedpipe.seed.set_seed`, then the model). See the module doc for what
    each field means.
    """
    local = train_cfg or TrainConfig(batch_size=BATCH_SIZE, lr=LR)
    os.environ.update(OFFLINE_ENV)
    quiet_flower()
    data = _data_config(dataset)
    ds = load_dataset(data)
    shape = ModelConfig(name=model)
    set_seed(seed)
    net = build_model(shape, ds.input_shape, ds.num_classes)
    params = sum(p.numel() for p in net.parameters())
    initial = _arrays(net)
    shard_sizes = [len(i) for i in partition_indices(data, partition, seed)]
    clients = partition.num_clients

    marks: list[float] = []
    accuracy: list[float] = []
    losses: list[float] = []
    update_l2: list[float] = []
    previous: list[NDArrays] = [initial]

    def central(
        server_round: int, arrays: NDArrays, config: dict[str, Scalar]
    ) -> tuple[float, dict[str, Scalar]]:
        _load(net, arrays)
        loss, acc = evaluate(net, ds.test)
        marks.append(time.perf_counter())
        accuracy.append(acc)
        losses.append(loss)
        diff = sum(float(np.sum((a - b) ** 2)) for a, b in zip(arrays, previous[0], strict=True))
        update_l2.append(diff**0.5)
        previous[0] = [np.array(a, copy=True) for a in arrays]
        return loss, {"accuracy": acc}

    def fit_config(server_round: int) -> dict[str, Scalar]:
        return {
            "dataset": data.dataset,
            "data-root": data.root,
            "model": shape.name,
            "hidden": shape.hidden,
            "scheme": partition.scheme,
            "num-clients": clients,
            "alpha": partition.alpha,
            "min-size": partition.min_size,
            "classes-per-client": partition.classes_per_client,
            "epochs": epochs,
            "seed": seed,
            "server-round": server_round,
            "batch-size": local.batch_size,
            "optimizer": local.optimizer,
            "lr": local.lr,
            "momentum": local.momentum,
        }

    strategy = FedAvg(
        fraction_fit=1.0,
        fraction_evaluate=0.0,
        min_fit_clients=clients,
        min_evaluate_clients=0,
        min_available_clients=clients,
        evaluate_fn=central,
        on_fit_config_fn=fit_config,
        initial_parameters=ndarrays_to_parameters(initial),
        fit_metrics_aggregation_fn=_no_metrics,  # clients send none; silences a warning
    )
    workflow = _TimedSecAggPlus(
        num_shares=num_shares,
        reconstruction_threshold=reconstruction_threshold,
        max_weight=max_weight,
        clipping_range=clipping_range,
        quantization_range=quantization_range,
        timeout=ROUND_TIMEOUT,
    )
    errors: list[BaseException] = []
    server_app = ServerApp()

    @server_app.main()
    def _main(grid: Grid, context: Context) -> None:
        legacy = LegacyContext(
            context=context, config=ServerConfig(num_rounds=rounds), strategy=strategy
        )
        try:
            DefaultWorkflow(fit_workflow=workflow)(grid, legacy)
        except BaseException as exc:  # surfaced after the simulation, not just logged
            errors.append(exc)
            raise

    log_dir = Path(tempfile.mkdtemp(prefix="flower-secaggplus-"))
    meter = _Meter(str(log_dir))
    client_app = ClientApp(client_fn=meter.client_fn, mods=[meter.mod, secaggplus_mod])
    t0 = time.perf_counter()
    try:
        run_simulation(
            server_app=server_app,
            client_app=client_app,
            num_supernodes=clients,
            backend_config=BACKEND_CONFIG,
        )
        wall = time.perf_counter() - t0
        rows = _read_rows(log_dir)
    finally:
        _stop_ray()
        shutil.rmtree(log_dir, ignore_errors=True)
    if errors:
        raise RuntimeError("Flower's SecAgg+ ServerApp failed") from errors[0]
    if len(marks) != rounds + 1 or not all(workflow.completed):
        done = sum(workflow.completed)
        raise RuntimeError(
            f"SecAgg+ aggregated {done} of {rounds} rounds: {workflow.failures or 'no reason'}"
        )
    if not rows:
        raise RuntimeError(f"the ClientApp's measurements never reached {log_dir}")

    per_round = []
    for i in range(rounds):
        traffic = _round_traffic(rows, i + 1, clients, params)
        per_round.append(
            {
                "round": i + 1,
                "seconds": marks[i + 1] - marks[i],
                "stage_seconds": workflow.stage_seconds[i],
                "accuracy": accuracy[i + 1],
                "loss": losses[i + 1],
                "update_l2": update_l2[i + 1],
                **traffic,
            }
        )
    return {
        "system": "flower-secaggplus",
        "flower_version": _flower_version(),
        "dataset": dataset,
        "model": model,
        "params": params,
        "partition": {
            "scheme": partition.scheme,
            "num_clients": clients,
            "alpha": partition.alpha,
        },
        "rounds_requested": rounds,
        "epochs": epochs,
        "seed": seed,
        "train": {"batch_size": local.batch_size, "lr": local.lr, "momentum": local.momentum},
        "secaggplus": {
            "num_shares": num_shares,
            "reconstruction_threshold": reconstruction_threshold,
            "clipping_range": clipping_range,
            "quantization_range": quantization_range,
            "modulus_range": workflow.modulus_range,
            "max_weight": max_weight,
            "stage_timeout": ROUND_TIMEOUT,
            "flower_default_timeout": None,
        },
        "max_client_examples": max(shard_sizes),
        "clients_over_max_weight": sum(1 for n in shard_sizes if n > max_weight),
        "workers": os.cpu_count() or 1,  # Ray runs one 1-CPU ClientAppActor per core
        "wall_seconds": wall,
        "initial_accuracy": accuracy[0],
        "rounds": per_round,
    }


def _flower_version() -> str:
    import flwr

    return str(flwr.__version__)


def _quick_checks() -> dict[str, Any]:
    """Digits (always available) and, when the files are found, MNIST with the CNN."""
    out: dict[str, Any] = {
        "digits": run_flower_secaggplus(
            "digits",
            "mlp",
            PartitionConfig(scheme="iid", num_clients=5),
            rounds=2,
            epochs=1,
            num_shares=5,
            reconstruction_threshold=3,
            clipping_range=8.0,
            quantization_range=2**22,
        )
    }
    try:
        mnist_root()
    except DatasetNotFoundError as exc:
        out["mnist"] = f"skipped: {exc}"
        return out
    out["mnist"] = run_flower_secaggplus(
        "mnist",
        "cnn",
        PartitionConfig(scheme="dirichlet", num_clients=10, alpha=0.5),
        rounds=1,
        epochs=1,
        num_shares=5,
        reconstruction_threshold=3,
        clipping_range=8.0,
        quantization_range=2**22,
    )
    return out


if __name__ == "__main__":
    print(json.dumps(_quick_checks(), indent=2))
