"""One typed configuration for a fedpipe run.

Every knob lives in a frozen dataclass here. Configs are built exactly once, at the edge
(CLI or Python caller), from TOML plus ``key=value`` overrides, and validated on
construction so that a bad value fails before any process starts. The resolved config
is serialised back to TOML and travels with the run (run directory, Flower run config,
checkpoints).
"""

from __future__ import annotations

import dataclasses
import tomllib
import typing
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import tomli_w

__all__ = [
    "BoundsConfig",
    "CodecConfig",
    "ConfigError",
    "DataConfig",
    "DownlinkConfig",
    "ExportConfig",
    "FederationConfig",
    "ModelConfig",
    "PartitionConfig",
    "ReleaseConfig",
    "RunConfig",
    "SecAggConfig",
    "SecurityConfig",
    "SimulationConfig",
    "TrainConfig",
    "apply_overrides",
    "check_choice",
    "check_range",
    "config_from_dict",
    "config_from_toml",
    "config_to_dict",
    "config_to_toml",
    "load_config",
    "load_profile",
    "parse_value",
    "with_device_settings",
]


class ConfigError(ValueError):
    """A config key is unknown or its value is out of range; the message names both."""


def check_choice(section: str, name: str, value: object, allowed: Iterable[object]) -> None:
    """`section.name=value` must be one of `allowed` (every component's config checks
    its values with these two, so every message names the key the same way)."""
    allowed = tuple(allowed)
    if value not in allowed:
        raise ConfigError(f"{section}.{name}={value!r} is not allowed; choose one of {allowed}")


def check_range(
    section: str,
    name: str,
    value: float,
    lo: float | None = None,
    hi: float | None = None,
    lo_open: bool = False,
) -> None:
    """`section.name=value` must lie in [lo, hi] (or (lo, hi] with `lo_open`)."""
    too_low = lo is not None and (value <= lo if lo_open else value < lo)
    too_high = hi is not None and value > hi
    if too_low or too_high:
        left = "(" if lo_open else "["
        bounds = f"{left}{'-inf' if lo is None else lo}, {'inf' if hi is None else hi}]"
        raise ConfigError(f"{section}.{name}={value!r} is out of range; allowed {bounds}")


DATASETS = ("digits", "mnist", "fashion_mnist", "cifar10", "file", "imagefolder", "table")
USER_DATA = ("file", "imagefolder", "table")  # datasets read from data.path
PARTITIONERS = ("iid", "dirichlet", "shards")
MODELS = ("mlp", "cnn", "resnet18")
OPTIMIZERS = ("sgd", "adam")
DEVICES = ("auto", "cpu", "cuda", "mps")
STRATEGIES = ("fedavg", "fedavgm", "fedmedian", "fedtrimmedavg", "krum", "multikrum", "bulyan")
# Strategies whose aggregate is not a weighted mean: they need every update at once.
BUFFERED_STRATEGIES = ("fedmedian", "fedtrimmedavg", "krum", "multikrum", "bulyan")
AGGREGATIONS = ("auto", "streaming", "buffered")
CODECS = ("float32", "float16", "int8", "int4", "int2", "sign", "topk", "hadamard1", "hadamard2")
ATTACKS = ("none", "label_flip", "sign_flip", "scale", "model_replacement", "noise", "inflate")


@dataclass(frozen=True)
class DataConfig:
    """Where the training data comes from."""

    SECTION: ClassVar[str] = "data"
    dataset: str = "digits"
    # Folder holding torchvision datasets; empty means search $FEDPIPE_DATA, ./data,
    # ../shared/data in that order.
    root: str = ""
    # dataset="file": an .npz with arrays x, y (and optionally x_test, y_test);
    # "imagefolder": a folder of class sub-folders (or train/ and test/ of them);
    # "table": a CSV (header row) or Parquet file of numeric features and a label.
    path: str = ""
    # Allow torchvision to download a missing dataset (needs network access).
    download: bool = False
    # table: the label column, and an optional separate test table.
    label: str = "label"
    test_path: str = ""
    # imagefolder / table without a separate test set: the fraction held out for it.
    test_fraction: float = 0.2
    # imagefolder: resize every image to image_size x image_size (0: keep; they must
    # then share one size), and read it as 1 (grey) or 3 (RGB) channels.
    image_size: int = 0
    channels: int = 3

    def __post_init__(self) -> None:
        check_choice(self.SECTION, "dataset", self.dataset, DATASETS)
        if self.dataset in USER_DATA and not self.path:
            raise ConfigError(f"data.path must name the data when data.dataset={self.dataset!r}")
        check_range(self.SECTION, "test_fraction", self.test_fraction, 0.0, 0.9)
        check_range(self.SECTION, "image_size", self.image_size, 0, 4096)
        check_choice(self.SECTION, "channels", self.channels, (1, 3))


