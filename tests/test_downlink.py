"""Compressed broadcast: the devices' public model equals the server's, bit for bit.

The server side (`Broadcaster`) and the device side (`receive` with either store) run
here on real Flower records, against a global model that moves like a training run's
(a random walk, with an integer buffer like BatchNorm's step counter).
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord, ConfigRecord, RecordDict

from fedpipe.codec import Encoded, build_codec
from fedpipe.config import DownlinkConfig
from fedpipe.downlink import (
    Broadcaster,
    Decisions,
    DownlinkRefusal,
    SharedStore,
    StateStore,
    receive,
)
from fedpipe.downlink.device import MODEL, STATE
from fedpipe.downlink.wire import diff_names
from fedpipe.records import ARRAYS, CONFIG, wire_bytes

SHAPES = {"w1": (40, 64), "b1": (64,), "w2": (64, 10), "steps": ()}
WIDE = {"w1": (400, 640), "b1": (640,), "steps": ()}  # 256k parameters


def _walk(
    seed: int = 0, shapes: Mapping[str, tuple[int, ...]] = SHAPES
) -> Iterator[dict[str, np.ndarray]]:
    """Global models as training makes them: each round moves every weight a little."""
    rng = np.random.default_rng(seed)
    model = {
        k: (np.array(0, np.int64) if k == "steps" else rng.normal(0, 0.1, s).astype(np.float32))
        for k, s in shapes.items()
    }
    while True:
        yield {k: v.copy() for k, v in model.items()}
        for k, v in model.items():
            if k == "steps":
                model[k] = np.array(int(v) + 12, np.int64)
            else:
                model[k] = (v + rng.normal(0, 0.01, v.shape)).astype(np.float32)


def _content(model: Mapping[str, np.ndarray]) -> RecordDict:
    """What a strategy's configure_train returns: the model and the round's config."""
    return RecordDict(
        {
            ARRAYS: ArrayRecord({k: Array(np.asarray(v)) for k, v in model.items()}),
            CONFIG: ConfigRecord({"server-round": 1}),
        }
    )


def _same_bits(a: Mapping[str, np.ndarray], b: Mapping[str, np.ndarray]) -> bool:
    """Same names, dtypes, shapes and bytes (assert_array_equal would forgive dtypes)."""
    return list(a) == list(b) and all(
        a[k].dtype == b[k].dtype and a[k].shape == b[k].shape and a[k].tobytes() == b[k].tobytes()
        for k in a
    )


class _Fleet:
    """A server's broadcaster and its devices, each with its own context.state."""

    def __init__(self, scheme: str, shared: bool = False, **settings: object) -> None:
        self.cfg = DownlinkConfig(scheme=scheme, **settings)  # type: ignore[arg-type]
        self.server = Broadcaster(self.cfg, seed=3)
        self.codec = build_codec(self.cfg.codec())
        self.states: dict[int, RecordDict] = {}
        self.store = SharedStore() if shared else StateStore()
        self.counts = Decisions()

    def round(self, model: Mapping[str, np.ndarray], nodes: list[int]) -> dict[int, RecordDict]:
        self.server.publish(model)
        contents = self.server.contents(_content(model), nodes, self.counts)
        for node in nodes:
            state = self.states.setdefault(node, RecordDict())
            rebuilt = receive(contents[node], state, self.store, self.codec)
            assert _same_bits(rebuilt, self.server.public), f"node {node}"
            self.server.answered(node)
        return contents


@pytest.mark.parametrize("scheme", ["hadamard1", "hadamard2", "int2", "sign", "topk", "float16"])
@pytest.mark.parametrize("shared", [False, True], ids=["own-copy", "shared"])
def test_devices_rebuild_the_public_model_bit_for_bit_after_every_round(
    scheme: str, shared: bool
) -> None:
    """Full participation, then partial; devices that miss 1, 5 and 50 rounds; a device
    that joins late. `_Fleet.round` checks every device after every round."""
    fleet = _Fleet(scheme, shared, chunk_size=256)
    walk = _walk()
    rng = np.random.default_rng(1)
    everyone = list(range(8))
    away = {5: range(10, 11), 6: range(10, 15), 7: range(10, 60)}  # missed rounds
    for rnd in range(1, 66):
        model = next(walk)
        if rnd <= 3:
            nodes = everyone
        else:  # half the others, plus the returning devices the round after their absence
            nodes = [n for n in range(5) if rng.random() < 0.5]
            nodes += [n for n, gone in away.items() if rnd not in gone and rnd - 1 in gone]
        if rnd == 30:
            nodes.append(9)  # a new device
        fleet.round(model, nodes)
    c = fleet.counts
    assert c.full >= 8 + 1 and c.diff > 0
    # float16 changes are half the model: two of them already cost the whole model
    assert c.catchup > 0 if scheme != "float16" else c.catchup == 0
    if shared:  # a version number per client, never a model
        assert all(MODEL not in s.array_records for s in fleet.states.values())
        assert len(fleet.store._models) <= fleet.store.capacity  # type: ignore[union-attr]
    else:
        assert all(MODEL in s.array_records for s in fleet.states.values())


def _catch_up(
    scheme: str, missed: int, shapes: Mapping[str, tuple[int, ...]] = SHAPES, **settings: object
) -> tuple[_Fleet, RecordDict]:
    """Device 1 misses `missed` rounds while device 0 trains; then both are sent."""
    fleet = _Fleet(scheme, **settings)
    walk = _walk(shapes=shapes)
    fleet.round(next(walk), [0, 1])
    for _ in range(missed):
        fleet.round(next(walk), [0])
    return fleet, fleet.round(next(walk), [0, 1])[1]


