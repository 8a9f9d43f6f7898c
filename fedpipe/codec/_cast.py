"""Cast codecs: each array travels as float32 (identity, plain Flower) or float16."""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np

from fedpipe.codec._base import Encoded, PayloadError, Update, expect_meta

__all__ = ["CastCodec"]


class CastCodec:
    def __init__(self, dtype: type[np.floating]) -> None:
        self.dtype = np.dtype(dtype)
        self.name = self.dtype.name  # "float32" or "float16"

    def encode(self, update: Update, rng: np.random.Generator) -> Encoded:
        del rng  # deterministic; kept for the Codec signature
        # asarray, not ascontiguousarray: the latter turns 0-d buffers into shape (1,).
        arrays = {k: np.asarray(v, dtype=self.dtype, order="C") for k, v in update.items()}
        return Encoded(arrays, {"scheme": self.name})

    def decode(self, encoded: Encoded, like: Mapping[str, np.ndarray]) -> Update:
        expect_meta(encoded, "scheme", self.name)
        for k, v in encoded.arrays.items():
            if v.dtype != self.dtype:
                raise PayloadError(f"{k}: dtype {v.dtype} in a {self.name} payload")
        return {k: v.astype(np.float32) for k, v in encoded.arrays.items()}
