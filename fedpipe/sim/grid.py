"""A Flower Grid whose nodes are virtual clients run by cohort workers.

The ServerApp sees an ordinary `flwr.serverapp.Grid`: node ids, `push_messages`,
`pull_messages`. Behind it, pushed messages are queued per worker (a client always goes
to the same worker, which keeps its state), sent to the worker `cohort_size` at a time,
and the replies wait in a bounded buffer until pulled. A pump thread keeps every worker
fed with at most two batches in flight and stops feeding while the buffer is full, so
the driver holds about 2 x workers x cohort_size replies at most, whatever the round's
size. Messages past their TTL are dropped, queued or answered (a round that timed out
leaves nothing behind).
"""

from __future__ import annotations

import itertools
import logging
import threading
import time
from collections import deque
from collections.abc import Callable, Iterable, Sequence
from typing import Any, Protocol
from uuid import uuid4

from flwr.app import Message, RecordDict
from flwr.serverapp import Grid
from flwr.supercore.run import Run

from fedpipe.sim.worker import CohortWorker, client_of_node, node_of_client

__all__ = ["CohortGrid", "InProcessPool", "RayPool", "WorkerPool"]

log = logging.getLogger(__name__)

_IN_FLIGHT = 2  # batches per worker: one running, one waiting
_QUERY_BATCH = 32
_PULL_WAIT_S = 0.05
_START_S = 300.0  # for workers to start and load their data


class WorkerPool(Protocol):
    """Runs batches of messages on worker i; results come back through `wait`."""

    size: int

    def submit(self, worker: int, messages: list[Message]) -> Any: ...

    def wait(self, handles: Sequence[Any], timeout: float) -> list[tuple[Any, list[Message]]]: ...

    def placement(self) -> list[dict[str, object]]: ...

    def close(self) -> None: ...


class InProcessPool:
    """One worker inside the driver: a batch runs when submitted (no Ray, no thread)."""

    def __init__(self, make_worker: Callable[[], CohortWorker]) -> None:
        self.size = 1
        self._worker = make_worker()
        self._done: dict[int, list[Message]] = {}
        self._handles = itertools.count()

    def submit(self, worker: int, messages: list[Message]) -> Any:
        handle = next(self._handles)
        self._done[handle] = self._worker.run(messages)
        return handle

    def wait(self, handles: Sequence[Any], timeout: float) -> list[tuple[Any, list[Message]]]:
        return [(h, self._done.pop(h)) for h in handles if h in self._done]

    def placement(self) -> list[dict[str, object]]:
        return [self._worker.where()]

    def close(self) -> None:
        pass


class RayPool:
    """`size` CohortWorker actors, each with cpus/gpus reserved, on the connected Ray."""

    def __init__(
        self, make_worker: Callable[[], CohortWorker], size: int, cpus: float, gpus: float
    ) -> None:
        import ray

        remote = ray.remote(num_cpus=cpus, num_gpus=gpus)(_RemoteWorker)
        self._actors: list[Any] = [remote.remote(make_worker) for _ in range(size)]
        self.size = size
        try:  # started (and prepared) now, or a clear error instead of waiting forever
            ray.get([a.where.remote() for a in self._actors], timeout=_START_S)
        except ray.exceptions.GetTimeoutError as exc:
            self.close()
            raise RuntimeError(
                f"{size} cohort worker(s) with {cpus:g} CPU and {gpus:g} GPU each did not "
                f"start within {_START_S:.0f} s: the Ray cluster lacks the resources "
                "(lower simulation.workers, cpus_per_client or gpus_per_client)"
            ) from exc

    def submit(self, worker: int, messages: list[Message]) -> Any:
        return self._actors[worker].run.remote(messages)

    def wait(self, handles: Sequence[Any], timeout: float) -> list[tuple[Any, list[Message]]]:
        import ray

        if not handles:
            return []
        done, _ = ray.wait(list(handles), num_returns=1, timeout=timeout)
        out: list[tuple[Any, list[Message]]] = []
        for handle in done:
            try:
                out.append((handle, ray.get(handle)))
            except Exception as exc:  # noqa: BLE001 - a lost worker: its clients go silent
                log.error("a cohort worker failed: %s", exc)
                out.append((handle, []))
        return out

    def placement(self) -> list[dict[str, object]]:
        import ray

        return list(ray.get([a.where.remote() for a in self._actors]))

    def close(self) -> None:
        import ray

        for actor in self._actors:
            ray.kill(actor)


class _RemoteWorker:
    """The Ray actor: builds its CohortWorker inside the actor's process."""

    def __init__(self, make_worker: Callable[[], CohortWorker]) -> None:
        self.worker = make_worker()

    def run(self, messages: list[Message]) -> list[Message]:
        return self.worker.run(messages)

    def where(self) -> dict[str, object]:
        return self.worker.where()


