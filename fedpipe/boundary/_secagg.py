"""The decode boundary for the SecAgg stages: each reply parsed, bounded, or rejected.

Same rules as every other reply (`_decode`): a reply is hostile, each check bounds the
work of the next, and any failure or exception at all becomes a `Rejection`. What is
checked beyond layout and types: a public key must be a usable X25519 point (a low-order
point would make every neighbour's key agreement fail), a share table must address
exactly the neighbours the aggregator named, once each, and a masked input must be
exactly count x m bits. The claims travel in the clear beside a masked input (num-examples
and the loss reveal what Flower's FedAvg reveals); the update never does.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TypeVar

import numpy as np
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord

from fedpipe.boundary._decode import Claims, Rejection, _last_line, _node
from fedpipe.boundary._records import (
    ReplyLimits,
    Scalar,
    check_layout,
    config_values,
    parse_arrays,
    safe_text,
)
from fedpipe.codec import PayloadError
from fedpipe.records import CODEC, METRICS, wire_bytes
from fedpipe.secagg.quant import packed_bytes, unpack
from fedpipe.secagg.records import ids_of, rows_of
from fedpipe.secagg.shamir import SHARE_BYTES
from fedpipe.secagg.wire import BOX_BYTES, MASKED_INPUT, PARAMS, TABLE

__all__ = [
    "Advertised",
    "MaskedInput",
    "Revealed",
    "decode_advertise",
    "decode_masked",
    "decode_shares",
    "decode_unmask",
]

_SMALL = ReplyLimits(max_array_bytes=0, max_arrays=0)
SHARES_REJECTED = "shares-rejected"  # a masked input's count of shares that did not open

T = TypeVar("T")


@dataclass(frozen=True)
class Advertised:
    client_id: int
    num_examples: int
    pk_s: bytes  # mask-key agreement
    pk_c: bytes  # share-encryption agreement
    commit: bytes  # SHA-256 commitment to the self-mask seed
    wire_bytes: int


@dataclass(frozen=True)
class MaskedInput:
    claims: Claims
    words: np.ndarray  # (count,) uint32, each < 2^m
    shares_rejected: int
    wire_bytes: int
    payload_bytes: int  # the masked words' array as sent (.npy bytes)


@dataclass(frozen=True)
class Revealed:
    seeds: dict[int, bytes]  # survivor client id -> share of its self-mask seed
    keys: dict[int, bytes]  # dropped client id -> share of its mask key
    wire_bytes: int


def _guard(msg: Message, what: str, parse: Callable[[], T]) -> T | Rejection:
    node = _node(msg)
    try:
        if msg.has_error():
            return Rejection(node, f"client error: {_last_line(msg.error.reason)}")
        return parse()
    except PayloadError as exc:
        return Rejection(node, f"bad {what}: {safe_text(str(exc))}")
    except Exception as exc:  # noqa: BLE001 - the boundary is total by design
        return Rejection(node, f"undecodable {what} ({type(exc).__name__})")


def _public_key(value: object, name: str) -> bytes:
    if not isinstance(value, bytes) or len(value) != 32:
        raise PayloadError(f"{name} must be 32 bytes")
    try:  # a low-order point gives an all-zero secret, which `cryptography` refuses
        X25519PrivateKey.generate().exchange(X25519PublicKey.from_public_bytes(value))
    except ValueError as exc:
        raise PayloadError(f"{name} is not a usable X25519 public key") from exc
    return value


def decode_advertise(msg: Message, max_examples: int) -> Advertised | Rejection:
    """Stage 1 reply: the device's two public keys, its seed commitment and its weight."""

    def parse() -> Advertised:
        check_layout(msg.content, {PARAMS: ConfigRecord}, {})
        values = config_values(msg.content.config_records[PARAMS], _SMALL, PARAMS)
        cid, examples = values.get("client-id"), values.get("num-examples")
        for name, v, hi in (
            ("client-id", cid, 2**31 - 1),
            ("num-examples", examples, max_examples),
        ):
            if isinstance(v, bool) or not isinstance(v, int) or not 0 <= v <= hi:
                raise PayloadError(f"{name} must be an integer in [0, {hi}]")
        commit = values.get("commit")
        if not isinstance(commit, bytes) or len(commit) != 32:
            raise PayloadError("commit must be 32 bytes")
        return Advertised(
            int(cid),  # type: ignore[arg-type]
            int(examples),  # type: ignore[arg-type]
            _public_key(values.get("pk-s"), "pk-s"),
            _public_key(values.get("pk-c"), "pk-c"),
            commit,
            wire_bytes(msg.content),
        )

    return _guard(msg, "advertise reply", parse)


