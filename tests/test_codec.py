from __future__ import annotations

import numpy as np
import pytest

from fedpipe.codec import Encoded, Float32Codec, PayloadError, build_codec, check_update
from fedpipe.config import CodecConfig


def test_float32_round_trip_is_exact() -> None:
    rng = np.random.default_rng(0)
    update = {"a": rng.normal(size=(3, 5)).astype(np.float32), "b": np.array(2.5, np.float32)}
    codec = build_codec(CodecConfig())
    decoded = codec.decode(codec.encode(update, rng), like=update)
    assert list(decoded) == ["a", "b"]
    for k in update:
        assert decoded[k].dtype == np.float32 and decoded[k].shape == update[k].shape
        assert np.array_equal(decoded[k], update[k])


def test_float32_rejects_foreign_payloads() -> None:
    like = {"a": np.zeros(2, np.float32)}
    with pytest.raises(PayloadError, match="scheme"):
        Float32Codec().decode(Encoded({"a": np.zeros(2, np.float32)}, {"scheme": "int8"}), like)
    with pytest.raises(PayloadError, match="dtype"):
        Float32Codec().decode(Encoded({"a": np.zeros(2, np.int8)}, {"scheme": "float32"}), like)


@pytest.mark.parametrize(
    ("update", "reason"),
    [
        ({"a": np.zeros(3, np.float32)}, "shape"),
        ({"b": np.zeros(2, np.float32)}, "missing"),
        ({"a": np.array([0.0, np.nan], np.float32)}, "NaN"),
        ({"a": np.array([np.inf, 0.0], np.float32)}, "Inf"),
    ],
)
def test_check_update_rejects(update: dict[str, np.ndarray], reason: str) -> None:
    with pytest.raises(PayloadError, match=reason):
        check_update(update, {"a": np.zeros(2, np.float32)})
