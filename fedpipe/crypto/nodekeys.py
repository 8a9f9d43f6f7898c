"""Device keys for Flower's SuperNode authentication (ECDSA P-384, OpenSSH format).

The coordinator registers each device's public key with its SuperLink; a SuperNode
without a registered key is refused before it gets any work. Flower 1.42 reads both
halves in OpenSSH format only.
"""

from __future__ import annotations

from pathlib import Path

from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from fedpipe.crypto.files import read_private_pem, write_private_bytes

__all__ = ["load_node_private_key", "load_node_public_key", "write_node_key"]


def write_node_key(folder: Path, name: str, force: bool = False) -> tuple[Path, Path]:
    """`<name>.key` (private, 0600) and `<name>.pub` (give it to the coordinator)."""
    private, public = folder / f"{name}.key", folder / f"{name}.pub"
    if not force and (private.exists() or public.exists()):
        raise FileExistsError(f"{private} or {public} exists; pass --force to replace them")
    key = ec.generate_private_key(ec.SECP384R1())
    pem = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.OpenSSH,
        serialization.NoEncryption(),
    )
    write_private_bytes(private, pem, force)
    line = key.public_key().public_bytes(
        serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH
    )
    public.write_bytes(line + f" fedpipe-{name}\n".encode())
    return private, public


def load_node_private_key(path: Path) -> ec.EllipticCurvePrivateKey:
    """A device's key as its SuperNode will read it; refuses one other users can read, and
    one Flower would reject (it takes OpenSSH EC keys only) before a SuperNode is started."""
    try:
        key = serialization.load_ssh_private_key(read_private_pem(path), password=None)
    except (ValueError, UnsupportedAlgorithm) as exc:
        raise ValueError(f"{path} is not an OpenSSH private key ({exc})") from exc
    if not isinstance(key, ec.EllipticCurvePrivateKey):
        raise ValueError(f"{path} is not an EC key (Flower's node authentication needs one)")
    return key


def load_node_public_key(path: Path) -> ec.EllipticCurvePublicKey:
    """A device's public key as the SuperLink will register it (OpenSSH, EC)."""
    try:
        key = serialization.load_ssh_public_key(path.read_bytes())
    except (ValueError, UnsupportedAlgorithm) as exc:
        raise ValueError(f"{path} is not an OpenSSH public key ({exc})") from exc
    if not isinstance(key, ec.EllipticCurvePublicKey):
        raise ValueError(f"{path} is not an EC key (Flower's node authentication needs one)")
    return key
