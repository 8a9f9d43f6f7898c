"""Fuzzing the aggregator's decode boundary with hostile replies, through the real round loop.

A seeded generator takes honest replies of every codec, sealed and unsealed, and breaks
them the ways a device (or a relay) can: records dropped, added, retyped; header values
huge, odd, non-finite or lone surrogates; array bytes swapped for .npz archives, pickles,
truncated or oversized .npy headers, huge declared shapes, one Flower chunk referenced
thousands of times; crafted plaintexts inside valid seals. Every reply must be accepted
as valid or dropped and counted, each within a time bound and all within a memory bound,
and every round must complete from its honest replies.
"""

from __future__ import annotations

import contextlib
import io
import pickle
import time
import tracemalloc
from collections.abc import Callable

import numpy as np
import pytest
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey
from flwr.app import (
    Array,
    ArrayRecord,
    ConfigRecord,
    Error,
    Message,
    MessageType,
    MetricRecord,
    RecordDict,
)
from flwr.app.message.arraychunk import ArrayChunk
from flwr.serverapp.strategy import FedAvg
from grids import ReplyGrid

from fedpipe.boundary import DecodeBoundary, DecodedReply, Rejection, limit_array_inflation
from fedpipe.codec import Codec, Encoded, build_codec, to_npy
from fedpipe.config import CODECS, CodecConfig
from fedpipe.crypto.seal import Binding, _pack, open_sealed, seal, seal_bytes
from fedpipe.metrics import RoundRecord
from fedpipe.records import (
    CLIENT_ID,
    CODEC,
    ENCODE_SECONDS,
    METRICS,
    NUM_EXAMPLES,
    TRAIN_LOSS,
    TRAIN_SECONDS,
    UPDATE,
    train_content,
)
from fedpipe.strategy import CodecStrategy

pytestmark = pytest.mark.usefixtures("task_identity")

KEY = X25519PrivateKey.generate()
RUN = 9
MODEL = {
    "conv.weight": np.linspace(-1, 1, 240, dtype=np.float32).reshape(4, 3, 4, 5),
    "fc.bias": np.zeros(7, np.float32),
    "bn.count": np.array(3, np.int64),
}
HONEST = (1, 2, 3)  # node ids that answer honestly every round
HOSTILE_PER_ROUND = 60
ROUNDS = 12  # x 60 hostile x 14 (codec, sealed) settings = 10,080 hostile replies
MAX_SECONDS_PER_REPLY = 0.5
MAX_PEAK_BYTES = 64 * 2**20  # what one round may allocate, whatever the replies hold


def _codec(scheme: str) -> Codec:
    return build_codec(CodecConfig(scheme=scheme, chunk_size=64, topk=0.1, topk_bits=4))


def _update(rng: np.random.Generator) -> dict[str, np.ndarray]:
    return {k: rng.normal(0, 0.1, v.shape).astype(np.float32) for k, v in MODEL.items()}


def _claims(node: int) -> dict[str, int | float]:
    return {
        NUM_EXAMPLES: 10 + node,
        TRAIN_LOSS: 0.5,
        CLIENT_ID: node,
        TRAIN_SECONDS: 1.0,
        ENCODE_SECONDS: 0.01,
    }