@dataclass(frozen=True)
class PartitionConfig:
    """How the training set is split across clients (simulation and `partition`)."""

    SECTION: ClassVar[str] = "partition"
    scheme: str = "iid"
    num_clients: int = 10
    # Dirichlet concentration: small alpha = strong label skew.
    alpha: float = 0.5
    # Dirichlet resamples until every client holds at least this many examples.
    min_size: int = 10
    # "shards": number of distinct classes each client holds.
    classes_per_client: int = 2
    # The fraction of each client's shard it keeps for federated evaluation and never
    # trains on (its own held-out split; 0: federated evaluation uses the training shard).
    holdout: float = 0.0

    def __post_init__(self) -> None:
        check_choice(self.SECTION, "scheme", self.scheme, PARTITIONERS)
        check_range(self.SECTION, "holdout", self.holdout, 0.0, 0.5)
        check_range(self.SECTION, "num_clients", self.num_clients, 1, 100_000)
        check_range(self.SECTION, "alpha", self.alpha, 0.0, lo_open=True)
        check_range(self.SECTION, "min_size", self.min_size, 0)
        check_range(self.SECTION, "classes_per_client", self.classes_per_client, 1)


@dataclass(frozen=True)
class ModelConfig:
    """Which network to train."""

    SECTION: ClassVar[str] = "model"
    name: str = "mlp"
    # Width of the MLP hidden layers (ignored by other models).
    hidden: int = 64
    # A previous run's directory: start from its global model instead of a fresh one
    # (warm start; the run records that parent in lineage.json).
    init: str = ""

    def __post_init__(self) -> None:
        check_choice(self.SECTION, "name", self.name, MODELS)
        check_range(self.SECTION, "hidden", self.hidden, 1, 65_536)


@dataclass(frozen=True)
class TrainConfig:
    """Local training on each client."""

    SECTION: ClassVar[str] = "train"
    epochs: int = 3
    batch_size: int = 16
    optimizer: str = "sgd"
    lr: float = 0.05
    momentum: float = 0.9
    weight_decay: float = 0.0
    device: str = "auto"
    # CPU threads torch may use on a client (IoT boards and simulated clients share cores).
    threads: int = 1
    # Mixed precision; only takes effect on CUDA.
    amp: bool = True

    def __post_init__(self) -> None:
        check_range(self.SECTION, "epochs", self.epochs, 1, 10_000)
        check_range(self.SECTION, "batch_size", self.batch_size, 1, 1_000_000)
        check_choice(self.SECTION, "optimizer", self.optimizer, OPTIMIZERS)
        check_range(self.SECTION, "lr", self.lr, 0.0, 10.0, lo_open=True)
        check_range(self.SECTION, "momentum", self.momentum, 0.0, 1.0)
        check_range(self.SECTION, "weight_decay", self.weight_decay, 0.0, 1.0)
        check_choice(self.SECTION, "device", self.device, DEVICES)
        check_range(self.SECTION, "threads", self.threads, 1, 1024)


