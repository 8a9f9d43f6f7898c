"""Bit packing: store b-bit codes (b in 1, 2, 4, 8) densely, 8 // b codes per byte."""

from __future__ import annotations

import numpy as np

__all__ = ["PACKABLE_BITS", "pack_bits", "packed_size", "unpack_bits"]

PACKABLE_BITS = (1, 2, 4, 8)


def _check_bits(bits: int) -> None:
    if bits not in PACKABLE_BITS:
        raise ValueError(f"bits={bits} not packable; choose one of {PACKABLE_BITS}")


def packed_size(count: int, bits: int) -> int:
    """Bytes needed for `count` codes of `bits` bits each."""
    _check_bits(bits)
    per_byte = 8 // bits
    return -(-count // per_byte)


def pack_bits(codes: np.ndarray, bits: int) -> np.ndarray:
    """uint8 codes (each < 2**bits) -> packed uint8 array of `packed_size` bytes.

    Code j of a byte sits at bit offset bits*j (little-endian within the byte).
    """
    _check_bits(bits)
    codes = np.asarray(codes, dtype=np.uint8).ravel()
    if bits == 8:
        return codes.copy()
    if bits == 1:  # NumPy's own, same layout
        return np.packbits(codes, bitorder="little")
    per_byte = 8 // bits
    padded = np.zeros(packed_size(len(codes), bits) * per_byte, dtype=np.uint8)
    padded[: len(codes)] = codes
    groups = padded.reshape(-1, per_byte)  # (bytes, codes per byte)
    packed = groups[:, 0].copy()
    for j in range(1, per_byte):
        packed |= groups[:, j] << np.uint8(bits * j)
    return packed


def unpack_bits(packed: np.ndarray, bits: int, count: int) -> np.ndarray:
    """Inverse of `pack_bits`: the first `count` codes as uint8."""
    _check_bits(bits)
    packed = np.asarray(packed, dtype=np.uint8).ravel()
    if len(packed) != packed_size(count, bits):
        raise ValueError(
            f"{len(packed)} packed bytes cannot hold exactly {count} {bits}-bit codes "
            f"(expected {packed_size(count, bits)})"
        )
    if bits == 8:
        return packed.copy()
    if bits == 1:
        return np.unpackbits(packed, count=count, bitorder="little")
    per_byte = 8 // bits
    shifts = (np.arange(per_byte, dtype=np.uint8) * bits)[None, :]
    mask = np.uint8((1 << bits) - 1)
    return ((packed[:, None] >> shifts) & mask).ravel()[:count]
