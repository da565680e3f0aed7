"""Dynamic batching for one graph: requests queue whole, and batches are shared fairly among them.

A batch leaves when it holds `max_rows` rows, or when the oldest queued request has waited
`max_delay` seconds, and only when this graph's executor is free: whatever queued while the model
was busy forms the next batch. The delay is only spent while requests arrive together (the last
batch merged several): a lone request at low load goes straight to the model.

A queue entry is a whole request: its rows, and how many of them batches have taken so far. When
every waiting row fits in one batch, the batch is all of them in queue order: the hot path, many
small calls at once, with nothing to sort. When they do not fit, the batch's rows are shared
max-min fairly among the waiting requests: those that need less than the fair level get all their
remaining rows, the large ones split what is left, oldest first on ties. One request of 16,000 rows
therefore cannot hold a one-row request back for seconds: the small one rides the next batch. While
requests come together (several wait, or the last batch was shared), none takes more than
`max_share_rows` of a batch, so batches stay short and a small request arriving behind a large one
is not held long; a request alone gets full batches. A request larger than a batch is so served
across several, and answered with its outputs put back together once its last rows are computed.
Answers do not depend on which batch carried a row: the graphs work row by row, and seeded noise is
drawn before batching.

The queue is bounded in rows and refuses at once past the bound; a request whose caller goes away
leaves the count at once. A request whose deadline passes is failed at the next decision: unrun if
no batch had taken its rows yet, and otherwise before its remaining rows are taken. Inference runs
on a worker thread, off the event loop, except a lone batch that the last batch's time per row says
will take under `inline_seconds` (on CPU): handing it to the thread and back would cost more than
computing it where it is.

Two parts. `BatchPolicy.decide(queue, now)` is the whole decision and is pure: from the queue and
the time it answers `Take` (these rows of these entries now, on the loop or the worker) or `Wait`
(until a time); no asyncio, the clock passed in, so tables test it. `Batcher` is the mechanism: it
owns the futures, the worker thread and the timer, asks the policy whenever the graph is free, and
does what it says.
"""

from __future__ import annotations

import asyncio
import math
import time
from collections import deque
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import Executor, ThreadPoolExecutor
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Protocol

import numpy as np

from service.errors import DeadlineExceeded, Internal, ResourceExhausted, Unavailable
from service.metrics import Metrics

RunFn = Callable[[np.ndarray], list[np.ndarray]]
# What a request keeps of its rows of a batch's outputs, computed on the inference worker with the
# batch: (the slice's first row within the request, its rows of the outputs) -> what it keeps.
Reduce = Callable[[int, list[np.ndarray]], list[np.ndarray]]
INLINE_SECONDS = 0.0005  # on CPU, a lone batch expected to compute in less runs on the event loop itself
# Of a full batch's time, what background requests get while interactive ones are about by default:
# at least (so neither starves) and at most (so an interactive call never waits behind more bulk work).
BACKGROUND_SHARE = 0.25
UNLABELLED: Mapping[str, str] = MappingProxyType({"model": "", "version": ""})


class QueueFull(ResourceExhausted):
    """The queue holds too many rows to admit this request."""


class DeadlineExpired(DeadlineExceeded):
    """The request's deadline passed while it waited; it was not computed (or, when batches had taken
    some of its rows, not finished)."""


class BatchFailed(Internal):
    """Inference on the batch holding this request failed; other batches are unaffected."""


class Closed(Unavailable):
    """The batcher is shutting down."""


# The policy: pure, no asyncio, the clock passed in.


class Queued(Protocol):
    """A queue entry as the policy sees it: one request."""

    n: int  # rows
    taken: int  # rows already taken into batches; the next batch takes from row `taken` on
    deadline: float | None  # event-loop time; None: none
    enqueued: float  # event-loop time
    background: bool  # bulk work (Score's draws): it takes what the others leave, and at least a floor

    @property
    def abandoned(self) -> bool:
        """Its caller went away, or it failed: it is passed over, and its rows no longer wait."""
        ...


