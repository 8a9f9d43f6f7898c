"""Simulation: N virtual clients run by cohort workers on Ray, one machine or a cluster.

The ServerApp and ClientApp are the deployed ones; the Grid between them is
`fedpipe.sim.CohortGrid` instead of Flower's simulation engine, which spent ~40 ms of
Ray and state handling per client message (see fedpipe.sim.worker).
"""

from __future__ import annotations

import json
import logging
import os
import secrets
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

from flwr.common.constant import SUPERLINK_NODE_ID

from fedpipe.config import RunConfig
from fedpipe.data import load_dataset, partition_indices
from fedpipe.deploy.processes import OFFLINE_ENV
from fedpipe.errors import os_reason
from fedpipe.lineage import LineageError, load_parent
from fedpipe.partition_info import write_partition_info
from fedpipe.rundir import (
    METRICS_FILE,
    SUMMARY_FILE,
    create_run_dir,
    discard_run_dir,
    write_json,
)
from fedpipe.sim import CohortGrid, CohortWorker, InProcessPool, RayPool, WorkerPool
from fedpipe.task import load_task

__all__ = ["RunFailed", "SimulationResult", "offline_env", "quiet_flower", "run_simulation"]

log = logging.getLogger(__name__)

# Flower phones home unless told not to; everything fedpipe starts inherits this.


class RunFailed(RuntimeError):
    """The run did not complete; the message says why."""


@dataclass(frozen=True)
class SimulationResult:
    run_dir: Path
    summary: dict[str, Any]


def offline_env() -> None:
    os.environ.update(OFFLINE_ENV)
    # Ray would otherwise start a dashboard and report usage statistics.
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    os.environ.setdefault("RAY_DEDUP_LOGS", "0")
    os.environ.setdefault("RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO", "0")


def quiet_flower(verbose: bool = False) -> None:
    """Show fedpipe's progress lines, not Flower's per-round INFO chatter.

    Flower re-installs its own console handler at INFO on every run, so the filter goes
    on the "flwr" logger itself; warnings and errors (e.g. a failing client) still show.
    """
    logging.basicConfig(
        level=logging.INFO if verbose else logging.WARNING,
        format="%(levelname)s %(name)s: %(message)s",
    )
    flwr_logger = logging.getLogger("flwr")
    flwr_logger.propagate = False  # Flower has its own handler; avoid printing twice
    if not verbose:
        flwr_logger.addFilter(_important)


# Warnings Flower prints on every run that say nothing about this run.
_NOISE = ("DEPRECATED FEATURE", "fraction_evaluate is set to 0.0")


def _important(record: logging.LogRecord) -> bool:
    return record.levelno >= logging.WARNING and not any(n in str(record.msg) for n in _NOISE)


def _connect_ray(cfg: RunConfig) -> bool:
    """Connect to the configured cluster, or start a local Ray; False if already on one."""
    import ray

    if ray.is_initialized():
        return False
    if cfg.simulation.ray_address:
        ray.init(address=cfg.simulation.ray_address, log_to_driver=True)
    else:
        ray.init(num_cpus=os.cpu_count() or 1, include_dashboard=False, log_to_driver=True)
    return True


