"""Dynamic batching for one graph: requests queue as rows, and batches go out full or on time.

A batch leaves when it holds `max_rows` rows, or when the oldest queued request has waited
`max_delay` seconds, and only when this graph's executor is free: whatever queued while the model
was busy forms the next batch. The delay is only spent while requests arrive together (the last
batch merged several): a lone request at low load goes straight to the model. The queue is
bounded in rows and refuses at once past the bound. A request larger than `max_rows` is split
into several queue entries; a request whose deadline has passed is dropped before compute.
Inference runs on a worker thread, off the event loop, except a lone batch that the last batch's
time per row says will take under `inline_seconds` (on CPU): handing it to the thread and back
would cost more than computing it where it is (digits model, Sample(1) at concurrency 1: 0.65 ->
0.75 of the bare echo's requests/s).
"""

from __future__ import annotations

import asyncio
import math
import time
from collections import deque
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np

from service.metrics import Metrics

RunFn = Callable[[np.ndarray], list[np.ndarray]]
INLINE_SECONDS = 0.0005  # on CPU, a lone batch expected to compute in less runs on the event loop itself


class QueueFull(RuntimeError):
    """The queue holds too many rows to admit this request."""


class DeadlineExpired(RuntimeError):
    """The request's deadline passed while it waited; it was not computed."""


class BatchFailed(RuntimeError):
    """Inference on the batch holding this request failed; other batches are unaffected."""


class Closed(RuntimeError):
    """The batcher is shutting down."""


@dataclass
class _Entry:
    rows: np.ndarray
    future: asyncio.Future
    deadline: float | None  # event-loop time
    enqueued: float


