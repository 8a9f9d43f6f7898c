"""Per-class metrics, the spread across devices, devices' held-out splits and the
histograms they report (checked like any device input)."""

from __future__ import annotations

from collections import Counter

import numpy as np
import pytest
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict
from test_client_app import _context, _instruction

from fedpipe.boundary import DecodeBoundary, Rejection
from fedpipe.builtin_task import eval_data, train_data
from fedpipe.client_app import client_evaluate
from fedpipe.codec import CastCodec
from fedpipe.config import load_config
from fedpipe.data import Split, load_dataset
from fedpipe.drift import DESCRIPTORS, Profile, parse_bins
from fedpipe.records import (
    CONFIG,
    EVAL_ACCURACY,
    EVAL_LOSS,
    METRICS,
    NUM_EXAMPLES,
    PROFILE,
    PROFILE_EDGES,
)
from fedpipe.rounds.evaluation import EvaluationIntake, profile_config
from fedpipe.task import TaskContext
from fedpipe.training import validate
from fedpipe.validation import class_metrics, round_fields, spread

pytestmark = pytest.mark.usefixtures("task_identity")


def test_class_metrics_by_hand() -> None:
    # Prepare: true class 0 -> predicted (0: 3, 1: 1); true 1 -> (0: 2, 1: 4); class 2 absent
    cm = np.array([[3, 1, 0], [2, 4, 0], [0, 0, 0]])
    # Execute
    m = class_metrics(cm)
    # Assert: precision = column hits, recall = row hits, 0 where undefined
    assert m.precision == pytest.approx([3 / 5, 4 / 5, 0.0])
    assert m.recall == pytest.approx([3 / 4, 4 / 6, 0.0])
    f1_0 = 2 * (3 / 5) * (3 / 4) / (3 / 5 + 3 / 4)
    f1_1 = 2 * (4 / 5) * (4 / 6) / (4 / 5 + 4 / 6)
    assert m.f1 == pytest.approx([f1_0, f1_1, 0.0])
    assert m.macro_f1 == pytest.approx((f1_0 + f1_1) / 3)


def test_validate_counts_the_confusion_matrix_in_one_pass() -> None:
    # A "model" that predicts class (x > 0): logits [-x, x]
    model = torch.nn.Linear(1, 2, bias=False)
    model.weight.data = torch.tensor([[-1.0], [1.0]])
    x = torch.tensor([[-2.0], [1.0], [3.0], [-1.0], [2.0]])
    y = torch.tensor([0, 0, 1, 1, 1])
    v = validate(model, Split(x, y), batch_size=2)  # batches straddle the classes
    assert v.confusion is not None
    assert v.confusion.tolist() == [[1, 1], [1, 2]]
    assert v.accuracy == pytest.approx(3 / 5)


def test_spread_weights_the_mean_and_finds_the_worst_device() -> None:
    s = spread([0.9, 0.5, 1.0], [10, 30, 60])
    assert s is not None
    assert s.mean == pytest.approx((9 + 15 + 60) / 100)
    assert (s.minimum, s.maximum, s.devices) == (0.5, 1.0, 3)
    assert s.std == pytest.approx(np.std([0.9, 0.5, 1.0]))
    assert spread([], []) is None


def test_round_fields_rebuild_the_square_confusion() -> None:
    central = {"class_precision": [1.0, 0.5], "class_recall": [0.5, 1.0], "class_f1": [0.6, 0.7]}
    fields = round_fields({**central, "confusion": [1, 1, 0, 2]})
    assert fields["confusion"] == [[1, 1], [0, 2]]
    assert fields["macro_f1"] == pytest.approx(0.65)
    assert round_fields({"accuracy": 0.9}) == {}


def test_builtin_holdout_is_disjoint_fixed_and_covers_the_shard() -> None:
    cfg = load_config(None, ["partition.holdout=0.2"])
    ctx = TaskContext(cfg, 3, {})
    train, held = train_data(ctx), eval_data(ctx)
    whole = train_data(TaskContext(load_config(), 3, {}))
    assert len(train) + len(held) == len(whole)
    assert len(held) == round(0.2 * len(whole))

    def rows(split: Split) -> Counter[bytes]:
        return Counter(r.numpy().tobytes() for r in split.x)

    assert rows(train) + rows(held) == rows(whole)  # a partition of the shard
    assert torch.equal(eval_data(ctx).x, held.x)  # the same split every round


