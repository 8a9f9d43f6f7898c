"""The aggregator's long-term X25519 key pair and how devices get (and pin) its public key."""

from __future__ import annotations

from pathlib import Path

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey

from fedpipe.crypto.files import read_private_pem, write_private_bytes
from fedpipe.crypto.seal import fingerprint

__all__ = ["KeyMismatch", "load_aggregator_key", "load_public_key", "write_aggregator_keys"]


class KeyMismatch(ValueError):
    """The aggregator public key a device was given is not the one it pinned."""


def write_aggregator_keys(folder: Path, force: bool = False) -> tuple[Path, Path, str]:
    """aggregator.key (0600, stays on the coordinator), aggregator.pub, and the fingerprint."""
    private, public = folder / "aggregator.key", folder / "aggregator.pub"
    if not force and (private.exists() or public.exists()):
        raise FileExistsError(f"{private} or {public} exists; pass --force to replace them")
    key = X25519PrivateKey.generate()
    pem = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    write_private_bytes(private, pem, force)
    public.write_bytes(
        key.public_key().public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
        )
    )
    return private, public, fingerprint(key.public_key())


def load_aggregator_key(path: Path) -> X25519PrivateKey:
    key = serialization.load_pem_private_key(read_private_pem(path), password=None)
    if not isinstance(key, X25519PrivateKey):
        raise ValueError(f"{path} is not an X25519 private key (create one with `fedpipe keys`)")
    return key


def load_public_key(path: Path, pin: str | None = None) -> X25519PublicKey:
    """The aggregator's public key from a file, checked against a pinned fingerprint."""
    try:
        key = serialization.load_pem_public_key(path.read_bytes())
    except (OSError, ValueError) as exc:
        raise ValueError(f"cannot read the aggregator public key {path}: {exc}") from exc
    if not isinstance(key, X25519PublicKey):
        raise ValueError(f"{path} is not an X25519 public key (see `fedpipe keys`)")
    if pin is not None and fingerprint(key) != pin:
        raise KeyMismatch(
            f"aggregator key {path} has fingerprint {fingerprint(key)}, but this device pins "
            f"{pin}: refusing to send updates to an unknown aggregator"
        )
    return key
