"""The Flower ClientApp: train on the local shard, send back an encoded update.

The app is built by a factory so that simulation can hand it the config directly while
a deployed app reads it from Flower's run config; both then run the same code.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from typing import Protocol

import numpy as np
import torch
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PublicKey
from flwr.app import (
    Array,
    ArrayRecord,
    ConfigRecord,
    ConfigRecordValues,
    Context,
    Message,
    MetricRecord,
    RecordDict,
)
from flwr.clientapp import ClientApp
from flwr.clientapp.typing import Mod

from fedpipe.boundary import SHARES_REJECTED
from fedpipe.builtin_task import DATA_PATH
from fedpipe.codec import Encoded, MetaValue, Update, build_codec, encode_with_feedback
from fedpipe.config import (
    DEVICE_KEYS,
    CodecConfig,
    RunConfig,
    with_device_settings,
)
from fedpipe.crypto.seal import Binding, seal
from fedpipe.data import Split, load_dataset
from fedpipe.downlink import HEADER as DOWNLINK_HEADER
from fedpipe.downlink import ModelStore, SharedStore, StateStore, receive
from fedpipe.drift import observe_split, parse_bins
from fedpipe.records import (
    ARRAYS,
    CLIENT_ID,
    CODEC,
    CONFIG,
    ENCODE_SECONDS,
    EVAL_ACCURACY,
    EVAL_LOSS,
    IDENTITY,
    METRICS,
    NUM_EXAMPLES,
    PROFILE,
    PROFILE_EDGES,
    SEAL_REQUIRED,
    SERVER_ROUND,
    TRAIN_LOSS,
    TRAIN_SECONDS,
    config_from_run_config,
    record_int,
    train_content,
)
from fedpipe.secagg.client import accept_request, masked_input
from fedpipe.secagg.device import STATE as SECAGG_STATE
from fedpipe.secagg.device import SecAggRefusal, advertise, share_keys, unmask
from fedpipe.secagg.keys import RoundId
from fedpipe.secagg.wire import ADVERTISE, MASKED_INPUT, PARAMS, SHARE
from fedpipe.seed import client_seed, round_generator
from fedpipe.task import Task, TaskContext, as_split, load_task
from fedpipe.training import select_device

__all__ = [
    "DATA_PATH",
    "OWN_COPY",
    "ClientHooks",
    "Trained",
    "client_id_of",
    "encoded_reply",
    "identity_reply",
    "make_client_app",
]

log = logging.getLogger(__name__)

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


def _device_config(cfg: RunConfig, context: Context) -> RunConfig:
    """The run's config with this device's profile (batch size, device, AMP, threads)."""
    own = {k: v for k, v in context.node_config.items() if k in DEVICE_KEYS}
    return with_device_settings(cfg, own) if own else cfg


def _task_context(
    cfg: RunConfig, context: Context, server_round: int, generator: torch.Generator | None = None
) -> TaskContext:
    """Where a task function runs: this client, this round, this device."""
    return TaskContext(
        cfg,
        client_id_of(context),
        dict(context.node_config),
        server_round,
        select_device(cfg.train.device),
        generator,
    )


class _Broadcast:
    """The last plain broadcast's state dict: a cohort worker's clients share one
    broadcast object, which is decoded into tensors once instead of once per client."""

    record: ArrayRecord | None = None  # held, so its id cannot be reused while cached
    state: dict[str, torch.Tensor] = {}

    @classmethod
    def state_dict(cls, record: ArrayRecord) -> dict[str, torch.Tensor]:
        if record is not cls.record:
            cls.record, cls.state = record, record.to_torch_state_dict()
        return cls.state


OWN_COPY = StateStore()  # a deployed device: the public model in its context.state


def _global_state(
    cfg: RunConfig, context: Context, msg: Message, store: ModelStore
) -> dict[str, torch.Tensor]:
    """The model the server broadcast: whole, or rebuilt from a compressed broadcast
    (fedpipe.downlink; raises DownlinkRefusal if it cannot be rebuilt exactly)."""
    if DOWNLINK_HEADER not in msg.content.config_records:
        return _Broadcast.state_dict(msg.content.array_records[ARRAYS])
    codec = build_codec(cfg.downlink.codec())
    public = receive(msg.content, context.state, store, codec)
    return {k: torch.from_numpy(v) for k, v in public.items()}


def _model(
    task: Task, ctx: TaskContext, context: Context, msg: Message, store: ModelStore
) -> tuple[torch.nn.Module, dict[str, torch.Tensor]]:
    """The task's model holding the global weights as broadcast, and those weights."""
    model = task.model(ctx)
    global_sd = _global_state(ctx.config, context, msg, store)
    task.load_weights(model, global_sd)
    return model, global_sd


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


