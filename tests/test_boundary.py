"""The decode boundary's parts: the strict .npy reader, the record checks, evaluation
replies, and the pinned patch of Flower's Array inflation."""

from __future__ import annotations

import io
import pickle

import flwr
import flwr.superlink.grid.http_grid as http_grid
import numpy as np
import pytest
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
from flwr.supercore.inflatable.inflatable_object import get_all_nested_objects
from flwr.supercore.inflatable.inflatable_utils import inflate_object_from_contents

from fedpipe.boundary import DecodeBoundary, Rejection, ReplyLimits, limit_array_inflation
from fedpipe.boundary._inflate import _ORIGINAL_CONTENTS, PINNED_FLWR, _total_inflate, inflated_size
from fedpipe.boundary._records import parse_arrays
from fedpipe.codec import CastCodec, PayloadError, parse_npy, to_npy
from fedpipe.records import EVAL_ACCURACY, EVAL_LOSS, METRICS, NUM_EXAMPLES

pytestmark = pytest.mark.usefixtures("task_identity")


# --- the .npy reader ---------------------------------------------------------------------


@pytest.mark.parametrize(
    "array",
    [
        np.zeros((3, 4), np.float32),
        np.array(5, np.int64),
        np.arange(7, dtype=np.uint8),
        np.zeros(0, np.float16),
        np.ones((2, 3, 4, 5), np.float32),
        np.array([True, False]),
    ],
)
def test_npy_round_trips_what_np_save_writes(array: np.ndarray) -> None:
    buf = io.BytesIO()
    np.save(buf, array)
    assert to_npy(array) == buf.getvalue()
    out = parse_npy(buf.getvalue(), max_bytes=1 << 20)
    assert out.dtype == array.dtype and out.shape == array.shape
    np.testing.assert_array_equal(out, array)


def _saved(array: np.ndarray, allow_pickle: bool = False) -> bytes:
    buf = io.BytesIO()
    np.save(buf, array, allow_pickle=allow_pickle)
    return buf.getvalue()


def _npz() -> bytes:
    buf = io.BytesIO()
    np.savez(buf, a=np.zeros(3))
    return buf.getvalue()


def _header(text: str, data: bytes = b"") -> bytes:
    head = (text + " " * (-(len(text) + 11) % 64) + "\n").encode()
    return b"\x93NUMPY\x01\x00" + len(head).to_bytes(2, "little") + head + data


HOSTILE_NPY = {
    "npz archive": (_npz(), "zip/npz archive"),
    "pickle": (pickle.dumps([1, 2]), "not a .npy"),
    "object dtype": (_saved(np.array([{}], dtype=object), allow_pickle=True), "not a plain"),
    "big-endian": (_saved(np.zeros(3, ">f4")), "not accepted"),
    "complex": (_saved(np.zeros(3, np.complex64)), "not accepted"),
    "fortran": (_saved(np.asfortranarray(np.zeros((2, 3), np.float32))), "Fortran"),
    "trailing bytes": (to_npy(np.zeros(3, np.float32)) + b"x", "needs 12 bytes, 13"),
    "truncated data": (to_npy(np.zeros(3, np.float32))[:-1], "needs 12 bytes, 11"),
    "truncated header": (to_npy(np.zeros(3, np.float32))[:40], "too long or truncated"),
    "huge shape": (
        _header("{'descr': '<f4', 'fortran_order': False, 'shape': (100000000000,), }"),
        "exceeds",
    ),
    "overflowing dims": (
        _header("{'descr': '<f4', 'fortran_order': False, 'shape': (9999999999, 9999999999), }"),
        "exceeds",
    ),
    "nested header": (_header("{'descr': " + "(" * 500 + ")" * 500 + "}"), "not a plain"),
    "expression header": (_header("{'descr': __import__('os'), }"), "not a plain"),
    "too many dims": (
        _header("{'descr': '<f4', 'fortran_order': False, 'shape': (" + "1, " * 9 + "), }"),
        "dimensions",
    ),
    "version 9": (b"\x93NUMPY\x09\x00" + b"\x00" * 20, "version 9"),
    "empty": (b"", "not a .npy"),
}


@pytest.mark.parametrize("case", sorted(HOSTILE_NPY))
def test_npy_reader_refuses_hostile_bytes_before_allocating(case: str) -> None:
    data, reason = HOSTILE_NPY[case]
    with pytest.raises(PayloadError, match=reason):
        parse_npy(data, max_bytes=1 << 20)


