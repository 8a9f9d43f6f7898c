"""The knobs of `fedpipe serve`, checked once when the service is configured."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from fedpipe.config import ConfigError, check_range

__all__ = ["ServeConfig"]


@dataclass(frozen=True)
class ServeConfig:
    """One inference service: where it listens, which artifact, and its bounds.

    Every bound is a number here so that overload and hostile requests meet a limit
    that was chosen, not the machine's memory.
    """

    SECTION: ClassVar[str] = "serve"
    host: str = "127.0.0.1"
    port: int = 8000
    # The artifact's name in export.json (e.g. torchscript-int8), or a short alias.
    artifact: str = "torchscript-fp32"
    # Examples per model call; 1 turns micro-batching off.
    max_batch: int = 64
    # How long the first queued example may wait for others to fill its batch. 0: take
    # what queued while the model was busy, which under load is already a batch (mean
    # 32 at 64 clients on the MNIST CNN) and at low load adds no latency. Waiting won
    # nothing on CPU there (2 ms cost 1 client 3 ms a request and 64 clients nothing),
    # but can on a model whose per-call cost dominates (a GPU). The event loop's timers
    # resolve about 1 ms.
    max_wait_ms: float = 0.0
    # Examples waiting for the model; a request that would go past it gets 503.
    max_queue: int = 1024
    # Request bodies and inputs per request above these get 413.
    max_body_bytes: int = 4 * 1024 * 1024
    max_inputs: int = 256
    # Connections (and requests) open at once; beyond it the server answers 503. With
    # max_body_bytes this bounds the memory held by bodies being read.
    max_connections: int = 512
    # torch intra-op threads of the one inference thread.
    threads: int = 1
    # Drift monitoring (when the export has a data profile): examples per window, the
    # score that raises the alarm, and the examples seen before any score counts.
    drift_window: int = 1000
    drift_threshold: float = 0.25  # PSI above 0.25 is the usual reading of a shift
    drift_min_examples: int = 200

    def __post_init__(self) -> None:
        if not self.host:
            raise ConfigError("serve.host must not be empty")
        check_range(self.SECTION, "port", self.port, 0, 65535)  # 0: any free port
        if not self.artifact:
            raise ConfigError("serve.artifact must name an artifact of export.json")
        check_range(self.SECTION, "max_batch", self.max_batch, 1, 65_536)
        check_range(self.SECTION, "max_wait_ms", self.max_wait_ms, 0.0, 10_000.0)
        check_range(self.SECTION, "max_inputs", self.max_inputs, 1, 1_000_000)
        # A request is admitted whole or not at all, so the largest one must fit.
        check_range(self.SECTION, "max_queue", self.max_queue, self.max_inputs, 10_000_000)
        check_range(self.SECTION, "max_body_bytes", self.max_body_bytes, 1024, 1 << 31)
        check_range(self.SECTION, "max_connections", self.max_connections, 1, 1_000_000)
        check_range(self.SECTION, "threads", self.threads, 1, 1024)
        check_range(self.SECTION, "drift_window", self.drift_window, 1, 10_000_000)
        check_range(self.SECTION, "drift_threshold", self.drift_threshold, 0.0, lo_open=True)
        check_range(
            self.SECTION, "drift_min_examples", self.drift_min_examples, 1, self.drift_window
        )