@dataclass(frozen=True)
class FederationConfig:
    """The FedAvg rounds the coordinator runs."""

    SECTION: ClassVar[str] = "federation"
    rounds: int = 10
    strategy: str = "fedavg"
    fraction_train: float = 1.0
    # Federated evaluation on the clients' own shards; centralized evaluation on the
    # held-out test set always runs on the server.
    fraction_evaluate: float = 0.0
    min_nodes: int = 2
    # Seconds the server waits for replies in a round before aggregating what it has.
    round_timeout: float = 600.0
    # Seconds to wait for min_nodes devices to be connected before a round; then the run
    # stops with an error instead of waiting forever as Flower's sampler would.
    wait_for_nodes: float = 300.0
    # Seconds between checks for replies (Flower's deployment Grid: a fixed 3 s).
    poll_interval: float = 0.1
    # Server-side momentum for fedavgm; trimmed fraction for fedtrimmedavg.
    server_momentum: float = 0.9
    trim_beta: float = 0.2
    # krum / multikrum / bulyan: how many replies per round may be malicious (f; Bulyan
    # needs at least 4f + 3 replies), and how many updates multikrum averages.
    num_malicious: int = 0
    krum_select: int = 1
    # How replies are combined (fedpipe.rounds): "streaming" folds each one into an exact
    # running sum as it arrives (server memory O(model)); "buffered" holds every update
    # of the round (O(clients x model)), which the strategies that need all updates at
    # once require (fedmedian, fedtrimmedavg, krum, multikrum, bulyan); "auto" picks
    # streaming where the strategy allows it.
    aggregation: str = "auto"

    def __post_init__(self) -> None:
        check_range(self.SECTION, "rounds", self.rounds, 1, 100_000)
        check_choice(self.SECTION, "strategy", self.strategy, STRATEGIES)
        check_choice(self.SECTION, "aggregation", self.aggregation, AGGREGATIONS)
        if self.aggregation == "streaming" and self.strategy in BUFFERED_STRATEGIES:
            raise ConfigError(
                f"federation.strategy={self.strategy!r} needs every update of a round at "
                "once; use federation.aggregation=buffered (or auto)"
            )
        check_range(self.SECTION, "fraction_train", self.fraction_train, 0.0, 1.0, lo_open=True)
        check_range(self.SECTION, "fraction_evaluate", self.fraction_evaluate, 0.0, 1.0)
        check_range(self.SECTION, "min_nodes", self.min_nodes, 1)
        check_range(self.SECTION, "round_timeout", self.round_timeout, 0.0, lo_open=True)
        check_range(self.SECTION, "wait_for_nodes", self.wait_for_nodes, 0.0, lo_open=True)
        check_range(self.SECTION, "poll_interval", self.poll_interval, 0.0, 60.0, lo_open=True)
        check_range(self.SECTION, "server_momentum", self.server_momentum, 0.0, 1.0)
        check_range(self.SECTION, "trim_beta", self.trim_beta, 0.0, 0.5)
        check_range(self.SECTION, "num_malicious", self.num_malicious, 0, 100_000)
        check_range(self.SECTION, "krum_select", self.krum_select, 1, 100_000)


@dataclass(frozen=True)
class CodecConfig:
    """How a client's update is encoded for the uplink."""

    SECTION: ClassVar[str] = "codec"
    # float32 = identity; float16 = cast; int8/int4/int2 = uniform stochastic per chunk;
    # sign = 1 bit + per-chunk scale; topk = largest coordinates only, values quantized;
    # hadamard1/hadamard2 = randomized Hadamard rotation per chunk, then 1 or 2 bits.
    scheme: str = "float32"
    # Coordinates sharing one scale in the quantized schemes (a power of two for the
    # hadamard schemes: the rotation's block).
    chunk_size: int = 1024
    # Keep what the codec dropped on the device and add it to the next update.
    error_feedback: bool = False
    # Drop the residual if the client missed more than this many rounds: a stale
    # correction would push the model towards where it was, not where it is.
    max_staleness: int = 5
    # topk: fraction of coordinates kept, and bits per kept value (2, 4 or 8).
    topk: float = 0.01
    topk_bits: int = 8

    def __post_init__(self) -> None:
        _check_scheme(self.SECTION, self.scheme, self.chunk_size, self.topk, self.topk_bits)
        check_range(self.SECTION, "max_staleness", self.max_staleness, 0, 1_000_000)