class Mutator:
    """Makes one hostile reply from an honest one: a seeded pick of 1-3 breakages."""

    def __init__(self, rng: np.random.Generator, sealed: bool) -> None:
        self.rng, self.sealed = rng, sealed
        self.moves: list[Callable[[RecordDict, int, int], RecordDict]] = [
            self.drop_record,
            self.extra_record,
            self.retype_record,
            self.odd_header_value,
            self.drop_header_key,
            self.bad_claim,
            self.odd_codec_field,
            self.swap_array_bytes,
            self.rename_or_add_array,
            self.chunk_bomb,
            self.odd_metrics,
        ]
        if sealed:
            self.moves += [self.crafted_plaintext] * 4 + [self.flip_sealed_byte]

    def __call__(self, content: RecordDict, node: int, rnd: int) -> RecordDict:
        for _ in range(int(self.rng.integers(1, 4))):
            move = self.moves[int(self.rng.integers(len(self.moves)))]
            content = move(content, node, rnd)
        return content

    def pick(self, options: list[object]) -> object:
        return options[int(self.rng.integers(len(options)))]

    def odd_value(self) -> object:
        return self.pick(
            [
                2**62,
                -(2**62),
                float("inf"),
                float("nan"),
                1e308,
                -1e308,
                "\ud800",
                "x" * 100_000,
                b"\x00" * 100_000,
                [1, 2, 3],
                ["\udfff"],
                True,
                "",
                0,
                -1,
            ]
        )

    # -- records --------------------------------------------------------------------------
    def drop_record(self, c: RecordDict, node: int, rnd: int) -> RecordDict:
        name = self.pick(list(c.keys()) or [UPDATE])
        if name in c:
            del c[name]  # type: ignore[arg-type]
        return c

    def extra_record(self, c: RecordDict, node: int, rnd: int) -> RecordDict:
        name = str(self.pick(["extra", "\ud83d", "arrays", "x" * 300, "fedpipe"]))
        kind = self.pick(
            [
                ConfigRecord({"a": 1}),
                MetricRecord({"a": 1.0}),
                ArrayRecord({"a": Array(np.zeros(3, np.float32))}),
            ]
        )
        with contextlib.suppress(Exception):  # Flower refuses some itself
            c[name] = kind  # type: ignore[assignment]
        return c

    def retype_record(self, c: RecordDict, node: int, rnd: int) -> RecordDict:
        name = str(self.pick([UPDATE, CODEC, METRICS]))
        c[name] = self.pick([ConfigRecord({"a": 1}), MetricRecord({"b": 2.0}), ArrayRecord()])  # type: ignore[assignment]
        return c

    # -- header ---------------------------------------------------------------------------
    def _header(self, c: RecordDict) -> ConfigRecord | None:
        record = c.get(CODEC)
        return record if isinstance(record, ConfigRecord) else None

    def odd_header_value(self, c: RecordDict, node: int, rnd: int) -> RecordDict:
        header = self._header(c)
        if header is not None:
            key = str(self.pick([*header.keys(), "\ud800", "k" * 1000, "new"]))
            with contextlib.suppress(Exception):  # Flower refuses some itself
                header[key] = self.odd_value()  # type: ignore[assignment]
        return c

    def drop_header_key(self, c: RecordDict, node: int, rnd: int) -> RecordDict:
        header = self._header(c)
        if header:
            del header[str(self.pick(list(header.keys())))]
        return c

    def bad_claim(self, c: RecordDict, node: int, rnd: int) -> RecordDict:
        header = self._header(c)
        if header is not None:
            key = str(self.pick([NUM_EXAMPLES, CLIENT_ID, TRAIN_LOSS, TRAIN_SECONDS]))
            header[key] = self.pick([1e308, 10**18, 0, -5, True, float("nan"), 2**31, 1.5, "7"])  # type: ignore[assignment]
        return c

    def odd_codec_field(self, c: RecordDict, node: int, rnd: int) -> RecordDict:
        header = self._header(c)
        if header is not None:
            key = str(self.pick(["scheme", "chunk", "count", "k", "bits", "seal"]))
            header[key] = self.pick([0, -1, 2**40, "int3", "float32", "topk", 10**9, 1])  # type: ignore[assignment]
        return c

    # -- arrays ---------------------------------------------------------------------------
    def hostile_bytes(self) -> bytes:
        kind = int(self.rng.integers(11))
        if kind == 0:  # an .npz archive (np.load would return an NpzFile)
            buf = io.BytesIO()
            np.savez(buf, a=np.zeros(3))
            return buf.getvalue()
        if kind == 1:  # pickle bytes
            return pickle.dumps({"a": np.zeros(3)})
        if kind == 2:  # an object array: needs pickle to load
            buf = io.BytesIO()
            np.save(buf, np.array([{"a": 1}], dtype=object), allow_pickle=True)
            return buf.getvalue()
        if kind == 3:  # a huge declared shape over few bytes
            return _npy_header(HUGE_SHAPE)
        if kind == 4:  # dimensions whose product overflows int64
            return _npy_header(OVERFLOW)
        if kind == 5:  # deep nesting in the header
            return _npy_header("{'descr': " + "(" * 3000 + ")" * 3000 + "}")
        if kind == 6:  # truncated .npy
            data = to_npy(np.zeros(50, np.float32))
            return data[: int(self.rng.integers(0, len(data)))]
        if kind == 7:  # trailing bytes
            return to_npy(np.zeros(5, np.float32)) + b"junk"
        if kind == 8:  # big-endian, Fortran order, or a dtype no codec sends
            arr = self.pick(
                [
                    np.zeros(4, ">f4"),
                    np.asfortranarray(np.zeros((3, 4), np.float32)),
                    np.zeros(2, np.complex64),
                ]
            )
            buf = io.BytesIO()
            np.save(buf, arr)
            return buf.getvalue()
        if kind == 9:  # random bytes
            return self.rng.bytes(int(self.rng.integers(0, 300)))
        return to_npy(self.rng.normal(size=int(self.rng.integers(0, 50))).astype(np.float32))

    def swap_array_bytes(self, c: RecordDict, node: int, rnd: int) -> RecordDict:
        record = c.get(UPDATE)
        if isinstance(record, ArrayRecord) and len(record):
            name = str(self.pick(list(record.keys())))
            old = record[name]
            data = self.hostile_bytes()
            record[name] = Array(dtype=old.dtype, shape=old.shape, stype=old.stype, data=data)
        return c

    def rename_or_add_array(self, c: RecordDict, node: int, rnd: int) -> RecordDict:
        record = c.get(UPDATE)
        if isinstance(record, ArrayRecord):
            name = str(self.pick(["\udcff", "extra", "y" * 500, "fc.bias"]))
            with contextlib.suppress(Exception):  # Flower refuses some itself
                record[name] = Array(np.ones(int(self.rng.integers(0, 40)), np.float32))
        return c

    def chunk_bomb(self, c: RecordDict, node: int, rnd: int) -> RecordDict:
        """One small chunk listed many times, inflated through Flower's real Array.inflate."""
        record = c.get(UPDATE)
        if isinstance(record, ArrayRecord):
            record[str(self.pick(list(record.keys()) or ["w"]))] = chunk_bomb(4096, 20_000)
        return c

    def odd_metrics(self, c: RecordDict, node: int, rnd: int) -> RecordDict:
        value = self.pick([float("nan"), -1.0, 1e308, 2**62, [1.0, 2.0], 3])
        key = str(self.pick(["seal-seconds", "x", NUM_EXAMPLES]))
        with contextlib.suppress(Exception):  # Flower refuses some itself
            c[METRICS] = MetricRecord({key: value})  # type: ignore[dict-item]
        return c

    # -- inside a valid seal ----------------------------------------------------------------
    def crafted_plaintext(self, c: RecordDict, node: int, rnd: int) -> RecordDict:
        """Bytes of the device's choosing, sealed properly: authentic, and hostile."""
        header = self._header(c)
        meta = {k: v for k, v in (header or ConfigRecord()).items() if k != "seal"}
        meta = {**meta, **_claims(node)}
        kind = int(self.rng.integers(7))
        if kind == 0:  # the old JSON header format, deeply nested
            plain = (3000).to_bytes(4, "little") + b"[" * 3000
        elif kind == 1:  # an entry whose length runs past the end
            plain = b"\x01\x00w" + (2**31).to_bytes(4, "little") + b"\x93NUMPY"
        elif kind == 2:  # hostile bytes as one array
            blob = self.hostile_bytes()
            plain = b"\x01\x00w" + len(blob).to_bytes(4, "little") + blob
        elif kind == 3:  # the same array name twice
            packed = _pack({"w": np.zeros(3, np.float32)})
            plain = packed + packed
        elif kind == 4:  # an array name that is not valid UTF-8
            packed = _pack({"w": np.zeros(3, np.float32)})
            plain = packed[:2] + b"\xff" + packed[3:]
        elif kind == 5:  # valid inner arrays that do not fit the codec
            plain = _pack(_update(self.rng))
        else:  # random bytes
            plain = self.rng.bytes(int(self.rng.integers(0, 200)))
        sealed = seal_bytes(plain, meta, KEY.public_key(), Binding(RUN, rnd, node))  # type: ignore[arg-type]
        return train_content(sealed)

    def flip_sealed_byte(self, c: RecordDict, node: int, rnd: int) -> RecordDict:
        record = c.get(UPDATE)
        if isinstance(record, ArrayRecord) and "sealed" in record:
            old = record["sealed"]
            blob = bytearray(old.data)  # the .npy bytes: header or ciphertext may change
            if blob:
                blob[int(self.rng.integers(len(blob)))] ^= 0xFF
            record["sealed"] = Array(
                dtype=old.dtype, shape=old.shape, stype=old.stype, data=bytes(blob)
            )
        return c


