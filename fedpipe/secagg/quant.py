"""Quantizing an update for secure aggregation: one server-fixed grid for every device.

Under masking the aggregator only ever decodes the *sum*, so every device must put its
update on the same grid: the aggregator fixes a clipping range [-c, c] and `bits` per
round. A device scales its update by its weight share w = min(examples, W)/W (W the
round's weight cap, also fixed by the aggregator), clips to the range and rounds
stochastically to an integer code in [0, L], L = 2^bits - 1 (unbiased inside the range;
error feedback on the device carries what clipping and rounding lost). One more code
carries w itself. The sum of n devices' codes is below n*L + 1, so it is exact modulo
2^m with m = bit_length(n*L): masks are added modulo 2^m and the aggregator recovers the
exact integer sum, then sum(values) = sum(codes) * 2c/L - n*c and sum(w) = code_w / L.

Codes of m bits are bit-packed on the wire (12 bits a parameter for 8-bit codes and
10 devices, against Flower's 64).
"""

from __future__ import annotations

import numpy as np

__all__ = [
    "MAX_MODULUS_BITS",
    "dequantize_sum",
    "device_estimate",
    "modulus_bits",
    "pack",
    "packed_bytes",
    "quantize",
    "unpack",
]

MAX_MODULUS_BITS = 32  # codes and masks are uint32 words, summed with wrap-around


def modulus_bits(devices: int, bits: int) -> int:
    """The smallest m such that the sum of `devices` codes of `bits` bits fits in [0, 2^m)."""
    m = max(1, devices) * ((1 << bits) - 1)
    return max(1, m.bit_length())


def quantize(
    update: np.ndarray, weight: float, clip: float, bits: int, rng: np.random.Generator
) -> np.ndarray:
    """update (count,) float32, weight in [0, 1] -> codes (count + 1,) uint32 in [0, L]."""
    levels = (1 << bits) - 1
    v = np.clip(np.asarray(update, np.float64) * weight, -clip, clip)  # (count,)
    scaled = np.append((v + clip) * (levels / (2 * clip)), weight * levels)  # (count + 1,)
    codes = np.floor(scaled + rng.random(scaled.shape))
    return np.clip(codes, 0, levels).astype(np.uint32)


def device_estimate(codes: np.ndarray, weight: float, clip: float, bits: int) -> np.ndarray:
    """What the aggregator's mean will take from this device, per unit weight: the
    update as quantized (float32, (count,)). Error feedback keeps update - this."""
    if weight <= 0:
        return np.zeros(len(codes) - 1, np.float32)
    levels = (1 << bits) - 1
    values = codes[:-1].astype(np.float64) * (2 * clip / levels) - clip
    return (values / weight).astype(np.float32)


def dequantize_sum(
    total: np.ndarray, devices: int, clip: float, bits: int
) -> tuple[np.ndarray, float]:
    """The exact code sum of `devices` devices -> (sum of weighted values (count,)
    float64, sum of weights)."""
    levels = (1 << bits) - 1
    values = total[:-1].astype(np.float64) * (2 * clip / levels) - devices * clip
    return values, float(total[-1]) / levels


def packed_bytes(count: int, m: int) -> int:
    return -(-count * m // 8)


def pack(words: np.ndarray, m: int) -> np.ndarray:
    """uint32 words (each < 2^m) -> their low m bits back to back, little-endian, uint8."""
    bits = np.unpackbits(
        words.astype("<u4").view(np.uint8).reshape(-1, 4), axis=1, bitorder="little"
    )
    return np.packbits(bits[:, :m].ravel(), bitorder="little")


def unpack(packed: np.ndarray, m: int, count: int) -> np.ndarray:
    """Inverse of `pack`; the length must be exactly `packed_bytes(count, m)`."""
    if packed.dtype != np.uint8 or packed.ndim != 1 or len(packed) != packed_bytes(count, m):
        raise ValueError(
            f"{count} words of {m} bits need {packed_bytes(count, m)} bytes, got "
            f"{packed.dtype}{list(packed.shape)}"
        )
    bits = np.unpackbits(packed, bitorder="little", count=count * m).reshape(count, m)
    full = np.zeros((count, 32), np.uint8)
    full[:, :m] = bits
    return np.packbits(full, axis=1, bitorder="little").view("<u4").ravel().astype(np.uint32)
