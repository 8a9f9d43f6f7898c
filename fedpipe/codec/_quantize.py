"""Quantizers: pure functions over a flat float32 vector, split into fixed-size chunks.

Each chunk has its own scale, so one large weight does not flatten the resolution of
every other coordinate. Rounding is stochastic (floor(v + u), u ~ U[0, 1)) so the
dequantized value is an unbiased estimate of the input; the RNG is always passed in.
"""

from __future__ import annotations

import numpy as np

__all__ = [
    "dequantize_sign",
    "dequantize_uniform",
    "num_chunks",
    "quantize_sign",
    "quantize_uniform",
]


def num_chunks(count: int, chunk: int) -> int:
    return -(-count // chunk)


def _chunks(x: np.ndarray, chunk: int, mode: str) -> np.ndarray:
    """(count,) -> (num_chunks, chunk); the tail is padded by `mode` ("edge" or zeros)."""
    pad = num_chunks(len(x), chunk) * chunk - len(x)
    if pad and len(x):
        x = np.pad(x, (0, pad), mode="edge" if mode == "edge" else "constant")
    return x.reshape(-1, chunk)


def quantize_uniform(
    x: np.ndarray, bits: int, chunk: int, rng: np.random.Generator
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """x (count,) -> codes (count,) uint8 in [0, 2**bits - 1], per-chunk lo and step.

    Edge padding keeps the tail chunk's min and max those of its real values.
    """
    levels = (1 << bits) - 1
    c = _chunks(np.asarray(x, np.float32), chunk, "edge")  # (k, chunk)
    lo, hi = c.min(axis=1), c.max(axis=1)  # (k,); an empty input gives k = 0
    step = ((hi - lo) / levels).astype(np.float32)
    safe = np.where(step > 0, step, 1.0)[:, None]
    v = (c - lo[:, None]) / safe  # (k, chunk) in [0, levels]
    codes = np.floor(v + rng.random(v.shape, dtype=np.float32))
    codes = np.clip(codes, 0, levels).astype(np.uint8).ravel()[: len(x)]
    return codes, lo.astype(np.float32), step


def dequantize_uniform(
    codes: np.ndarray, lo: np.ndarray, step: np.ndarray, chunk: int
) -> np.ndarray:
    """codes (count,) -> float32 (count,): lo + code * step of each code's chunk."""
    chunk_of = np.arange(len(codes)) // chunk
    out: np.ndarray = lo[chunk_of] + codes.astype(np.float32) * step[chunk_of]
    return out.astype(np.float32)


def quantize_sign(x: np.ndarray, chunk: int) -> tuple[np.ndarray, np.ndarray]:
    """x (count,) -> signs (count,) uint8 (1 = non-negative) and per-chunk mean |x|.

    Scaled sign (Karimireddy et al. 2019): biased on its own, which error feedback corrects.
    """
    x = np.asarray(x, np.float32)
    c = _chunks(np.abs(x), chunk, "zeros")  # zero padding does not add to the sums
    counts = np.minimum(chunk, len(x) - np.arange(len(c)) * chunk)
    scale = (c.sum(axis=1) / np.maximum(counts, 1)).astype(np.float32)
    return (x >= 0).astype(np.uint8), scale


def dequantize_sign(signs: np.ndarray, scale: np.ndarray, chunk: int) -> np.ndarray:
    s = scale[np.arange(len(signs)) // chunk]
    return np.where(signs.astype(bool), s, -s).astype(np.float32)