def _check_scheme(section: str, scheme: str, chunk_size: int, topk: float, bits: int) -> None:
    """A codec's settings, wherever they configure one (the uplink or the broadcast)."""
    check_choice(section, "scheme", scheme, CODECS)
    check_range(section, "chunk_size", chunk_size, 8, 1 << 24)
    check_range(section, "topk", topk, 0.0, 1.0, lo_open=True)
    check_choice(section, "topk_bits", bits, (2, 4, 8))
    if scheme.startswith("hadamard") and chunk_size & (chunk_size - 1):
        raise ConfigError(f"{section}.chunk_size={chunk_size} must be a power of two for {scheme}")


@dataclass(frozen=True)
class DownlinkConfig:
    """How the global model reaches the devices (fedpipe.downlink).

    float32 sends the whole model in every message and devices keep nothing. Any other
    codec scheme compresses the broadcast: the server keeps the public model (exactly
    what devices rebuild) and sends its coded change; a device keeps the model it holds
    and applies the changes it missed, or gets the whole model when that is smaller.
    """

    SECTION: ClassVar[str] = "downlink"
    scheme: str = "float32"
    chunk_size: int = 1024
    topk: float = 0.01
    topk_bits: int = 8
    # Carry what a broadcast rounded away into the next one (the server's error
    # feedback), so the devices' model never drifts from the server's.
    error_feedback: bool = True

    def __post_init__(self) -> None:
        _check_scheme(self.SECTION, self.scheme, self.chunk_size, self.topk, self.topk_bits)

    @property
    def compressed(self) -> bool:
        return self.scheme != "float32"

    def codec(self) -> CodecConfig:
        """The broadcast's codec, built like an uplink codec (fedpipe.codec.build_codec)."""
        return CodecConfig(self.scheme, self.chunk_size, topk=self.topk, topk_bits=self.topk_bits)


NORM_ACTIONS = ("clip", "reject")
SIM_BACKENDS = ("ray", "inprocess")


@dataclass(frozen=True)
class BoundsConfig:
    """How much one device can move the global model (fedpipe.influence).

    The reference is the median over a round's decoded replies: the previous round's,
    or the round's own when there is none yet (the run's first round, or after a resume).
    """

    SECTION: ClassVar[str] = "bounds"
    # A reply's weight (num-examples) is capped at this multiple of the reference
    # median; 0 turns the cap off.
    weight_ratio: float = 3.0
    # An update whose L2 norm exceeds this multiple of the reference median norm is
    # rejected (or, with norm_action="clip", scaled down to it); 0 turns the bound off.
    # Rejecting leaves an outlier no influence at all; clipping keeps an honest outlier's
    # direction but leaves a hostile one the bound's full length (robustness benchmark).
    norm_ratio: float = 2.0
    norm_action: str = "reject"
    # Claims of more examples than this are rejected outright, whatever the reference:
    # the total weight of a round can then never overflow.
    max_examples: int = 1_000_000_000
    # A round without a previous round's reference (a run's first) takes its reference
    # from the first this-many valid replies in sample order, holding later replies
    # until those have settled: order-independent, and memory for this many updates.
    reference_clients: int = 16

    def __post_init__(self) -> None:
        check_range(self.SECTION, "weight_ratio", self.weight_ratio, 0.0, 1e6)
        if 0.0 < self.weight_ratio < 1.0:
            raise ConfigError("bounds.weight_ratio must be 0 (off) or at least 1")
        check_range(self.SECTION, "norm_ratio", self.norm_ratio, 0.0, 1e6)
        check_choice(self.SECTION, "norm_action", self.norm_action, NORM_ACTIONS)
        check_range(self.SECTION, "max_examples", self.max_examples, 1, 10**12)
        check_range(self.SECTION, "reference_clients", self.reference_clients, 1, 100_000)


SEAL_MODES = ("auto", "on", "off")
SECAGG_MODES = ("off", "on")


