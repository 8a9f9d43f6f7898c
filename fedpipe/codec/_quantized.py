"""Quantized codecs: the whole update as one vector, b-bit codes bit-packed per chunk."""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np

from fedpipe.codec._base import (
    Encoded,
    Update,
    check_header,
    expect_arrays,
    flatten,
    unflatten,
)
from fedpipe.codec._packing import pack_bits, packed_size, unpack_bits
from fedpipe.codec._quantize import (
    dequantize_sign,
    dequantize_uniform,
    num_chunks,
    quantize_sign,
    quantize_uniform,
)

__all__ = ["SignCodec", "UniformCodec"]

F32, U8 = np.dtype(np.float32), np.dtype(np.uint8)


class UniformCodec:
    """int8 / int4 / int2: per-chunk min and step (float32), stochastic rounding."""

    def __init__(self, bits: int, chunk: int) -> None:
        self.bits, self.chunk, self.name = bits, chunk, f"int{bits}"

    def encode(self, update: Update, rng: np.random.Generator) -> Encoded:
        flat = flatten(update)
        codes, lo, step = quantize_uniform(flat, self.bits, self.chunk, rng)
        arrays = {"codes": pack_bits(codes, self.bits), "lo": lo, "step": step}
        return Encoded(arrays, {"scheme": self.name, "chunk": self.chunk, "count": len(flat)})

    def decode(self, encoded: Encoded, like: Mapping[str, np.ndarray]) -> Update:
        n = check_header(encoded, self.name, self.chunk, like)
        k = num_chunks(n, self.chunk)
        expect_arrays(
            encoded, {"codes": (U8, packed_size(n, self.bits)), "lo": (F32, k), "step": (F32, k)}
        )
        codes = unpack_bits(encoded.arrays["codes"], self.bits, n)
        flat = dequantize_uniform(codes, encoded.arrays["lo"], encoded.arrays["step"], self.chunk)
        return unflatten(flat, like)


class SignCodec:
    """1 bit per coordinate plus one float32 scale (mean |x|) per chunk."""

    name = "sign"

    def __init__(self, chunk: int) -> None:
        self.chunk = chunk

    def encode(self, update: Update, rng: np.random.Generator) -> Encoded:
        del rng  # deterministic
        flat = flatten(update)
        signs, scale = quantize_sign(flat, self.chunk)
        arrays = {"codes": pack_bits(signs, 1), "scale": scale}
        return Encoded(arrays, {"scheme": self.name, "chunk": self.chunk, "count": len(flat)})

    def decode(self, encoded: Encoded, like: Mapping[str, np.ndarray]) -> Update:
        n = check_header(encoded, self.name, self.chunk, like)
        expect_arrays(
            encoded, {"codes": (U8, packed_size(n, 1)), "scale": (F32, num_chunks(n, self.chunk))}
        )
        signs = unpack_bits(encoded.arrays["codes"], 1, n)
        return unflatten(dequantize_sign(signs, encoded.arrays["scale"], self.chunk), like)
