"""Device keys for Flower's SuperNode authentication (ECDSA P-384, OpenSSH format).

The coordinator registers each device's public key with its SuperLink; a SuperNode
without a registered key is refused before it gets any work. Flower 1.42 reads both
halves in OpenSSH format only.
"""

from __future__ import annotations

from pathlib import Path

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from fedpipe.crypto.files import write_private_bytes

__all__ = ["write_node_key"]


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