@dataclass
class Trained:
    """One round of local training on this device, as the codec or SecAgg encodes it."""

    client_id: int
    server_round: int
    update: Update  # local weights - global weights (what error feedback corrects)
    num_examples: int
    loss: float
    train_seconds: float
    rng: np.random.Generator


def _local_update(
    msg: Message, context: Context, cfg: RunConfig, hooks: ClientHooks | None, store: ModelStore
) -> Trained:
    server_round = record_int(msg.content.config_records[CONFIG], SERVER_ROUND)
    cid = client_id_of(context)
    task = load_task(cfg.task)
    ctx = _task_context(cfg, context, server_round, round_generator(cfg.seed, cid, server_round))
    model, global_sd = _model(task, ctx, context, msg, store)
    data = task.train_data(ctx)
    if hooks is not None:  # simulated attacks, on fedpipe's datasets
        data = hooks.on_data(cid, as_split(data, task.name), load_dataset(cfg.data).num_classes)
    t0 = time.perf_counter()
    result = task.train(model, data, ctx)
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
    return Trained(cid, server_round, update, num_examples, result.loss, t1 - t0, rng)


def _claims(t: Trained, encode_seconds: float) -> dict[str, MetaValue]:
    """What a device states beside its update (bound with it when sealed)."""
    return {
        NUM_EXAMPLES: t.num_examples,
        TRAIN_LOSS: t.loss,
        CLIENT_ID: t.client_id,
        TRAIN_SECONDS: t.train_seconds,
        ENCODE_SECONDS: encode_seconds,
    }


def client_train(
    msg: Message,
    context: Context,
    cfg: RunConfig,
    seal_key: bytes | None = None,
    hooks: ClientHooks | None = None,
    store: ModelStore = OWN_COPY,
) -> Message:
    t = _local_update(msg, context, cfg, hooks, store)
    return encoded_reply(msg, context, cfg.codec, t, seal_key)


def encoded_reply(
    msg: Message, context: Context, codec_cfg: CodecConfig, t: Trained, seal_key: bytes | None
) -> Message:
    """The training reply: the update encoded (with error feedback kept in
    `context.state`), the claims in its header, sealed when this device has the key."""
    t1 = time.perf_counter()
    codec = build_codec(codec_cfg)
    residual = None
    if codec_cfg.error_feedback:
        prior = load_residual(context, t.server_round, codec_cfg)
        encoded, residual = encode_with_feedback(codec, t.update, prior, t.rng)
    else:
        encoded = codec.encode(t.update, t.rng)
    # The claims travel in the update's header: a seal binds them with the update.
    claims = _claims(t, time.perf_counter() - t1)  # encode: error feedback and codec
    encoded = Encoded(encoded.arrays, {**encoded.meta, **claims})
    t_seal = time.perf_counter()
    encoded = _maybe_seal(encoded, msg, context, _seal_key(context, seal_key), t.server_round)
    sealing = time.perf_counter() - t_seal
    _remember(context, t.server_round, residual)
    return Message(train_content(encoded, sealing), reply_to=msg)


def identity_reply(msg: Message, context: Context) -> Message:
    """Which client this node is: the aggregator samples by client id."""
    return Message(
        RecordDict({IDENTITY: ConfigRecord({CLIENT_ID: client_id_of(context)})}), reply_to=msg
    )


def _secagg_state(context: Context) -> ConfigRecord:
    return context.state.config_records.setdefault(SECAGG_STATE, ConfigRecord())


def _round_id(msg: Message, context: Context) -> RoundId:
    params = msg.content.config_records.get(PARAMS, ConfigRecord())
    return RoundId(context.run_id, record_int(params, "server-round"))


def client_secagg_train(
    msg: Message,
    context: Context,
    cfg: RunConfig,
    hooks: ClientHooks | None = None,
    store: ModelStore = OWN_COPY,
) -> Message:
    """SecAgg's masked-input stage: train, then send the masked, quantized update.

    The update is neither encoded by the codec nor sealed: the masks hide it from the
    relay and the aggregator alike. Error feedback works as with any codec."""
    rid = _round_id(msg, context)
    if rid.round != record_int(msg.content.config_records[CONFIG], SERVER_ROUND):
        raise SecAggRefusal("the request's secagg round differs from its training round")
    grid, bad = accept_request(
        _secagg_state(context), cfg.secagg, rid, client_id_of(context), msg.content
    )
    t = _local_update(msg, context, cfg, hooks, store)
    t1 = time.perf_counter()
    prior = load_residual(context, t.server_round, cfg.codec)
    record, residual = masked_input(
        _secagg_state(context), rid, t.client_id, grid, t.update, prior, t.num_examples, t.rng
    )
    claims: dict[str, ConfigRecordValues] = {
        **_claims(t, time.perf_counter() - t1),
        SHARES_REJECTED: bad,
    }
    _remember(context, t.server_round, residual if cfg.codec.error_feedback else None)
    content = RecordDict({MASKED_INPUT: record, CODEC: ConfigRecord(claims)})
    return Message(content, reply_to=msg)