@dataclass(frozen=True)
class SecurityConfig:
    """Who can read an update: sealing (fedpipe.crypto.seal) hides it from the relay;
    secure aggregation (fedpipe.secagg) hides it from the aggregator too."""

    SECTION: ClassVar[str] = "security"
    # auto: on in deployment (fedpipe-server), off in simulation; on/off force it.
    seal: str = "auto"
    # on: the aggregator learns only the sum of a round's updates (section [secagg]).
    secagg: str = "off"

    def __post_init__(self) -> None:
        check_choice(self.SECTION, "seal", self.seal, SEAL_MODES)
        check_choice(self.SECTION, "secagg", self.secagg, SECAGG_MODES)

    def sealed(self, deployed: bool) -> bool:
        return self.seal == "on" or (self.seal == "auto" and deployed)


@dataclass(frozen=True)
class SecAggConfig:
    """Secure aggregation of quantized updates (fedpipe.secagg), when security.secagg=on."""

    SECTION: ClassVar[str] = "secagg"
    # Bits per coordinate of each device's quantized update; the masked sum then takes
    # m = bit_length(devices * (2^bits - 1)) bits a coordinate on the wire.
    bits: int = 8
    # Neighbours each device masks with and shares its secrets with (SecAgg+); 0 = every
    # other sampled device (SecAgg). Even, so the graph is regular.
    neighbours: int = 0
    # Shares needed to recover a device's secrets, as a fraction of its neighbours;
    # above 1/2, so an aggregator can never hold enough shares of both kinds.
    threshold: float = 0.6
    # The first round's clipping range [-clip, clip] for a weighted update coordinate;
    # later rounds take clip_ratio x the largest coordinate of the previous round's mean
    # update (never below clip / 16). Error feedback on the device carries what is cut.
    clip: float = 0.15
    clip_ratio: float = 4.0
    # A device refuses a round with fewer sampled devices (a smaller sum reveals more).
    min_devices: int = 3
    # Each key stage (advertise, share, unmask) waits at most this long for replies;
    # the masked-input stage, which trains, has federation.round_timeout.
    stage_timeout: float = 120.0

    def __post_init__(self) -> None:
        check_range(self.SECTION, "bits", self.bits, 1, 16)
        check_range(self.SECTION, "neighbours", self.neighbours, 0, 100_000)
        if self.neighbours % 2 or self.neighbours == 1:
            raise ConfigError(
                f"secagg.neighbours={self.neighbours} must be 0 (all) or even and >= 2"
            )
        check_range(self.SECTION, "threshold", self.threshold, 0.5, 1.0, lo_open=True)
        check_range(self.SECTION, "clip", self.clip, 0.0, 1e6, lo_open=True)
        check_range(self.SECTION, "clip_ratio", self.clip_ratio, 0.0, 1e6, lo_open=True)
        check_range(self.SECTION, "min_devices", self.min_devices, 2, 65_536)
        check_range(self.SECTION, "stage_timeout", self.stage_timeout, 0.0, 86_400.0, lo_open=True)


