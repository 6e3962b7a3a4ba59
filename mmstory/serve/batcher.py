"""Dynamic batching: requests that arrive together share one forward pass.

Each request is a ``Job`` with a ``key`` (what may share a batch: the task, the input modalities and the
decoding options) and a prepared payload. One asyncio task gathers batches: it takes the oldest job, then jobs of
the same key as they come, waiting at most ``max_wait_ms`` (counted from when the oldest arrived) for the batch to
fill up to ``max_batch``; jobs of other keys met meanwhile wait for the next batches, oldest first. Each batch is
one call of ``run_batch(key, payloads)`` in a single worker thread -- one model instance, never two batches at
once, and the event loop keeps answering (health checks, uploads, new requests) while the model computes.
Requests that arrive during a batch are taken together by the next one, so under load batches fill without
waiting (Triton's "dynamic batcher" works the same way).

Bounded: at most ``max_queue`` jobs wait; one more raises ``QueueFull`` (the server answers 503 with a
``Retry-After`` of the expected wait) instead of queueing without limit. A batch that raises is run again one
job at a time, so one bad input fails only its own request. Written by hand because the field's servers
(Triton, TorchServe, Ray Serve) are whole deployment systems; this is the 150 lines of one of their ideas.
"""
from __future__ import annotations

import asyncio
import math
import time
from collections import Counter, deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, Callable, Hashable, Sequence

RunBatch = Callable[[Hashable, Sequence[Any]], Sequence[Any]]


class QueueFull(Exception):
    """Too many requests are waiting; ``retry_after`` seconds is the expected wait for the queue to drain."""

    def __init__(self, waiting: int, retry_after: int):
        super().__init__(f"the server is busy: its queue is full ({waiting} waiting); retry in {retry_after} s")
        self.waiting, self.retry_after = waiting, retry_after


@dataclass
class Job:
    key: Hashable
    payload: Any
    future: asyncio.Future
    enqueued: float = field(default_factory=time.perf_counter)


@dataclass
class Timings:
    """Where one request's time went, in milliseconds; ``batch_size`` is how many requests shared its batch."""
    queue_ms: float
    model_ms: float
    batch_size: int

    def as_dict(self) -> dict:
        return {"queue_ms": round(self.queue_ms, 2), "model_ms": round(self.model_ms, 2), "batch_size": self.batch_size}


