"""Simulation on an existing multi-node Ray cluster (`simulation.ray_address`), for real.

`ray.cluster_utils.Cluster` starts a head and a second node on this machine, each a
separate raylet with one CPU: with one CPU per worker, the two cohort workers can only
be placed one per node, so the run's clients are trained on both nodes.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from fedpipe.config import load_config
from fedpipe.metrics import read_metrics
from fedpipe.rundir import METRICS_FILE
from fedpipe.simulation import run_simulation

CLIENTS = 6
ROUNDS = 2


@pytest.mark.slow
@pytest.mark.usefixtures("no_leftover_processes")
def test_two_node_cluster_runs_clients_on_both_nodes(tmp_path: Path) -> None:
    import ray
    from ray.cluster_utils import Cluster

    assert not ray.is_initialized()  # run_simulation must connect (and disconnect) itself
    cluster = Cluster(
        initialize_head=True, head_node_args={"num_cpus": 1, "include_dashboard": False}
    )
    try:
        cluster.add_node(num_cpus=1)
        cluster.wait_for_nodes()
        cfg = load_config(
            None,
            [
                f"partition.num_clients={CLIENTS}",
                f"federation.rounds={ROUNDS}",
                "model.hidden=16",
                "train.epochs=1",
                f"output_dir={tmp_path}",
                f'simulation.ray_address="{cluster.address}"',
                "simulation.workers=2",
                "simulation.cpus_per_client=1",
            ],
        )
        assert cfg.simulation.ray_address == cluster.address
        result = run_simulation(cfg)
        # The run connected to the cluster and disconnected again; the cluster is still up.
        assert not ray.is_initialized()
        assert cluster.remaining_processes_alive()
    finally:
        cluster.shutdown()

    rounds = read_metrics(result.run_dir / METRICS_FILE)
    assert [r["round"] for r in rounds] == list(range(1, ROUNDS + 1))
    for r in rounds:
        assert (r["clients_sampled"], r["clients_replied"], r["clients_failed"]) == (
            CLIENTS,
            CLIENTS,
            0,
        )
        assert 0.0 <= r["accuracy"] <= 1.0 and r["bytes_up"] > 0
    summary = result.summary
    assert summary["rounds"] == ROUNDS

    workers = summary["workers"]
    assert len(workers) == 2
    nodes = {w["node"] for w in workers}
    assert len(nodes) == 2 and "" not in nodes, workers  # one worker on each Ray node
    assert all(w["clients_run"] > 0 for w in workers), workers
    # Each worker identified its clients once and trained them every round.
    assert sum(w["clients_run"] for w in workers) == CLIENTS * (ROUNDS + 1)
    # Both nodes are this machine, but each worker is its own process.
    assert len({w["pid"] for w in workers}) == 2


@pytest.mark.slow
@pytest.mark.usefixtures("no_leftover_processes")
def test_workers_the_cluster_cannot_place_fail_clearly(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Three 1-CPU workers on a 2-CPU cluster: an error naming the knobs, not a hang."""
    import ray
    from ray.cluster_utils import Cluster

    from fedpipe.sim import grid
    from fedpipe.simulation import RunFailed

    monkeypatch.setattr(grid, "_START_S", 5.0)
    cluster = Cluster(
        initialize_head=True, head_node_args={"num_cpus": 2, "include_dashboard": False}
    )
    try:
        cfg = load_config(
            None,
            [
                "partition.num_clients=6",
                "federation.rounds=1",
                f"simulation.ray_address={cluster.address}",
                "simulation.workers=3",
                f"output_dir={tmp_path}",
            ],
        )
        with pytest.raises(RunFailed, match="did not start within 5 s"):
            run_simulation(cfg)
        assert not ray.is_initialized()
    finally:
        cluster.shutdown()