@dataclass(frozen=True)
class SimulationConfig:
    """Virtual clients run by cohort workers (fedpipe.sim) on Ray, locally or on a cluster.

    A worker runs the ClientApp for one client after another and keeps its clients'
    state; clients are never processes or Ray tasks of their own.
    """

    SECTION: ClassVar[str] = "simulation"
    # Resources of one worker, which trains one client at a time: 2 cores / 1.0 = two
    # workers. GPU shares let several workers use one GPU (0.5 = two per GPU).
    cpus_per_client: float = 1.0
    gpus_per_client: float = 0.0
    # Workers to start; 0 = as many as the cluster's resources allow (never more than
    # there are clients).
    workers: int = 0
    # Clients a worker runs per call: larger amortizes the call, smaller streams replies
    # sooner (server memory holds about 2 x workers x cohort_size replies at most).
    cohort_size: int = 16
    # "ray": workers are Ray actors; "inprocess": one worker inside the driver (no Ray:
    # for a debugger, a machine without Ray, or a quick test).
    backend: str = "ray"
    # An existing Ray cluster ("auto" or "HOST:6379"; `ray start --head` on one machine,
    # `ray start --address=HOST:6379` on the others); empty starts a local Ray.
    ray_address: str = ""
    # Fault injection for resilience tests: these client ids raise during training.
    fail_clients: tuple[int, ...] = ()
    # Attack simulation (fedpipe.attacks): what the attacking clients do, and who they
    # are: explicit ids, or a fraction of all clients drawn with the run's seed.
    attack: str = "none"
    attackers: tuple[int, ...] = ()
    attacker_fraction: float = 0.0
    # Strength: sign_flip sends -scale x the update, scale and model_replacement scale x,
    # noise has scale x the update's RMS, inflate claims scale^3 x its examples.
    attack_scale: float = 10.0

    def __post_init__(self) -> None:
        check_range(
            self.SECTION, "cpus_per_client", self.cpus_per_client, 0.0, 1024.0, lo_open=True
        )
        check_range(self.SECTION, "gpus_per_client", self.gpus_per_client, 0.0, 64.0)
        check_range(self.SECTION, "workers", self.workers, 0, 100_000)
        check_range(self.SECTION, "cohort_size", self.cohort_size, 1, 100_000)
        check_choice(self.SECTION, "backend", self.backend, SIM_BACKENDS)
        for cid in self.fail_clients:
            check_range(self.SECTION, "fail_clients[]", cid, 0)
        check_choice(self.SECTION, "attack", self.attack, ATTACKS)
        check_range(self.SECTION, "attacker_fraction", self.attacker_fraction, 0.0, 1.0)
        check_range(self.SECTION, "attack_scale", self.attack_scale, 0.0, 1e6, lo_open=True)
        if self.attackers and self.attacker_fraction:
            raise ConfigError("give simulation.attackers (ids) or attacker_fraction, not both")
        if self.attack != "none" and not (self.attackers or self.attacker_fraction):
            raise ConfigError(
                f"simulation.attack={self.attack!r} needs simulation.attackers (ids) "
                "or simulation.attacker_fraction"
            )


@dataclass(frozen=True)
class ExportConfig:
    """`fedpipe export`: the compressed artifacts beside float32 and int8."""

    SECTION: ClassVar[str] = "export"
    # Global magnitude pruning: the fraction of conv/linear weights set to zero (0: skip).
    # MNIST CNN (5 rounds, test accuracy 0.9901): 0.7 + int8 is 10.5x smaller than
    # float32 as stored (0.64 MB, LZMA) at the same accuracy; 0.9 + int8 24.1x, -0.1 pt.
    prune_amount: float = 0.7
    # Structured pruning: the fraction of each conv layer's output channels (and of
    # each hidden layer's units) removed (0: skip). MNIST CNN: 0.25 keeps accuracy,
    # 0.5 costs 0.15 pt and gives float32 2.8x its batch-64 throughput.
    channel_fraction: float = 0.25

    def __post_init__(self) -> None:
        check_range(self.SECTION, "prune_amount", self.prune_amount, 0.0, 0.99)
        check_range(self.SECTION, "channel_fraction", self.channel_fraction, 0.0, 0.9)


@dataclass(frozen=True)
class ReleaseConfig:
    """The bar `fedpipe export` holds a model to before it writes any artifact."""

    SECTION: ClassVar[str] = "release"
    # Centralized test accuracy of the float32 model (0: no bar).
    min_accuracy: float = 0.0
    # Centralized accuracy minus the worst device's accuracy on its own held-out split,
    # in the last round with federated evaluation (1: no bar).
    max_worst_client_drop: float = 1.0

    def __post_init__(self) -> None:
        check_range(self.SECTION, "min_accuracy", self.min_accuracy, 0.0, 1.0)
        check_range(self.SECTION, "max_worst_client_drop", self.max_worst_client_drop, 0.0, 1.0)