@dataclass(slots=True)
class QueueState:
    """What the policy decides from: the queue, and what the last batch showed. The mechanism owns it."""

    entries: deque = field(default_factory=deque)  # Queued, oldest first; abandoned ones stay until a decision passes
    rows: int = 0  # rows waiting: in entries, not yet taken, expired or withdrawn
    last_merged: bool = False  # the last batch held several requests or left rows waiting
    last_shared: bool = False  # the last batch served a small request beside others: it is likely on its way back
    seconds_per_row: float = math.inf  # the last successful batch's time per row, a hop to the worker included
    background_rows: int = 0  # of the rows waiting, background requests'
    bulk_cost: float = 1.0  # a background row's time in rows of the graph alone: its reduce measured on top
    interactive_at: float = -math.inf  # when the last batch holding interactive rows was answered (event-loop time)


@dataclass(slots=True)
class Wait:
    """Take nothing now: ask again at `until` (event-loop time; inf: when a request arrives), or
    sooner if a request fills a batch or arrives at an empty queue."""

    until: float


@dataclass(slots=True)
class Take:
    """Compute `slices` now, `rows` rows in all: (entry, k) pairs in queue order, each the entry's
    next k rows (from row `entry.taken`). Fail `expired` (unrun, or unfinished if batches had taken
    some of their rows). The decision looked at the first `scanned` entries of the queue, and every
    entry it finishes (all rows taken, expired, or abandoned and passed over) is among them: the
    mechanism tidies that prefix only, never the whole queue."""

    scanned: int
    slices: list[tuple[Queued, int]]
    rows: int
    expired: Sequence
    merged: bool  # several requests in the batch, or rows left waiting: the next batch waits for company
    inline: bool  # run it on the event loop, not the worker thread


UNTIL_ARRIVAL = Wait(math.inf)
_NONE: tuple = ()