def test_npy_reader_holds_the_byte_bound() -> None:
    data = to_npy(np.zeros(100, np.float32))
    assert parse_npy(data, max_bytes=400).size == 100
    with pytest.raises(PayloadError, match="exceeds the 399-byte bound"):
        parse_npy(data, max_bytes=399)


# --- Flower's Array inflation, pinned --------------------------------------------------------


def test_the_inflation_patch_targets_this_flower_version() -> None:
    """The guard replaces flwr 1.42's Array.inflate: a new Flower must be re-checked."""
    assert flwr.__version__.startswith(PINNED_FLWR), (
        f"flwr {flwr.__version__}: re-check fedpipe/boundary/_inflate.py against the new "
        "Array.inflate / deflate format, then update PINNED_FLWR"
    )


def _round_trip(record: ArrayRecord) -> ArrayRecord:
    """Deflate and inflate as Flower's Grid does with a pulled reply."""
    objects = get_all_nested_objects(record)
    contents = {oid: obj.deflate() for oid, obj in objects.items()}
    out = inflate_object_from_contents(record.object_id, contents)
    assert isinstance(out, ArrayRecord)
    return out


def test_guarded_inflation_keeps_honest_arrays_and_empties_chunk_bombs() -> None:
    honest = ArrayRecord({"w": Array(np.arange(300_000, dtype=np.float32))})  # > 1 chunk
    zeros = b"\x00" * 4096
    chunk = ArrayChunk(memoryview(zeros))
    bomb = Array(dtype="float32", shape=(1,), stype="numpy.ndarray", data=zeros)
    bomb.__dict__["_chunks"] = [(chunk.object_id, chunk)] * 1000  # 4 MB from 4 KB
    hostile = ArrayRecord()
    hostile["w"] = bomb  # (the constructor would copy the Array and lose its chunk list)
    assert inflated_size(bomb.deflate(), {chunk.object_id: chunk}) == 4096 * 1000
    limit_array_inflation(2 << 20)
    try:
        out = _round_trip(honest)
        emptied = _round_trip(hostile)
    finally:
        limit_array_inflation(None)
    np.testing.assert_array_equal(out["w"].numpy(), honest["w"].numpy())
    assert emptied["w"].data == b""
    limits = ReplyLimits(max_array_bytes=2 << 20, max_arrays=4)
    with pytest.raises(PayloadError, match="would inflate to 4096000 bytes"):
        parse_arrays(emptied, limits, "update")
    # With no bound, Flower's own behaviour is unchanged.
    assert len(_round_trip(hostile)["w"].data) == 4096000


def _reply_contents(header: ConfigRecord) -> tuple[Message, dict[str, bytes]]:
    """A reply as its sender deflates it: (the Message, {object id: content})."""
    msg = Message(RecordDict(), dst_node_id=5, message_type=MessageType.TRAIN)
    reply = Message(RecordDict({"codec": header}), reply_to=msg)
    objects = get_all_nested_objects(reply)
    return reply, {oid: obj.deflate() for oid, obj in objects.items()}


def test_a_reply_flower_cannot_parse_becomes_an_error_reply_from_its_sender() -> None:
    """Invalid UTF-8 in a ConfigRecord body made Flower's parser raise inside
    pull_messages and ended the run; through the guarded Grid it is an error reply."""
    header = ConfigRecord({"scheme": "float32", "note": "aXXXb"})
    reply, contents = _reply_contents(header)
    honest = header.deflate()
    bad = honest.replace(b"aXXXb", b"a\xed\xa0\x80b")  # same length: the head still fits
    contents = {oid: bad if c == honest else c for oid, c in contents.items()}
    with pytest.raises(Exception, match="Error parsing"):  # Flower as is
        inflate_object_from_contents(reply.object_id, dict(contents))
    limit_array_inflation(None)  # installs the guard
    out = http_grid.inflate_object_from_contents(reply.object_id, dict(contents))
    assert isinstance(out, Message) and out.has_error()
    assert "undecodable reply (DecodeError" in out.error.reason
    assert out.metadata.src_node_id == 5  # from the Message's own body
    assert out.metadata.reply_to_message_id == reply.metadata.reply_to_message_id
    out = BOUNDARY.train(out, 1)
    assert isinstance(out, Rejection) and "undecodable reply" in out.reason


