"""Names of the records fedpipe puts in Flower messages, and conversions to/from them.

One place for the keys (instead of string literals spread through apps and strategy),
and the measured size of what crosses the wire.
"""

from __future__ import annotations

from functools import lru_cache
from typing import Any

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, MetricRecord, RecordDict
from flwr.supercore.inflatable.inflatable_object import get_all_nested_objects

from fedpipe.codec import Encoded, PayloadError
from fedpipe.config import RunConfig, config_from_toml

__all__ = [
    "ARRAYS",
    "CODEC",
    "CONFIG",
    "ENCODE_SECONDS",
    "EVAL_ACCURACY",
    "EVAL_LOSS",
    "IDENTIFY",
    "IDENTITY",
    "METRICS",
    "NUM_EXAMPLES",
    "PROFILE",
    "PROFILE_EDGES",
    "RUN_CONFIG_KEY",
    "SEAL_REQUIRED",
    "SEAL_SECONDS",
    "SERVER_ROUND",
    "TRAIN_LOSS",
    "TRAIN_SECONDS",
    "UPDATE",
    "config_from_run_config",
    "encode_records",
    "record_int",
    "train_content",
    "wire_bytes",
]

# Keys inside a message's RecordDict.
ARRAYS = "arrays"  # ArrayRecord: global model (server -> client), decoded weights (server)
CONFIG = "config"  # ConfigRecord: per-round instructions from the strategy
UPDATE = "update"  # ArrayRecord: the encoded update (client -> server)
# ConfigRecord: the update's header: the codec metadata needed to decode UPDATE and the
# client's claims (NUM_EXAMPLES, TRAIN_LOSS, CLIENT_ID, TRAIN_SECONDS, ENCODE_SECONDS).
# A seal binds the whole header, so a relay can edit none of it.
CODEC = "codec"
IDENTITY = "identity"  # ConfigRecord: a node's answer to the identify stage (CLIENT_ID)
METRICS = "metrics"  # MetricRecord: evaluation metrics; seal timing of a training reply
# ArrayRecord of an evaluation reply: the device's histograms of its held-out data in
# the bins PROFILE_EDGES gave (fedpipe.drift; counts, never examples).
PROFILE = "profile"
PROFILE_EDGES = "profile-edges"  # CONFIG of an evaluate message: the bins, as JSON
# Message types of fedpipe's stages beyond Flower's default "train"/"evaluate".
IDENTIFY = "query.identify"  # which client a node is: asked once per node
# Keys inside records.
NUM_EXAMPLES = "num-examples"  # Flower strategies weight by this
SERVER_ROUND = "server-round"  # injected by Flower strategies into CONFIG
CLIENT_ID = "client-id"
TRAIN_LOSS = "train_loss"  # the name Flower's strategies average
TRAIN_SECONDS = "train-seconds"  # client's local training time
ENCODE_SECONDS = "encode-seconds"  # client's encode time, up to (not including) sealing
# METRICS of a training reply: the seal's own cost, measured after the seal was made and
# so outside it; telemetry only, never used to aggregate.
SEAL_SECONDS = "seal-seconds"
SEAL_REQUIRED = "seal"  # CONFIG: the aggregator accepts sealed updates only
EVAL_LOSS = "eval_loss"
EVAL_ACCURACY = "eval_accuracy"
# Key in Flower's run config that carries the whole fedpipe config as TOML.
RUN_CONFIG_KEY = "fedpipe-config"


def record_int(record: ConfigRecord, key: str, default: int | None = None) -> int:
    """An integer field of a ConfigRecord, or a PayloadError naming it."""
    value = record.get(key, default)
    if isinstance(value, bool) or not isinstance(value, int):
        raise PayloadError(f"{key}={value!r} must be an integer")
    return value


def encode_records(encoded: Encoded) -> tuple[ArrayRecord, ConfigRecord]:
    # asarray, not ascontiguousarray: the latter turns 0-d buffers into shape (1,).
    arrays = ArrayRecord({k: Array(np.asarray(v, order="C")) for k, v in encoded.arrays.items()})
    return arrays, ConfigRecord(dict(encoded.meta))


def train_content(encoded: Encoded, seal_seconds: float = 0.0) -> RecordDict:
    """A training reply: the (sealed) update, its header with the claims, seal telemetry."""
    arrays, meta = encode_records(encoded)
    return RecordDict(
        {UPDATE: arrays, CODEC: meta, METRICS: MetricRecord({SEAL_SECONDS: seal_seconds})}
    )


def wire_bytes(content: RecordDict) -> int:
    """Serialized size of a RecordDict as Flower 1.42 transfers it (sum of deflated objects).

    Counted without hashing the payload: Flower names every object (each record, each
    array and each of its chunks) by the SHA-256 of its bytes, so measuring by deflating
    the real objects hashed every update again (~1 ms a reply, more than decoding it).
    A deflated object's size depends on its structure, never on the ids' values (64 hex
    characters each), so sizes are measured once per structure on a stand-in with the
    same keys, dtypes, shapes and byte counts, and added up. Flower sends identical
    chunks once; they are counted each time (identical chunks do not occur in updates).
    """
    total = _dict_bytes(tuple((name, type(rec).__name__) for name, rec in content.items()))
    for rec in content.values():
        if isinstance(rec, ArrayRecord):
            total += _array_record_bytes(tuple(rec.keys()))
            for arr in rec.values():
                total += _array_bytes(arr.dtype, tuple(arr.shape), arr.stype, len(arr.data))
        else:
            total += len(rec.deflate())  # config and metric records: small, no children
    return total


_RECORD_TYPES = {
    "ArrayRecord": ArrayRecord,
    "ConfigRecord": ConfigRecord,
    "MetricRecord": MetricRecord,
}


@lru_cache(maxsize=256)
def _dict_bytes(layout: tuple[tuple[str, str], ...]) -> int:
    stand_in = RecordDict({name: _RECORD_TYPES[kind]() for name, kind in layout})
    return len(stand_in.deflate())


@lru_cache(maxsize=256)
def _array_record_bytes(keys: tuple[str, ...]) -> int:
    # Distinct stand-ins: identical arrays would share an id, and the record lists each once.
    arrays = {k: Array(np.full(1, i, np.int64)) for i, k in enumerate(keys)}
    return len(ArrayRecord(arrays).deflate())


@lru_cache(maxsize=4096)
def _array_bytes(dtype: str, shape: tuple[int, ...], stype: str, nbytes: int) -> int:
    """An Array and its chunks, deflated, for distinct (random) bytes of this length."""
    data = np.random.default_rng(nbytes).bytes(nbytes)
    stand_in = Array(dtype=dtype, shape=shape, stype=stype, data=data)
    return sum(len(obj.deflate()) for obj in get_all_nested_objects(stand_in).values())


@lru_cache(maxsize=4)
def _parse(text: str) -> RunConfig:
    return config_from_toml(text)


def config_from_run_config(run_config: dict[str, Any]) -> RunConfig:
    """The fedpipe config that `fedpipe-server` put into Flower's run config."""
    text = run_config.get(RUN_CONFIG_KEY)
    if not isinstance(text, str):
        raise KeyError(f"run config lacks {RUN_CONFIG_KEY!r}; start runs with fedpipe-server")
    return _parse(text)