@dataclass(frozen=True)
class RunConfig:
    """A whole run: what is trained, on what, how, and where results go."""

    SECTION: ClassVar[str] = ""
    name: str = "run"
    seed: int = 0
    # Each run writes a fresh sub-directory here.
    output_dir: str = "runs"
    # The task module (fedpipe.task): your model, data and training loop, imported from
    # the environment on every device and the coordinator; empty: fedpipe's built-in
    # registry models and datasets ([model], [data]).
    task: str = ""
    data: DataConfig = field(default_factory=DataConfig)
    partition: PartitionConfig = field(default_factory=PartitionConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    federation: FederationConfig = field(default_factory=FederationConfig)
    codec: CodecConfig = field(default_factory=CodecConfig)
    downlink: DownlinkConfig = field(default_factory=DownlinkConfig)
    security: SecurityConfig = field(default_factory=SecurityConfig)
    secagg: SecAggConfig = field(default_factory=SecAggConfig)
    bounds: BoundsConfig = field(default_factory=BoundsConfig)
    simulation: SimulationConfig = field(default_factory=SimulationConfig)
    export: ExportConfig = field(default_factory=ExportConfig)
    release: ReleaseConfig = field(default_factory=ReleaseConfig)

    def __post_init__(self) -> None:
        check_range("", "seed", self.seed, 0, 2**32 - 1)
        if self.task and not all(p.isidentifier() for p in self.task.split(".")):
            raise ConfigError(f"task={self.task!r} must be a module name such as 'mypkg.task'")
        if not self.name or "/" in self.name:
            raise ConfigError(f"name={self.name!r} must be non-empty and contain no '/'")
        last = self.partition.num_clients - 1
        for cid in self.simulation.fail_clients:
            check_range("simulation", "fail_clients[]", cid, 0, last)
        for cid in self.simulation.attackers:
            check_range("simulation", "attackers[]", cid, 0, last)
        if self.security.secagg == "on":
            self._check_secagg()

    def _check_secagg(self) -> None:
        """Secure aggregation decodes only the sum: what needs single updates cannot run."""
        fed = self.federation
        if fed.strategy in BUFFERED_STRATEGIES or fed.aggregation == "buffered":
            raise ConfigError(
                f"security.secagg=on reveals only the sum of updates; federation.strategy="
                f"{fed.strategy!r} / aggregation={fed.aggregation!r} needs each update"
            )
        if self.codec.scheme != "float32":
            raise ConfigError(
                "security.secagg=on quantizes updates itself (secagg.bits); leave "
                f"codec.scheme at 'float32', not {self.codec.scheme!r}"
            )


# --- dict <-> dataclass ------------------------------------------------------------


def _coerce(key: str, value: Any, tp: Any) -> Any:
    """Check `value` against the annotation `tp`, allowing only lossless conversions."""
    origin = typing.get_origin(tp)
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, Mapping):
            raise ConfigError(f"{key} must be a table, got {value!r}")
        return _build(tp, value, key)  # type: ignore[arg-type]
    if origin is tuple:
        (item_tp, _ellipsis) = typing.get_args(tp)
        if not isinstance(value, list | tuple):
            raise ConfigError(f"{key} must be a list, got {value!r}")
        return tuple(_coerce(f"{key}[]", v, item_tp) for v in value)
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{key} must be true or false, got {value!r}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{key} must be an integer, got {value!r}")
        return value
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise ConfigError(f"{key} must be a number, got {value!r}")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"{key} must be a string, got {value!r}")
        return value
    raise TypeError(f"unsupported config annotation {tp!r} for {key}")  # programming error


def _build(cls: type[Any], data: Mapping[str, Any], prefix: str = "") -> Any:
    hints = typing.get_type_hints(cls)
    known = {f.name for f in dataclasses.fields(cls)}
    for key in data:
        if key not in known:
            where = f"{prefix}.{key}" if prefix else key
            raise ConfigError(f"unknown config key {where!r}; allowed keys: {sorted(known)}")
    kwargs = {k: _coerce(f"{prefix}.{k}" if prefix else k, v, hints[k]) for k, v in data.items()}
    return cls(**kwargs)


def config_from_dict(data: Mapping[str, Any]) -> RunConfig:
    """Build and validate a RunConfig; missing keys take their defaults."""
    cfg: RunConfig = _build(RunConfig, data)
    return cfg


