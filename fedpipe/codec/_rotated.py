"""Rotation codecs: a randomized Hadamard rotation, then 1 or 2 bits per coordinate.

After a random rotation the coordinates of any vector look alike (close to Gaussian), so
one scale per chunk fits all of them and a 1-bit sign carries most of the information
(DRIVE, Vargaftik et al. NeurIPS 2021; EDEN, ICML 2022). Per chunk of B = 2^p
coordinates (the update zero-padded to whole chunks):

    y = H D x / sqrt(B)          D: random signs, H: the Walsh-Hadamard matrix
    q = Q(y)                     hadamard1: sign(y) in {-1, 1}; hadamard2: the nearest
                                 of {-3, -1, 1, 3} x 0.498 sigma, sigma = |y| / sqrt(B)
                                 (the best uniform 4-level grid for a Gaussian: 1 % more
                                 error than Lloyd-Max's levels, but integer codes)
    s = |x|^2 / <y, q>           the scale that makes the estimate unbiased (EDEN)
    x' = D (H q) s / sqrt(B)     at the receiver: H / sqrt(B) is its own inverse

The signs D are never sent: they are regenerated from a 63-bit seed the device draws
from its own per-round, per-client generator and sends in the header. Wire cost per
coordinate: bits + 32 / B (1.03 bits for hadamard1 at B = 1024; the last chunk's padding
is sent too, since the rotation spreads every coordinate over its chunk). Error feedback works as
with any codec. The transform is vectorized over all chunks at once (two batched matrix
products, `fwht`).

Decoding is exact and the same on every machine: H q is a transform of small integers,
which float32 holds exactly whatever order BLAS sums in, and the rest is elementwise.
The compressed broadcast (fedpipe.downlink) relies on that: the server and each device
must rebuild the public model bit for bit.
"""

from __future__ import annotations

from collections.abc import Mapping
from functools import lru_cache

import numpy as np
from scipy.linalg import hadamard

from fedpipe.codec._base import (
    Encoded,
    MetaValue,
    PayloadError,
    Update,
    check_header,
    expect_arrays,
    unflatten,
)
from fedpipe.codec._packing import pack_bits, packed_size, unpack_bits
from fedpipe.codec._quantize import num_chunks

__all__ = ["RotatedCodec", "fwht"]

F32, U8 = np.dtype(np.float32), np.dtype(np.uint8)
MAX_SEED = 2**63 - 1
# hadamard2's levels, in units of _STEP_2 x sigma, and the edges between them.
_LEVELS_2 = np.array([-3.0, -1.0, 1.0, 3.0], np.float32)
_EDGES_2 = np.array([-2.0, 0.0, 2.0], np.float32)
_STEP_2 = 0.498  # half the optimal step of a 4-level uniform quantizer for N(0, 1)


@lru_cache(maxsize=16)
def _hadamard(n: int) -> np.ndarray:
    """The n x n Walsh-Hadamard matrix (entries +-1), n a power of two."""
    h: np.ndarray = hadamard(n, dtype=np.float32)
    return h