class CohortGrid(Grid):
    """A Grid over `num_clients` virtual nodes served by `pool` (see module docstring)."""

    def __init__(self, pool: WorkerPool, num_clients: int, cohort_size: int, run_id: int) -> None:
        self.pool, self.cohort_size = pool, cohort_size
        self._nodes = [node_of_client(c) for c in range(num_clients)]
        self._run = Run.create_empty(run_id)
        self._queues: list[deque[Message]] = [deque() for _ in range(pool.size)]
        self._in_flight: dict[Any, int] = {}  # handle -> worker
        self._expiry: dict[str, float] = {}  # message id -> wall-clock expiry
        self._ready: dict[str, Message] = {}  # reply_to id -> reply
        self._max_ready = _IN_FLIGHT * pool.size * cohort_size
        self._lock = threading.Condition()
        self._stop = False
        self.dropped = 0  # replies and messages that expired before they were pulled
        self._threaded = not isinstance(pool, InProcessPool)
        self._pump_thread: threading.Thread | None = None
        if self._threaded:
            self._pump_thread = threading.Thread(target=self._pump, name="cohort-pump", daemon=True)
            self._pump_thread.start()

    # -- Flower's Grid ------------------------------------------------------------------

    def set_run(self, run: Run) -> None:
        self._run = run

    @property
    def run(self) -> Run:
        return self._run

    def create_message(
        self,
        content: RecordDict,
        message_type: str,
        dst_node_id: int,
        group_id: str,
        ttl: float | None = None,
    ) -> Message:
        return Message(content, dst_node_id, message_type, ttl=ttl, group_id=group_id)

    def get_node_ids(self) -> Iterable[int]:
        return list(self._nodes)

    def push_messages(self, messages: Iterable[Message]) -> Iterable[str]:
        ids: list[str] = []
        with self._lock:
            for msg in messages:
                mid = uuid4().hex
                msg.metadata.__dict__["_message_id"] = mid
                msg.metadata.__dict__["_run_id"] = self._run.run_id
                self._expiry[mid] = msg.metadata.created_at + msg.metadata.ttl
                self._queues[self._worker_of(msg.metadata.dst_node_id)].append(msg)
                ids.append(mid)
            self._lock.notify_all()
        return ids

    # Pulls wait (briefly) for a reply instead of the caller sleeping between pulls: the
    # reply buffer is small, and a caller asleep while it fills would idle the workers.
    waits_for_replies = True

    def pull_messages(self, message_ids: Iterable[str]) -> Iterable[Message]:
        wanted = list(message_ids)
        if not self._threaded:
            self._step(timeout=0.0)
        with self._lock:
            if self._threaded and not any(i in self._ready for i in wanted):
                self._lock.wait(_PULL_WAIT_S)  # the pump notifies when replies arrive
            out = [self._ready.pop(i) for i in wanted if i in self._ready]
            for reply in out:
                self._expiry.pop(reply.metadata.reply_to_message_id, None)
            self._lock.notify_all()  # room in the buffer: the pump may feed workers again
        return out

    def send_and_receive(
        self, messages: Iterable[Message], *, timeout: float | None = None
    ) -> Iterable[Message]:
        pending = set(self.push_messages(messages))
        deadline = time.monotonic() + (timeout if timeout is not None else 3600.0)
        replies: list[Message] = []
        while pending and time.monotonic() < deadline:
            got = list(self.pull_messages(pending))
            replies += got
            pending -= {m.metadata.reply_to_message_id for m in got}
            if not got:
                time.sleep(0.01)
        return replies

    # -- feeding the workers ------------------------------------------------------------

    def _worker_of(self, node_id: int) -> int:
        """Always the same worker for a client: it holds the client's state."""
        return client_of_node(node_id) % self.pool.size

    def _next_batch(self, worker: int) -> list[Message]:
        """Up to cohort_size live messages from the worker's queue (expired ones dropped);
        queries (identify: no training, a few bytes back) go QUERY_BATCH times as many."""
        queue, now = self._queues[worker], time.time()
        batch: list[Message] = []
        limit = self.cohort_size
        if queue and queue[0].metadata.message_type.startswith("query"):
            limit *= _QUERY_BATCH
        while queue and len(batch) < limit:
            msg = queue.popleft()
            if self._expiry.get(msg.metadata.message_id, 0.0) < now:
                self._expiry.pop(msg.metadata.message_id, None)
                self.dropped += 1
                continue
            batch.append(msg)
        return batch

    def _feed(self) -> None:
        """Submit batches while workers have room and the reply buffer is not full."""
        busy = {w: 0 for w in range(self.pool.size)}
        for w in self._in_flight.values():
            busy[w] += 1
        for w in range(self.pool.size):
            while busy[w] < _IN_FLIGHT and len(self._ready) < self._max_ready:
                batch = self._next_batch(w)
                if not batch:
                    break
                self._in_flight[self.pool.submit(w, batch)] = w
                busy[w] += 1

    def _collect(self, results: list[tuple[Any, list[Message]]]) -> None:
        """File replies under the message they answer (caller holds the lock)."""
        now = time.time()
        for handle, replies in results:
            self._in_flight.pop(handle, None)
            for reply in replies:
                answered = reply.metadata.reply_to_message_id
                if self._expiry.get(answered, 0.0) < now:
                    self._expiry.pop(answered, None)
                    self.dropped += 1
                    continue
                self._ready[answered] = reply

    def _step(self, timeout: float) -> None:
        with self._lock:
            self._feed()
            handles = list(self._in_flight)
        results = self.pool.wait(handles, timeout)
        with self._lock:
            self._collect(results)
            self._feed()
            if results:
                self._lock.notify_all()

    def _pump(self) -> None:
        while True:
            with self._lock:
                if self._stop:
                    return
                idle = not self._in_flight and not any(self._queues)
                full = len(self._ready) >= self._max_ready
                if idle or (full and not self._in_flight):
                    self._lock.wait(0.05)
                    continue
            try:
                self._step(timeout=0.05)
            except Exception:  # noqa: BLE001 - a dead worker must not kill the pump silently
                log.exception("cohort worker failed")
                time.sleep(0.05)

    def close(self) -> None:
        if self.dropped:
            log.info("%d message(s) or replies expired before they were pulled", self.dropped)
        with self._lock:
            self._stop = True
            self._lock.notify_all()
        if self._pump_thread is not None:
            self._pump_thread.join(timeout=5)
        self.pool.close()
