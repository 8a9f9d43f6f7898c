from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from fedpipe.codec import (
    CastCodec,
    Codec,
    Encoded,
    PayloadError,
    SignCodec,
    TopKCodec,
    UniformCodec,
    build_codec,
    check_update,
    encode_with_feedback,
    flatten,
    pack_bits,
    packed_size,
    unpack_bits,
)
from fedpipe.codec._rice import decode_indices, encode_indices, rice_bits
from fedpipe.config import CodecConfig, ConfigError


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
        CastCodec(np.float32).decode(
            Encoded({"a": np.zeros(2, np.float32)}, {"scheme": "int8"}), like
        )
    with pytest.raises(PayloadError, match="dtype"):
        CastCodec(np.float32).decode(
            Encoded({"a": np.zeros(2, np.int8)}, {"scheme": "float32"}), like
        )


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


# --- bit packing ------------------------------------------------------------------------


@settings(max_examples=200, deadline=None)
@given(bits=st.sampled_from([1, 2, 4, 8]), count=st.integers(0, 3000), seed=st.integers(0, 999))
def test_bit_packing_round_trips_any_length(bits: int, count: int, seed: int) -> None:
    codes = np.random.default_rng(seed).integers(0, 1 << bits, count).astype(np.uint8)
    packed = pack_bits(codes, bits)
    assert packed.dtype == np.uint8 and len(packed) == packed_size(count, bits)
    assert len(packed) == -(-count * bits // 8)  # really bits/8 bytes per code
    assert np.array_equal(unpack_bits(packed, bits, count), codes)


def test_unpack_rejects_a_wrong_length() -> None:
    with pytest.raises(ValueError, match="expected 2"):
        unpack_bits(np.zeros(3, np.uint8), 4, 4)


# --- quantized codecs -------------------------------------------------------------------

LIKE = {
    "w": np.zeros((37, 29), np.float32),
    "b": np.zeros(29, np.float32),
    "n": np.zeros((), np.float32),
}  # 1103 values: odd length, partial last chunk


def _random_update(seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {k: rng.normal(scale=0.1, size=v.shape).astype(np.float32) for k, v in LIKE.items()}


@pytest.mark.parametrize("bits", [8, 4, 2])
def test_uniform_error_is_below_one_step_per_chunk(bits: int) -> None:
    codec, update = UniformCodec(bits, chunk=64), _random_update()
    enc = codec.encode(update, np.random.default_rng(1))
    dec = codec.decode(enc, LIKE)
    flat_x = np.concatenate([update[k].ravel() for k in LIKE])
    flat_y = np.concatenate([dec[k].ravel() for k in LIKE])
    step = np.repeat(enc.arrays["step"], 64)[: len(flat_x)]
    assert np.all(np.abs(flat_y - flat_x) <= step * (1 + 1e-5) + 1e-7)
    assert all(dec[k].shape == LIKE[k].shape for k in LIKE)


@pytest.mark.parametrize("bits", [4, 2])
def test_stochastic_rounding_is_unbiased(bits: int) -> None:
    # Mean of N independent decodes; rounding noise per coordinate has std <= step / 2,
    # so |mean - x| stays within 6 std / sqrt(N) everywhere (false alarm ~ 1e-9 per value).
    codec, update, draws = UniformCodec(bits, chunk=128), _random_update(), 2000
    rng = np.random.default_rng(7)
    total = {k: np.zeros_like(v) for k, v in LIKE.items()}
    for _ in range(draws):
        dec = codec.decode(codec.encode(update, rng), LIKE)
        for k in total:
            total[k] += dec[k]
    step = codec.encode(update, rng).arrays["step"].max()
    for k in LIKE:
        assert np.all(np.abs(total[k] / draws - update[k]) <= 6 * (step / 2) / np.sqrt(draws))


def test_sign_codec_keeps_signs_and_chunk_mean_magnitude() -> None:
    codec, update = SignCodec(chunk=100), _random_update()
    dec = codec.decode(codec.encode(update, np.random.default_rng(0)), LIKE)
    x = np.concatenate([update[k].ravel() for k in LIKE])
    y = np.concatenate([dec[k].ravel() for k in LIKE])
    assert np.array_equal(y >= 0, x >= 0)
    np.testing.assert_allclose(np.abs(y[:100]), np.abs(x[:100]).mean(), rtol=1e-5)
    np.testing.assert_allclose(np.abs(y[1100:]), np.abs(x[1100:]).mean(), rtol=1e-5)  # tail


def test_encoding_is_deterministic_under_a_seed() -> None:
    codec, update = UniformCodec(4, 64), _random_update()
    a = codec.encode(update, np.random.default_rng(3)).arrays["codes"]
    b = codec.encode(update, np.random.default_rng(3)).arrays["codes"]
    c = codec.encode(update, np.random.default_rng(4)).arrays["codes"]
    assert np.array_equal(a, b) and not np.array_equal(a, c)


@pytest.mark.parametrize(
    ("scheme", "max_bits"),
    [
        ("float32", 32.1),
        ("float16", 16.1),
        ("int8", 8.2),
        ("int4", 4.2),
        ("int2", 2.2),
        ("sign", 1.2),
        ("topk", 0.3),  # 1 % kept: 8-bit value + ~8-bit index each, + record overhead
        ("hadamard1", 1.1),  # 1 bit + one float32 scale per 1,024 coordinates
        ("hadamard2", 2.1),
    ],
)
def test_serialized_payload_shrinks_with_the_scheme(scheme: str, max_bits: float) -> None:
    from flwr.app import RecordDict

    from fedpipe.records import CODEC, UPDATE, encode_records, wire_bytes

    n = 200_000
    like = {"w": np.zeros(n, np.float32)}
    codec = build_codec(CodecConfig(scheme=scheme, chunk_size=1024))
    arrays, meta = encode_records(
        codec.encode({"w": np.ones(n, np.float32)}, np.random.default_rng(0))
    )
    bits_per_param = 8 * wire_bytes(RecordDict({UPDATE: arrays, CODEC: meta})) / n
    assert bits_per_param <= max_bits
    assert len(codec.decode(codec.encode(like, np.random.default_rng(0)), like)["w"]) == n


def _tamper(enc: Encoded, **changes: object) -> Encoded:
    arrays = {**enc.arrays, **{k: v for k, v in changes.items() if isinstance(v, np.ndarray)}}
    meta = {**enc.meta, **{k: v for k, v in changes.items() if not isinstance(v, np.ndarray)}}
    return Encoded(arrays, meta)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("change", "reason"),
    [
        ({"scheme": "int3"}, "scheme"),
        ({"chunk": 32}, "chunk"),
        ({"count": 5}, "count"),
        ({"codes": np.zeros(3, np.uint8)}, "codes"),
        ({"step": np.zeros(2, np.float64)}, "step"),
        ({"step": np.full(18, np.nan, np.float32)}, "NaN"),
        ({"lo": np.full(18, np.inf, np.float32)}, "NaN or Inf"),
    ],
)
def test_bad_quantized_payload_is_rejected(change: dict[str, object], reason: str) -> None:
    codec = UniformCodec(4, 64)
    enc = _tamper(codec.encode(_random_update(), np.random.default_rng(0)), **change)
    with pytest.raises(PayloadError, match=reason):
        check_update(codec.decode(enc, LIKE), LIKE)


def test_nan_sign_scale_is_rejected() -> None:
    codec = SignCodec(64)
    enc = codec.encode(_random_update(), np.random.default_rng(0))
    enc.arrays["scale"][0] = np.nan
    with pytest.raises(PayloadError, match="NaN"):
        check_update(codec.decode(enc, LIKE), LIKE)


# --- top-k sparsification --------------------------------------------------------------


@settings(max_examples=200, deadline=None)
@given(count=st.integers(1, 5000), data=st.data())
def test_rice_index_coding_round_trips(count: int, data: st.DataObject) -> None:
    k = data.draw(st.integers(1, count))
    idx = np.sort(np.random.default_rng(count + k).choice(count, size=k, replace=False))
    b = rice_bits(count, k)
    quotients, remainders = encode_indices(idx, b)
    assert np.array_equal(decode_indices(quotients, remainders, k, b, count), idx)


def test_topk_keeps_the_largest_coordinates_within_one_step() -> None:
    codec, update = TopKCodec(0.1, 8, 32), _random_update()
    enc = codec.encode(update, np.random.default_rng(0))
    x, y = flatten(update), flatten(codec.decode(enc, LIKE))
    kept = np.flatnonzero(y)
    assert enc.meta["k"] == 110 and len(kept) <= 110  # a value may round to exactly 0
    threshold = np.sort(np.abs(x))[-110]
    assert np.all(np.abs(x[kept]) >= threshold)
    assert np.all(np.abs(x[np.abs(x) < threshold]) < threshold)
    assert np.all(np.abs(y - x)[kept] <= enc.arrays["step"].max() * (1 + 1e-5))
    assert np.array_equal(y[np.abs(x) < threshold], np.zeros(np.sum(np.abs(x) < threshold)))


def _topk_payload() -> tuple[TopKCodec, Encoded]:
    codec = TopKCodec(0.1, 4, 64)
    return codec, codec.encode(_random_update(), np.random.default_rng(0))


@pytest.mark.parametrize(
    ("change", "reason"),
    [
        ({"k": 7}, "k=7"),
        ({"bits": 8}, "bits"),
        ({"quotients": np.zeros(0, np.uint8)}, "index stream holds 0"),
        ({"quotients": np.zeros(10_000, np.uint8)}, "quotients"),
        ({"quotients": np.zeros((2, 2), np.uint8)}, "quotients"),
        ({"remainders": np.zeros(3, np.uint8)}, "remainders"),
        ({"codes": np.zeros(7, np.uint8)}, "codes"),
    ],
)
def test_bad_topk_payload_is_rejected(change: dict[str, object], reason: str) -> None:
    codec, enc = _topk_payload()
    with pytest.raises(PayloadError, match=reason):
        codec.decode(_tamper(enc, **change), LIKE)


def test_topk_rejects_indices_out_of_range_and_trailing_bytes() -> None:
    codec, enc = _topk_payload()
    q = enc.arrays["quotients"]
    # A first gap of 275 * 2**b (b = 2 here) within the stream's size bound: the indices
    # run past the end of the 1103-value model.
    bits = np.array([1] * 275 + [0] * 110 + [1] * 7, np.uint8)
    far = np.packbits(bits, bitorder="little")
    with pytest.raises(PayloadError, match="out of range|index"):
        codec.decode(_tamper(enc, quotients=far), LIKE)
    with pytest.raises(PayloadError, match="trailing"):
        codec.decode(_tamper(enc, quotients=np.concatenate([q, [255]]).astype(np.uint8)), LIKE)


# --- error feedback ---------------------------------------------------------------------


def test_error_feedback_residual_arithmetic() -> None:
    # decoded + new residual == update + old residual, exactly what was owed
    codec, update = SignCodec(64), _random_update(0)
    old = _random_update(1)
    enc, new = encode_with_feedback(codec, update, old, np.random.default_rng(0))
    dec = codec.decode(enc, LIKE)
    for k in LIKE:
        np.testing.assert_allclose(dec[k] + new[k], update[k] + old[k], atol=1e-6)


@pytest.mark.parametrize("codec", [SignCodec(64), TopKCodec(0.05, 4, 64)], ids=["sign", "topk"])
def test_error_feedback_makes_decoded_updates_telescope(codec: Codec) -> None:
    # Over T rounds: sum(decoded) == sum(updates) - final residual, so the error in the
    # sum stays bounded by one residual instead of growing with T as without feedback.
    rng, residual = np.random.default_rng(0), None
    owed, got, got_plain = (np.zeros(1103, np.float32) for _ in range(3))
    for t in range(30):
        update = _random_update(100 + t)
        enc, residual = encode_with_feedback(codec, update, residual, rng)
        owed += flatten(update)
        got += flatten(codec.decode(enc, LIKE))
        got_plain += flatten(codec.decode(codec.encode(update, rng), LIKE))
    assert residual is not None
    np.testing.assert_allclose(got + flatten(residual), owed, atol=1e-4)
    assert np.abs(got - owed).mean() < 0.5 * np.abs(got_plain - owed).mean()


# -- rotation codecs ------------------------------------------------------------------


def test_walsh_hadamard_is_orthonormal_and_its_own_inverse() -> None:
    from fedpipe.codec._rotated import fwht

    x = np.random.default_rng(0).normal(size=(5, 64)).astype(np.float32)
    h = fwht(np.eye(64, dtype=np.float32))  # the transform's matrix, row by row
    assert np.allclose(h @ h.T, np.eye(64), atol=1e-5)
    assert np.allclose(fwht(fwht(x)), x, atol=1e-5)
    assert np.allclose(fwht(x), x @ h.T, atol=1e-5)


@pytest.mark.parametrize(("bits", "nmse"), [(1, 0.6), (2, 0.14)])
def test_rotation_codecs_are_unbiased_with_edens_error(bits: int, nmse: float) -> None:
    """Over many draws the decoded update averages to the update (EDEN's scale), and the
    normalized squared error is about EDEN's: 0.57 for 1 bit; 0.135 for 2 bits on the
    uniform levels (Lloyd-Max's would give 0.133)."""
    rng = np.random.default_rng(3)
    update = {
        "conv": rng.normal(0, 0.01, (40, 7)).astype(np.float32),
        "bias": rng.normal(0.02, 0.1, 55).astype(np.float32),  # not a multiple of the chunk
    }
    codec = build_codec(CodecConfig(scheme=f"hadamard{bits}", chunk_size=128))
    x = flatten(update)
    draws = np.array([flatten(codec.decode(codec.encode(update, rng), update)) for _ in range(600)])
    errors = np.sum((draws - x) ** 2, axis=1) / np.sum(x**2)
    assert errors.mean() < nmse
    # the mean of 600 unbiased draws is off by about sqrt(nmse / 600) of |x|
    assert np.linalg.norm(draws.mean(axis=0) - x) / np.linalg.norm(x) < 3 * np.sqrt(nmse / 600)


@pytest.mark.parametrize("bits", [1, 2])
def test_rotation_decoding_is_exact_whatever_order_the_sums_take(bits: int) -> None:
    """The compressed broadcast needs every machine to decode the same bits: the
    transform of the integer codes, done here in exact int64 arithmetic instead of
    float32 BLAS, gives a bit-identical update."""
    from scipy.linalg import hadamard

    from fedpipe.codec._rotated import _LEVELS_2, _flip, _inv_sqrt

    chunk, rng = 256, np.random.default_rng(9)
    update = {"w": rng.normal(0, 0.05, 1000).astype(np.float32)}
    codec = build_codec(CodecConfig(scheme=f"hadamard{bits}", chunk_size=chunk))
    enc = codec.encode(update, rng)
    k = 4
    codes = unpack_bits(enc.arrays["codes"], bits, k * chunk).reshape(k, chunk)
    q = (2 * codes.astype(np.int64) - 1) if bits == 1 else _LEVELS_2[codes].astype(np.int64)
    exact = (q @ hadamard(chunk, dtype=np.int64).T).astype(np.float32)  # H q, row by row
    exact *= (enc.arrays["scale"] * _inv_sqrt(chunk))[:, None]
    _flip(exact, int(enc.meta["seed"]))  # type: ignore[arg-type]
    assert codec.decode(enc, update)["w"].tobytes() == exact.reshape(-1)[:1000].tobytes()


def test_rotation_codec_error_feedback_telescopes() -> None:
    rng = np.random.default_rng(4)
    codec = build_codec(CodecConfig(scheme="hadamard1", chunk_size=64))
    updates = [{"w": rng.normal(0, 0.01, 300).astype(np.float32)} for _ in range(30)]
    residual = None
    sent = np.zeros(300, np.float64)
    for u in updates:
        enc, residual = encode_with_feedback(codec, u, residual, rng)
        sent += codec.decode(enc, u)["w"]
    total = np.sum([u["w"] for u in updates], axis=0)
    assert residual is not None
    assert np.allclose(sent + residual["w"], total, atol=1e-5)
    assert np.linalg.norm(residual["w"]) < 0.5 * np.linalg.norm(total)


def test_rotation_codec_refuses_a_bad_seed_or_size() -> None:
    codec = build_codec(CodecConfig(scheme="hadamard2", chunk_size=64))
    like = {"w": np.zeros(100, np.float32)}
    enc = codec.encode({"w": np.ones(100, np.float32)}, np.random.default_rng(0))
    for bad in (-1, 2**63, "7", True):
        with pytest.raises(PayloadError, match="seed"):
            codec.decode(_tamper(enc, seed=bad), like)
    with pytest.raises(PayloadError, match="codes"):
        codec.decode(_tamper(enc, codes=enc.arrays["codes"][:-1]), like)
    with pytest.raises(ConfigError, match="power of two"):
        CodecConfig(scheme="hadamard1", chunk_size=1000)
