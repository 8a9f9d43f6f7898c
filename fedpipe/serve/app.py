"""The HTTP face of a model: FastAPI routes over the micro-batcher.

    POST /predict   {"inputs": [...]} as application/json, or a raw .npy file as
                    application/x-npy (or application/octet-stream): a batch of
                    inputs, each the model's input shape or flattened to its size
                    -> 200 {"classes": [...], "probabilities": [[...]], "logits": [[...]]}
    GET  /healthz   -> 200 {"status": "ok", "artifact", "input_shape", "lineage",
                            "drift": null or {"score", "alarm", "threshold", "seen"}}
    GET  /metrics   -> Prometheus text (fedpipe.serve.metrics, fedpipe.serve.watch)

/predict answers 400 for malformed or wrongly shaped input, an empty batch or values
that are not finite; 413 for a body over max_body_bytes (by Content-Length, and while
reading, for a body that lies about its length or is chunked) or more than max_inputs
inputs; 415 for another content type; 422 for values of the wrong kind; 503, with
Retry-After, when the queue has no room; 500 only when the model itself fails on a
valid batch. Each error body is {"detail": "<reason>"}.
The body parsing is by hand, not by pydantic, since a request holds hundreds of
numbers and validating them one by one would cost more than the model.
"""

from __future__ import annotations

import json
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import numpy as np
import torch
from fastapi import FastAPI, Request, Response
from fastapi.responses import JSONResponse
from starlette.requests import ClientDisconnect

from fedpipe.drift import DriftMonitor
from fedpipe.serve.batcher import BatchHook, InferenceError, MicroBatcher, Model, QueueFull
from fedpipe.serve.config import ServeConfig
from fedpipe.serve.decode import BadRequest, decode_json, decode_npy, to_batch
from fedpipe.serve.metrics import CONTENT_TYPE, ServeMetrics
from fedpipe.serve.watch import DriftWatch

__all__ = ["make_app"]

JSON_TYPES = ("application/json",)
NPY_TYPES = ("application/x-npy", "application/octet-stream")
RETRY_AFTER_S = "1"


def make_app(
    model: Model,
    input_shape: tuple[int, ...],
    cfg: ServeConfig,
    artifact: str = "model",
    lineage: Any = None,
    monitor: DriftMonitor | None = None,
) -> FastAPI:
    """A service for `model` (any callable from a (B, *input_shape) batch to logits),
    watching its inputs for drift when given a monitor."""
    metrics = ServeMetrics(lambda: batcher.depth)
    watch = DriftWatch(monitor) if monitor is not None else None
    if watch is not None:
        metrics.registry.register(watch)
    on_batch = _both(metrics.batch, watch.batch) if watch is not None else metrics.batch
    batcher = MicroBatcher(
        model, cfg.max_batch, cfg.max_wait_ms / 1e3, cfg.max_queue, on_batch, cfg.threads
    )

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        batcher.start()
        yield
        await batcher.stop()

    # No OpenAPI pages: /predict reads its body by hand, so they would describe nothing,
    # and every route is one more pattern each request is matched against.
    app = FastAPI(
        title="fedpipe serve", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None
    )
    health = {"status": "ok", "artifact": artifact, "input_shape": list(input_shape)}

    @app.get("/healthz")
    async def healthz() -> dict[str, Any]:
        drift = watch.summary() if watch is not None else None
        return {**health, "lineage": lineage, "drift": drift}

    @app.get("/metrics")
    async def prometheus() -> Response:
        return Response(metrics.render(), media_type=CONTENT_TYPE)

    async def predict(request: Request) -> Response:
        t0 = time.perf_counter()
        try:
            answer = await batcher.predict(await _read_batch(request, input_shape, cfg))
        except (BadRequest, QueueFull, ClientDisconnect, InferenceError) as exc:
            return _refuse(exc, metrics)
        body = json.dumps(
            {"classes": answer.classes, "probabilities": answer.probabilities,
             "logits": answer.logits}
        )  # fmt: skip
        metrics.answered(time.perf_counter() - t0)
        return Response(body, media_type="application/json")

    # A plain Starlette route: FastAPI's parameter resolution has nothing to resolve here
    # and costs about as much as the rest of the request handling.
    app.router.add_route("/predict", predict, methods=["POST"])
    return app


def _refuse(exc: Exception, metrics: ServeMetrics) -> Response:
    """The response to a request the service does not answer, counted by reason."""
    headers = {}
    if isinstance(exc, BadRequest):
        status, label, detail = exc.status, exc.label, exc.detail
    elif isinstance(exc, QueueFull):
        status, label, detail = 503, "overloaded", f"overloaded: {exc}"
        headers["Retry-After"] = RETRY_AFTER_S
    elif isinstance(exc, ClientDisconnect):  # no one to read it; counted all the same
        status, label, detail = 499, "disconnected", "the client went away"
    else:  # the model failed on a valid batch: the service's fault, not the client's
        status, label, detail = 500, "inference", str(exc)
    metrics.refused(status, label)
    return JSONResponse({"detail": detail}, status, headers=headers)


def _both(first: BatchHook, second: BatchHook) -> BatchHook:
    def hook(x: torch.Tensor, logits: torch.Tensor, probs: torch.Tensor) -> None:
        first(x, logits, probs)
        second(x, logits, probs)

    return hook


async def _read_batch(request: Request, shape: tuple[int, ...], cfg: ServeConfig) -> np.ndarray:
    kind = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if kind not in JSON_TYPES + NPY_TYPES:
        accepted = ", ".join(JSON_TYPES + NPY_TYPES)
        raise BadRequest(415, "content_type", f"content type {kind!r}; send one of {accepted}")
    body = await _read_body(request, cfg.max_body_bytes)
    if kind in JSON_TYPES:
        return to_batch(decode_json(body, cfg.max_inputs), shape, cfg.max_inputs)
    return to_batch(decode_npy(body, shape, cfg.max_inputs), shape, cfg.max_inputs)


async def _read_body(request: Request, limit: int) -> bytes:
    """The body, refused as soon as it is known to exceed `limit`: by its declared
    length before reading, or by what has arrived (a false or absent Content-Length)."""
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise BadRequest(413, "too_large", f"a body of {declared} bytes; at most {limit}")
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise BadRequest(413, "too_large", f"the body exceeds {limit} bytes")
        chunks.append(chunk)
    return b"".join(chunks)
