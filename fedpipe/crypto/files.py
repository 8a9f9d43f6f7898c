"""Private key files: written 0600 from the first byte, never world-readable, never logged."""

from __future__ import annotations

import os
import stat
from pathlib import Path

__all__ = ["read_private_pem", "write_private_bytes"]


def write_private_bytes(path: Path, data: bytes, force: bool = False) -> None:
    """Create `path` with mode 0600 (O_EXCL unless `force`), so no other user can read it."""
    path.parent.mkdir(parents=True, exist_ok=True)
    if force and path.exists():
        path.unlink()
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(data)
    os.chmod(path, 0o600)  # O_CREAT's mode is masked by the umask; make sure


def read_private_pem(path: Path) -> bytes:
    """A private key file's bytes; refuses files other users can read (as ssh does)."""
    mode = stat.S_IMODE(path.stat().st_mode)
    if mode & 0o077:
        raise PermissionError(
            f"{path} is readable by other users (mode {mode:o}); run: chmod 600 {path}"
        )
    return path.read_bytes()