class DynamicBatcher:
    def __init__(self, run_batch: RunBatch, *, max_batch: int = 32, max_wait_ms: float = 5.0, max_queue: int = 256):
        if max_batch < 1:
            raise ValueError(f"max_batch must be >= 1, got {max_batch}")
        if max_wait_ms < 0:
            raise ValueError(f"max_wait_ms must be >= 0, got {max_wait_ms}")
        if max_queue < 1:
            raise ValueError(f"max_queue must be >= 1, got {max_queue}")
        self.run_batch, self.max_batch, self.max_wait, self.max_queue = run_batch, max_batch, max_wait_ms / 1e3, max_queue
        self.queue: asyncio.Queue[Job] | None = None
        self.held: deque[Job] = deque()  # gathered, but of another key than the batch being filled
        self.executor: ThreadPoolExecutor | None = None
        self.batch_sizes: Counter = Counter()  # size -> number of batches of that size
        self.busy_seconds = 0.0                # model time, for the Retry-After estimate
        self._task: asyncio.Task | None = None

    # ------------------------------------------------------------------ lifecycle
    async def start(self) -> None:
        self.queue = asyncio.Queue()
        self.executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="mmstory-model")
        self._task = asyncio.get_running_loop().create_task(self._loop(), name="mmstory-batcher")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            try:
                await self._task
            except asyncio.CancelledError:
                pass
        while self.queue is not None and not self.queue.empty():  # nobody will answer these now
            self.held.append(self.queue.get_nowait())
        while self.held:
            job = self.held.popleft()
            if not job.future.done():
                job.future.set_exception(RuntimeError("the server is shutting down"))
        if self.executor is not None:
            self.executor.shutdown(wait=True)
        self.queue = self.executor = self._task = None

    # ------------------------------------------------------------------ requests
    @property
    def waiting(self) -> int:
        return len(self.held) + (0 if self.queue is None else self.queue.qsize())

    def retry_after(self) -> int:
        """Seconds until the queue is expected to drain, from the mean model time per batch so far."""
        batches = sum(self.batch_sizes.values())
        per_batch = self.busy_seconds / batches if batches else 1.0
        return max(1, math.ceil(per_batch * math.ceil((self.waiting + 1) / self.max_batch)))

    async def submit(self, key: Hashable, payload: Any) -> tuple[Any, Timings]:
        """Queue one job and wait for its result (raises what ``run_batch`` raised for it)."""
        if self.queue is None:
            raise RuntimeError("the batcher is not started")
        if self.waiting >= self.max_queue:
            raise QueueFull(self.waiting, self.retry_after())
        job = Job(key, payload, asyncio.get_running_loop().create_future())
        self.queue.put_nowait(job)
        return await job.future

    def stats(self) -> dict:
        batches = sum(self.batch_sizes.values())
        requests = sum(size * n for size, n in self.batch_sizes.items())
        return {"batches": batches, "requests": requests, "waiting": self.waiting,
                "mean_batch_size": round(requests / batches, 3) if batches else None,
                "batch_sizes": {str(k): v for k, v in sorted(self.batch_sizes.items())},
                "model_seconds": round(self.busy_seconds, 3),
                "max_batch": self.max_batch, "max_wait_ms": self.max_wait * 1e3, "max_queue": self.max_queue}

    # ------------------------------------------------------------------ the loop
    async def _gather(self) -> list[Job]:
        """Up to ``max_batch`` jobs of one key: the oldest job's. Jobs of other keys met on the way are held for
        the next batches, oldest first."""
        first = self.held.popleft() if self.held else await self.queue.get()
        batch, others = [first], deque()
        for job in self.held:
            (batch if job.key == first.key and len(batch) < self.max_batch else others).append(job)
        self.held = others
        deadline = first.enqueued + self.max_wait
        while len(batch) < self.max_batch:
            if not self.queue.empty():
                job = self.queue.get_nowait()
            else:
                left = deadline - time.perf_counter()
                if left <= 0:
                    break
                try:
                    job = await asyncio.wait_for(self.queue.get(), left)
                except asyncio.TimeoutError:
                    break
            (batch if job.key == first.key else self.held).append(job)
        return batch

    async def _loop(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            batch = [j for j in await self._gather() if not j.future.done()]  # a client that left is not computed
            if batch:
                await loop.run_in_executor(self.executor, self._run_group, loop, batch[0].key, batch)

    def _run_group(self, loop: asyncio.AbstractEventLoop, key: Hashable, group: list[Job]) -> None:
        """In the worker thread: one batched call, or one call per job when the batch raised."""
        start = time.perf_counter()
        try:
            results = list(self.run_batch(key, [j.payload for j in group]))
            if len(results) != len(group):
                raise RuntimeError(f"run_batch returned {len(results)} results for {len(group)} inputs")
            outcomes = [(r, None) for r in results]
        except Exception as batch_error:
            if len(group) == 1:
                outcomes = [(None, batch_error)]
            else:  # find the job that fails; the others still get their answers
                outcomes = []
                for job in group:
                    try:
                        outcomes.append((self.run_batch(key, [job.payload])[0], None))
                    except Exception as e:
                        outcomes.append((None, e))
        end = time.perf_counter()
        self.busy_seconds += end - start
        self.batch_sizes[len(group)] += 1
        for job, (result, error) in zip(group, outcomes):
            timings = Timings((start - job.enqueued) * 1e3, (end - start) * 1e3, len(group))
            loop.call_soon_threadsafe(_settle, job.future, result, error, timings)


def _settle(future: asyncio.Future, result: Any, error: BaseException | None, timings: Timings) -> None:
    if future.done():  # the client went away
        return
    if error is not None:
        future.set_exception(error)
    else:
        future.set_result((result, timings))