def _npy_header(text: str) -> bytes:
    """A .npy file with this header text and a few bytes of data."""
    head = (text + " " * (-(len(text) + 11) % 64) + "\n").encode()
    return b"\x93NUMPY\x01\x00" + len(head).to_bytes(2, "little") + head + b"\x00" * 16


HUGE_SHAPE = "{'descr': '<f4', 'fortran_order': False, 'shape': (1000000000000,), }"
OVERFLOW = "{'descr': '<f4', 'fortran_order': False, 'shape': (99999999999, 99999999999, 9999), }"


def chunk_bomb(chunk_bytes: int, repeats: int) -> Array:
    """An Array whose body lists one chunk `repeats` times, inflated by Flower's own
    `Array.inflate` (through fedpipe's guard when it is installed)."""
    zeros = b"\x00" * chunk_bytes
    chunk = ArrayChunk(memoryview(zeros))
    sender = Array(dtype="float32", shape=(1,), stype="numpy.ndarray", data=zeros)
    sender.__dict__["_chunks"] = [(chunk.object_id, chunk)] * repeats  # what deflate lists
    return Array.inflate(sender.deflate(), children={chunk.object_id: chunk})


def _honest(codec: Codec, sealed: bool, node: int, rnd: int) -> RecordDict:
    enc = codec.encode(_update(np.random.default_rng([node, rnd])), np.random.default_rng(0))
    enc = Encoded(enc.arrays, {**enc.meta, **_claims(node)})
    if sealed:
        enc = seal(enc, KEY.public_key(), Binding(RUN, rnd, node))
    return train_content(enc)