def test_the_grid_patch_wraps_the_function_flower_calls() -> None:
    limit_array_inflation(None)
    assert http_grid.inflate_object_from_contents is _total_inflate
    assert _ORIGINAL_CONTENTS is inflate_object_from_contents  # still Flower's own
    honest, contents = _reply_contents(ConfigRecord({"a": 1}))
    out = http_grid.inflate_object_from_contents(honest.object_id, contents)
    assert not out.has_error() and out.content["codec"]["a"] == 1


# --- evaluation replies ----------------------------------------------------------------------


def _eval_reply(metrics: dict[str, object] | None = None, **extra: object) -> Message:
    msg = Message(RecordDict(), dst_node_id=5, message_type=MessageType.EVALUATE)
    values = {NUM_EXAMPLES: 10, EVAL_LOSS: 0.5, EVAL_ACCURACY: 0.9} if metrics is None else metrics
    content = RecordDict({METRICS: MetricRecord(values)})  # type: ignore[arg-type]
    for name, record in extra.items():
        content[name] = record  # type: ignore[assignment]
    return Message(content, reply_to=msg)


BOUNDARY = DecodeBoundary(CastCodec(np.float32), {"w": np.zeros(3, np.float32)})


def test_evaluation_reply_keeps_any_apps_metrics_checked() -> None:
    """A Flower app names its own metrics; each is a single finite number."""
    reply = _eval_reply({NUM_EXAMPLES: 10, EVAL_LOSS: 0.5, "eval_acc": 0.9, "extra": 1})
    out = BOUNDARY.evaluate(reply)
    assert not isinstance(out, Rejection)
    assert dict(out.metric_records[METRICS]) == {
        NUM_EXAMPLES: 10,
        EVAL_LOSS: 0.5,
        "eval_acc": 0.9,
        "extra": 1,
    }


@pytest.mark.parametrize(
    ("metrics", "extra", "reason"),
    [
        ({EVAL_LOSS: 0.5, EVAL_ACCURACY: 0.9}, {}, "num-examples"),
        ({NUM_EXAMPLES: 0, EVAL_LOSS: 0.5, EVAL_ACCURACY: 0.9}, {}, "num-examples"),
        ({NUM_EXAMPLES: 10**13, EVAL_LOSS: 0.5, EVAL_ACCURACY: 0.9}, {}, "num-examples"),
        ({NUM_EXAMPLES: 10, EVAL_LOSS: float("nan"), EVAL_ACCURACY: 0.9}, {}, "not finite"),
        ({NUM_EXAMPLES: 10, EVAL_LOSS: 0.5, EVAL_ACCURACY: 1.5}, {}, "eval_accuracy"),
        ({NUM_EXAMPLES: 10, EVAL_LOSS: 0.5, EVAL_ACCURACY: [0.9]}, {}, "single values"),
        (None, {"x": ConfigRecord({"\ud800": "y"})}, "unexpected record"),
        (None, {"conf": ConfigRecord({"a": 1})}, "unexpected record"),
    ],
)
def test_bad_evaluation_replies_are_rejected(
    metrics: dict[str, object] | None, extra: dict[str, object], reason: str
) -> None:
    out = BOUNDARY.evaluate(_eval_reply(metrics, **extra))
    assert isinstance(out, Rejection) and reason in out.reason


def test_client_errors_with_unencodable_text_are_rejections() -> None:
    msg = Message(RecordDict(), dst_node_id=5, message_type=MessageType.TRAIN)
    reply = Message(Error(code=1, reason="Traceback\nValueError: bad \ud800"), reply_to=msg)
    for out in (BOUNDARY.train(reply, 1), BOUNDARY.evaluate(reply)):
        assert isinstance(out, Rejection) and "bad \\ud800" in out.reason
        out.reason.encode("utf-8")  # safe to log and to write anywhere


def test_odd_strings_in_a_training_header_are_rejected_not_raised() -> None:
    msg = Message(RecordDict(), dst_node_id=5, message_type=MessageType.TRAIN)
    content = RecordDict(
        {
            "update": ArrayRecord({"w": Array(np.zeros(3, np.float32))}),
            "codec": ConfigRecord({"scheme": "float32", "\udcff": "x"}),
        }
    )
    out = BOUNDARY.train(Message(content, reply_to=msg), 1)
    assert isinstance(out, Rejection) and "not valid Unicode" in out.reason
