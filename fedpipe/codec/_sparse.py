"""Top-k sparsification: the k largest coordinates, values quantized, indices Rice-coded.

Top-k drops most of the update each round, so it is biased; with error feedback the
dropped mass is sent later and training converges (Stich et al. 2018). The values use
the same per-chunk uniform stochastic quantizer as int8/int4/int2.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np

from fedpipe.codec._base import (
    Encoded,
    MetaValue,
    PayloadError,
    Update,
    check_header,
    expect_arrays,
    expect_meta,
    flatten,
    unflatten,
)
from fedpipe.codec._packing import pack_bits, packed_size, unpack_bits
from fedpipe.codec._quantize import dequantize_uniform, num_chunks, quantize_uniform
from fedpipe.codec._rice import (
    decode_indices,
    encode_indices,
    max_quotient_bytes,
    remainder_bytes,
    rice_bits,
)

__all__ = ["TopKCodec", "topk_count"]

F32, U8 = np.dtype(np.float32), np.dtype(np.uint8)


def topk_count(count: int, fraction: float) -> int:
    """How many coordinates are kept: at least one of a non-empty update."""
    return min(count, max(1, round(fraction * count))) if count else 0


def top_indices(x: np.ndarray, k: int) -> np.ndarray:
    """Sorted indices of the k entries of largest magnitude (O(n) selection)."""
    if k == len(x):
        return np.arange(len(x))
    return np.sort(np.argpartition(np.abs(x), len(x) - k)[len(x) - k :])


class TopKCodec:
    """Keep a fraction of coordinates; values as `bits`-bit codes with per-chunk scale."""

    name = "topk"

    def __init__(self, fraction: float, bits: int, chunk: int) -> None:
        self.fraction, self.bits, self.chunk = fraction, bits, chunk

    def encode(self, update: Update, rng: np.random.Generator) -> Encoded:
        flat = flatten(update)
        idx = top_indices(flat, topk_count(len(flat), self.fraction))
        codes, lo, step = quantize_uniform(flat[idx], self.bits, self.chunk, rng)
        quotients, remainders = encode_indices(idx, rice_bits(len(flat), len(idx)))
        arrays = {
            "codes": pack_bits(codes, self.bits),
            "lo": lo,
            "step": step,
            "quotients": quotients,
            "remainders": remainders,
        }
        meta: dict[str, MetaValue] = {"scheme": self.name, "chunk": self.chunk}
        meta.update(count=len(flat), bits=self.bits, k=len(idx))
        return Encoded(arrays, meta)

    def decode(self, encoded: Encoded, like: Mapping[str, np.ndarray]) -> Update:
        n = check_header(encoded, self.name, self.chunk, like)
        k = topk_count(n, self.fraction)
        expect_meta(encoded, "bits", self.bits)
        expect_meta(encoded, "k", k)
        b = rice_bits(n, k)
        quotients = encoded.arrays.get("quotients")
        qlen = len(quotients) if quotients is not None and quotients.ndim == 1 else -1
        if not 0 <= qlen <= max_quotient_bytes(n, k, b):
            raise PayloadError(f"quotients: missing, or over {max_quotient_bytes(n, k, b)} bytes")
        c = num_chunks(k, self.chunk)
        expect_arrays(
            encoded,
            {
                "codes": (U8, packed_size(k, self.bits)),
                "lo": (F32, c),
                "step": (F32, c),
                "quotients": (U8, qlen),
                "remainders": (U8, remainder_bytes(k, b)),
            },
        )
        try:
            idx = decode_indices(encoded.arrays["quotients"], encoded.arrays["remainders"], k, b, n)
        except ValueError as exc:
            raise PayloadError(f"indices: {exc}") from exc
        codes = unpack_bits(encoded.arrays["codes"], self.bits, k)
        flat = np.zeros(n, np.float32)
        lo, step = encoded.arrays["lo"], encoded.arrays["step"]
        flat[idx] = dequantize_uniform(codes, lo, step, self.chunk)
        return unflatten(flat, like)
