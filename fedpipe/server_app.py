"""The Flower ServerApp: FedAvg (or another Flower strategy) behind the decode wrapper,
with centralized evaluation of the global model on the held-out test set every round."""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path

import torch
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, MetricRecord
from flwr.serverapp import Grid, ServerApp
from torch.utils.data import Dataset

from fedpipe.boundary import Opener
from fedpipe.checkpoint import CHECKPOINT_FILE, load_checkpoint, restore_strategy, save_checkpoint
from fedpipe.codec import Encoded, build_codec
from fedpipe.config import RunConfig
from fedpipe.crypto.keys import load_aggregator_key
from fedpipe.crypto.seal import Binding, open_sealed
from fedpipe.data import Split
from fedpipe.drift import PROFILE_EXAMPLES, Profile, probabilities
from fedpipe.grid import BoundedGrid
from fedpipe.lineage import finish_lineage, load_parent, start_lineage
from fedpipe.metrics import MetricsLog
from fedpipe.progress import RoundProgress
from fedpipe.records import config_from_run_config
from fedpipe.rounds.engine import RoundPlan
from fedpipe.rundir import (
    DEVICE_PROFILE_FILE,
    METRICS_FILE,
    MODEL_FILE,
    SUMMARY_FILE,
    save_model,
    write_json,
)
from fedpipe.seed import set_seed
from fedpipe.strategy import CodecStrategy, build_strategy, streams
from fedpipe.task import TaskContext, load_task
from fedpipe.validation import class_record

__all__ = ["make_opener", "make_server_app", "run_server"]

log = logging.getLogger(__name__)


@contextmanager
def _closing(view: RoundProgress) -> Iterator[None]:
    """The live bar ends with the rounds, however they end (a bar left running hides the
    terminal's cursor)."""
    try:
        yield
    finally:
        view.close()


def _report(run_dir: Path) -> None:
    """The run's report.html and plots; a failure here never fails the run."""
    try:
        from fedpipe.report import write_report

        write_report([run_dir], force=True)
    except Exception as exc:  # noqa: BLE001 - plotting must not lose a finished run
        log.warning("could not write the report for %s: %s", run_dir, exc)


def _input_shape(test: Split | Dataset | None) -> tuple[int, ...]:  # type: ignore[type-arg]
    """One input's shape, saved with the model for export (empty without test data)."""
    if test is None:
        return ()
    if isinstance(test, Split):
        return tuple(test.x.shape[1:])
    return tuple(torch.as_tensor(test[0][0]).shape)


def _reference(model: torch.nn.Module, test: Split | Dataset | None) -> Profile | None:  # type: ignore[type-arg]
    """The bins devices report their held-out data in: deciles of the coordinator's test
    inputs (None without test data, or data fedpipe cannot read as tensors)."""
    if not isinstance(test, Split) or len(test) == 0:
        return None
    x = test.x[:PROFILE_EXAMPLES]
    return Profile.reference(x, probabilities(model, x))


def make_opener(run_id: int, key: X25519PrivateKey) -> Opener:
    """Opens a sealed update for (round, node) of run `run_id` with the aggregator key."""

    def open_payload(encoded: Encoded, server_round: int, node: int) -> Encoded:
        return open_sealed(encoded, key, Binding(run_id, server_round, node))

    return open_payload