def _transform(x: np.ndarray) -> np.ndarray:
    """H x for each row of x (k, B), B = 2^p, unnormalized (exact for small integers).

    H_B = H_m (x) H_n with m n = B (Kronecker), so for each row reshaped to an m x n
    matrix X, H_B x is H_m X H_n: two small batched matrix products (BLAS) instead of
    log2(B) butterfly passes over the whole array.
    """
    k, b = x.shape
    p = b.bit_length() - 1
    m, n = 1 << (p // 2), 1 << (p - p // 2)
    rows = np.asarray(x, np.float32).reshape(k, m, n)
    out: np.ndarray = np.matmul(np.matmul(_hadamard(m), rows), _hadamard(n))  # (k, m, n)
    return out.reshape(k, b)


def _inv_sqrt(b: int) -> np.float32:
    return np.float32(1.0 / np.sqrt(b))


def fwht(x: np.ndarray) -> np.ndarray:
    """The orthonormal Walsh-Hadamard transform of each row of x (k, B), B = 2^p; applying
    it twice gives x back."""
    out = _transform(x)
    out *= _inv_sqrt(x.shape[1])
    return out


def _flip(x: np.ndarray, seed: int) -> np.ndarray:
    """D x: the rotation's random signs applied to x (k, B) float32, in place.

    The signs are the bits of the seed's random bytes; flipping a float's sign bit is
    exactly multiplying it by -1, and ten times faster than drawing +-1 floats.
    """
    flips = np.unpackbits(np.frombuffer(np.random.default_rng(seed).bytes(x.size // 8), np.uint8))
    x.reshape(-1).view(np.uint32)[:] ^= flips.astype(np.uint32) << np.uint32(31)
    return x


class RotatedCodec:
    """hadamard1 / hadamard2: see the module docstring."""

    def __init__(self, bits: int, chunk: int) -> None:
        if bits not in (1, 2) or chunk & (chunk - 1) or chunk < 8:
            raise ValueError("bits must be 1 or 2 and the chunk a power of two, at least 8")
        self.bits, self.chunk, self.name = bits, chunk, f"hadamard{bits}"

    def _rows(self, update: Update) -> tuple[np.ndarray, int]:
        """The update as (k, B) rows, zero-padded to whole chunks, and its length."""
        n = sum(int(v.size) for v in update.values())
        padded = np.zeros(num_chunks(n, self.chunk) * self.chunk, np.float32)
        if update:  # straight into the padded buffer: no separate flat copy
            np.concatenate(
                [np.asarray(v, np.float32).ravel() for v in update.values()], out=padded[:n]
            )
        return padded.reshape(-1, self.chunk), n

    def encode(self, update: Update, rng: np.random.Generator) -> Encoded:
        seed = int(rng.integers(0, MAX_SEED))
        x, n = self._rows(update)  # (k, B)
        _flip(x, seed)  # D x: the same norm as x
        norm2 = np.einsum("ij,ij->i", x, x, dtype=np.float64)  # (k,) |x_c|^2
        y = fwht(x)
        if self.bits == 1:
            codes = (y >= 0).astype(np.uint8)
            dot = np.abs(y).sum(axis=1, dtype=np.float64)  # <y, sign(y)>
            unit = np.ones_like(dot)
        else:
            sigma = np.sqrt(np.einsum("ij,ij->i", y, y, dtype=np.float64) / self.chunk)
            unit = _STEP_2 * sigma
            codes = np.digitize(y / np.maximum(unit, 1e-30)[:, None], _EDGES_2).astype(np.uint8)
            dot = np.einsum("ij,ij->i", y, _LEVELS_2[codes], dtype=np.float64) * unit
        # EDEN's scale |x|^2 / <y, q>, in units of the levels sent (0 for an all-zero chunk)
        scale = np.where(dot > 0, norm2 / np.where(dot > 0, dot, 1.0), 0.0) * unit
        arrays = {
            "codes": pack_bits(codes.ravel(), self.bits),  # all k x B: rotation mixes them
            "scale": scale.astype(np.float32),
        }
        meta: dict[str, MetaValue] = {
            "scheme": self.name,
            "chunk": self.chunk,
            "count": n,
            "seed": seed,
        }
        return Encoded(arrays, meta)

    def decode(self, encoded: Encoded, like: Mapping[str, np.ndarray]) -> Update:
        n = check_header(encoded, self.name, self.chunk, like)
        seed = encoded.meta.get("seed")
        if isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed <= MAX_SEED:
            raise PayloadError(f"seed={seed!r:.40} must be an integer in [0, 2^63)")
        k = num_chunks(n, self.chunk)
        size = k * self.chunk
        expect_arrays(encoded, {"codes": (U8, packed_size(size, self.bits)), "scale": (F32, k)})
        codes = unpack_bits(encoded.arrays["codes"], self.bits, size)
        q = 2.0 * codes.astype(np.float32) - 1.0 if self.bits == 1 else _LEVELS_2[codes]
        x = _transform(q.reshape(k, self.chunk))  # exact: integers
        x *= (encoded.arrays["scale"] * _inv_sqrt(self.chunk))[:, None]
        _flip(x, seed)
        return unflatten(x.reshape(-1)[:n], like)
