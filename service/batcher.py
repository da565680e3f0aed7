"""Dynamic batching for one graph: requests queue as rows, and batches go out full or on time.

A batch leaves when it holds `max_rows` rows, or when the oldest queued request has waited
`max_delay` seconds, and only when this graph's executor is free: whatever queued while the model
was busy forms the next batch. The delay is only spent while requests arrive together (the last
batch merged several): a lone request at low load goes straight to the model. The queue is
bounded in rows and refuses at once past the bound; a request whose caller goes away leaves the
count at once. A request larger than `max_rows` is split into several queue entries; a request
whose deadline has passed is dropped before compute. Inference runs on a worker thread, off the
event loop, except a lone batch that the last batch's time per row says will take under
`inline_seconds` (on CPU): handing it to the thread and back would cost more than computing it
where it is.

Two parts. `BatchPolicy.decide(queue, now)` is the whole decision and is pure: from the queue and
the time it answers `Take` (these entries now, on the loop or the worker) or `Wait` (until a time);
no asyncio, the clock passed in, so tables test it. `Batcher` is the mechanism: it owns the
futures, the worker thread and the timer, asks the policy whenever the graph is free, and does
what it says.
"""

from __future__ import annotations

import asyncio
import math
import time
from collections import deque
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Protocol

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


# The policy: pure, no asyncio, the clock passed in.


class Queued(Protocol):
    """A queue entry as the policy sees it."""

    n: int  # rows
    deadline: float | None  # event-loop time; None: none
    enqueued: float  # event-loop time

    @property
    def abandoned(self) -> bool:
        """Its caller went away: it is passed over, never computed, and its rows no longer wait."""
        ...


@dataclass(slots=True)
class QueueState:
    """What the policy decides from: the queue, and what the last batch showed. The mechanism owns it."""

    entries: deque = field(default_factory=deque)  # Queued, oldest first; abandoned ones stay until a batch passes them
    rows: int = 0  # rows waiting: in entries not yet taken, expired or withdrawn
    last_merged: bool = False  # the last batch held several entries or left some waiting
    seconds_per_row: float = math.inf  # the last successful batch's time per row, a hop to the worker included


@dataclass(slots=True)
class Wait:
    """Take nothing now: ask again at `until` (event-loop time; inf: when a request arrives), or
    sooner if a request fills a batch or arrives at an empty queue."""

    until: float


@dataclass(slots=True)
class Take:
    """Pop the first `consumed` entries: compute `batch` (`rows` rows), fail `expired` unrun, and pass
    over the abandoned ones among them."""

    consumed: int
    batch: list
    rows: int
    expired: Sequence
    merged: bool  # several entries in the batch, or some left waiting: the next batch waits for company
    inline: bool  # run it on the event loop, not the worker thread


UNTIL_ARRIVAL = Wait(math.inf)
_NONE: tuple = ()


@dataclass(frozen=True, slots=True)
class BatchPolicy:
    """When a batch goes and what it holds: rows first in, first out, up to `max_rows`.

    merge=False turns batching off: one entry per graph call, never waiting to fill.
    adaptive_delay=False makes every batch wait out `max_delay` to fill, company or not.
    inline_seconds=0 keeps every batch on the worker thread (a GPU's small batches cost launch
    overhead that a time per row from large ones does not predict).
    """

    max_rows: int = 256
    max_delay: float = 0.002
    merge: bool = True
    adaptive_delay: bool = True
    inline_seconds: float = INLINE_SECONDS

    def decide(self, queue: QueueState, now: float) -> Take | Wait:
        """Asked whenever the graph is free and something may have changed."""
        if queue.rows <= 0:
            return UNTIL_ARRIVAL
        # Waiting for company only pays when requests do come together: a lone caller's batch goes
        # at once, so the delay costs nothing at low load and is spent only once batches merge.
        if self.merge and (queue.last_merged or not self.adaptive_delay) and queue.rows < self.max_rows:
            for entry in queue.entries:
                if not entry.abandoned:  # the oldest request still waiting
                    until = entry.enqueued + self.max_delay
                    if until > now:
                        return Wait(until)
                    break
        return self.take(queue.entries, queue.seconds_per_row, now)

    def take(self, entries: Iterable[Queued], seconds_per_row: float, now: float) -> Take:
        """The batch that goes now: entries in queue order while they fit (one with merge off); the
        expired ones among them are failed, and abandoned ones are passed over whatever their size."""
        max_rows, merge = self.max_rows, self.merge
        batch: list = []
        expired: list | None = None
        rows = consumed = 0
        left_waiting = False
        for entry in entries:
            if entry.abandoned:
                consumed += 1
                continue
            n = entry.n
            if rows + n > max_rows or (batch and not merge):
                left_waiting = True
                break
            consumed += 1
            if entry.deadline is not None and entry.deadline <= now:
                if expired is None:
                    expired = []
                expired.append(entry)
                continue
            batch.append(entry)
            rows += n
        merged = len(batch) > 1 or left_waiting
        inline = len(batch) == 1 and not left_waiting and rows * seconds_per_row < self.inline_seconds
        return Take(consumed, batch, rows, expired or _NONE, merged, inline)


