"""The Flower ClientApp: train on the local shard, send back an encoded update.

The app is built by a factory so that simulation can hand it the config directly while
a deployed app reads it from Flower's run config; both then run the same code.
"""

from __future__ import annotations

import time
from functools import lru_cache
from typing import Protocol

import numpy as np
import torch
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PublicKey
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp
from flwr.clientapp.typing import Mod

from fedpipe.codec import Encoded, Update, build_codec, encode_with_feedback
from fedpipe.config import (
    DEVICE_KEYS,
    CodecConfig,
    DataConfig,
    ModelConfig,
    RunConfig,
    with_device_settings,
)
from fedpipe.crypto.seal import Binding, seal
from fedpipe.data import Split, TensorDataset, client_shard, load_dataset
from fedpipe.models import build_model
from fedpipe.records import (
    ARRAYS,
    CLIENT_ID,
    CONFIG,
    ENCODE_SECONDS,
    EVAL_ACCURACY,
    EVAL_LOSS,
    IDENTITY,
    METRICS,
    NUM_EXAMPLES,
    SEAL_REQUIRED,
    SERVER_ROUND,
    TRAIN_LOSS,
    TRAIN_SECONDS,
    config_from_run_config,
    record_int,
    train_content,
)
from fedpipe.seed import client_seed, round_generator
from fedpipe.training import evaluate, select_device, train

__all__ = ["ClientHooks", "client_id_of", "make_client_app"]

STATE = "fedpipe-client"  # ConfigRecord in context.state that survives rounds
RESIDUAL = "fedpipe-residual"  # ArrayRecord in context.state: error-feedback residual


class ClientHooks(Protocol):
    """Where simulation changes what a client does (attacks), outside the training code.

    Production apps have no hooks; `fedpipe.attacks` provides them to simulations.
    """

    def on_data(self, client_id: int, data: Split, num_classes: int) -> Split:
        """The examples the client trains on."""
        ...

    def on_update(
        self, client_id: int, update: Update, num_examples: int, rng: np.random.Generator
    ) -> tuple[Update, int]:
        """The update the client encodes, and the number of examples it claims."""
        ...


def client_id_of(context: Context) -> int:
    """Simulation numbers clients by partition; a deployed device says so in node config."""
    for key in ("partition-id", "client-id"):
        if key in context.node_config:
            return int(context.node_config[key])
    raise KeyError("node config has neither 'partition-id' nor 'client-id'")


DATA_PATH = "data-path"  # node config: a deployed device's own shard file
AGGREGATOR_KEY = "aggregator-key"  # node config: the aggregator's X25519 public key, hex
# node config, tests only: comma-separated floats planted in the first coordinates of the
# update, so an end-to-end test can look for them on the wire and in the relay's database.
CANARY = "test-canary"


def _seal_key(context: Context, given: bytes | None) -> X25519PublicKey | None:
    """The aggregator's public key: given (simulation) or from the node config (device)."""
    raw = given if given is not None else context.node_config.get(AGGREGATOR_KEY)
    if not raw:
        return None
    return X25519PublicKey.from_public_bytes(
        raw if isinstance(raw, bytes) else bytes.fromhex(str(raw))
    )


def _maybe_seal(
    encoded: Encoded, msg: Message, context: Context, key: X25519PublicKey | None, rnd: int
) -> Encoded:
    """Seal whenever this device has the aggregator's key, whatever the broadcast says: a
    relay that turned the flag off must not get plaintext."""
    if key is None:
        if msg.content.config_records[CONFIG].get(SEAL_REQUIRED, False):
            raise RuntimeError(
                "the aggregator accepts sealed updates only, and this device has no "
                "aggregator public key (fedpipe-client --aggregator-key)"
            )
        return encoded
    return seal(encoded, key, Binding(context.run_id, rnd, context.node_id))


def _device_data(context: Context) -> TensorDataset | None:
    """A deployed device's own shard (`fedpipe-client --data`); None in simulation."""
    path = context.node_config.get(DATA_PATH)
    return load_dataset(DataConfig(dataset="file", path=str(path))) if path else None


def _device_config(cfg: RunConfig, context: Context) -> RunConfig:
    """The run's config with this device's profile (batch size, device, AMP, threads)."""
    own = {k: v for k, v in context.node_config.items() if k in DEVICE_KEYS}
    return with_device_settings(cfg, own) if own else cfg


def _local_data(cfg: RunConfig, context: Context, cid: int) -> Split:
    own = _device_data(context)
    return own.train if own is not None else client_shard(cfg.data, cfg.partition, cfg.seed, cid)


@lru_cache(maxsize=2)
def _module(cfg: ModelConfig, input_shape: tuple[int, ...], num_classes: int) -> torch.nn.Module:
    """One module per shape, reused by every client this process runs, one at a time.

    Each client overwrites every parameter and buffer with the broadcast (a strict
    load_state_dict), so building and randomly initializing a fresh module per client
    (about 1 ms of a 5 ms MLP client) bought nothing.
    """
    return build_model(cfg, input_shape, num_classes)


class _Broadcast:
    """The last broadcast's state dict: a cohort worker's clients share one broadcast
    object, which is decoded into tensors once instead of once per client."""

    record: ArrayRecord | None = None  # held, so its id cannot be reused while cached
    state: dict[str, torch.Tensor] = {}

    @classmethod
    def state_dict(cls, record: ArrayRecord) -> dict[str, torch.Tensor]:
        if record is not cls.record:
            cls.record, cls.state = record, record.to_torch_state_dict()
        return cls.state