def run_server(
    grid: Grid,
    cfg: RunConfig,
    run_dir: Path,
    resume: bool = False,
    seal: tuple[int, X25519PrivateKey] | None = None,
) -> dict[str, object]:
    """Run all rounds on `grid`, writing metrics, checkpoints, the final model and summary.

    With `resume`, continue from the run directory's last checkpoint: the rounds it holds
    are kept, the round that was in flight is run again. With `seal` (this run's id and
    the aggregator's private key), only sealed updates bound to this run are accepted.
    """
    t0 = time.perf_counter()
    set_seed(cfg.seed)
    task = load_task(cfg.task)
    ctx = TaskContext(cfg, None, {})
    model = task.model(ctx)  # seeded init
    parent = load_parent(cfg.model.init) if cfg.model.init and not resume else None
    if parent is not None:  # warm start: the parent run's global model
        task.load_weights(model, parent.state_dict)
    test = task.test_data(ctx)
    if test is None:
        log.warning("task %s has no test_data: no centralized evaluation", task.name)
    inner = build_strategy(cfg.federation)
    view = RoundProgress(cfg.federation.rounds, tensorboard_dir=run_dir / "tensorboard")
    metrics = MetricsLog(run_dir / METRICS_FILE, cfg.federation.rounds, view=view.update)
    done = 0
    if resume:
        ckpt = load_checkpoint(run_dir / CHECKPOINT_FILE)
        model.load_state_dict(
            ArrayRecord({k: Array(v) for k, v in ckpt.arrays.items()}).to_torch_state_dict()
        )
        restore_strategy(inner, ckpt.strategy_state)
        metrics.keep_until(ckpt.round)
        done = ckpt.round
        log.info("resuming %s after round %d of %d", run_dir, done, cfg.federation.rounds)

    def central_evaluate(server_round: int, arrays: ArrayRecord) -> MetricRecord | None:
        if test is None:
            return None
        model.load_state_dict(arrays.to_torch_state_dict())
        v = task.validate(model, test, ctx)
        per_class = class_record(v.confusion) if v.confusion is not None else {}
        return MetricRecord({"accuracy": v.accuracy, "loss": v.loss, **per_class})

    if not resume:
        first = central_evaluate(0, ArrayRecord(model.state_dict()))
        start_lineage(
            run_dir,
            cfg,
            model.state_dict(),
            parent,
            float(first["accuracy"]) if first is not None else None,  # type: ignore[arg-type]
        )

    strategy = CodecStrategy(
        inner,
        build_codec(cfg.codec),
        on_round_end=metrics.write,
        downlink=cfg.downlink,
        checkpoint=lambda rnd, arrays: save_checkpoint(
            run_dir / CHECKPOINT_FILE, rnd, arrays, inner
        ),
        round_offset=done,
        opener=make_opener(*seal) if seal is not None else None,
        bounds=cfg.bounds,
        streaming=streams(cfg.federation),
        plan=RoundPlan(
            fraction_train=cfg.federation.fraction_train,
            fraction_evaluate=cfg.federation.fraction_evaluate,
            min_nodes=cfg.federation.min_nodes,
            seed=cfg.seed,
            poll_s=cfg.federation.poll_interval,
            wait_s=cfg.federation.wait_for_nodes,
        ),
        on_progress=view.clients_done,
        secagg=cfg.secagg if cfg.security.secagg == "on" else None,
        profile=_reference(model, test) if cfg.federation.fraction_evaluate > 0 else None,
    )
    if done < cfg.federation.rounds:
        with _closing(view):
            result = strategy.start(
                BoundedGrid(grid, cfg.federation.min_nodes, cfg.federation.wait_for_nodes),  # type: ignore[arg-type]
                ArrayRecord(model.state_dict()),
                num_rounds=cfg.federation.rounds - done,
                timeout=cfg.federation.round_timeout,
                train_config=ConfigRecord(),
                evaluate_fn=central_evaluate,
            )
        model.load_state_dict(result.arrays.to_torch_state_dict())
    save_model(run_dir / MODEL_FILE, model, cfg, _input_shape(test))
    finish_lineage(run_dir, model.state_dict())
    if strategy.device_profiles is not None:
        write_json(run_dir / DEVICE_PROFILE_FILE, strategy.device_profiles.to_json())
    summary = metrics.summary(time.perf_counter() - t0)
    write_json(run_dir / SUMMARY_FILE, summary)
    _report(run_dir)
    return summary


SEAL_KEY_FILE = "seal-key-file"  # run config: the aggregator's private key, on the coordinator


def _deployed_seal_key(cfg: RunConfig, run_config: Mapping[str, object]) -> X25519PrivateKey | None:
    """The aggregator key a deployed run must use (a path, never the key, is in the run
    config: the SuperLink stores run configs in its database)."""
    if not cfg.security.sealed(deployed=True):
        return None
    path = run_config.get(SEAL_KEY_FILE)
    if not path:
        raise ValueError(
            f"security.seal={cfg.security.seal!r} but the run names no {SEAL_KEY_FILE}"
        )
    return load_aggregator_key(Path(str(path)))


def make_server_app(
    cfg: RunConfig | None = None,
    run_dir: Path | None = None,
    seal_key: X25519PrivateKey | None = None,
) -> ServerApp:
    """A ServerApp bound to `cfg` and `run_dir`, or reading them from the run config."""
    app = ServerApp()

    @app.main()
    def _main(grid: Grid, context: Context) -> None:
        run_config = dict(context.run_config)
        run_cfg = cfg or config_from_run_config(run_config)
        out = run_dir if run_dir is not None else Path(str(run_config["run-dir"]))
        resume = bool(run_config.get("resume", False))
        key = seal_key if cfg is not None else _deployed_seal_key(run_cfg, run_config)
        seal = (context.run_id, key) if key is not None else None
        run_server(grid, run_cfg, out, resume=resume, seal=seal)

    return app
