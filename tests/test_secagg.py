"""Secure aggregation: the parts (Shamir, packing, masks), the protocol's exactness under
dropouts, the statistics of a masked input, and what devices refuse a hostile aggregator."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
from flwr.app import ArrayRecord, ConfigRecord, RecordDict
from hypothesis import given, settings
from hypothesis import strategies as st
from scipy import stats

from fedpipe.config import ConfigError, RunConfig, SecAggConfig
from fedpipe.secagg import device, keys, shamir
from fedpipe.secagg.device import SecAggRefusal
from fedpipe.secagg.graph import degree, neighbour_graph, threshold
from fedpipe.secagg.keys import RoundId
from fedpipe.secagg.quant import (
    dequantize_sum,
    device_estimate,
    modulus_bits,
    pack,
    packed_bytes,
    quantize,
    unpack,
)
from fedpipe.secagg.records import id_array, row_array
from fedpipe.secagg.wire import MASKED, PARAMS, SHARE, TABLE, UNMASK
from tests.secagg_devices import RUN, Devices, run_round

pytestmark = pytest.mark.usefixtures("task_identity")


def _codes(clients: int, count: int, bits: int, seed: int = 0) -> dict[int, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {c: rng.integers(0, 1 << bits, count + 1).astype(np.uint32) for c in range(clients)}


def _plain_sum(codes: dict[int, np.ndarray], keep: set[int]) -> np.ndarray:
    return np.sum([codes[c].astype(np.uint64) for c in sorted(keep)], axis=0)


# -- parts ----------------------------------------------------------------------------


def test_shamir_any_t_shares_recover_and_points_are_checked() -> None:
    secret = int.from_bytes(keys.new_private(), "big")
    xs = [3, 5, 8, 13, 21]
    shares = shamir.split(secret, xs, 3)
    assert all(len(s) == shamir.SHARE_BYTES for s in shares)
    for subset in itertools.combinations(zip(xs, shares, strict=True), 3):
        assert shamir.combine(list(subset), 3) == secret
    # t - 1 shares and any guessed third point give a different secret
    assert shamir.combine([(3, shares[0]), (5, shares[1]), (99, shares[2])], 3) != secret
    with pytest.raises(shamir.ShareError):
        shamir.combine([(3, shares[0]), (3, shares[0]), (5, shares[1])], 3)
    with pytest.raises(shamir.ShareError):
        shamir.combine([(3, shares[0])], 3)
    with pytest.raises(shamir.ShareError):
        shamir.share_from_bytes(b"\xff" * shamir.SHARE_BYTES)  # outside the field
    with pytest.raises(shamir.ShareError):
        shamir.split(shamir.PRIME, xs, 3)


def test_fewer_than_t_shares_say_nothing_about_the_secret() -> None:
    """Two different secrets give identically distributed pairs of shares at t = 3:
    each share of a degree-2 polynomial with uniform coefficients is uniform."""
    firsts = [shamir.share_from_bytes(shamir.split(s, [1, 2, 3], 3)[0]) for s in (0, 1) * 200]
    lows = np.array([f & 0xFF for f in firsts]).reshape(200, 2)
    assert stats.ks_2samp(lows[:, 0], lows[:, 1]).pvalue > 1e-3


@given(
    m=st.integers(1, 32),
    words=st.lists(st.integers(0, 2**32 - 1), min_size=0, max_size=200),
)
def test_pack_round_trips_m_bit_words(m: int, words: list[int]) -> None:
    arr = np.array(words, np.uint32) & np.uint32((1 << m) - 1)
    packed = pack(arr, m)
    assert len(packed) == packed_bytes(len(arr), m)
    assert np.array_equal(unpack(packed, m, len(arr)), arr)


def test_modulus_holds_the_largest_sum() -> None:
    assert modulus_bits(10, 8) == 12  # 10 x 255 = 2550 < 4096
    assert modulus_bits(1, 8) == 8
    for n, bits in [(2, 1), (7, 3), (1000, 16)]:
        assert n * ((1 << bits) - 1) < 1 << modulus_bits(n, bits)


def test_quantized_sum_dequantizes_to_the_weighted_sum() -> None:
    rng = np.random.default_rng(1)
    xs = [rng.normal(0, 0.01, 500).astype(np.float32) for _ in range(4)]
    weights = [1.0, 0.5, 0.25, 1.0]
    codes = [quantize(x, w, 0.05, 8, rng) for x, w in zip(xs, weights, strict=True)]
    values, wsum = dequantize_sum(np.sum(codes, axis=0), 4, 0.05, 8)
    assert wsum == pytest.approx(sum(weights), abs=4 / 255)
    want = sum(w * x for x, w in zip(xs, weights, strict=True))
    assert np.abs(values - want).max() < 4 * 0.1 / 255


def test_error_feedback_carries_what_clipping_cut() -> None:
    """Updates of 0.08 and 0 in turn against a clip of 0.05: without error feedback the
    device's estimates average 0.025 (the excess is lost each time); with it they
    average the true 0.04, and estimates plus the last residual telescope to the sum."""
    rng = np.random.default_rng(2)
    updates = [np.full(64, 0.08 if r % 2 == 0 else 0.0, np.float32) for r in range(40)]
    residual = np.zeros(64, np.float32)
    sent, plain = [], []
    for u in updates:
        x = u + residual
        est = device_estimate(quantize(x, 1.0, 0.05, 8, rng), 1.0, 0.05, 8)
        residual = x - est
        sent.append(est)
        plain.append(device_estimate(quantize(u, 1.0, 0.05, 8, rng), 1.0, 0.05, 8))
    assert np.abs(np.mean(sent, axis=0) - 0.04).max() < 0.002
    assert np.abs(np.mean(plain, axis=0) - 0.025).max() < 0.002
    assert np.allclose(np.sum(sent, axis=0) + residual, np.sum(updates, axis=0), atol=1e-4)


def test_graph_is_symmetric_regular_and_full_at_small_n() -> None:
    ids = list(range(100, 140))
    g = neighbour_graph(ids, 8, seed=3, server_round=2)
    assert all(len(v) == 8 and c not in v for c, v in g.items())
    assert all(c in g[j] for c, v in g.items() for j in v)
    assert neighbour_graph(ids, 8, 3, 2) == g and neighbour_graph(ids, 8, 3, 3) != g
    small = neighbour_graph([1, 2, 3, 4], 8, 0, 1)
    assert small == {c: [o for o in (1, 2, 3, 4) if o != c] for c in (1, 2, 3, 4)}
    assert degree(0, 10) == 9 and threshold(0.6, 0, 10) == 6
    assert threshold(0.5001, 8, 100) == 5  # a strict majority of the neighbours


def test_config_validates_threshold_neighbours_and_what_secagg_cannot_run() -> None:
    with pytest.raises(ConfigError, match="threshold"):
        SecAggConfig(threshold=0.5)
    with pytest.raises(ConfigError, match="neighbours"):
        SecAggConfig(neighbours=5)
    with pytest.raises(ConfigError, match="bits"):
        SecAggConfig(bits=17)
    from fedpipe.config import CodecConfig, FederationConfig, SecurityConfig

    on = SecurityConfig(secagg="on")
    with pytest.raises(ConfigError, match="krum"):
        RunConfig(security=on, federation=FederationConfig(strategy="krum"))
    with pytest.raises(ConfigError, match="codec.scheme"):
        RunConfig(security=on, codec=CodecConfig(scheme="int8"))


# -- the protocol ---------------------------------------------------------------------


@settings(max_examples=25, deadline=None)
@given(
    count=st.integers(1, 300),
    clients=st.integers(3, 12),
    bits=st.integers(1, 16),
    neighbours=st.sampled_from([0, 2, 4, 6]),
    seed=st.integers(0, 2**16),
)
def test_unmasked_sum_equals_the_plain_sum_bit_for_bit(
    count: int, clients: int, bits: int, neighbours: int, seed: int
) -> None:
    cfg = SecAggConfig(bits=bits, neighbours=neighbours, threshold=0.6, stage_timeout=5)
    codes = _codes(clients, count, bits, seed)
    out = run_round(Devices(cfg, codes), count)
    assert out.abandoned is None and out.devices == clients
    assert out.total is not None
    assert np.array_equal(out.total.astype(np.uint64), _plain_sum(codes, set(codes)))
    assert out.modulus == modulus_bits(clients, bits)


@pytest.mark.parametrize(
    ("stage", "answers"),
    [
        (MASKED, False),  # dropped after sharing keys: their mask keys are rebuilt
        (UNMASK, False),  # dropped after sending the masked input: inputs count
        (UNMASK, True),  # during unmasking: their unmask replies are lost
    ],
)
def test_a_third_dropping_out_leaves_the_sum_exact(stage: str, answers: bool) -> None:
    cfg = SecAggConfig(bits=8, threshold=0.6, stage_timeout=0.3)
    codes = _codes(9, 257, 8, seed=4)
    devs = Devices(cfg, codes)
    dropped = {1, 4, 7}
    if answers:
        devs.lose_replies[UNMASK] = dropped
    else:
        devs.drop[stage] = dropped
    out = run_round(devs, 257)
    keep = set(codes) - dropped if stage == MASKED else set(codes)
    assert out.abandoned is None, out.abandoned
    assert out.total is not None
    assert np.array_equal(out.total.astype(np.uint64), _plain_sum(codes, keep))
    assert out.stages["unmask"].replied == (len(codes) - 3 if stage == UNMASK else len(keep))


def test_below_threshold_the_round_is_abandoned() -> None:
    cfg = SecAggConfig(bits=8, threshold=0.6, stage_timeout=0.3)
    codes = _codes(9, 33, 8, seed=5)
    devs = Devices(cfg, codes)
    devs.drop[UNMASK] = {0, 1, 2, 3}  # 5 of 9 left: a survivor's seed has 4 < 5 holders
    out = run_round(devs, 33)
    assert out.total is None and out.abandoned is not None
    assert "needed" in out.abandoned


def test_k_regular_graph_sum_is_exact_with_dropouts_and_costs_k_not_n() -> None:
    cfg = SecAggConfig(bits=8, neighbours=8, threshold=0.6, stage_timeout=0.3)
    codes = _codes(40, 65, 8, seed=6)
    devs = Devices(cfg, codes)
    devs.drop[MASKED] = {3}
    out = run_round(devs, 65)
    assert out.abandoned is None and out.total is not None
    assert np.array_equal(out.total.astype(np.uint64), _plain_sum(codes, set(codes) - {3}))
    # each device sent boxes for its 8 neighbours (168 bytes each with the id), not 39
    per_device = out.stages["share"].bytes_up / 40  # all 40 shared; client 3 dropped later
    assert 8 * 168 < per_device < 8 * 168 + 1500 < 39 * 168


def test_a_bad_share_is_survived_when_spare_shares_came_back() -> None:
    cfg = SecAggConfig(bits=8, threshold=0.6, stage_timeout=0.3)
    codes = _codes(8, 17, 8, seed=7)
    devs = Devices(cfg, codes)
    devs.corrupt_unmask = {2}  # one neighbour reveals garbage shares
    out = run_round(devs, 17)
    assert out.abandoned is None and out.total is not None
    assert np.array_equal(out.total.astype(np.uint64), _plain_sum(codes, set(codes)))


# -- what a masked input reveals ------------------------------------------------------


def _masked_words(update_codes: np.ndarray, devices: int = 5, bits: int = 8) -> np.ndarray:
    """The masked input device 0 sends for these codes, unpacked to words."""
    cfg = SecAggConfig(bits=bits, stage_timeout=0.3)
    codes = {c: update_codes for c in range(devices)}
    devs = Devices(cfg, codes)
    devs.keep_masked = True
    run_round(devs, len(update_codes) - 1)
    m = modulus_bits(devices, bits)
    return unpack(devs.masked[0], m, len(update_codes))


def test_a_masked_input_is_uniform_and_independent_of_the_update() -> None:
    count, m = 40_000, modulus_bits(5, 8)
    zeros = np.zeros(count + 1, np.uint32)
    ramp = (np.arange(count + 1) % 256).astype(np.uint32)
    for update in (zeros, ramp):
        words = _masked_words(update)
        observed = np.bincount(words, minlength=1 << m)
        assert len(observed) == 1 << m
        assert stats.chisquare(observed).pvalue > 1e-4  # uniform over [0, 2^m)
    # independent: the masked word's top bits do not depend on the update's value
    table = np.zeros((4, 16), np.int64)
    np.add.at(table, (ramp // 64, words >> (m - 4)), 1)
    assert stats.chi2_contingency(table).pvalue > 1e-4
    # the same update twice (fresh keys each round) gives unrelated masked inputs
    a, b = _masked_words(ramp), _masked_words(ramp)
    assert abs(np.corrcoef(a.astype(float), b.astype(float))[0, 1]) < 0.03


# -- shares in transit ----------------------------------------------------------------


def test_tampered_replayed_and_misrouted_shares_do_not_open() -> None:
    rid, other = RoundId(RUN, 3), RoundId(RUN, 4)
    a, b, c = (keys.new_private() for _ in range(3))
    k_ab = keys.agree(a, keys.public_of(b), rid, "share")
    assert k_ab == keys.agree(b, keys.public_of(a), rid, "share")  # both ends agree
    box = keys.seal_box(k_ab, b"s" * 132, rid, 2, 10, 11)
    assert keys.open_box(k_ab, box, rid, 2, 10, 11) == b"s" * 132
    tampered = box[:-1] + bytes([box[-1] ^ 1])
    with pytest.raises(keys.ShareBoxError):
        keys.open_box(k_ab, tampered, rid, 2, 10, 11)
    with pytest.raises(keys.ShareBoxError):  # replayed into the next round
        keys.open_box(keys.agree(b, keys.public_of(a), other, "share"), box, other, 2, 10, 11)
    with pytest.raises(keys.ShareBoxError):  # routed to another receiver
        keys.open_box(k_ab, box, rid, 2, 10, 12)
    k_cb = keys.agree(c, keys.public_of(b), rid, "share")
    with pytest.raises(keys.ShareBoxError):  # ... who cannot even derive the key
        keys.open_box(k_cb, box, rid, 2, 10, 11)


def test_devices_count_and_drop_shares_that_do_not_open() -> None:
    cfg = SecAggConfig(bits=8, stage_timeout=0.3)
    codes = _codes(6, 9, 8, seed=8)
    devs = Devices(cfg, codes)
    devs.tamper_boxes_to = {5}  # the relay flips a bit in every box addressed to 5
    out = run_round(devs, 9)
    assert out.shares_rejected == 5  # 5's five neighbours' boxes
    assert devs.state[5]["from"] == []  # none of them kept
    assert out.abandoned is None and out.total is not None  # 5 holds no share: t still met
    assert np.array_equal(out.total.astype(np.uint64), _plain_sum(codes, set(codes)))


# -- a hostile aggregator -------------------------------------------------------------


class HostileAggregator:
    """Drives real device code through the stages with requests an honest aggregator
    would never send."""

    def __init__(self, cfg: SecAggConfig, devices: int = 6) -> None:
        self.cfg, self.rid, self.n = cfg, RoundId(RUN, 1), devices
        self.state = {c: ConfigRecord() for c in range(devices)}
        self.pub: dict[int, ConfigRecord] = {}
        for c in range(devices):
            req = RecordDict({PARAMS: ConfigRecord({"server-round": 1, "devices": devices})})
            out = device.advertise(self.state[c], cfg, self.rid, c, 10, req)
            self.pub[c] = out.config_records[PARAMS]
        self.boxes: dict[int, dict[int, bytes]] = {}

    def share(self, c: int, nbrs: list[int], devices: int | None = None) -> RecordDict:
        table = ArrayRecord(
            {
                "ids": id_array(nbrs),
                "pk-s": row_array([self.pub[j]["pk-s"] for j in nbrs], 32),  # type: ignore[misc]
                "pk-c": row_array([self.pub[j]["pk-c"] for j in nbrs], 32),  # type: ignore[misc]
            }
        )
        params = ConfigRecord({"server-round": 1, "devices": devices or self.n})
        out = device.share_keys(
            self.state[c], self.cfg, self.rid, c, RecordDict({PARAMS: params, TABLE: table})
        )
        ids = out.array_records[TABLE]["ids"].numpy()
        rows = out.array_records[TABLE]["boxes"].numpy()
        self.boxes[c] = {int(j): bytes(r) for j, r in zip(ids, rows, strict=True)}
        return out

    def share_all(self) -> None:
        for c in range(self.n):
            self.share(c, [j for j in range(self.n) if j != c])

    def mask(self, c: int, alive: list[int], bits: int | None = None) -> np.ndarray:
        m = modulus_bits(self.n, bits or self.cfg.bits)
        params = ConfigRecord(
            {
                "server-round": 1,
                "devices": self.n,
                "clip": 0.1,
                "bits": bits or self.cfg.bits,
                "modulus-bits": m,
                "max-weight": 10,
            }
        )
        table = ArrayRecord(
            {"ids": id_array(alive), "boxes": row_array([self.boxes[j][c] for j in alive], 160)}
        )
        req = RecordDict({PARAMS: params, TABLE: table})
        grid = device.round_grid(self.state[c], self.cfg, req)
        device.receive_shares(self.state[c], self.cfg, self.rid, c, req)
        return device.mask_input(self.state[c], self.rid, c, np.zeros(5, np.uint32), grid)

    def unmask(self, c: int, survivors: list[int], dropped: list[int]) -> RecordDict:
        table = ArrayRecord({"survivors": id_array(survivors), "dropped": id_array(dropped)})
        params = ConfigRecord({"server-round": 1, "devices": self.n})
        return device.unmask(
            self.state[c], self.cfg, self.rid, RecordDict({PARAMS: params, TABLE: table})
        )


CFG = SecAggConfig(bits=8, threshold=0.6, min_devices=3)  # 6 devices: k = 5, t = 3


def test_device_refuses_too_few_or_malformed_neighbours() -> None:
    h = HostileAggregator(CFG)
    with pytest.raises(SecAggRefusal, match="neighbours"):
        h.share(0, [1, 2])  # fewer than t
    h = HostileAggregator(CFG)
    with pytest.raises(SecAggRefusal, match="neighbours"):
        h.share(0, [0, 1, 2, 3, 4])  # itself among its neighbours
    h = HostileAggregator(CFG)
    with pytest.raises(SecAggRefusal, match="devices"):
        h.share(0, [1, 2, 3, 4, 5], devices=7)  # more devices than it advertised to
    with pytest.raises(SecAggRefusal, match="min_devices"):
        device.advertise(
            ConfigRecord(),
            CFG,
            RoundId(RUN, 1),
            0,
            10,
            RecordDict({PARAMS: ConfigRecord({"server-round": 1, "devices": 2})}),
        )


def test_device_refuses_to_mask_with_fewer_than_t_or_twice() -> None:
    h = HostileAggregator(CFG)
    h.share_all()
    with pytest.raises(SecAggRefusal, match="threshold"):
        h.mask(0, [1, 2])
    h = HostileAggregator(CFG)
    h.share_all()
    with pytest.raises(SecAggRefusal, match="bits"):
        h.mask(0, [1, 2, 3, 4, 5], bits=4)  # a grid its own config does not give
    h.mask(0, [1, 2, 3, 4, 5])
    with pytest.raises(SecAggRefusal, match="out of order or repeated"):
        h.mask(0, [1, 2, 3, 4, 5])  # two inputs under one mask would leak their difference


def test_device_refuses_short_survivor_lists() -> None:
    h = HostileAggregator(CFG)
    h.share_all()
    h.mask(0, [1, 2, 3, 4, 5])
    with pytest.raises(SecAggRefusal, match="threshold"):
        h.unmask(0, [1], [2, 3, 4, 5])  # "everyone else dropped": asks for 4 key shares


def test_device_never_reveals_both_shares_of_one_neighbour() -> None:
    h = HostileAggregator(CFG)
    h.share_all()
    for c in range(6):
        h.mask(c, [j for j in range(6) if j != c])
    with pytest.raises(SecAggRefusal, match="both"):
        h.unmask(0, [1, 2, 3], [3, 4, 5])  # 3 listed as survivor and dropped
    first = h.unmask(0, [1, 2, 3], [4, 5]).array_records[TABLE]
    assert sorted(first["seed-ids"].numpy()) == [1, 2, 3]
    assert sorted(first["key-ids"].numpy()) == [4, 5]
    assert not {"sk-s", "sk-c", "seed", "seed-sh", "key-sh"} & set(h.state[0])  # forgotten
    with pytest.raises(SecAggRefusal, match="out of order or repeated"):
        h.unmask(0, [4, 5, 1], [2, 3])  # asking again, lists swapped: nothing more
    h2 = HostileAggregator(CFG)
    h2.share_all()
    h2.mask(1, [0, 2, 3, 4, 5])
    with pytest.raises(SecAggRefusal, match="did not mask with"):
        h2.unmask(1, [0, 2, 3, 4, 5, 9], [])


def test_requests_out_of_order_or_for_another_round_are_refused() -> None:
    h = HostileAggregator(CFG)
    with pytest.raises(SecAggRefusal):
        h.unmask(0, [1, 2, 3], [4, 5])  # unmask before anything was masked
    other = RecordDict({PARAMS: ConfigRecord({"server-round": 2, "devices": 6})})
    with pytest.raises(SecAggRefusal):
        device.share_keys(h.state[0], CFG, RoundId(RUN, 2), 0, other)


def test_stage_messages_round_trip_through_flower_records() -> None:
    """The tables are plain Flower records: a share reply survives Flower's serialization
    byte for byte."""
    from flwr.common.serde import recorddict_from_proto, recorddict_to_proto

    h = HostileAggregator(CFG)
    out = h.share(0, [1, 2, 3, 4, 5])
    again = recorddict_from_proto(recorddict_to_proto(out)).array_records[TABLE]
    sent = out.array_records[TABLE]
    assert again["boxes"].numpy().shape == (5, 160)
    for name in ("ids", "boxes"):
        assert np.array_equal(again[name].numpy(), sent[name].numpy())


# -- a hostile device -----------------------------------------------------------------


def _low_order_point() -> bytes:
    return bytes(32)  # the identity: every agreement with it is all zeros


HOSTILE: dict[str, object] = {
    "advertise-low-order-key": (
        "query.secagg_advertise",
        lambda c: c.config_records[PARAMS].__setitem__("pk-s", _low_order_point()),
    ),
    "advertise-other-client": (
        "query.secagg_advertise",
        lambda c: c.config_records[PARAMS].__setitem__("client-id", 99),
    ),
    "share-boxes-for-strangers": (
        SHARE,
        lambda c: c.array_records[TABLE].__setitem__("ids", id_array([90, 91, 92, 93, 94])),
    ),
    "masked-input-short": (
        MASKED,
        lambda c: c.array_records["masked"].__setitem__(
            "y", ArrayRecord({"y": row_array([b"\x00" * 3], 3)})["y"]
        ),
    ),
    "unmask-shares-never-asked-for": (
        UNMASK,
        lambda c: c.array_records[TABLE].__setitem__("key-ids", id_array([1, 2])),
    ),
}


@pytest.mark.parametrize("attack", sorted(HOSTILE))
def test_hostile_replies_are_rejected_and_the_round_goes_on(attack: str) -> None:
    """Client 0 answers one stage with something no honest device sends: the reply is a
    counted rejection, client 0 is treated as dropped, and the others' sum is exact."""
    stage, edit = HOSTILE[attack]  # type: ignore[misc]
    cfg = SecAggConfig(bits=8, threshold=0.6, stage_timeout=0.3)
    codes = _codes(7, 40, 8, seed=9)

    class Hostile(Devices):
        def _answer(self, me: int, kind: str, content: RecordDict) -> RecordDict:
            out = super()._answer(me, kind, content)
            if me == 0 and kind == stage:
                edit(out)
            return out

    devs = Hostile(cfg, codes)
    out = run_round(devs, 40)
    name = {
        v: k
        for k, v in {
            "advertise": "query.secagg_advertise",
            "share": SHARE,
            "masked": MASKED,
            "unmask": UNMASK,
        }.items()
    }[stage]
    assert out.stages[name].rejected == 1
    assert out.abandoned is None and out.total is not None
    keep = set(codes) if stage == UNMASK else set(codes) - {0}
    assert np.array_equal(out.total.astype(np.uint64), _plain_sum(codes, keep))