class HostileGrid(ReplyGrid):
    """Honest nodes answer honestly; every other sampled node sends a mutated reply."""

    def __init__(self, codec: Codec, sealed: bool, seed: int) -> None:
        super().__init__([*HONEST, *range(100, 100 + HOSTILE_PER_ROUND)])
        self.codec, self.sealed = codec, sealed
        self.mutate = Mutator(np.random.default_rng(seed), sealed)
        self.round = 0
        self.hostile = 0
        self.peak = 0  # bytes allocated at most while round 1 was made and aggregated

    def exchange(self, messages: list[Message]) -> list[Message]:
        if not messages:  # the evaluation exchange, off here
            return []
        self.round += 1
        # Memory is traced over round 1 (tracing slows Python ~15x; later rounds only time).
        if self.round == 1:
            tracemalloc.start()
        elif tracemalloc.is_tracing():
            self.peak = tracemalloc.get_traced_memory()[1]
            tracemalloc.stop()
        out = []
        for m in messages:
            node = m.metadata.dst_node_id
            content = _honest(self.codec, self.sealed, node, self.round)
            if node not in HONEST:
                self.hostile += 1
                if node % 17 == 0:  # a client error whose text cannot be encoded
                    out.append(Message(Error(code=1, reason="boom \ud800\n" * 3), reply_to=m))
                    continue
                content = self.mutate(content, node, self.round)
            out.append(Message(content, reply_to=m))
        return out


