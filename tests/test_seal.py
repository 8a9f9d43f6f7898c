"""Sealed updates: round trip, every rejection, and rounds that go on without the bad ones."""

from __future__ import annotations

import stat
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey
from flwr.app import Array, ArrayRecord, Message, MetricRecord
from flwr.serverapp.strategy import FedAvg
from grids import ReplyGrid

from fedpipe.codec import CastCodec, Encoded, PayloadError, UniformCodec
from fedpipe.crypto.keys import (
    KeyMismatch,
    load_aggregator_key,
    load_public_key,
    write_aggregator_keys,
)
from fedpipe.crypto.seal import (
    SEALED,
    Binding,
    _pack,
    fingerprint,
    open_sealed,
    seal,
    seal_bytes,
)
from fedpipe.metrics import RoundRecord
from fedpipe.records import (
    CLIENT_ID,
    CODEC,
    ENCODE_SECONDS,
    METRICS,
    NUM_EXAMPLES,
    SEAL_SECONDS,
    TRAIN_LOSS,
    TRAIN_SECONDS,
    train_content,
)
from fedpipe.strategy import CodecStrategy

pytestmark = pytest.mark.usefixtures("task_identity")

KEY = X25519PrivateKey.generate()
BIND = Binding(run_id=7, server_round=3, node_id=11)
CODEC_8 = UniformCodec(8, chunk=64)
UPDATE_1 = {"w": np.linspace(-1, 1, 300, dtype=np.float32).reshape(20, 15)}


def _payload() -> Encoded:
    return CODEC_8.encode(UPDATE_1, np.random.default_rng(0))


def test_seal_round_trips_and_adds_48_bytes() -> None:
    enc = _payload()
    sealed = seal(enc, KEY.public_key(), BIND)
    opened = open_sealed(sealed, KEY, BIND)
    assert opened.meta == enc.meta and set(opened.arrays) == set(enc.arrays)
    for name, arr in enc.arrays.items():
        assert opened.arrays[name].dtype == arr.dtype
        np.testing.assert_array_equal(opened.arrays[name], arr)
    # Exactly the packed arrays plus a 32-byte ephemeral key and a 16-byte tag.
    assert len(sealed.arrays[SEALED]) == len(_pack(enc.arrays)) + 48
    assert not np.array_equal(
        seal(enc, KEY.public_key(), BIND).arrays[SEALED], sealed.arrays[SEALED]
    )


def _flip(enc: Encoded, at: int) -> Encoded:
    blob = enc.arrays[SEALED].copy()
    blob[at] ^= 0x01
    return Encoded({SEALED: blob}, dict(enc.meta))


