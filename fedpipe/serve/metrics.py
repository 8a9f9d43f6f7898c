"""What `GET /metrics` reports, in Prometheus' text format.

Each app owns its registry rather than prometheus-client's global one, so two services
in one process (tests, a benchmark) count separately and never clash over names. Label
values come from small fixed sets (status codes, refusal reasons, class indices), so a
client cannot grow the series without bound.

    fedpipe_requests_total{code}            /predict requests answered, by HTTP status
    fedpipe_request_errors_total{reason}    refused or failed ones, by reason
    fedpipe_request_latency_seconds         time to answer a /predict with 200
    fedpipe_examples_total                  examples predicted
    fedpipe_batch_size                      examples per model call
    fedpipe_queue_depth                     examples waiting for the model
    fedpipe_predicted_class_total{class}    predictions per class
    process_resident_memory_bytes, ...      the process (Linux /proc)
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    ProcessCollector,
    generate_latest,
)
from prometheus_client.exposition import CONTENT_TYPE_PLAIN_0_0_4 as CONTENT_TYPE

__all__ = ["CONTENT_TYPE", "ServeMetrics"]

LATENCY_BUCKETS = (0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0, 2.0, 5.0)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024)


class ServeMetrics:
    """The service's counters, on a registry of its own."""

    def __init__(self, queue_depth: Callable[[], float]) -> None:
        self.registry = CollectorRegistry()
        reg = self.registry
        ProcessCollector(registry=reg)  # memory, CPU time, open files
        self.requests = Counter(
            "fedpipe_requests", "/predict requests by HTTP status", ["code"], registry=reg
        )
        self.errors = Counter(
            "fedpipe_request_errors", "refused or failed /predict requests", ["reason"],
            registry=reg,
        )  # fmt: skip
        self.latency = Histogram(
            "fedpipe_request_latency_seconds", "time to answer a /predict with 200",
            buckets=LATENCY_BUCKETS, registry=reg,
        )  # fmt: skip
        self.examples = Counter("fedpipe_examples", "examples predicted", registry=reg)
        self.batch_size = Histogram(
            "fedpipe_batch_size", "examples per model call", buckets=BATCH_BUCKETS, registry=reg
        )
        self.queue_depth = Gauge("fedpipe_queue_depth", "examples waiting", registry=reg)
        self.queue_depth.set_function(queue_depth)
        self.predicted = Counter(
            "fedpipe_predicted_class", "predictions per class", ["class"], registry=reg
        )
        self._ok = self.requests.labels("200")  # looked up once, counted on every answer

    def answered(self, seconds: float) -> None:
        self._ok.inc()
        self.latency.observe(seconds)

    def refused(self, code: int, reason: str) -> None:
        self.requests.labels(str(code)).inc()
        self.errors.labels(reason).inc()

    def batch(self, x: torch.Tensor, logits: torch.Tensor, probs: torch.Tensor) -> None:
        """After each model call (in the inference thread): sizes and class counts."""
        self.batch_size.observe(len(x))
        self.examples.inc(len(x))
        counts = torch.bincount(probs.argmax(1), minlength=probs.shape[1])
        for cls in torch.nonzero(counts).flatten().tolist():
            self.predicted.labels(str(cls)).inc(int(counts[cls]))

    def render(self) -> bytes:
        return generate_latest(self.registry)