SETTINGS = [(scheme, sealed) for scheme in CODECS for sealed in (False, True)]


def test_the_suite_sends_at_least_ten_thousand_hostile_replies() -> None:
    """Per CI run, through the round loop (and 300 more timed one by one below)."""
    assert len(SETTINGS) * ROUNDS * HOSTILE_PER_ROUND >= 10_000


@pytest.mark.parametrize(("scheme", "sealed"), SETTINGS)
def test_hostile_replies_are_dropped_and_counted_and_rounds_complete(
    scheme: str, sealed: bool
) -> None:
    codec = _codec(scheme)
    grid = HostileGrid(codec, sealed, seed=SETTINGS.index((scheme, sealed)))
    records: list[RoundRecord] = []
    strategy = CodecStrategy(
        FedAvg(fraction_evaluate=0.0, min_train_nodes=1, min_available_nodes=1),
        codec,
        on_round_end=records.append,
        opener=(lambda e, r, n: open_sealed(e, KEY, Binding(RUN, r, n))) if sealed else None,
    )
    try:
        t0 = time.perf_counter()
        result = strategy.start(
            grid,  # type: ignore[arg-type]
            ArrayRecord({k: Array(v) for k, v in MODEL.items()}),
            num_rounds=ROUNDS,
            evaluate_fn=lambda rnd, arrays: MetricRecord({"accuracy": 0.5, "loss": 1.0}),
        )
        elapsed = time.perf_counter() - t0
    finally:
        tracemalloc.stop()  # in case round 2 never came
    assert len(records) == ROUNDS and grid.hostile == ROUNDS * HOSTILE_PER_ROUND
    for rec in records:
        sent = len(HONEST) + HOSTILE_PER_ROUND
        # every reply was either aggregated or dropped and counted
        assert rec.clients_replied + rec.clients_rejected == sent
        assert rec.clients_replied >= len(HONEST)
    assert all(np.all(np.isfinite(a.numpy())) for a in result.arrays.values())
    assert 0 < grid.peak < MAX_PEAK_BYTES, f"peak {grid.peak / 2**20:.1f} MiB"
    per_reply = elapsed / (ROUNDS * (len(HONEST) + HOSTILE_PER_ROUND))
    assert per_reply < MAX_SECONDS_PER_REPLY


def test_each_hostile_reply_is_decided_within_the_time_bound() -> None:
    """The slowest single reply, timed one by one through the boundary itself."""
    codec = _codec("topk")
    like = {k: np.asarray(v) for k, v in MODEL.items()}
    boundary = DecodeBoundary(codec, like, lambda e, r, n: open_sealed(e, KEY, Binding(RUN, r, n)))
    mutate = Mutator(np.random.default_rng(123), sealed=True)
    limit_array_inflation(boundary.limits.max_array_bytes)  # as the strategy does
    slowest = 0.0
    outcomes = {"accepted": 0, "rejected": 0}
    for i in range(300):
        node = 100 + i
        msg = Message(RecordDict(), dst_node_id=node, message_type=MessageType.TRAIN)
        content = mutate(_honest(codec, True, node, 1), node, 1)
        reply = Message(content, reply_to=msg)
        t0 = time.perf_counter()
        out = boundary.train(reply, 1)
        slowest = max(slowest, time.perf_counter() - t0)
        assert isinstance(out, DecodedReply | Rejection)
        outcomes["accepted" if isinstance(out, DecodedReply) else "rejected"] += 1
    limit_array_inflation(None)
    assert slowest < MAX_SECONDS_PER_REPLY
    assert outcomes["rejected"] > 250  # nearly every mutation breaks the reply


def test_a_chunk_bomb_is_emptied_before_it_is_allocated() -> None:
    limit_array_inflation(1 << 20)
    try:
        tracemalloc.start()
        bomb = chunk_bomb(5 * 2**20, 200)  # would be 1,000 MiB
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
        limit_array_inflation(None)
    assert bomb.data == b"" and peak < 64 * 2**20
    honest = chunk_bomb(4096, 3)  # without a bound: Flower's behaviour
    assert len(honest.data) == 3 * 4096