CASES: dict[str, Callable[[Encoded], tuple[Encoded, X25519PrivateKey, Binding]]] = {
    "tampered-ephemeral-key": lambda e: (_flip(e, 3), KEY, BIND),
    "tampered-ciphertext": lambda e: (_flip(e, 100), KEY, BIND),
    "tampered-tag": lambda e: (_flip(e, len(e.arrays[SEALED]) - 1), KEY, BIND),
    "truncated": lambda e: (Encoded({SEALED: e.arrays[SEALED][:-20]}, dict(e.meta)), KEY, BIND),
    "truncated-to-nothing": lambda e: (
        Encoded({SEALED: e.arrays[SEALED][:10]}, dict(e.meta)),
        KEY,
        BIND,
    ),
    "wrong-key": lambda e: (e, X25519PrivateKey.generate(), BIND),
    "earlier-round": lambda e: (e, KEY, Binding(7, 4, 11)),
    "other-node": lambda e: (e, KEY, Binding(7, 3, 12)),
    "other-run": lambda e: (e, KEY, Binding(8, 3, 11)),
    "relabelled-codec": lambda e: (Encoded(e.arrays, {**e.meta, "chunk": 32}), KEY, BIND),
    "not-sealed": lambda e: (_payload(), KEY, BIND),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_open_rejects(case: str) -> None:
    payload, key, binding = CASES[case](seal(_payload(), KEY.public_key(), BIND))
    with pytest.raises(PayloadError):
        open_sealed(payload, key, binding)


def _entry(name: bytes, blob: bytes) -> bytes:
    return len(name).to_bytes(2, "little") + name + len(blob).to_bytes(4, "little") + blob


def _npy(header: str) -> bytes:
    head = (header + " " * (-(len(header) + 11) % 64) + "\n").encode()
    return b"\x93NUMPY\x01\x00" + len(head).to_bytes(2, "little") + head


# Plaintexts any device can seal with the aggregator's public key: authentic, and hostile.
CRAFTED = {
    # the crashes: shapes that overflow, JSON nested past the recursion limit
    "huge-shape": _entry(
        b"w",
        _npy("{'descr': '<f4', 'fortran_order': False, 'shape': (99999999999, 99999999999), }"),
    ),
    "old-format-deep-json": (5000).to_bytes(4, "little") + b"[" * 5000,
    "npz-inside": _entry(b"w", b"PK\x03\x04" + b"\x00" * 40),
    "entry-past-the-end": _entry(b"w", b"")[:-4] + (2**31).to_bytes(4, "little"),
    "name-not-utf8": _entry(b"\xff\xfe", b""),
    "same-name-twice": _pack({"w": np.zeros(2, np.float32)}) * 2,
    "three-stray-bytes": b"abc",
}


@pytest.mark.parametrize("case", sorted(CRAFTED))
def test_crafted_plaintext_inside_a_valid_seal_is_a_payload_error(case: str) -> None:
    sealed = seal_bytes(CRAFTED[case], _payload().meta, KEY.public_key(), BIND)
    with pytest.raises(PayloadError, match="malformed inside|not a|exceeds|archive"):
        open_sealed(sealed, KEY, BIND)


# --- in a round: the strategy drops the bad replies and aggregates the honest ones ---------


GLOBAL = {"w": np.zeros((20, 15), np.float32)}
RUN = 5


def _claimed(enc: Encoded, cid: int, n: int = 1) -> Encoded:
    """The payload with a device's claims in its header, as the ClientApp makes it."""
    claims = {NUM_EXAMPLES: n, TRAIN_LOSS: 0.5, CLIENT_ID: cid}
    claims |= {TRAIN_SECONDS: 1.0, ENCODE_SECONDS: 0.1}
    return Encoded(enc.arrays, {**enc.meta, **claims})


def _reply(msg: Message, enc: Encoded, cid: int) -> Message:
    del cid  # the claims travel inside the (sealed) header
    return Message(train_content(enc), reply_to=msg)


class Grid2(ReplyGrid):
    """Nodes 1 and 2 are honest; node 3 attacks as told; round by round."""

    def __init__(self, attack: str) -> None:
        super().__init__([1, 2, 3])
        self.attack, self.round = attack, 0
        self.kept: Encoded | None = None

    def _honest(self, node: int) -> Encoded:
        return seal(_claimed(_payload(), node), KEY.public_key(), Binding(RUN, self.round, node))

    def exchange(self, messages: list[Message]) -> list[Message]:
        if not messages:
            return []
        self.round += 1
        out = []
        for m in messages:
            node = m.metadata.dst_node_id
            if node != 3:
                out.append(_reply(m, self._honest(node), node))
                continue
            bad = self._bad(m)
            out += bad
        return out

    def _bad(self, m: Message) -> list[Message]:
        own = self._honest(3)
        if self.attack == "replay-earlier-round":
            if self.round == 1:
                self.kept = own
                return [_reply(m, own, 3)]
            return [_reply(m, self.kept, 3)]  # type: ignore[arg-type]
        if self.attack == "replay-other-node":
            return [_reply(m, self._honest(1), 3)]
        if self.attack == "second-reply":
            return [_reply(m, own, 3), _reply(m, own, 3)]
        if self.attack == "wrong-key":
            return [
                _reply(
                    m,
                    seal(
                        _claimed(_payload(), 3),
                        X25519PrivateKey.generate().public_key(),
                        Binding(RUN, self.round, 3),
                    ),
                    3,
                )
            ]
        if self.attack == "tampered":
            return [_reply(m, _flip(own, 40), 3)]
        if self.attack == "relay-raises-claim":  # a genuine sealed reply, re-weighted
            reply = _reply(m, own, 3)
            reply.content.config_records[CODEC][NUM_EXAMPLES] = 10**6
            return [reply]
        if self.attack == "truncated":
            return [_reply(m, Encoded({SEALED: own.arrays[SEALED][:60]}, dict(own.meta)), 3)]
        raise AssertionError(self.attack)


@pytest.mark.parametrize(
    "attack",
    [
        "replay-earlier-round",
        "replay-other-node",
        "second-reply",
        "wrong-key",
        "tampered",
        "truncated",
        "relay-raises-claim",
    ],
)
def test_round_completes_from_honest_clients(attack: str) -> None:
    records: list[RoundRecord] = []
    strategy = CodecStrategy(
        FedAvg(fraction_evaluate=0.0, min_train_nodes=1, min_available_nodes=1),
        CODEC_8,
        on_round_end=records.append,
        opener=lambda enc, rnd, node: open_sealed(enc, KEY, Binding(RUN, rnd, node)),
    )
    result = strategy.start(
        Grid2(attack),  # type: ignore[arg-type]
        ArrayRecord({k: Array(v) for k, v in GLOBAL.items()}),
        num_rounds=2,
        evaluate_fn=lambda rnd, arrays: MetricRecord({"accuracy": 0.5, "loss": 1.0}),
    )
    last = records[-1]
    if attack == "replay-earlier-round":  # round 1 was honest; round 2 is the replay
        assert (records[0].clients_replied, records[0].clients_failed) == (3, 0)
    if attack == "second-reply":  # one message, one answer: the second is never handed on
        assert (last.clients_replied, last.clients_failed) == (3, 0)
    else:
        assert (last.clients_replied, last.clients_failed) == (2, 1)
    assert last.clients_sampled == 3
    # The honest updates arrived: after two rounds, global = 2 * the decoded update.
    expected = 2 * CODEC_8.decode(_payload(), GLOBAL)["w"]
    np.testing.assert_allclose(result.arrays["w"].numpy(), expected, atol=1e-6)


def test_relay_edits_outside_the_seal_change_nothing() -> None:
    """The weight a strategy uses comes from the sealed header only: a relay that adds
    or raises numbers in the reply's other records cannot re-weight the round."""
    float32 = CastCodec(np.float32)

    class RelayGrid(Grid2):
        def exchange(self, messages: list[Message]) -> list[Message]:
            out = []
            for m in messages:
                node = m.metadata.dst_node_id
                update = {"w": np.full((20, 15), float(node), np.float32)}
                enc = float32.encode(update, np.random.default_rng(0))
                enc = seal(_claimed(enc, node, n=node), KEY.public_key(), Binding(RUN, 1, node))
                reply = _reply(m, enc, node)
                metrics = reply.content.metric_records[METRICS]
                metrics[NUM_EXAMPLES] = 10**6 if node == 3 else 1  # not the claim: ignored
                metrics[SEAL_SECONDS] = 0.0
                out.append(reply)
            return out

    records: list[RoundRecord] = []
    strategy = CodecStrategy(
        FedAvg(fraction_evaluate=0.0, min_train_nodes=1, min_available_nodes=1),
        float32,
        on_round_end=records.append,
        opener=lambda enc, rnd, node: open_sealed(enc, KEY, Binding(RUN, rnd, node)),
    )
    result = strategy.start(
        RelayGrid("none"),  # type: ignore[arg-type]
        ArrayRecord({k: Array(v) for k, v in GLOBAL.items()}),
        num_rounds=1,
        evaluate_fn=lambda rnd, arrays: MetricRecord({"accuracy": 0.5, "loss": 1.0}),
    )
    assert (records[0].clients_replied, records[0].clients_failed) == (3, 0)
    # Node n sealed the update n with the claim n: the sealed weights give (1+4+9)/6.
    np.testing.assert_allclose(result.arrays["w"].numpy(), 14 / 6, rtol=1e-6)


# --- keys --------------------------------------------------------------------------------


def test_aggregator_keys_are_private_and_pinned(tmp_path: Path) -> None:
    private, public, fp = write_aggregator_keys(tmp_path)
    assert stat.S_IMODE(private.stat().st_mode) == 0o600
    key = load_aggregator_key(private)
    assert fingerprint(load_public_key(public, pin=fp)) == fp == fingerprint(key.public_key())
    other = tmp_path / "other"
    write_aggregator_keys(other)
    with pytest.raises(KeyMismatch, match="refusing"):
        load_public_key(other / "aggregator.pub", pin=fp)
    with pytest.raises(FileExistsError):
        write_aggregator_keys(tmp_path)
    assert b"PRIVATE" not in public.read_bytes()