class Batcher:
    def __init__(
        self, graph: str, run: RunFn, metrics: Metrics, max_rows: int = 256, max_delay: float = 0.002,
        max_queue_rows: int = 4096, merge: bool = True, adaptive_delay: bool = True,
        inline_seconds: float = INLINE_SECONDS,
    ) -> None:  # fmt: skip
        """merge=False turns batching off: one request (chunk) per graph call, never waiting to fill.
        adaptive_delay=False makes every batch wait out `max_delay` to fill, company or not.
        inline_seconds=0 keeps every batch on the worker thread (a GPU's small batches cost launch
        overhead that a time per row from large ones does not predict)."""
        self.graph = graph
        self.merge = merge
        self.adaptive_delay = adaptive_delay
        self.run = run
        self.metrics = metrics
        self.max_rows = max_rows
        self.max_delay = max_delay
        self.max_queue_rows = max_queue_rows
        self.inline_seconds = inline_seconds
        self._queue: deque[_Entry] = deque()
        self._queued_rows = 0
        self._wake = asyncio.Event()
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix=f"infer-{graph}")
        self._task: asyncio.Task | None = None
        self._running: list[_Entry] = []  # the batch in the executor now
        self._company = False  # did the last batch find other requests waiting?
        self._row_seconds = math.inf  # time per row of the last batch, a hop to the worker included
        self._wait = metrics.queue_wait.labels(graph=graph)  # children looked up once, not per request
        self._rows = metrics.batch_rows.labels(graph=graph)
        self._compute = metrics.compute.labels(graph=graph)

    def start(self) -> None:
        """Serve batches; from now on the queue-depth gauge reads this batcher's queue (read at
        scrape time, so a request pays nothing for it; a swapped-in engine's batcher takes it over)."""
        self.metrics.queue_rows.labels(graph=self.graph).set_function(lambda: self._queued_rows)
        self._task = asyncio.get_running_loop().create_task(self._serve(), name=f"batcher-{self.graph}")

    async def close(self) -> None:
        """Stop taking batches and fail every call still waiting, queued or in the batch being
        computed, with Closed; the worker thread finishes that batch on its own, unawaited."""
        running = self._running  # taken first: cancelling the loop clears it
        if self._task:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
        for entry in (*running, *self._queue):
            if not entry.future.done():
                entry.future.set_exception(Closed("the server is shutting down"))
        self._queue.clear()
        self._queued_rows = 0
        self._executor.shutdown(wait=False)

    async def submit(self, rows: np.ndarray, deadline: float | None = None) -> list[np.ndarray]:
        """Queue `rows` (split if larger than a batch) and wait for the graph's outputs for them."""
        n = len(rows)
        if self._task is None or self._task.done():
            raise Closed("the server is shutting down")
        if self._queued_rows + n > self.max_queue_rows:
            self.metrics.rejections.labels(reason="queue_full").inc()
            raise QueueFull(
                f"{self.graph} queue is full ({self._queued_rows} of {self.max_queue_rows} rows waiting, "
                f"request needs {n}); retry later"
            )
        loop = asyncio.get_running_loop()
        now = loop.time()
        was_empty = not self._queue
        futures = []
        for start in range(0, n, self.max_rows):
            entry = _Entry(rows[start : start + self.max_rows], loop.create_future(), deadline, now)
            self._queue.append(entry)
            futures.append(entry.future)
        self._queued_rows += n
        if was_empty or self._queued_rows >= self.max_rows:  # the only two events a waiting batcher needs
            self._wake.set()
        try:
            parts = [await futures[0]] if len(futures) == 1 else await asyncio.gather(*futures)
        except BaseException:
            for f in futures:
                f.cancel()  # entries still queued are skipped when a batch is formed
            raise
        if len(parts) == 1:
            return parts[0]
        return [np.concatenate(outs) for outs in zip(*parts)]

    def _take(self, now: float) -> list[_Entry]:
        """Pop up to max_rows rows of live entries; fail the expired ones without computing them."""
        batch: list[_Entry] = []
        rows = 0
        while self._queue and rows + len(self._queue[0].rows) <= self.max_rows and (self.merge or not batch):
            entry = self._queue.popleft()
            self._queued_rows -= len(entry.rows)
            expired = entry.deadline is not None and entry.deadline <= now
            if expired or entry.future.done():  # past its deadline, or its caller went away
                self.metrics.rejections.labels(reason="deadline" if expired else "cancelled").inc()
                if not entry.future.done():
                    entry.future.set_exception(DeadlineExpired("deadline passed while queued; not computed"))
                continue
            self._wait.observe(now - entry.enqueued)
            batch.append(entry)
            rows += len(entry.rows)
        return batch

    async def _wait_for_batch(self, loop: asyncio.AbstractEventLoop) -> None:
        while not self._queue:
            self._wake.clear()
            await self._wake.wait()
        # Waiting for company only pays when requests do come together: a lone caller's batch goes
        # at once, so the delay costs nothing at low load and is spent only once batches merge.
        # Only a full batch or the timer ends the wait: one wake-up per batch, not one per arrival.
        if not (self.merge and (self._company or not self.adaptive_delay)) or self._queued_rows >= self.max_rows:
            return
        remaining = self._queue[0].enqueued + self.max_delay - loop.time()
        if remaining <= 0:
            return
        self._wake.clear()
        timer = loop.call_later(remaining, self._wake.set)
        try:
            await self._wake.wait()
        finally:
            timer.cancel()

    async def _serve(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            await self._wait_for_batch(loop)
            batch = self._take(loop.time())
            if not batch:
                continue
            self._company = len(batch) > 1 or bool(self._queue)
            x = batch[0].rows if len(batch) == 1 else np.concatenate([e.rows for e in batch])
            self._rows.observe(len(x))
            started = time.perf_counter()
            self._running = batch
            try:
                if not self._company and len(x) * self._row_seconds < self.inline_seconds:
                    outputs = self.run(x)  # a lone, quick batch: the hop to the worker costs more
                else:
                    outputs = await loop.run_in_executor(self._executor, self.run, x)
            except Exception as err:  # noqa: BLE001 - one batch's failure must not end the loop
                for entry in batch:
                    if not entry.future.done():
                        entry.future.set_exception(BatchFailed(f"{self.graph} inference failed: {err}"))
                continue
            finally:
                self._running = []
                elapsed = time.perf_counter() - started
                self._compute.observe(elapsed)
            self._row_seconds = elapsed / len(x)  # only from successes: a quick failure predicts nothing
            offset = 0
            for entry in batch:
                k = len(entry.rows)
                if not entry.future.done():
                    entry.future.set_result([out[offset : offset + k] for out in outputs])
                offset += k