def test_a_device_that_missed_rounds_gets_the_changes_it_missed() -> None:
    fleet, content = _catch_up("hadamard1", 5)
    assert ARRAYS not in content.array_records
    versions = [fleet.server.version - i for i in range(6)]
    assert all(diff_names(v)[0] in content.array_records for v in versions)
    assert (fleet.counts.catchup, fleet.counts.behind) == (1, 6)


def test_a_stale_device_falls_back_to_the_whole_model_when_that_is_cheaper() -> None:
    """hadamard1 changes are ~1/30 of the model: 50 of them are not worth sending."""
    fleet, content = _catch_up("hadamard1", 50)
    assert ARRAYS in content.array_records
    assert not any(k.startswith("downlink-diff-") for k in content.array_records)
    server = fleet.server
    history = sum(d.wire_bytes for d in server._history)
    assert history < server._full_record_bytes()  # memory: under one model's worth
    # The rule itself: the chain the device would need is at least the whole model.
    assert wire_bytes(content) < 1.01 * server._full_record_bytes() + 4096
    # ... while top-k's far smaller changes of a larger model still go as a chain.
    wide, sparse = _catch_up("topk", 50, WIDE, topk=0.002, topk_bits=2)
    assert ARRAYS not in sparse.array_records
    assert wire_bytes(sparse) < wide.server._full_record_bytes()


@pytest.mark.parametrize("scheme", ["hadamard1", "int2", "sign"])
def test_server_error_feedback_telescopes_and_keeps_devices_on_the_global_model(
    scheme: str,
) -> None:
    """The broadcasts add up to the global model's change less what is still carried
    (global - public), and that carried part stays one round's rounding, where without
    error feedback the devices' model drifts further from the server's every round.
    The integer buffer is sent exactly: nothing of it is carried."""
    floats = [k for k in SHAPES if k != "steps"]
    drift: dict[bool, float] = {}
    for ef in (True, False):
        fleet = _Fleet(scheme, error_feedback=ef)
        walk = _walk()
        fleet.round(next(walk), [0])
        start = {k: fleet.server.public[k].astype(np.float64) for k in floats}
        sent = {k: np.zeros(v.shape) for k, v in start.items()}
        norms = []
        for _ in range(100):
            model = next(walk)
            content = fleet.round(model, [0])[0]
            arrays, meta, _ = diff_names(fleet.server.version)
            arrays, meta = content.array_records[arrays], content.config_records[meta]
            encoded = Encoded({k: a.numpy() for k, a in arrays.items()}, dict(meta))
            step = fleet.codec.decode(encoded, {k: fleet.server.public[k] for k in floats})
            for k in floats:
                sent[k] += step[k].astype(np.float64)
            residual = fleet.server.residual
            norms.append(np.sqrt(sum(float((residual[k] ** 2).sum()) for k in floats)))
        for k in floats:  # sum of broadcasts = true change - carried residual
            change = model[k].astype(np.float64) - start[k]
            np.testing.assert_allclose(sent[k] + residual[k], change, atol=2e-5)
        drift[ef] = norms[-1]
        if ef:
            assert max(norms[50:]) < 2 * np.median(norms[:10])  # bounded, not growing
        assert residual["steps"] == 0
    assert drift[False] > 5 * drift[True]


def test_a_device_that_lost_its_model_is_refused_then_sent_the_whole_model() -> None:
    fleet = _Fleet("hadamard1")
    walk = _walk()
    fleet.round(next(walk), [0])
    fleet.states[0] = RecordDict()  # the device restarted: nothing held
    model = next(walk)
    fleet.server.publish(model)
    content = fleet.server.contents(_content(model), [0], fleet.counts)[0]
    with pytest.raises(DownlinkRefusal, match="holds nothing of this run"):
        receive(content, fleet.states[0], fleet.store, fleet.codec)
    fleet.server.failed(0)  # its error answer
    assert ARRAYS in fleet.round(next(walk), [0])[0].array_records


def test_a_tampered_change_fails_the_digest_and_the_device_drops_what_it_held() -> None:
    fleet = _Fleet("int2")
    walk = _walk()
    fleet.round(next(walk), [0])
    model = next(walk)
    fleet.server.publish(model)
    content = fleet.server.contents(_content(model), [0], fleet.counts)[0]
    name = diff_names(fleet.server.version)[0]
    codes = content.array_records[name]["codes"].numpy().copy()
    codes[0] ^= 0xFF
    content[name] = ArrayRecord({**{k: a for k, a in content[name].items()}, "codes": Array(codes)})
    with pytest.raises(DownlinkRefusal, match="fails its digest"):
        receive(content, fleet.states[0], fleet.store, fleet.codec)
    assert STATE not in fleet.states[0].config_records


def test_another_runs_broadcast_is_refused() -> None:
    a, b = _Fleet("hadamard1"), _Fleet("hadamard1")
    walk = _walk()
    first = next(walk)
    a.round(first, [0])
    b.round(first, [0])
    model = next(walk)
    b.server.publish(model)
    content = b.server.contents(_content(model), [0], b.counts)[0]
    with pytest.raises(DownlinkRefusal, match="holds nothing of this run"):
        receive(content, a.states[0], a.store, a.codec)


def test_publishing_the_same_model_again_changes_nothing() -> None:
    fleet = _Fleet("hadamard1")
    walk = _walk()
    first = next(walk)
    fleet.round(first, [0])
    fleet.round(next(walk), [0])
    version = fleet.server.version
    second = fleet.round({k: a.copy() for k, a in fleet.server._source.items()}, [0, 1])
    assert fleet.server.version == version
    assert fleet.counts.current == 1  # device 0 already holds it: nothing is sent
    assert not any(k.startswith("downlink-diff-") for k in second[0].array_records)
