"""Update codecs: encode on the device, decode at the aggregator."""

from __future__ import annotations

from fedpipe.codec._base import Codec, Encoded, PayloadError, Update, check_update
from fedpipe.codec._float32 import Float32Codec
from fedpipe.config import CodecConfig

__all__ = [
    "Codec",
    "Encoded",
    "Float32Codec",
    "PayloadError",
    "Update",
    "build_codec",
    "check_update",
]


def build_codec(cfg: CodecConfig) -> Codec:
    """The codec named by `cfg.scheme` (config validation guarantees it exists)."""
    codecs: dict[str, Codec] = {"float32": Float32Codec()}
    return codecs[cfg.scheme]
