"""Sealed updates: an encoded update readable by the aggregator alone.

Each payload is sealed to the aggregator's long-term X25519 public key with a fresh
ephemeral key (ECIES in the manner of HPKE base mode): X25519 agreement, HKDF-SHA256 to an
AES-256-GCM key and nonce, one message per key. The associated data binds the run, the
server round, the sending node and the codec description, so a payload replayed into
another round, node or run, or re-labelled with another codec, fails authentication.
Overhead per update: the 32-byte ephemeral public key and the 16-byte tag.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from fedpipe.codec import Encoded, PayloadError

__all__ = [
    "SEALED",
    "SEAL_META",
    "SUITE",
    "Binding",
    "fingerprint",
    "open_sealed",
    "public_bytes",
    "seal",
]

SUITE = "x25519-hkdf-aesgcm-1"  # X25519, HKDF-SHA256, AES-256-GCM; version 1
SEALED = "sealed"  # the one array of a sealed payload
SEAL_META = "seal"  # metadata key naming the suite of a sealed payload
_EPK = 32
_TAG = 16
_INFO = b"fedpipe seal " + SUITE.encode()


@dataclass(frozen=True)
class Binding:
    """What a sealed payload is bound to: the aggregator checks its own values."""

    run_id: int
    server_round: int
    node_id: int


def public_bytes(key: X25519PublicKey) -> bytes:
    return key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)


def fingerprint(key: X25519PublicKey) -> str:
    """SHA256:<hex> of the raw public key: what a device pins."""
    return "SHA256:" + hashlib.sha256(public_bytes(key)).hexdigest()


def _aad(binding: Binding, meta: Mapping[str, object], recipient: bytes) -> bytes:
    header = {
        "suite": SUITE,
        "run": binding.run_id,
        "round": binding.server_round,
        "node": binding.node_id,
        "codec": meta,
        "to": recipient.hex(),
    }
    text = json.dumps(header, sort_keys=True, separators=(",", ":"), default=_hex)
    return text.encode()


def _hex(value: object) -> str:
    if isinstance(value, bytes):
        return value.hex()
    raise TypeError(f"cannot bind {type(value).__name__} in associated data")


def _keys(shared: bytes, epk: bytes, recipient: bytes) -> tuple[bytes, bytes]:
    okm = HKDF(hashes.SHA256(), 44, salt=epk + recipient, info=_INFO).derive(shared)
    return okm[:32], okm[32:]  # AES-256 key, 96-bit nonce (a key is never used twice)


def _pack(arrays: dict[str, np.ndarray]) -> bytes:
    """Arrays as one byte string: a JSON header (name, dtype, shape), then the raw data."""
    header = [[k, a.dtype.str, list(a.shape)] for k, a in arrays.items()]
    head = json.dumps(header, separators=(",", ":")).encode()
    body = b"".join(np.ascontiguousarray(a).tobytes() for a in arrays.values())
    return len(head).to_bytes(4, "little") + head + body


def _unpack(data: bytes) -> dict[str, np.ndarray]:
    """Inverse of `_pack`; authenticated input, but still checked (a bug must not crash)."""
    try:
        n = int.from_bytes(data[:4], "little")
        header = json.loads(data[4 : 4 + n])
        out, pos = {}, 4 + n
        for name, dtype, shape in header:
            dt = np.dtype(dtype)
            size = dt.itemsize * int(np.prod(shape, dtype=np.int64))
            if pos + size > len(data):
                raise ValueError("array data runs past the payload")
            out[str(name)] = np.frombuffer(data, dt, int(np.prod(shape)), pos).reshape(shape)
            pos += size
        if pos != len(data):
            raise ValueError(f"{len(data) - pos} trailing bytes")
        return out
    except (ValueError, TypeError, json.JSONDecodeError) as exc:
        raise PayloadError(f"sealed payload is malformed inside: {exc}") from exc


def seal(encoded: Encoded, recipient: X25519PublicKey, binding: Binding) -> Encoded:
    """Encrypt the encoded arrays to `recipient`; the codec metadata stays readable."""
    eph = X25519PrivateKey.generate()
    epk, to = public_bytes(eph.public_key()), public_bytes(recipient)
    key, nonce = _keys(eph.exchange(recipient), epk, to)
    meta = dict(encoded.meta)
    box = AESGCM(key).encrypt(nonce, _pack(encoded.arrays), _aad(binding, meta, to))
    sealed = np.frombuffer(epk + box, np.uint8)
    return Encoded({SEALED: sealed}, {**meta, SEAL_META: SUITE})


def open_sealed(encoded: Encoded, private: X25519PrivateKey, binding: Binding) -> Encoded:
    """The inner payload, or PayloadError: tampered, truncated, wrong key or wrong binding."""
    meta = dict(encoded.meta)
    if meta.pop(SEAL_META, None) != SUITE:
        raise PayloadError(f"payload is not sealed with {SUITE}; this aggregator requires it")
    if set(encoded.arrays) != {SEALED}:
        raise PayloadError(f"sealed payload must hold exactly the array {SEALED!r}")
    blob = encoded.arrays[SEALED]
    if blob.dtype != np.uint8 or blob.ndim != 1 or len(blob) < _EPK + _TAG:
        raise PayloadError(f"sealed payload truncated or malformed ({blob.dtype}{blob.shape})")
    data = blob.tobytes()
    to = public_bytes(private.public_key())
    try:
        epk = X25519PublicKey.from_public_bytes(data[:_EPK])
        key, nonce = _keys(private.exchange(epk), data[:_EPK], to)
        plain = AESGCM(key).decrypt(nonce, data[_EPK:], _aad(binding, meta, to))
    except (InvalidTag, ValueError) as exc:
        raise PayloadError(
            "sealed payload failed authentication (tampered, truncated, another key, or "
            f"replayed from another run/round/node: expected {binding})"
        ) from exc
    return Encoded(_unpack(plain), meta)
