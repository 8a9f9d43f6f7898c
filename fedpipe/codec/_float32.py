"""Identity codec: the update travels as float32, as plain Flower would send weights."""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np

from fedpipe.codec._base import Encoded, PayloadError, Update

__all__ = ["Float32Codec"]


class Float32Codec:
    name = "float32"

    def encode(self, update: Update, rng: np.random.Generator) -> Encoded:
        del rng  # deterministic; kept for the Codec signature
        arrays = {k: np.asarray(v, dtype=np.float32, order="C") for k, v in update.items()}
        return Encoded(arrays, {"scheme": self.name})

    def decode(self, encoded: Encoded, like: Mapping[str, np.ndarray]) -> Update:
        scheme = encoded.meta.get("scheme")
        if scheme != self.name:
            raise PayloadError(f"payload scheme {scheme!r} but the server expects {self.name!r}")
        for k, v in encoded.arrays.items():
            if v.dtype != np.float32:
                raise PayloadError(f"{k}: dtype {v.dtype} in a float32 payload")
        return dict(encoded.arrays)
