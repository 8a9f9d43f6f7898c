"""Update codecs: encode on the device, decode at the aggregator."""

from __future__ import annotations

import numpy as np

from fedpipe.codec._base import (
    Codec,
    Encoded,
    MetaValue,
    PayloadError,
    Update,
    check_update,
    flatten,
    unflatten,
)
from fedpipe.codec._cast import CastCodec
from fedpipe.codec._feedback import encode_with_feedback
from fedpipe.codec._npy import parse_npy, to_npy
from fedpipe.codec._packing import pack_bits, packed_size, unpack_bits
from fedpipe.codec._quantized import SignCodec, UniformCodec
from fedpipe.codec._rotated import RotatedCodec
from fedpipe.codec._sparse import TopKCodec, topk_count
from fedpipe.config import CodecConfig

__all__ = [
    "CastCodec",
    "Codec",
    "Encoded",
    "MetaValue",
    "PayloadError",
    "RotatedCodec",
    "SignCodec",
    "TopKCodec",
    "UniformCodec",
    "Update",
    "build_codec",
    "check_update",
    "encode_with_feedback",
    "flatten",
    "pack_bits",
    "packed_size",
    "parse_npy",
    "to_npy",
    "topk_count",
    "unflatten",
    "unpack_bits",
]


def build_codec(cfg: CodecConfig) -> Codec:
    """The codec named by `cfg.scheme` (config validation guarantees it exists)."""
    if cfg.scheme == "float32":
        return CastCodec(np.float32)
    if cfg.scheme == "float16":
        return CastCodec(np.float16)
    if cfg.scheme == "sign":
        return SignCodec(cfg.chunk_size)
    if cfg.scheme.startswith("hadamard"):
        return RotatedCodec(int(cfg.scheme.removeprefix("hadamard")), cfg.chunk_size)
    if cfg.scheme == "topk":
        return TopKCodec(cfg.topk, cfg.topk_bits, cfg.chunk_size)
    return UniformCodec(int(cfg.scheme.removeprefix("int")), cfg.chunk_size)