def _worker_count(cfg: RunConfig) -> int:
    """simulation.workers, or as many as the cluster's CPUs (and GPUs) allow."""
    sim = cfg.simulation
    if sim.workers:
        return min(sim.workers, cfg.partition.num_clients)
    import ray

    res: dict[str, float] = ray.cluster_resources()  # type: ignore[no-untyped-call]
    count = int(res.get("CPU", 1.0) // sim.cpus_per_client)
    if sim.gpus_per_client > 0:
        count = min(count, int(res.get("GPU", 0.0) // sim.gpus_per_client))
        if count < 1:
            raise RunFailed(
                f"simulation.gpus_per_client={sim.gpus_per_client} but the Ray cluster has "
                f"{res.get('GPU', 0.0):g} GPU(s)"
            )
    return max(1, min(count, cfg.partition.num_clients))


def _pool(cfg: RunConfig, make_worker: Callable[[], Any]) -> WorkerPool:
    sim = cfg.simulation
    if sim.backend == "inprocess":
        return InProcessPool(make_worker)
    size = _worker_count(cfg)
    log.info("simulation: %d cohort worker(s) on Ray", size)
    return RayPool(make_worker, size, sim.cpus_per_client, sim.gpus_per_client)


def run_simulation(cfg: RunConfig, run_dir: Path | None = None) -> SimulationResult:
    """Run `cfg` with cohort workers and return the run directory and summary.

    Without `run_dir`, a fresh one is made under `cfg.output_dir` once the dataset loads,
    and removed again (with `output_dir` when this run made it) if the run fails before
    any round finished: a failed start leaves nothing behind.
    """
    offline_env()
    if not cfg.task:  # fedpipe's datasets: fail on a missing one before Ray starts
        load_dataset(cfg.data)
    else:  # a task that cannot be imported fails here, not in every worker
        load_task(cfg.task)
    if cfg.model.init:  # a warm start from a run that is not there fails before Ray
        try:
            load_parent(cfg.model.init)
        except LineageError as exc:
            raise RunFailed(str(exc)) from exc
    if run_dir is not None:
        return _simulate(cfg, run_dir)
    made_output_dir = not Path(cfg.output_dir).exists()
    try:
        run_dir = create_run_dir(cfg)
    except OSError as exc:
        raise RunFailed(
            f"cannot create the run directory {exc.filename or cfg.output_dir}: "
            f"{os_reason(exc)}; set output_dir=... to a folder you can write"
        ) from exc
    try:
        return _simulate(cfg, run_dir)
    except BaseException as exc:
        metrics = run_dir / METRICS_FILE
        if metrics.is_file() and metrics.stat().st_size > 0:
            raise  # rounds ran: keep what they wrote
        discard_run_dir(run_dir, made_output_dir)
        if isinstance(exc, RunFailed):
            raise RunFailed(str(exc).replace(f" (run directory {run_dir})", "")) from exc
        raise


def _simulate(cfg: RunConfig, run_dir: Path) -> SimulationResult:
    if not cfg.task:  # fedpipe's partition of its datasets: who holds which labels
        write_partition_info(cfg, run_dir)

    from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey
    from flwr.app import Context, RecordDict

    from fedpipe.attacks import build_attack, fault_mod
    from fedpipe.client_app import make_client_app
    from fedpipe.crypto.seal import public_bytes
    from fedpipe.server_app import make_server_app

    # A simulated aggregator's key lives for one run; deployment uses `fedpipe keys`.
    key = X25519PrivateKey.generate() if cfg.security.sealed(deployed=False) else None
    fault = fault_mod(cfg.simulation)
    app = make_client_app(
        cfg,
        seal_key=public_bytes(key.public_key()) if key else None,
        hooks=build_attack(cfg),
        mods=[fault] if fault else None,
        shared_models=True,  # thousands of virtual clients: one public model per worker
    )
    run_id = secrets.randbits(62)
    threads = max(1, int(cfg.simulation.cpus_per_client))
    prepare = partial(_prepare_data, cfg) if not cfg.task else None
    make_worker = partial(CohortWorker, app, run_id, cfg.partition.num_clients, threads, prepare)
    started_ray = cfg.simulation.backend == "ray" and _connect_ray(cfg)
    try:
        grid = CohortGrid(
            _pool(cfg, make_worker), cfg.partition.num_clients, cfg.simulation.cohort_size, run_id
        )
        try:
            server = make_server_app(cfg, run_dir, seal_key=key)
            with _serverapp_identity(run_id):
                server(grid, Context(run_id, SUPERLINK_NODE_ID, {}, RecordDict(), {}))
            placement = grid.pool.placement()
        finally:
            grid.close()
    except RunFailed:
        raise
    except Exception as exc:
        raise RunFailed(f"simulation failed: {exc!r} (run directory {run_dir})") from exc
    finally:
        if started_ray:
            _stop_ray()
    summary_path = run_dir / SUMMARY_FILE
    if not summary_path.exists():
        raise RunFailed(
            f"simulation failed: the ServerApp stopped before the last round "
            f"(run directory {run_dir})"
        )
    summary = json.loads(summary_path.read_text())
    summary["workers"] = placement
    write_json(summary_path, summary)
    return SimulationResult(run_dir, summary)


def _prepare_data(cfg: RunConfig) -> None:
    """Load and partition the dataset in a worker before round 1 (cached per process)."""
    load_dataset(cfg.data)
    partition_indices(cfg.data, cfg.partition, cfg.seed)


@contextmanager
def _serverapp_identity(run_id: int) -> Iterator[None]:
    """Who is sending: Flower's Message() reads the run id from the process's task
    identity, which Flower's own runtimes set before they start a ServerApp."""
    from flwr.supercore.task_identity import TaskIdentity

    saved = (TaskIdentity._task_id, TaskIdentity._run_id, TaskIdentity._node_id)
    TaskIdentity.task_id, TaskIdentity.run_id = 1, run_id
    TaskIdentity.node_id = SUPERLINK_NODE_ID
    try:
        yield
    finally:
        TaskIdentity._task_id, TaskIdentity._run_id, TaskIdentity._node_id = saved


def _stop_ray() -> None:
    """Disconnect from Ray; a local Ray this run started stops with it."""
    import ray

    if ray.is_initialized():
        ray.shutdown()