# The mechanism: futures, the worker thread, the timer.


@dataclass(eq=False, slots=True)
class _Entry:
    rows: np.ndarray
    n: int
    future: asyncio.Future
    deadline: float | None  # event-loop time
    enqueued: float
    queued: bool = True  # its rows count in the queue: not yet taken, expired or withdrawn

    @property
    def abandoned(self) -> bool:
        return self.future.done()  # while queued, only a caller that went away leaves its future done


_RELEASED = np.empty((0,), np.float32)  # a withdrawn entry's rows: it holds no memory while it waits to be passed over


class Batcher:
    def __init__(
        self, graph: str, run: RunFn, metrics: Metrics, max_rows: int = 256, max_delay: float = 0.002,
        max_queue_rows: int = 4096, merge: bool = True, adaptive_delay: bool = True,
        inline_seconds: float = INLINE_SECONDS,
    ) -> None:  # fmt: skip
        """The batching options are `BatchPolicy`'s; `max_queue_rows` bounds the rows waiting."""
        self.graph = graph
        self.run = run
        self.metrics = metrics
        self.policy = BatchPolicy(max_rows, max_delay, merge, adaptive_delay, inline_seconds)
        self.max_queue_rows = max_queue_rows
        self.queue = QueueState()
        self._wake = asyncio.Event()  # set on an arrival at an empty queue and when a batch fills
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix=f"infer-{graph}")
        self._task: asyncio.Task | None = None
        self._computing: list[_Entry] = []  # the batch being computed now
        self._wait = metrics.queue_wait.labels(graph=graph)  # children looked up once, not per request
        self._rows = metrics.batch_rows.labels(graph=graph)
        self._compute = metrics.compute.labels(graph=graph)

    def start(self) -> None:
        """Serve batches; from now on the queue-depth gauge reads this batcher's queue (read at
        scrape time, so a request pays nothing for it; a swapped-in engine's batcher takes it over)."""
        queue = self.queue
        self.metrics.queue_rows.labels(graph=self.graph).set_function(lambda: queue.rows)
        self._task = asyncio.get_running_loop().create_task(self._serve(), name=f"batcher-{self.graph}")

    async def close(self) -> None:
        """Stop taking batches and fail every call still waiting, queued or in the batch being
        computed, with Closed; the worker thread finishes that batch on its own, unawaited."""
        computing = self._computing  # taken first: cancelling the loop clears it
        if self._task:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
        for entry in (*computing, *self.queue.entries):
            entry.queued = False
            if not entry.future.done():
                entry.future.set_exception(Closed("the server is shutting down"))
        self.queue.entries.clear()
        self.queue.rows = 0
        self._executor.shutdown(wait=False)

    async def submit(self, rows: np.ndarray, deadline: float | None = None) -> list[np.ndarray]:
        """Queue `rows` (split if larger than a batch) and wait for the graph's outputs for them."""
        n = len(rows)
        if self._task is None or self._task.done():
            raise Closed("the server is shutting down")
        queue = self.queue
        if queue.rows + n > self.max_queue_rows:
            self.metrics.rejections.labels(reason="queue_full").inc()
            raise QueueFull(
                f"{self.graph} queue is full ({queue.rows} of {self.max_queue_rows} rows waiting, "
                f"request needs {n}); retry later"
            )
        loop = asyncio.get_running_loop()
        now = loop.time()
        max_rows = self.policy.max_rows
        was_empty = queue.rows == 0
        if 0 < n <= max_rows:  # the common case: one entry, no list
            entry = _Entry(rows, n, loop.create_future(), deadline, now)
            queue.entries.append(entry)
            chunks = None
        else:
            chunks = [
                _Entry(rows[start : start + max_rows], min(max_rows, n - start), loop.create_future(), deadline, now)
                for start in range(0, n, max_rows)
            ]
            queue.entries.extend(chunks)
        queue.rows += n
        if was_empty or queue.rows >= max_rows:  # the only two events a waiting batcher needs
            self._wake.set()
        try:
            if chunks is None:
                return await entry.future
            parts = await asyncio.gather(*[chunk.future for chunk in chunks])
        except BaseException:
            self._withdraw((entry,) if chunks is None else chunks)
            raise
        return [np.concatenate(outs) for outs in zip(*parts)]

    def _withdraw(self, entries: Iterable[_Entry]) -> None:
        """The caller went away (cancelled, or another of its chunks failed): its rows still queued
        leave the count now, so callers that left cannot hold the queue full."""
        queue = self.queue
        for entry in entries:
            if entry.queued:
                entry.queued = False
                entry.rows = _RELEASED
                queue.rows -= entry.n
                self.metrics.rejections.labels(reason="cancelled").inc()
            entry.future.cancel()  # a queued one is passed over; a computing one's answer is dropped

    def _pop(self, take: Take, now: float) -> list[_Entry]:
        """Carry out `take` on the queue: pop its entries, fail the expired ones, time the waits."""
        queue = self.queue
        popleft = queue.entries.popleft
        observe = self._wait.observe
        batch = take.batch
        if take.consumed == len(batch):  # nothing to pass over or fail: the batch is the queue's head
            for entry in batch:
                popleft()
                entry.queued = False
                observe(now - entry.enqueued)
            queue.rows -= take.rows
            return batch
        for _ in range(take.consumed):
            entry = popleft()
            if entry.queued:
                entry.queued = False
                queue.rows -= entry.n
                if entry.future.done():  # its caller went away and has not withdrawn it yet
                    self.metrics.rejections.labels(reason="cancelled").inc()
        for entry in take.expired:
            self.metrics.rejections.labels(reason="deadline").inc()
            entry.future.set_exception(DeadlineExpired("deadline passed while queued; not computed"))
        for entry in batch:
            observe(now - entry.enqueued)
        return batch

    async def _sleep(self, loop: asyncio.AbstractEventLoop, until: float) -> None:
        """Until `until`, or sooner when submit wakes the batcher: one wake-up per batch, not one per arrival."""
        self._wake.clear()
        if until == math.inf:
            await self._wake.wait()
            return
        timer = loop.call_at(until, self._wake.set)
        try:
            await self._wake.wait()
        finally:
            timer.cancel()

    async def _serve(self) -> None:
        loop = asyncio.get_running_loop()
        decide, queue = self.policy.decide, self.queue
        while True:
            now = loop.time()
            decision = decide(queue, now)
            if isinstance(decision, Wait):
                await self._sleep(loop, decision.until)
                continue
            batch = self._pop(decision, now)
            if not batch:
                continue
            queue.last_merged = decision.merged
            x = batch[0].rows if len(batch) == 1 else np.concatenate([e.rows for e in batch])
            self._rows.observe(len(x))
            started = time.perf_counter()
            self._computing = batch
            try:
                if decision.inline:
                    outputs = self.run(x)  # a lone, quick batch: the hop to the worker costs more
                else:
                    outputs = await loop.run_in_executor(self._executor, self.run, x)
            except Exception as err:  # noqa: BLE001 - one batch's failure must not end the loop
                for entry in batch:
                    if not entry.future.done():
                        entry.future.set_exception(BatchFailed(f"{self.graph} inference failed: {err}"))
                continue
            finally:
                self._computing = []
                elapsed = time.perf_counter() - started
                self._compute.observe(elapsed)
            queue.seconds_per_row = elapsed / len(x)  # only from successes: a quick failure predicts nothing
            offset = 0
            for entry in batch:
                k = entry.n
                if not entry.future.done():
                    entry.future.set_result([out[offset : offset + k] for out in outputs])
                offset += k
