"""`fedpipe serve RUN_DIR`: the exported model behind uvicorn until interrupted."""

from __future__ import annotations

import gc
import logging
from pathlib import Path

import uvicorn

from fedpipe.drift import PROFILE_FILE, DriftMonitor
from fedpipe.export import EXPORT_DIR
from fedpipe.serve.app import make_app
from fedpipe.serve.config import ServeConfig
from fedpipe.serve.model import load_served_model

__all__ = ["serve"]

log = logging.getLogger(__name__)


def serve(run_dir: Path, cfg: ServeConfig) -> None:
    """Serve `cfg.artifact` of an exported run on cfg.host:cfg.port; blocks."""
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    served = load_served_model(run_dir, cfg.artifact)
    monitor = None
    if served.profile is None:
        log.info("no %s in %s: serving without drift monitoring", PROFILE_FILE, EXPORT_DIR)
    else:
        monitor = DriftMonitor(
            served.profile, cfg.drift_window, cfg.drift_threshold, cfg.drift_min_examples
        )
        log.info(
            "drift: PSI over the last %d examples against %s, alarm above %.3f",
            cfg.drift_window, PROFILE_FILE, cfg.drift_threshold,
        )  # fmt: skip
    app = make_app(served.model, served.input_shape, cfg, served.name, served.lineage, monitor)
    print(
        f"serving {served.name} ({served.path}) on http://{cfg.host}:{cfg.port}: "
        f"max_batch {cfg.max_batch}, max_wait {cfg.max_wait_ms} ms, "
        f"queue {cfg.max_queue} examples, {cfg.threads} thread(s)",
        flush=True,
    )
    # Everything loaded so far (torch, the model, ~200k objects) lives as long as the
    # process: out of the collector's sight, a full collection takes a millisecond or
    # two instead of 100-200 ms, which every request in flight would wait for.
    gc.collect()
    gc.freeze()
    uvicorn.run(
        app,
        host=cfg.host,
        port=cfg.port,
        # Beyond this many open connections uvicorn answers 503 itself: with
        # max_body_bytes, a bound on the memory that bodies being read can hold.
        limit_concurrency=cfg.max_connections,
        access_log=False,  # a log line per request would cost more than the model
        proxy_headers=False,  # no proxy in front by default; parsing them costs per request
        log_level="warning",
    )
