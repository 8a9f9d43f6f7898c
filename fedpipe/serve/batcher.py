"""Dynamic micro-batching: many small requests, few model calls.

A model call has a fixed cost (dispatch, thread hand-off, per-call overhead of every
layer) that one example pays alone and a batch of 64 shares. Requests put their
examples on a bounded queue; one worker coroutine takes up to `max_batch` of them,
waiting at most `max_wait` after the first arrived for others to join, and runs the
model in one dedicated thread, so the event loop goes on reading requests meanwhile.
When the queue is already full enough the batch goes at once: under load no one waits
for the budget, and an idle service adds at most `max_wait` to a request.

The queue is bounded in examples; a request that does not fit is refused whole
(`QueueFull`), which the service answers with 503 rather than holding memory and
latency it cannot serve. A request larger than `max_batch` is split into batches of at
most `max_batch` and answered when all of them are done.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import operator
from collections import deque
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np
import torch

__all__ = ["Answer", "BatchHook", "InferenceError", "MicroBatcher", "Model", "QueueFull"]

log = logging.getLogger(__name__)

Model = Callable[[torch.Tensor], torch.Tensor]  # (B, *input_shape) -> (B, classes)
# Called in the inference thread after every batch with (inputs, logits, probabilities).
BatchHook = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], None]


class QueueFull(RuntimeError):
    """The queue cannot take this request now; the client should retry later."""


class InferenceError(RuntimeError):
    """The model raised on a batch; every request in that batch gets this."""


@dataclass(frozen=True)
class Answer:
    """The model's answer for some examples, as plain lists ready to serialise."""

    classes: list[int]
    probabilities: list[list[float]]
    logits: list[list[float]]

    def __add__(self, other: Answer) -> Answer:
        return Answer(
            self.classes + other.classes,
            self.probabilities + other.probabilities,
            self.logits + other.logits,
        )

    def part(self, start: int, stop: int) -> Answer:
        return Answer(
            self.classes[start:stop], self.probabilities[start:stop], self.logits[start:stop]
        )


@dataclass
class _Item:
    x: np.ndarray  # (n, *input_shape) float32, n <= max_batch
    future: asyncio.Future[Answer]
    arrived: float  # loop time


class MicroBatcher:
    """Batches concurrent `predict` calls into model calls of at most `max_batch`."""

    def __init__(
        self,
        model: Model,
        max_batch: int,
        max_wait_s: float,
        max_queue: int,
        on_batch: BatchHook | None = None,
        threads: int = 1,
    ) -> None:
        self._model, self._on_batch = model, on_batch
        self.max_batch, self.max_wait_s, self.max_queue = max_batch, max_wait_s, max_queue
        self._items: deque[_Item] = deque()
        self._waiting = 0  # examples queued and not yet taken by the worker
        self._ready = asyncio.Event()  # set when the worker has something to do
        # torch's intra-op thread count is per calling thread (OpenMP), so it is set in
        # the inference thread itself.
        self._thread = ThreadPoolExecutor(
            1, "fedpipe-infer", initializer=torch.set_num_threads, initargs=(threads,)
        )
        self._worker: asyncio.Task[None] | None = None

    @property
    def depth(self) -> int:
        """Examples waiting for the model."""
        return self._waiting

    def start(self) -> None:
        self._worker = asyncio.get_running_loop().create_task(self._run())

    async def stop(self) -> None:
        """Stop the worker, fail what is still queued, release the inference thread."""
        if self._worker is not None:
            self._worker.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._worker
        while self._items:
            item = self._items.popleft()
            if not item.future.done():
                item.future.set_exception(QueueFull("the service is shutting down"))
        self._waiting = 0
        self._thread.shutdown(wait=True)

    async def predict(self, x: np.ndarray) -> Answer:
        """The answer for the examples of `x` (n, *input_shape) float32; QueueFull if they
        don't fit in the queue."""
        n = len(x)
        if self._waiting + n > self.max_queue:
            raise QueueFull(f"{self._waiting} examples queued; at most {self.max_queue}")
        loop = asyncio.get_running_loop()
        now, futures = loop.time(), list[asyncio.Future[Answer]]()
        for start in range(0, n, self.max_batch):
            futures.append(loop.create_future())
            self._items.append(_Item(x[start : start + self.max_batch], futures[-1], now))
        self._waiting += n
        if self._waiting >= self.max_batch or len(self._items) == len(futures):
            self._ready.set()  # a full batch, or the first work after an empty queue
        if len(futures) == 1:
            return await futures[0]
        parts = await asyncio.gather(*futures)
        return functools.reduce(operator.add, parts)

    async def _run(self) -> None:
        while True:
            while not self._items:
                self._ready.clear()
                await self._ready.wait()
            await self._fill()
            items = self._take()
            try:
                await self._answer(items)
            except Exception as exc:  # the worker must outlive any one bad batch
                log.exception("inference failed on a batch of %d requests", len(items))
                for item in items:
                    if not item.future.done():
                        item.future.set_exception(InferenceError(f"inference failed: {exc}"))

    async def _fill(self) -> None:
        """Wait until a full batch is queued or the oldest example's budget is spent."""
        if self._waiting >= self.max_batch:
            return
        delay = self._items[0].arrived + self.max_wait_s - asyncio.get_running_loop().time()
        if delay <= 0:
            return
        self._ready.clear()
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._ready.wait(), delay)

    def _take(self) -> list[_Item]:
        """Whole queued items, oldest first, up to max_batch examples (at least one)."""
        items = [self._items.popleft()]
        size = len(items[0].x)
        while self._items and size + len(self._items[0].x) <= self.max_batch:
            items.append(self._items.popleft())
            size += len(items[-1].x)
        self._waiting -= size
        return items

    async def _answer(self, items: list[_Item]) -> None:
        loop = asyncio.get_running_loop()
        answer = await loop.run_in_executor(self._thread, self._forward, [i.x for i in items])
        start = 0
        for item in items:
            stop = start + len(item.x)
            if not item.future.done():  # the client may have gone
                item.future.set_result(answer.part(start, stop))
            start = stop

    def _forward(self, xs: list[np.ndarray]) -> Answer:
        """In the inference thread: every torch call happens here. (A torch call releases
        the GIL and must take it back; on the event loop's thread that wait, up to the
        interpreter's switch interval, would stall every connection.)"""
        x = torch.from_numpy(xs[0] if len(xs) == 1 else np.concatenate(xs))
        with torch.inference_mode():
            logits = self._model(x).float()
            probs = torch.softmax(logits, dim=1)
        if self._on_batch is not None:
            try:
                self._on_batch(x, logits, probs)
            except Exception:  # monitoring must not cost the clients their answers
                log.exception("the batch hook failed")
        return Answer(probs.argmax(1).tolist(), probs.tolist(), logits.tolist())