@dataclass(frozen=True, slots=True)
class BatchPolicy:
    """When a batch goes and what it holds: every waiting row when they fit in `max_rows`, and
    otherwise max-min fair shares of `max_rows` rows among the waiting requests.

    Max-min fair: a request wanting less than the fair level gets all its remaining rows, and the
    larger ones split what is left evenly, the older ones taking the odd rows; with more requests
    waiting than `max_rows`, the oldest `max_rows` get one row each.

    While small requests are about, one request takes at most `max_share_rows` rows of a batch
    (None: `max_rows // 8`): a large request then goes in short batches, so a small request arriving
    behind it waits for a short batch, not a full one. About means one waits now (it wants no more
    rows than the cap, beside others), or the last batch served one beside others: a caller
    answered by that batch is likely sending its next request while this one computes, as the
    adaptive delay also assumes. This is the one case where a batch leaves short while rows wait,
    by design; large requests among themselves, or one alone, get full batches.
    `max_share_rows >= max_rows` leaves plain max-min fairness.

    Background requests (Score's chunks of draws: bulk work that takes seconds whatever its share)
    take `background_share` of a batch's time while interactive ones are about, at least and at most
    (in rows: fewer where their reduce makes a row cost more, as measured), so
    neither starves and an interactive call arriving waits behind a short stretch of bulk work, not
    a full batch of it; each class is shared max-min within. About means an interactive request
    waits now, or a batch answered one within the time a full batch takes: closed-loop callers are
    on their way back, and a full batch of bulk work taken in that gap would hold them all up.
    Background requests alone otherwise get full batches.

    merge=False turns batching off: one request per graph call (up to `max_rows` of its rows), oldest
    first, never waiting to fill. adaptive_delay=False makes every batch wait out `max_delay` to
    fill, company or not. inline_seconds=0 keeps every batch on the worker thread (a GPU's small
    batches cost launch overhead that a time per row from large ones does not predict).
    """

    max_rows: int = 256
    max_delay: float = 0.002
    merge: bool = True
    adaptive_delay: bool = True
    inline_seconds: float = INLINE_SECONDS
    max_share_rows: int | None = None
    background_share: float = BACKGROUND_SHARE

    def __post_init__(self) -> None:
        if self.max_rows < 1 or (self.max_share_rows is not None and self.max_share_rows < 1):
            raise ValueError(f"a batch and a share hold at least one row: {self}")
        if not 0 < self.background_share <= 1:
            raise ValueError(f"background requests' share of a batch is in (0, 1], got {self.background_share}")

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
        return self.take(queue, now)

    def take(self, queue: QueueState, now: float) -> Take:
        """The batch that goes now."""
        if not self.merge:
            return self._oldest(queue, now)
        bulk = self._bulk_rows(queue, now)
        if queue.rows <= self.max_rows and (bulk is None or queue.background_rows <= bulk):
            return self._everything(queue, now)
        return self._fair(queue, now, bulk)

    def _bulk_rows(self, queue: QueueState, now: float) -> int | None:
        """Background rows a batch takes while interactive requests are about; None: no limit."""
        if not queue.background_rows:
            return None
        waiting = queue.rows > queue.background_rows
        recent = queue.interactive_at > -math.inf and now - queue.interactive_at <= self.max_rows * queue.seconds_per_row
        if not (waiting or recent):
            return None
        # b rows at cost c beside M - b at 1 take the share s of the time: b = s M / (1 + (c - 1)(1 - s)).
        share = self.background_share
        rows = share * self.max_rows / (1 + (queue.bulk_cost - 1) * (1 - share))
        return max(1, int(rows))

    def _everything(self, queue: QueueState, now: float) -> Take:
        """Every waiting row fits: all of them, in queue order. The hot path (a crowd of one-row
        calls), so one pass and nothing sorted; the expired are failed, the abandoned passed over."""
        slices: list = []
        expired: list | None = None
        rows = 0
        for entry in queue.entries:
            if entry.abandoned:
                continue
            if entry.deadline is not None and entry.deadline <= now:
                if expired is None:
                    expired = []
                expired.append(entry)
                continue
            k = entry.n - entry.taken
            slices.append((entry, k))
            rows += k
        inline = len(slices) == 1 and rows * queue.seconds_per_row < self.inline_seconds
        return Take(len(queue.entries), slices, rows, expired or _NONE, len(slices) > 1, inline)

    def _fair(self, queue: QueueState, now: float, bulk: int | None = None) -> Take:
        """More rows wait than a batch holds (or than `bulk` allows of background ones): max-min
        fair shares among the oldest live requests. At most `max_rows` requests can get a row, so
        the scan stops there: bounded by the batch, not the queue."""
        max_rows = self.max_rows
        live: list = []
        expired: list | None = None
        scanned = 0
        for entry in queue.entries:
            if entry.abandoned:
                scanned += 1
                continue
            if len(live) == max_rows:
                break
            scanned += 1
            if entry.deadline is not None and entry.deadline <= now:
                if expired is None:
                    expired = []
                expired.append(entry)
                continue
            live.append(entry)
        wanted = [entry.n - entry.taken for entry in live]
        total = sum(wanted)
        # Expired ones may make room.
        shares = wanted if total <= max_rows and bulk is None else self._split(live, wanted, queue.last_shared, bulk)
        rows = sum(shares)
        left = rows < total or scanned < len(queue.entries)  # rows left waiting, or perhaps beyond the scan
        lone = len(live) == 1
        inline = lone and not left and rows * queue.seconds_per_row < self.inline_seconds
        slices = [(entry, k) for entry, k in zip(live, shares) if k]  # background ones past the bulk room wait
        return Take(scanned, slices, rows, expired or _NONE, left or not lone, inline)

    def _split(self, live: list, wanted: list[int], company: bool, bulk: int | None) -> list[int]:
        """Shares of a batch: background requests (Score's draws, thousands of rows of bulk work)
        take `bulk` rows (None: what the others leave) and interactive ones the rest, so that
        neither side starves; each class is shared max-min fairly within. Every interactive request
        takes at least a row; background ones share their room, the oldest first when they
        outnumber its rows (the others wait for a later batch: several Score calls' chunks would
        otherwise take a row each, far more than their share)."""
        back = [i for i, entry in enumerate(live) if entry.background]
        if not back or (bulk is None and len(back) == len(live)):
            return wanted if sum(wanted) <= self.max_rows else self.shares(wanted, company)
        front = [i for i, entry in enumerate(live) if not entry.background]
        bulk = self.max_rows if bulk is None else bulk
        floor = max(1, min(sum(wanted[i] for i in back), bulk))
        front_shares = self.shares([wanted[i] for i in front], company, max(len(front), self.max_rows - floor))
        room = max(1, min(bulk, self.max_rows - sum(front_shares)))
        back_shares = self.shares([wanted[i] for i in back], company, room)
        shares = [0] * len(live)
        for i, k in (*zip(front, front_shares), *zip(back, back_shares)):
            shares[i] = k
        return shares

    @property
    def share_cap(self) -> int:
        return self.max_share_rows or max(1, self.max_rows // 8)

    def shares(self, wanted: Sequence[int], company: bool = False, rows: int | None = None) -> list[int]:
        """Max-min fair shares of one batch (or of `rows` of it) among requests wanting these rows,
        oldest first; none above `share_cap` while small requests are about (one here wants no more
        than the cap, beside others, or `company`: the last batch served one). With no more
        requests than rows, every share is at least one row (the fair level never drops below one)."""
        max_rows = self.max_rows if rows is None else rows
        if len(wanted) > max_rows:
            return [1] * max_rows + [0] * (len(wanted) - max_rows)
        cap = self.share_cap
        if not (company or (len(wanted) > 1 and min(wanted) <= cap)):
            cap = max_rows
        shares = [min(w, cap) for w in wanted]
        room = max_rows
        if sum(shares) <= room:
            return shares  # everyone gets what it wants, up to the cap: the batch goes short
        # Water-filling: the smallest wants are met while they are under an even split of the room
        # left; the rest split that room, the oldest taking the odd rows. The sort is stable, so
        # equal wants stay oldest first.
        by_size = sorted(range(len(shares)), key=shares.__getitem__)
        for met, i in enumerate(by_size):
            rest = len(by_size) - met
            if shares[i] * rest > room:
                level, odd = divmod(room, rest)
                for rank, j in enumerate(sorted(by_size[met:])):
                    shares[j] = level + (rank < odd)
                break
            room -= shares[i]
        return shares

    def _oldest(self, queue: QueueState, now: float) -> Take:
        """Batching off: the oldest live request alone, up to `max_rows` of its rows; the expired
        ones before it are failed and the abandoned passed over."""
        chosen = None
        expired: list | None = None
        scanned = 0
        left = False
        for entry in queue.entries:
            if entry.abandoned:
                scanned += 1
                continue
            if chosen is not None:
                left = True  # another request waits behind it
                break
            scanned += 1
            if entry.deadline is not None and entry.deadline <= now:
                if expired is None:
                    expired = []
                expired.append(entry)
                continue
            chosen = entry
        if chosen is None:
            return Take(scanned, [], 0, expired or _NONE, False, False)
        wanted = chosen.n - chosen.taken
        k = min(wanted, self.max_rows)
        left = left or k < wanted
        inline = not left and k * queue.seconds_per_row < self.inline_seconds
        return Take(scanned, [(chosen, k)], k, expired or _NONE, left, inline)


# The mechanism: futures, the worker thread, the timer.


@dataclass(eq=False, slots=True)
class _Entry:
    rows: np.ndarray
    n: int
    future: asyncio.Future
    deadline: float | None  # event-loop time
    enqueued: float
    taken: int = 0  # rows taken into batches so far
    background: bool = False
    queued: bool = True  # some of its rows count in the queue: not yet taken, and not expired or withdrawn
    reduce: Reduce | None = None  # what it keeps of its slices' outputs (None: all of them)
    parts: list | None = None  # the outputs of its slices computed so far, when it spans several batches

    @property
    def abandoned(self) -> bool:
        return self.future.done()  # while queued, only a caller that went away or a failure leaves it done


# A batch's share of an entry: (entry, k), the k rows up to `entry.taken`. They stay the last rows
# taken until the batch is answered, since the policy is asked only while the graph is free.
_Slice = tuple[_Entry, int]
_RELEASED = np.empty((0,), np.float32)  # a withdrawn entry's rows: it holds no memory while it waits to be passed over


class Batcher:
    def __init__(
        self, graph: str, run: RunFn, metrics: Metrics, max_rows: int = 256, max_delay: float = 0.002,
        max_queue_rows: int = 4096, merge: bool = True, adaptive_delay: bool = True,
        inline_seconds: float = INLINE_SECONDS, max_share_rows: int | None = None,
        background_share: float = BACKGROUND_SHARE, labels: Mapping[str, str] = UNLABELLED, executor: Executor | None = None,
    ) -> None:  # fmt: skip
        """The batching options are `BatchPolicy`'s; `max_queue_rows` bounds the rows waiting.
        `labels` ("model" and "version") name the served model on this batcher's metrics.
        `executor` runs the batches: the server's one pool of inference workers, which every graph
        of every model shares, so that more models do not mean more threads computing at once
        (they would take the event loop's core); None gives this batcher a worker of its own."""
        self.graph = graph
        self.run = run
        self.metrics = metrics
        self.policy = BatchPolicy(max_rows, max_delay, merge, adaptive_delay, inline_seconds, max_share_rows, background_share)
        self.max_queue_rows = max_queue_rows
        self.labels = dict(labels)
        self.queue = QueueState()
        self._wake = asyncio.Event()  # set on an arrival at an empty queue and when a batch fills
        self._own_executor = executor is None
        self._executor = executor or ThreadPoolExecutor(max_workers=1, thread_name_prefix=f"infer-{graph}")
        self._task: asyncio.Task | None = None
        self._computing: list[_Slice] = []  # the batch being computed now
        children = {"graph": graph, **self.labels}
        self._wait = metrics.queue_wait.labels(**children)  # children looked up once, not per request
        self._rows = metrics.batch_rows.labels(**children)
        self._compute = metrics.compute.labels(**children)

    def start(self) -> None:
        """Serve batches; from now on the queue-depth gauge reads this batcher's queue (read at
        scrape time, so a request pays nothing for it; a batcher started later with the same labels
        takes it over)."""
        queue = self.queue
        self.metrics.queue_rows.labels(graph=self.graph, **self.labels).set_function(lambda: queue.rows)
        self._task = asyncio.get_running_loop().create_task(self._serve(), name=f"batcher-{self.graph}")

    async def close(self) -> None:
        """Stop taking batches and fail every call still waiting, queued or in the batch being
        computed, with Closed; the worker thread finishes that batch on its own, unawaited."""
        computing = self._computing  # taken first: cancelling the loop clears it
        if self._task:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
        for entry in (*(entry for entry, _ in computing), *self.queue.entries):
            entry.queued = False
            entry.parts = None
            if not entry.future.done():
                entry.future.set_exception(Closed("the server is shutting down"))
        self.queue.entries.clear()
        self.queue.rows = self.queue.background_rows = 0
        if self._own_executor:
            self._executor.shutdown(wait=False)

    async def submit(
        self, rows: np.ndarray, deadline: float | None = None, background: bool = False, reduce: Reduce | None = None
    ) -> list[np.ndarray]:
        """Queue `rows` as one request (served across several batches if larger than one) and wait
        for the graph's outputs for them; `background` ones take what the others leave of a batch
        (`BatchPolicy`). With `reduce`, each slice's outputs are reduced on the inference worker
        right after its batch, and the request gets the reductions, joined: its arithmetic is then
        part of the batch, which the policy shares fairly, and the full outputs are never held
        beyond the batch (Score's sums of log p(x|z), a scalar per row of a 35-channel image)."""
        n = len(rows)
        if self._task is None or self._task.done():
            raise Closed("the server is shutting down")
        queue = self.queue
        if queue.rows + n > self.max_queue_rows:
            self._reject("queue_full")
            raise QueueFull(
                f"{self.graph} queue is full ({queue.rows} of {self.max_queue_rows} rows waiting, "
                f"request needs {n}); retry later"
            )
        if n == 0:
            return []  # nothing to compute (as before: no outputs)
        loop = asyncio.get_running_loop()
        entry = _Entry(rows, n, loop.create_future(), deadline, loop.time(), background=background, reduce=reduce)
        was_empty = queue.rows == 0
        queue.entries.append(entry)
        queue.rows += n
        if background:
            queue.background_rows += n
        if was_empty or queue.rows >= self.policy.max_rows:  # the only two events a waiting batcher needs
            self._wake.set()
        try:
            return await entry.future
        except BaseException:
            self._withdraw(entry)
            raise

    def _reject(self, reason: str) -> None:
        self.metrics.rejections.labels(reason=reason, model=self.labels["model"]).inc()

    def _unqueue(self, entry: _Entry) -> None:
        """Its rows not yet taken leave the queue count (once: it is no longer queued after)."""
        entry.queued = False
        self.queue.rows -= entry.n - entry.taken
        if entry.background:
            self.queue.background_rows -= entry.n - entry.taken

    def _withdraw(self, entry: _Entry) -> None:
        """The caller went away: its rows still waiting leave the count now, so callers that left
        cannot hold the queue full. (A failed or expired entry was unqueued already: nothing counted.)"""
        if entry.queued:
            self._unqueue(entry)
            entry.rows = _RELEASED
            self._reject("cancelled")
        entry.parts = None
        entry.future.cancel()  # a queued one is passed over; a computing one's answer is dropped

    def _take(self, take: Take, now: float) -> list[_Slice]:
        """Carry out `take` on the queue: mark its rows taken, fail the expired entries, and drop the
        entries it finished from the scanned prefix, counting a caller that went away but has not
        withdrawn yet; a batch that takes rows is noted for the next decision (`last_merged`,
        `last_shared`). A request's queue wait is timed when its first rows are taken."""
        queue = self.queue
        observe = self._wait.observe
        batch: list[_Slice] = take.slices  # type: ignore[assignment] - the policy saw these _Entry as Queued
        if batch:
            queue.last_merged = take.merged
            queue.last_shared = len(batch) > 1 and any(entry.n <= self.policy.share_cap for entry, _ in batch)
        unfinished = 0
        for entry, k in batch:
            if entry.taken == 0:
                observe(now - entry.enqueued)
            if entry.background:
                queue.background_rows -= k
            entry.taken += k
            if entry.taken < entry.n:
                unfinished += 1
            else:
                entry.queued = False  # all its rows are in batches now
        queue.rows -= take.rows
        entries = queue.entries
        if take.scanned == len(entries) == len(batch) and not unfinished:  # the hot path: the whole queue went
            entries.clear()
            return batch
        for entry in take.expired:
            self._unqueue(entry)
            self._reject("deadline")
            done = f"{entry.taken} of its {entry.n} rows computed" if entry.taken else "not computed"
            entry.parts = None
            entry.future.set_exception(DeadlineExpired(f"deadline passed while queued; {done}"))
        popleft = entries.popleft
        kept: list[_Entry] = []  # requests with rows still to take, in queue order
        for _ in range(take.scanned):
            entry = popleft()
            if entry.queued:
                if entry.future.done():  # its caller went away and has not withdrawn it yet
                    self._unqueue(entry)
                    self._reject("cancelled")
                else:
                    kept.append(entry)
        if kept:
            entries.extendleft(reversed(kept))
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
            batch = self._take(decision, now)
            if batch:
                await self._run_batch(loop, batch, decision.inline)
            del batch, decision  # nothing of a batch outlives it here: its outputs belong to its callers

    async def _run_batch(self, loop: asyncio.AbstractEventLoop, batch: list[_Slice], inline: bool) -> None:
        """Run one batch and answer its requests. A method of its own so that the batch's inputs and
        outputs are let go when it returns, not kept by the serving loop's variables until the next
        batch (a 64x64 model's 256-row batch holds 140 MiB of outputs)."""
        queue = self.queue
        if len(batch) == 1:
            entry, k = batch[0]
            x = entry.rows if k == entry.n else entry.rows[entry.taken - k : entry.taken]
        else:
            x = np.concatenate([entry.rows[entry.taken - k : entry.taken] for entry, k in batch])
        self._rows.observe(len(x))
        started = time.perf_counter()
        self._computing = batch
        try:
            if inline:
                parts, reduced = self._outputs(x, batch)  # a lone, quick batch: the hop to the worker costs more
            else:
                parts, reduced = await loop.run_in_executor(self._executor, self._outputs, x, batch)
        except Exception as err:  # noqa: BLE001 - one batch's failure must not end the loop
            for entry, _ in batch:
                if not entry.future.done():
                    if entry.queued:  # rows it still had waiting leave the count: it will not finish
                        self._unqueue(entry)
                    entry.parts = None
                    entry.future.set_exception(BatchFailed(f"{self.graph} inference failed: {err}"))
            return
        finally:
            self._computing = []
            elapsed = time.perf_counter() - started
            self._compute.observe(elapsed)
        queue.seconds_per_row = elapsed / len(x)  # only from successes: a quick failure predicts nothing
        rows, seconds = reduced
        if rows and elapsed > seconds:
            queue.bulk_cost = 1 + (seconds / rows) / ((elapsed - seconds) / len(x))
        if not all(entry.background for entry, _ in batch):
            queue.interactive_at = loop.time()
        self._answer(batch, parts)

    def _outputs(self, x: np.ndarray, batch: list[_Slice]) -> tuple[list[list[np.ndarray] | None], tuple[int, float]]:
        """The batch's outputs, as each slice's rows of them, reduced where its request asks
        (None for a request that went away); and the rows reduced and the seconds it took."""
        outputs = self.run(x)
        parts: list[list[np.ndarray] | None] = []
        offset, rows, seconds = 0, 0, 0.0
        for entry, k in batch:
            part = None
            if not entry.future.done():
                part = [out[offset : offset + k] for out in outputs]
                if entry.reduce is not None:
                    started = time.perf_counter()
                    part = entry.reduce(entry.taken - k, part)
                    rows, seconds = rows + k, seconds + time.perf_counter() - started
            parts.append(part)
            offset += k
        return parts, (rows, seconds)

    @staticmethod
    def _answer(batch: list[_Slice], parts: list[list[np.ndarray] | None]) -> None:
        """Hand each slice its part: a request answered in one batch at once, one spread over
        several once its last slice is in (batches run one at a time, in order, so its slices come
        back in row order)."""
        for (entry, k), part in zip(batch, parts):
            if part is not None and not entry.future.done():
                if k == entry.n:
                    entry.future.set_result(part)
                else:
                    if entry.parts is None:
                        entry.parts = []
                    entry.parts.append(part)
                    if entry.taken == entry.n:
                        entry.future.set_result([np.concatenate(outs) for outs in zip(*entry.parts)])
                        entry.parts = None
