"""`compress`: wrap any Flower Message-API strategy in fedpipe's round engine.

In a ServerApp written the Flower way, replace

    result = FedAvg(fraction_train=0.5).start(grid=grid, initial_arrays=arrays, ...)

with

    strategy = compress(FedAvg(fraction_train=0.5), CodecConfig("int4", error_feedback=True))
    result = strategy.start(grid=grid, initial_arrays=arrays, ...)

and add `fedpipe_mod` to the ClientApp. fedpipe's engine then samples the round (the
strategy's own fractions and minimums, reproducibly from `seed`), announces the codecs
to the devices, decodes and bounds every reply at its boundary, and hands the strategy
the aggregate: the weighted mean for FedAvg and FedAvgM (streamed, O(model) memory),
every update for any other strategy.
"""

from __future__ import annotations

from collections.abc import Callable

from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey
from flwr.serverapp.strategy import FedAvg, FedAvgM, Strategy

from fedpipe.codec import build_codec
from fedpipe.config import BoundsConfig, CodecConfig, DownlinkConfig
from fedpipe.flower.spec import announce
from fedpipe.metrics import RoundRecord
from fedpipe.rounds.engine import RoundPlan
from fedpipe.server_app import make_opener
from fedpipe.strategy import CodecStrategy

__all__ = ["compress"]


def _take_sampling(strategy: Strategy) -> RoundPlan:
    """The strategy's sampling, for the engine; the strategy then configures all the
    nodes the engine shows it (its own sampler would sample the sample again)."""
    fraction_train = float(getattr(strategy, "fraction_train", 1.0))
    fraction_evaluate = float(getattr(strategy, "fraction_evaluate", 0.0))
    min_nodes = max(
        int(getattr(strategy, "min_train_nodes", 1)),
        int(getattr(strategy, "min_available_nodes", 1)),
    )
    for name, value in (
        ("fraction_train", 1.0),
        ("fraction_evaluate", 1.0 if fraction_evaluate > 0 else 0.0),
        ("min_train_nodes", 1),
        ("min_evaluate_nodes", 1 if fraction_evaluate > 0 else 0),
        ("min_available_nodes", 1),
    ):
        if hasattr(strategy, name):
            setattr(strategy, name, value)
    return RoundPlan(fraction_train, fraction_evaluate, max(1, min_nodes))


def compress(  # noqa: PLR0913 - each part has a default
    strategy: Strategy,
    codec: CodecConfig | None = None,
    downlink: DownlinkConfig | None = None,
    bounds: BoundsConfig | None = None,
    seed: int = 0,
    on_round_end: Callable[[RoundRecord], None] | None = None,
    wait_s: float = 300.0,
    seal: tuple[int, X25519PrivateKey] | None = None,
) -> CodecStrategy:
    """`strategy` inside fedpipe's engine (see the module docstring); `on_round_end`
    receives each round's record (bytes and bits per parameter both ways, rejections);
    a round waits at most `wait_s` for the strategy's minimum number of nodes.

    Nodes are sampled by node id, as Flower does: the app's ClientApp need not say
    which client it is (fedpipe's own apps do, so that samples follow client ids).

    `seal` = (the ServerApp context's run_id, the aggregator's private key): only
    updates sealed to it for this run are accepted, and devices without the key are
    told why (their node config needs `aggregator-key`, the public key in hex)."""
    codec = codec or CodecConfig()
    downlink = downlink or DownlinkConfig()
    plan = _take_sampling(strategy)
    return CodecStrategy(
        strategy,
        build_codec(codec),
        on_round_end=on_round_end,
        downlink=downlink,
        bounds=bounds,
        streaming=type(strategy) in (FedAvg, FedAvgM),
        plan=RoundPlan(
            plan.fraction_train,
            plan.fraction_evaluate,
            plan.min_nodes,
            seed=seed,
            wait_s=wait_s,
            identify=False,  # the app's ClientApp answers train and evaluate only
        ),
        announce=announce(codec, downlink),
        opener=make_opener(*seal) if seal is not None else None,
    )
