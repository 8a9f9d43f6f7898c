"""Single-machine simulation: N virtual clients on Flower's simulation engine (Ray)."""

from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fedpipe.config import RunConfig
from fedpipe.data import label_histograms, load_dataset, partition_indices
from fedpipe.deploy.processes import OFFLINE_ENV
from fedpipe.errors import os_reason
from fedpipe.rundir import (
    METRICS_FILE,
    PARTITION_FILE,
    SUMMARY_FILE,
    create_run_dir,
    discard_run_dir,
    write_json,
)

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


def log_partition(cfg: RunConfig, run_dir: Path) -> None:
    """Log and save every client's shard size and label histogram."""
    data = load_dataset(cfg.data)
    labels = data.train.y.numpy()
    parts = partition_indices(cfg.data, cfg.partition, cfg.seed)
    hists = label_histograms(labels, list(parts), data.num_classes)
    for cid, (idx, hist) in enumerate(zip(parts, hists, strict=True)):
        log.info("client %d: %d examples, labels %s", cid, len(idx), hist)
    write_json(
        run_dir / PARTITION_FILE,
        {
            "dataset": data.name,
            "scheme": cfg.partition.scheme,
            "clients": [
                {"client": c, "size": len(p), "labels": h}
                for c, (p, h) in enumerate(zip(parts, hists, strict=True))
            ],
        },
    )


def _backend_config(cfg: RunConfig) -> dict[str, Any]:
    return {
        "client_resources": {"num_cpus": cfg.simulation.cpus_per_client, "num_gpus": 0.0},
        "init_args": {"include_dashboard": False, "num_cpus": os.cpu_count() or 1},
    }


def _stop_ray() -> None:
    """Flower leaves Ray running after a simulation; fedpipe leaves no process behind."""
    import ray

    if ray.is_initialized():
        ray.shutdown()


def run_simulation(cfg: RunConfig, run_dir: Path | None = None) -> SimulationResult:
    """Run `cfg` on the simulation engine and return the run directory and summary.

    Without `run_dir`, a fresh one is made under `cfg.output_dir` once the dataset loads,
    and removed again (with `output_dir` when this run made it) if the run fails before
    any round finished: a failed start leaves nothing behind.
    """
    offline_env()
    # Fail on a missing dataset or impossible partition before Ray starts.
    load_dataset(cfg.data)
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
    log_partition(cfg, run_dir)

    from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey
    from flwr.simulation import run_simulation as flwr_run_simulation

    from fedpipe.attacks import build_attack, fault_mod
    from fedpipe.client_app import make_client_app
    from fedpipe.crypto.seal import public_bytes
    from fedpipe.server_app import make_server_app

    errors: list[BaseException] = []
    try:
        # A simulated aggregator's key lives for one run; deployment uses `fedpipe keys`.
        key = X25519PrivateKey.generate() if cfg.security.sealed(deployed=False) else None
        fault = fault_mod(cfg.simulation)
        flwr_run_simulation(
            server_app=make_server_app(cfg, run_dir, errors, seal_key=key),
            client_app=make_client_app(
                cfg,
                seal_key=public_bytes(key.public_key()) if key else None,
                hooks=build_attack(cfg),
                mods=[fault] if fault else None,
            ),
            num_supernodes=cfg.partition.num_clients,
            backend_config=_backend_config(cfg),
        )
    finally:
        _stop_ray()
    summary_path = run_dir / SUMMARY_FILE
    if errors or not summary_path.exists():
        reason = repr(errors[0]) if errors else "the ServerApp stopped before the last round"
        raise RunFailed(f"simulation failed: {reason} (run directory {run_dir})")
    return SimulationResult(run_dir, json.loads(summary_path.read_text()))