def _model(
    cfg: RunConfig, context: Context, msg: Message
) -> tuple[torch.nn.Module, dict[str, torch.Tensor], int]:
    """The global model as broadcast, its state dict, and the number of classes."""
    # Shapes come from the device's shard when it has one: it may not hold the dataset.
    ds = _device_data(context) or load_dataset(cfg.data)
    model = _module(cfg.model, tuple(ds.input_shape), ds.num_classes)
    global_sd = _Broadcast.state_dict(msg.content.array_records[ARRAYS])
    model.load_state_dict(global_sd)
    return model, global_sd, ds.num_classes


def load_residual(context: Context, server_round: int, cfg: CodecConfig) -> Update | None:
    """The error-feedback residual, unless off, absent, or older than max_staleness rounds."""
    if not cfg.error_feedback or RESIDUAL not in context.state.array_records:
        return None
    state = context.state.config_records.get(STATE, ConfigRecord())
    missed = server_round - record_int(state, "last-round", 0) - 1
    if missed > cfg.max_staleness:
        return None
    return {k: a.numpy() for k, a in context.state.array_records[RESIDUAL].items()}


def _remember(context: Context, server_round: int, residual: Update | None) -> None:
    """Per-client state that must survive rounds: participation and the EF residual."""
    state = context.state.config_records.setdefault(STATE, ConfigRecord())
    state["rounds-trained"] = record_int(state, "rounds-trained", 0) + 1
    state["last-round"] = server_round
    if residual is not None:
        context.state[RESIDUAL] = ArrayRecord({k: Array(v) for k, v in residual.items()})


def _plant_canary(update: Update, context: Context) -> None:
    raw = context.node_config.get(CANARY)
    if not raw:
        return
    values = np.array([float(v) for v in str(raw).split(",")], np.float32)
    first = next(iter(update.values())).reshape(-1)  # a view: writes go into the update
    first[: len(values)] = values[: len(first)]


def client_train(
    msg: Message,
    context: Context,
    cfg: RunConfig,
    seal_key: bytes | None = None,
    hooks: ClientHooks | None = None,
) -> Message:
    cid = client_id_of(context)
    server_round = record_int(msg.content.config_records[CONFIG], SERVER_ROUND)
    model, global_sd, num_classes = _model(cfg, context, msg)
    data = _local_data(cfg, context, cid)
    if hooks is not None:
        data = hooks.on_data(cid, data, num_classes)
    t0 = time.perf_counter()
    result = train(
        model,
        data,
        cfg.train,
        round_generator(cfg.seed, cid, server_round),
        select_device(cfg.train.device),
    )
    t1 = time.perf_counter()
    # The update, not the weights: what codecs compress and error feedback corrects.
    local_sd = model.state_dict()
    update = {
        k: (local_sd[k].detach().float().cpu() - global_sd[k].float()).numpy() for k in global_sd
    }
    _plant_canary(update, context)
    rng = np.random.default_rng([client_seed(cfg.seed, cid), server_round])
    num_examples = result.num_examples
    if hooks is not None:
        update, num_examples = hooks.on_update(cid, update, num_examples, rng)
    codec = build_codec(cfg.codec)
    residual = None
    if cfg.codec.error_feedback:
        prior = load_residual(context, server_round, cfg.codec)
        encoded, residual = encode_with_feedback(codec, update, prior, rng)
    else:
        encoded = codec.encode(update, rng)
    # The claims travel in the update's header: a seal binds them with the update.
    claims = {
        NUM_EXAMPLES: num_examples,
        TRAIN_LOSS: result.loss,
        CLIENT_ID: cid,
        TRAIN_SECONDS: t1 - t0,
        ENCODE_SECONDS: time.perf_counter() - t1,  # delta, error feedback, codec
    }
    encoded = Encoded(encoded.arrays, {**encoded.meta, **claims})
    t_seal = time.perf_counter()
    encoded = _maybe_seal(encoded, msg, context, _seal_key(context, seal_key), server_round)
    sealing = time.perf_counter() - t_seal
    _remember(context, server_round, residual)
    return Message(train_content(encoded, sealing), reply_to=msg)


def client_evaluate(msg: Message, context: Context, cfg: RunConfig) -> Message:
    """Federated evaluation of the global model on the client's own shard."""
    cid = client_id_of(context)
    model, _, _ = _model(cfg, context, msg)
    data = _local_data(cfg, context, cid)
    loss, acc = evaluate(model, data, device=select_device(cfg.train.device))
    metrics = MetricRecord({NUM_EXAMPLES: len(data), EVAL_LOSS: loss, EVAL_ACCURACY: acc})
    return Message(RecordDict({METRICS: metrics}), reply_to=msg)


def make_client_app(
    cfg: RunConfig | None = None,
    seal_key: bytes | None = None,
    hooks: ClientHooks | None = None,
    mods: list[Mod] | None = None,
) -> ClientApp:
    """A ClientApp bound to `cfg`, or reading it from the run config when `cfg` is None.

    `seal_key` (simulation) is the aggregator's raw X25519 public key (bytes: Ray must
    pickle the app); a deployed device gets it from its node config instead. `hooks`
    and Flower `mods` are how a simulation injects attacks and faults.
    """
    app = ClientApp(mods=mods or [])

    def resolve(context: Context) -> RunConfig:
        run = cfg if cfg is not None else config_from_run_config(dict(context.run_config))
        return _device_config(run, context)

    @app.train()
    def _train(msg: Message, context: Context) -> Message:
        return client_train(msg, context, resolve(context), seal_key, hooks)

    @app.evaluate()
    def _evaluate(msg: Message, context: Context) -> Message:
        return client_evaluate(msg, context, resolve(context))

    @app.query("identify")
    def _identify(msg: Message, context: Context) -> Message:
        """Which client this node is: the aggregator samples by client id."""
        return Message(
            RecordDict({IDENTITY: ConfigRecord({CLIENT_ID: client_id_of(context)})}), reply_to=msg
        )

    return app
