"""Sealed updates: an encoded update readable by the aggregator alone.

Each payload is sealed to the aggregator's long-term X25519 public key with a fresh
ephemeral key (ECIES in the manner of HPKE base mode): X25519 agreement, HKDF-SHA256 to an
AES-256-GCM key and nonce, one message per key. The associated data binds the run, the
server round, the sending node and the whole update header (the codec description and
the device's claims: examples, loss, client id), so a payload replayed into another
round, node or run, re-labelled with another codec, or re-weighted by a relay, fails
authentication.
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

from fedpipe.codec import Encoded, MetaValue, PayloadError, parse_npy, to_npy

__all__ = [
    "SEALED",
    "SEAL_META",
    "SUITE",
    "Binding",
    "fingerprint",
    "open_sealed",
    "public_bytes",
    "seal",
    "seal_bytes",
]

SUITE = "x25519-hkdf-aesgcm-2"  # X25519, HKDF-SHA256, AES-256-GCM; inner .npy arrays
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
    """Arrays as one byte string: per array, its name and its `.npy` bytes, length-prefixed."""
    out = bytearray()
    for name, array in arrays.items():
        key, npy = name.encode(), to_npy(array)
        out += len(key).to_bytes(2, "little") + key + len(npy).to_bytes(4, "little") + npy
    return bytes(out)


def _unpack(data: bytes) -> dict[str, np.ndarray]:
    """Inverse of `_pack`. Authenticated only as coming from *some* device (every device
    holds the public key), so the plaintext is parsed as hostile: lengths are checked
    before use, arrays go through the strict `.npy` reader, nothing is evaluated."""
    out: dict[str, np.ndarray] = {}
    pos = 0
    while pos < len(data):
        if len(data) - pos < 6:
            raise PayloadError("sealed payload is malformed inside: truncated entry")
        klen = int.from_bytes(data[pos : pos + 2], "little")
        nlen = int.from_bytes(data[pos + 2 + klen : pos + 6 + klen], "little")
        start = pos + 6 + klen
        if start + nlen > len(data):
            raise PayloadError("sealed payload is malformed inside: entry runs past the end")
        try:
            name = data[pos + 2 : pos + 2 + klen].decode("utf-8")
        except UnicodeDecodeError as exc:
            raise PayloadError("sealed payload is malformed inside: bad array name") from exc
        if name in out:
            raise PayloadError(f"sealed payload is malformed inside: {name!r} twice")
        out[name] = parse_npy(data[start : start + nlen], nlen)
        pos = start + nlen
    return out


def seal(encoded: Encoded, recipient: X25519PublicKey, binding: Binding) -> Encoded:
    """Encrypt the encoded arrays to `recipient`; the header stays readable, and bound."""
    return seal_bytes(_pack(encoded.arrays), encoded.meta, recipient, binding)


def seal_bytes(
    plaintext: bytes, meta: Mapping[str, MetaValue], recipient: X25519PublicKey, binding: Binding
) -> Encoded:
    """Seal any plaintext: what `seal` does with packed arrays, and what any device holding
    the public key can do with bytes of its choosing (the aggregator assumes so)."""
    eph = X25519PrivateKey.generate()
    epk, to = public_bytes(eph.public_key()), public_bytes(recipient)
    key, nonce = _keys(eph.exchange(recipient), epk, to)
    header = dict(meta)
    box = AESGCM(key).encrypt(nonce, plaintext, _aad(binding, header, to))
    sealed = np.frombuffer(epk + box, np.uint8)
    return Encoded({SEALED: sealed}, {**header, SEAL_META: SUITE})


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
