"""Checkpoints and resume, bounded waits: the coordinator's fault handling, in-process."""

from __future__ import annotations

import time
from collections.abc import Iterable
from pathlib import Path
from uuid import uuid4

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord, Context, Message, RecordDict
from flwr.serverapp.strategy import FedAvgM

from fedpipe.checkpoint import CHECKPOINT_FILE, load_checkpoint, restore_strategy, save_checkpoint
from fedpipe.client_app import make_client_app
from fedpipe.config import RunConfig, load_config
from fedpipe.grid import BoundedGrid, NotEnoughNodes
from fedpipe.metrics import read_metrics
from fedpipe.rundir import METRICS_FILE, create_run_dir
from fedpipe.server_app import run_server

pytestmark = pytest.mark.usefixtures("task_identity")


class InProcessGrid:
    """Delivers each message to the real ClientApp as node i (client i-1).

    Implements Grid's push/pull pair, so fedpipe's own reply polling (BoundedGrid) runs.
    """

    def __init__(self, cfg: RunConfig, crash_in_round: int | None = None) -> None:
        self.cfg, self.crash_in_round, self.calls = cfg, crash_in_round, 0
        self.app = make_client_app(cfg)
        self.replies: dict[str, Message] = {}
        n = cfg.partition.num_clients
        self.contexts = {
            i + 1: Context(
                run_id=1,
                node_id=i + 1,
                node_config={"partition-id": i},
                state=RecordDict(),
                run_config={},
            )
            for i in range(n)
        }

    def get_node_ids(self) -> list[int]:
        return list(self.contexts)

    def push_messages(self, messages: Iterable[Message]) -> list[str]:
        messages = list(messages)
        self.calls += any(m.metadata.message_type == "train" for m in messages)
        if messages and self.calls == self.crash_in_round:
            raise KeyboardInterrupt("coordinator killed")
        ids = []
        for m in messages:
            m.metadata.__dict__["_message_id"] = uuid4().hex  # as Flower's InMemoryGrid does
            reply = self.app(m, self.contexts[m.metadata.dst_node_id])
            self.replies[m.metadata.message_id] = reply
            ids.append(m.metadata.message_id)
        return ids

    def pull_messages(self, message_ids: Iterable[str]) -> list[Message]:
        return [self.replies.pop(i) for i in list(message_ids) if i in self.replies]


def _cfg(tmp_path: Path) -> RunConfig:
    return load_config(
        None,
        [
            f"output_dir='{tmp_path}'",
            "partition.num_clients=3",
            "federation.rounds=3",
            "federation.min_nodes=3",
            "federation.strategy='fedavgm'",
            "model.hidden=16",
            "train.epochs=1",
        ],
    )


def test_killed_coordinator_resumes_with_no_gap_and_the_same_result(tmp_path: Path) -> None:
    cfg = _cfg(tmp_path)
    whole = create_run_dir(cfg)
    run_server(InProcessGrid(cfg), cfg, whole)  # type: ignore[arg-type]

    broken = create_run_dir(cfg)
    with pytest.raises(KeyboardInterrupt):  # dies while round 3 is in flight
        run_server(InProcessGrid(cfg, crash_in_round=3), cfg, broken)  # type: ignore[arg-type]
    assert load_checkpoint(broken / CHECKPOINT_FILE).round == 2
    run_server(InProcessGrid(cfg), cfg, broken, resume=True)  # type: ignore[arg-type]

    a, b = read_metrics(whole / METRICS_FILE), read_metrics(broken / METRICS_FILE)
    assert [r["round"] for r in b] == [1, 2, 3]
    # Same seeds, same client RNG per (client, round), momentum restored: identical model.
    assert [r["accuracy"] for r in a] == [r["accuracy"] for r in b]
    assert [r["loss"] for r in a] == pytest.approx([r["loss"] for r in b], rel=1e-6)


def test_checkpoint_round_trips_model_and_fedavgm_momentum(tmp_path: Path) -> None:
    strategy = FedAvgM(server_momentum=0.9)
    strategy.momentum_vector = [np.arange(3, dtype=np.float32), np.ones((2, 2), np.float32)]
    strategy.current_arrays = ArrayRecord({"w": Array(np.full(3, 2.0, np.float32))})
    arrays = ArrayRecord({"w": Array(np.arange(3, dtype=np.float32)), "n": Array(np.array(4))})
    save_checkpoint(tmp_path / CHECKPOINT_FILE, 7, arrays, strategy)

    ckpt = load_checkpoint(tmp_path / CHECKPOINT_FILE)
    fresh = FedAvgM(server_momentum=0.9)
    restore_strategy(fresh, ckpt.strategy_state)
    assert ckpt.round == 7 and ckpt.arrays["n"].dtype == arrays["n"].numpy().dtype
    np.testing.assert_array_equal(ckpt.arrays["w"], arrays["w"].numpy())
    assert fresh.momentum_vector is not None
    for got, want in zip(fresh.momentum_vector, strategy.momentum_vector, strict=True):
        np.testing.assert_array_equal(got, want)
    assert fresh.current_arrays is not None
    np.testing.assert_array_equal(fresh.current_arrays["w"].numpy(), np.full(3, 2.0))


def test_resume_without_checkpoint_says_so(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="did not complete a round"):
        load_checkpoint(tmp_path / CHECKPOINT_FILE)


class _Nodes:
    def __init__(self, n: int) -> None:
        self.n = n

    def get_node_ids(self) -> list[int]:
        return list(range(self.n))


def test_bounded_grid_gives_up_on_missing_devices() -> None:
    grid = BoundedGrid(_Nodes(1), min_nodes=2, wait_s=0.05)  # type: ignore[arg-type]
    assert list(grid.get_node_ids()) == [0]  # starts the clock
    time.sleep(0.1)
    with pytest.raises(NotEnoughNodes, match="federation.min_nodes=2"):
        grid.get_node_ids()
    assert list(BoundedGrid(_Nodes(3), 2, 0.01).get_node_ids()) == [0, 1, 2]  # type: ignore[arg-type]
