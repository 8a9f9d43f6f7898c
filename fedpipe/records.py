"""Names of the records fedpipe puts in Flower messages, and conversions to/from them.

One place for the keys (instead of string literals spread through apps and strategy),
and the measured size of what crosses the wire.
"""

from __future__ import annotations

from functools import lru_cache
from typing import Any

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, RecordDict
from flwr.supercore.inflatable.inflatable_object import get_all_nested_objects

from fedpipe.codec import Encoded, PayloadError
from fedpipe.config import RunConfig, config_from_toml

__all__ = [
    "ARRAYS",
    "CODEC",
    "CONFIG",
    "ENCODE_SECONDS",
    "INFO",
    "METRICS",
    "NUM_EXAMPLES",
    "RUN_CONFIG_KEY",
    "SEAL_REQUIRED",
    "SEAL_SECONDS",
    "SERVER_ROUND",
    "TRAIN_SECONDS",
    "UPDATE",
    "config_from_run_config",
    "decode_records",
    "encode_records",
    "record_int",
    "wire_bytes",
]

# Keys inside a message's RecordDict.
ARRAYS = "arrays"  # ArrayRecord: global model (server -> client), decoded weights (server)
CONFIG = "config"  # ConfigRecord: per-round instructions from the strategy
UPDATE = "update"  # ArrayRecord: the encoded update (client -> server)
CODEC = "codec"  # ConfigRecord: codec metadata needed to decode UPDATE
METRICS = "metrics"  # MetricRecord: train/eval metrics, incl. NUM_EXAMPLES
INFO = "fedpipe"  # ConfigRecord: who sent it (client id)
# Keys inside records.
NUM_EXAMPLES = "num-examples"  # Flower strategies weight by this
SERVER_ROUND = "server-round"  # injected by Flower strategies into CONFIG
CLIENT_ID = "client-id"
TRAIN_SECONDS = "train-seconds"  # client's local training time (METRICS)
ENCODE_SECONDS = "encode-seconds"  # client's encode time (METRICS)
SEAL_SECONDS = "seal-seconds"  # client's sealing time, part of ENCODE_SECONDS (METRICS)
SEAL_REQUIRED = "seal"  # CONFIG: the aggregator accepts sealed updates only
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


def decode_records(content: RecordDict) -> Encoded:
    """Pull the encoded update out of a reply, or say what is missing."""
    if UPDATE not in content.array_records or CODEC not in content.config_records:
        raise PayloadError(f"reply lacks the {UPDATE!r}/{CODEC!r} records of a fedpipe update")
    try:
        arrays = {k: a.numpy() for k, a in content.array_records[UPDATE].items()}
    except Exception as exc:  # a malformed Array (bad dtype/shape/bytes)
        raise PayloadError(f"undecodable array in update: {exc}") from exc
    meta = dict(content.config_records[CODEC])
    return Encoded(arrays, meta)  # type: ignore[arg-type]


def wire_bytes(content: RecordDict) -> int:
    """Serialized size of a RecordDict as Flower 1.42 transfers it (sum of deflated objects)."""
    return sum(len(obj.deflate()) for obj in get_all_nested_objects(content).values())


@lru_cache(maxsize=4)
def _parse(text: str) -> RunConfig:
    return config_from_toml(text)


def config_from_run_config(run_config: dict[str, Any]) -> RunConfig:
    """The fedpipe config that `fedpipe-server` put into Flower's run config."""
    text = run_config.get(RUN_CONFIG_KEY)
    if not isinstance(text, str):
        raise KeyError(f"run config lacks {RUN_CONFIG_KEY!r}; start runs with fedpipe-server")
    return _parse(text)