def config_to_dict(cfg: Any) -> dict[str, Any]:
    """Plain nested dict (tuples as lists) suitable for TOML or JSON."""

    def plain(v: Any) -> Any:
        return list(v) if isinstance(v, tuple) else v

    out: dict[str, Any] = {}
    for f in dataclasses.fields(cfg):
        v = getattr(cfg, f.name)
        out[f.name] = config_to_dict(v) if dataclasses.is_dataclass(v) else plain(v)
    return out


def config_to_toml(cfg: RunConfig) -> str:
    return tomli_w.dumps(config_to_dict(cfg))


def config_from_toml(text: str) -> RunConfig:
    return config_from_dict(tomllib.loads(text))


# --- overrides ----------------------------------------------------------------------


def parse_value(raw: str) -> Any:
    """Parse an override value as a TOML literal; bare words stay strings."""
    try:
        return tomllib.loads(f"v = {raw}")["v"]
    except tomllib.TOMLDecodeError:
        return raw


def apply_overrides(data: dict[str, Any], overrides: Sequence[str]) -> dict[str, Any]:
    """Apply ``a.b=value`` overrides to a nested dict, keeping sibling keys intact."""
    out = _deep_copy(data)
    for item in overrides:
        key, sep, raw = item.partition("=")
        if not sep or not key:
            raise ConfigError(f"override {item!r} must look like key=value (e.g. train.lr=0.1)")
        node = out
        *parents, leaf = key.strip().split(".")
        for part in parents:
            child = node.setdefault(part, {})
            if not isinstance(child, dict):
                raise ConfigError(f"override {item!r}: {part!r} is a value, not a table")
            node = child
        node[leaf] = parse_value(raw.strip())
    return out


def _deep_copy(data: Mapping[str, Any]) -> dict[str, Any]:
    return {k: _deep_copy(v) if isinstance(v, Mapping) else v for k, v in data.items()}


# What a device may set for itself (its profile, `fedpipe-client` flags); the rest of the
# config is the run's, decided by the coordinator.
DEVICE_KEYS = ("train.device", "train.batch_size", "train.amp", "train.threads")


def with_device_settings(cfg: RunConfig, settings: Mapping[str, Any]) -> RunConfig:
    """`cfg` with a device's own settings applied (validated like any other key)."""
    bad = sorted(set(settings) - set(DEVICE_KEYS))
    if bad:
        raise ConfigError(f"device settings {bad} are not allowed; a device may set {DEVICE_KEYS}")
    data = config_to_dict(cfg)
    for key, value in settings.items():
        section, leaf = key.split(".")
        data[section][leaf] = value
    return config_from_dict(data)


def load_profile(path: str | Path) -> dict[str, Any]:
    """A device profile TOML (tables of DEVICE_KEYS) as flat ``{"train.batch_size": 256}``."""
    p = Path(path)
    try:
        tables = tomllib.loads(p.read_text())
    except FileNotFoundError as exc:
        raise ConfigError(f"device profile {str(p)!r} does not exist") from exc
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"device profile {str(p)!r} is not valid TOML: {exc}") from exc
    flat: dict[str, Any] = {}
    for section, table in tables.items():
        if not isinstance(table, dict):
            raise ConfigError(f"device profile {str(p)!r}: {section!r} must be a table")
        flat.update({f"{section}.{k}": v for k, v in table.items()})
    with_device_settings(RunConfig(), flat)  # fail fast, naming the bad key
    return flat


def load_config(path: str | Path | None = None, overrides: Sequence[str] = ()) -> RunConfig:
    """TOML file (optional) + ``key=value`` overrides -> validated RunConfig."""
    data: dict[str, Any] = {}
    if path is not None:
        p = Path(path)
        if not p.is_file():
            raise ConfigError(f"config file {str(p)!r} does not exist")
        try:
            data = tomllib.loads(p.read_text())
        except tomllib.TOMLDecodeError as exc:
            raise ConfigError(f"config file {str(p)!r} is not valid TOML: {exc}") from exc
    return config_from_dict(apply_overrides(data, overrides))
