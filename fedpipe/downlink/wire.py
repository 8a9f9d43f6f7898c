"""What a compressed broadcast carries, and the arithmetic both sides share.

The server and every device must hold the same public model bit for bit, so the one
step that changes it (`advance`) and the digest that checks it live here, used by both.
Only float arrays go through the codec. Integer buffers (BatchNorm's step counter) are
sent as they are: a few bytes, and a counter that grows by hundreds a round would set
the scale of its whole chunk and swamp the small weight changes sharing it.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping

import numpy as np

__all__ = ["DIFF", "HEADER", "advance", "coded", "diff_names", "digest"]

HEADER = "downlink"  # ConfigRecord: lineage, version, digest, base (-1: the whole model)
DIFF = "downlink-diff-"  # + version (+ suffix): the records of one change of the model


def diff_names(version: int) -> tuple[str, str, str]:
    """The records of the change that made `version`: the coded float arrays
    (ArrayRecord), their codec header (ConfigRecord), the integer buffers' new values
    (ArrayRecord, absent for a model without any)."""
    return f"{DIFF}{version}", f"{DIFF}{version}-meta", f"{DIFF}{version}-exact"


def coded(model: Mapping[str, np.ndarray]) -> list[str]:
    """The arrays whose changes go through the codec: the float ones."""
    return [k for k, v in model.items() if v.dtype.kind == "f"]


def advance(
    public: Mapping[str, np.ndarray],
    step: Mapping[str, np.ndarray],
    exact: Mapping[str, np.ndarray],
) -> dict[str, np.ndarray]:
    """The next public model: float arrays plus their decoded `step`, the others `exact`.

    Elementwise float32 arithmetic only: IEEE rounding makes it the same on the server
    and on every device, so applying the same steps gives the same bits everywhere.
    """
    out: dict[str, np.ndarray] = {}
    for name, p in public.items():
        if name in step:
            s = np.asarray(step[name], np.float32).reshape(p.shape)
            value = p.astype(np.float32, copy=False) + s
        else:
            value = np.asarray(exact[name]).reshape(p.shape)
        # asarray, not ascontiguousarray: the latter turns 0-d buffers into shape (1,)
        out[name] = np.asarray(value, dtype=p.dtype, order="C")
    return out


def digest(model: Mapping[str, np.ndarray]) -> str:
    """BLAKE2b-128 of names, dtypes, shapes and bytes: a device checks what it rebuilt."""
    h = hashlib.blake2b(digest_size=16)
    for name, a in model.items():
        h.update(f"{name}|{a.dtype.str}|{a.shape}|".encode())
        h.update(np.asarray(a, order="C").tobytes())
    return h.hexdigest()