def _profile() -> Profile:
    ds = load_dataset(load_config().data)
    return Profile.reference(ds.test.x, torch.full((len(ds.test), 10), 0.1))


def test_a_device_reports_histograms_of_its_held_out_data() -> None:
    cfg = load_config(None, ["partition.num_clients=4", "model.hidden=8", "partition.holdout=0.2"])
    msg = _instruction("evaluate", 1)
    msg.content.config_records[CONFIG][PROFILE_EDGES] = profile_config(_profile())[PROFILE_EDGES]
    reply = client_evaluate(msg, _context(1), cfg)
    metrics = reply.content.metric_records[METRICS]
    held = len(eval_data(TaskContext(cfg, 1, {})))
    assert metrics[NUM_EXAMPLES] == held
    counts = {k: a.numpy() for k, a in reply.content.array_records[PROFILE].items()}
    assert set(counts) == set(DESCRIPTORS)
    assert all(int(c.sum()) == held for c in counts.values())
    # Bins it cannot read: the evaluation still counts, without histograms.
    msg = _instruction("evaluate", 1)
    msg.content.config_records[CONFIG][PROFILE_EDGES] = '{"classes": -1}'
    reply = client_evaluate(msg, _context(1), cfg)
    assert PROFILE not in reply.content and EVAL_ACCURACY in reply.content.metric_records[METRICS]


def _reply(node: int, acc: float, n: int, counts: dict[str, np.ndarray] | None) -> Message:
    ask = Message(RecordDict(), dst_node_id=node, message_type="evaluate")
    content = RecordDict(
        {METRICS: MetricRecord({NUM_EXAMPLES: n, EVAL_LOSS: 1 - acc, EVAL_ACCURACY: acc})}
    )
    if counts is not None:
        content[PROFILE] = ArrayRecord({k: Array(v) for k, v in counts.items()})
    reply = Message(content, reply_to=ask)
    reply.metadata.__dict__["_src_node_id"] = node
    return reply


def test_hostile_histograms_are_refused_and_counted_and_the_stage_goes_on() -> None:
    profile = _profile()
    bins = profile.bins()
    good = {k: np.bincount([0] * 20, minlength=b).astype(np.int64) for k, b in bins.items()}
    boundary = DecodeBoundary(CastCodec(np.float32), {"w": np.zeros(3, np.float32)})
    intake = EvaluationIntake(profile)
    cases = {
        1: _reply(1, 0.9, 20, good),
        2: _reply(2, 0.5, 20, {**good, "predicted": good["predicted"][:3]}),  # wrong bins
        3: _reply(3, 0.1, 20, {**good, "input_mean": good["input_mean"] * 5}),  # 100 != 20
        4: _reply(4, 0.8, 20, {**good, "confidence": good["confidence"].astype(np.float64)}),
        5: _reply(5, 0.7, 10, None),  # no histograms: its accuracy still counts
        6: _reply(6, 0.6, 20, {"x": np.zeros(300_000, np.int64)}),  # over the byte bound
    }
    for node, msg in cases.items():
        out = boundary.evaluate(msg)
        if isinstance(out, Rejection):
            intake.reject(node, out.reason)
        else:
            intake.add(node, out)
    kept = intake.kept()
    result = intake.result()
    assert sorted(m.metadata.dst_node_id for m in kept) == [1, 5]
    assert result.rejected == 4
    assert result.devices is not None and result.devices.minimum == 0.7
    assert intake.profiles is not None and intake.profiles.devices == 1


def test_histograms_nobody_asked_for_are_ignored() -> None:
    intake = EvaluationIntake(None)
    intake.add(1, RecordDict({METRICS: MetricRecord({NUM_EXAMPLES: 5, EVAL_ACCURACY: 0.5})}))
    intake.add(
        2,
        RecordDict(
            {
                METRICS: MetricRecord({NUM_EXAMPLES: 5, EVAL_ACCURACY: 0.7}),
                PROFILE: ArrayRecord({"input_mean": Array(np.zeros(3, np.int64))}),
            }
        ),
    )
    assert len(intake.kept()) == 2 and intake.profiles is None
    assert intake.result().rejected == 0


def test_the_bins_a_device_is_sent_are_the_profiles() -> None:
    profile = _profile()
    sent = ConfigRecord(profile_config(profile))[PROFILE_EDGES]
    assert isinstance(sent, str)
    edges, classes = parse_bins(sent)
    assert classes == profile.classes and edges.keys() == profile.edges.keys()
    for name, e in edges.items():
        np.testing.assert_array_equal(e, profile.edges[name])
