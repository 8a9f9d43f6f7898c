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
import logging
from collections import deque
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import torch

__all__ = ["BatchHook", "MicroBatcher", "Model", "QueueFull"]

log = logging.getLogger(__name__)

Model = Callable[[torch.Tensor], torch.Tensor]  # (B, *input_shape) -> (B, classes)
# Called in the inference thread after every batch with (inputs, logits, probabilities).
BatchHook = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], None]
Result = tuple[torch.Tensor, torch.Tensor]  # logits, probabilities: (B, classes) each


class QueueFull(RuntimeError):
    """The queue cannot take this request now; the client should retry later."""


@dataclass
class _Item:
    x: torch.Tensor  # (n, *input_shape), n <= max_batch
    future: asyncio.Future[Result]
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

    async def predict(self, x: torch.Tensor) -> Result:
        """Logits and probabilities for the examples of `x`; QueueFull if they don't fit."""
        n = len(x)
        if self._waiting + n > self.max_queue:
            raise QueueFull(f"{self._waiting} examples queued; at most {self.max_queue}")
        loop = asyncio.get_running_loop()
        now, futures = loop.time(), list[asyncio.Future[Result]]()
        for chunk in torch.split(x, self.max_batch):
            futures.append(loop.create_future())
            self._items.append(_Item(chunk, futures[-1], now))
        self._waiting += n
        if self._waiting >= self.max_batch or len(self._items) == len(futures):
            self._ready.set()  # a full batch, or the first work after an empty queue
        if len(futures) == 1:
            return await futures[0]
        parts = await asyncio.gather(*futures)
        return torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts])

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
                        item.future.set_exception(exc)

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
        x = items[0].x if len(items) == 1 else torch.cat([i.x for i in items])
        loop = asyncio.get_running_loop()
        logits, probs = await loop.run_in_executor(self._thread, self._forward, x)
        start = 0
        for item in items:
            stop = start + len(item.x)
            if not item.future.done():  # the client may have gone
                item.future.set_result((logits[start:stop], probs[start:stop]))
            start = stop

    def _forward(self, x: torch.Tensor) -> Result:
        with torch.inference_mode():
            logits = self._model(x).float()
            probs = torch.softmax(logits, dim=1)
        if self._on_batch is not None:
            try:
                self._on_batch(x, logits, probs)
            except Exception:  # monitoring must not cost the clients their answers
                log.exception("the batch hook failed")
        return logits, probs