def _table(msg: Message, limit: int) -> ArrayRecord:
    check_layout(msg.content, {TABLE: ArrayRecord}, {})
    arrays = msg.content.array_records[TABLE]
    if len(arrays) > 4 or sum(len(a.data) for a in arrays.values()) > limit:
        raise PayloadError(f"share table larger than {limit} bytes")
    return arrays


def decode_shares(
    msg: Message, neighbours: Sequence[int]
) -> tuple[dict[int, bytes], int] | Rejection:
    """Stage 2 reply: one share box per named neighbour, exactly -> (receiver -> box, bytes)."""

    def parse() -> tuple[dict[int, bytes], int]:
        arrays = _table(msg, (BOX_BYTES + 8) * len(neighbours) + 1024)
        ids = ids_of(arrays, "ids", len(neighbours))
        if sorted(ids) != sorted(neighbours):
            raise PayloadError("share boxes must address exactly the device's neighbours, once")
        boxes = rows_of(arrays, "boxes", len(ids), BOX_BYTES)
        return dict(zip(ids, boxes, strict=True)), wire_bytes(msg.content)

    return _guard(msg, "share reply", parse)


def decode_masked(
    msg: Message,
    count: int,
    m: int,
    limits: ReplyLimits,
    claims: Callable[[dict[str, Scalar]], Claims],
) -> MaskedInput | Rejection:
    """Stage 3 reply: count words of m bits, bit-packed, and the device's claims."""

    def parse() -> MaskedInput:
        check_layout(
            msg.content, {MASKED_INPUT: ArrayRecord, CODEC: ConfigRecord}, {METRICS: MetricRecord}
        )
        meta = config_values(msg.content.config_records[CODEC], limits, CODEC)
        arrays = parse_arrays(msg.content.array_records[MASKED_INPUT], limits, MASKED_INPUT)
        packed = arrays.get("y")
        if set(arrays) != {"y"} or packed is None:
            raise PayloadError("a masked input is one array 'y'")
        if packed.dtype != np.uint8 or packed.ndim != 1 or len(packed) != packed_bytes(count, m):
            raise PayloadError(
                f"masked input must be uint8[{packed_bytes(count, m)}] ({count} x {m} bits)"
            )
        rejected = meta.pop(SHARES_REJECTED, 0)
        if isinstance(rejected, bool) or not isinstance(rejected, int) or not 0 <= rejected < 2**20:
            raise PayloadError(f"{SHARES_REJECTED} must be a small integer")
        payload = len(msg.content.array_records[MASKED_INPUT]["y"].data)
        return MaskedInput(
            claims(meta), unpack(packed, m, count), rejected, wire_bytes(msg.content), payload
        )

    return _guard(msg, "masked input", parse)


def decode_unmask(
    msg: Message, survivors: Sequence[int], dropped: Sequence[int]
) -> Revealed | Rejection:
    """Stage 4 reply: seed shares of listed survivors, key shares of listed dropped
    devices, each at most once; anything else is a rejection."""

    def parse() -> Revealed:
        arrays = _table(msg, (SHARE_BYTES + 8) * (len(survivors) + len(dropped)) + 2048)
        seed_ids = ids_of(arrays, "seed-ids", len(survivors))
        key_ids = ids_of(arrays, "key-ids", len(dropped))
        if len(set(seed_ids)) != len(seed_ids) or not set(seed_ids) <= set(survivors):
            raise PayloadError("seed shares for devices not listed as survivors")
        if len(set(key_ids)) != len(key_ids) or not set(key_ids) <= set(dropped):
            raise PayloadError("key shares for devices not listed as dropped")
        seeds = rows_of(arrays, "seed-shares", len(seed_ids), SHARE_BYTES)
        keys = rows_of(arrays, "key-shares", len(key_ids), SHARE_BYTES)
        return Revealed(
            dict(zip(seed_ids, seeds, strict=True)),
            dict(zip(key_ids, keys, strict=True)),
            wire_bytes(msg.content),
        )

    return _guard(msg, "unmask reply", parse)