def client_secagg_query(msg: Message, context: Context, cfg: RunConfig) -> Message:
    """SecAgg's key stages: advertise, share keys, unmask (fedpipe.secagg.device)."""
    rid, kind = _round_id(msg, context), msg.metadata.message_type
    state, cid = _secagg_state(context), client_id_of(context)
    if kind == ADVERTISE:
        task = load_task(cfg.task)
        examples = len(task.train_data(_task_context(cfg, context, rid.round)))  # type: ignore[arg-type]
        content = advertise(state, cfg.secagg, rid, cid, examples, msg.content)
    elif kind == SHARE:
        content = share_keys(state, cfg.secagg, rid, cid, msg.content)
    else:
        content = unmask(state, cfg.secagg, rid, msg.content)
    return Message(content, reply_to=msg)


def client_evaluate(
    msg: Message, context: Context, cfg: RunConfig, store: ModelStore = OWN_COPY
) -> Message:
    """Federated evaluation of the global model on the client's own held-out data, with
    its histograms for the drift profile when the server asks for them."""
    config = msg.content.config_records[CONFIG]
    server_round = record_int(config, SERVER_ROUND, 0)
    task = load_task(cfg.task)
    ctx = _task_context(cfg, context, server_round)
    model, _ = _model(task, ctx, context, msg, store)
    data = task.eval_data(ctx)
    loss, acc = task.evaluate(model, data, ctx)
    metrics = MetricRecord({NUM_EXAMPLES: len(data), EVAL_LOSS: loss, EVAL_ACCURACY: acc})  # type: ignore[arg-type]
    content = RecordDict({METRICS: metrics})
    bins = config.get(PROFILE_EDGES)
    if isinstance(bins, str):
        profile = _profile(task, model, data, bins)
        if profile is not None:
            content[PROFILE] = ArrayRecord({k: Array(v) for k, v in profile.items()})
    return Message(content, reply_to=msg)


def _profile(
    task: Task, model: torch.nn.Module, data: object, bins: str
) -> dict[str, np.ndarray] | None:
    """Counts of the held-out data in the announced bins; None (and a log line) when the
    bins or the data cannot be read: the evaluation still counts."""
    try:
        edges, classes = parse_bins(bins)
        return observe_split(model, as_split(data, f"{task.name}.eval_data").x, edges, classes)
    except Exception as exc:  # noqa: BLE001 - a drift profile must not fail evaluation
        log.warning("no drift histograms this round: %s", exc)
        return None


def make_client_app(
    cfg: RunConfig | None = None,
    seal_key: bytes | None = None,
    hooks: ClientHooks | None = None,
    mods: list[Mod] | None = None,
    shared_models: bool = False,
) -> ClientApp:
    """A ClientApp bound to `cfg`, or reading it from the run config when `cfg` is None.

    `seal_key` (simulation) is the aggregator's raw X25519 public key (bytes: Ray must
    pickle the app); a deployed device gets it from its node config instead. `hooks`
    and Flower `mods` are how a simulation injects attacks and faults. With a
    compressed broadcast, `shared_models` (simulation) keeps the public model once per
    worker process instead of once per client (fedpipe.downlink.SharedStore).
    """
    app = ClientApp(mods=mods or [])
    store: ModelStore = SharedStore() if shared_models else OWN_COPY

    def resolve(context: Context) -> RunConfig:
        run = cfg if cfg is not None else config_from_run_config(dict(context.run_config))
        return _device_config(run, context)

    @app.train()
    def _train(msg: Message, context: Context) -> Message:
        return client_train(msg, context, resolve(context), seal_key, hooks, store)

    @app.evaluate()
    def _evaluate(msg: Message, context: Context) -> Message:
        return client_evaluate(msg, context, resolve(context), store)

    @app.train("secagg")
    def _secagg_train(msg: Message, context: Context) -> Message:
        return client_secagg_train(msg, context, resolve(context), hooks, store)

    @app.query("secagg_advertise")
    def _secagg_advertise(msg: Message, context: Context) -> Message:
        return client_secagg_query(msg, context, resolve(context))

    @app.query("secagg_share")
    def _secagg_share(msg: Message, context: Context) -> Message:
        return client_secagg_query(msg, context, resolve(context))

    @app.query("secagg_unmask")
    def _secagg_unmask(msg: Message, context: Context) -> Message:
        return client_secagg_query(msg, context, resolve(context))

    @app.query("identify")
    def _identify(msg: Message, context: Context) -> Message:
        return identity_reply(msg, context)

    return app
