"""The batch policy on its own: tables of cases and properties, no asyncio, a fake clock passed in.

`BatchPolicy.decide(queue, now)` answers Take (these entries now) or Wait (until a time). The
entries here are plain records; time is a number the test moves. The one asyncio test at the end
checks the mechanism's side of cancellation: a cancelled call's rows leave the queue count at once.
"""

from __future__ import annotations

import asyncio
import math
from collections import deque
from dataclasses import dataclass

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from service.batcher import INLINE_SECONDS, Batcher, BatchPolicy, QueueFull, QueueState, Take, Wait
from service.metrics import Metrics
from tests.conftest import HeldGraph

DELAY = 0.002


@dataclass(eq=False)
class Entry:
    n: int
    enqueued: float = 0.0
    deadline: float | None = None
    abandoned: bool = False


class FakeClock:
    """Time that moves only when told."""

    def __init__(self, now: float = 0.0) -> None:
        self.now = now

    def advance(self, seconds: float) -> float:
        self.now += seconds
        return self.now


def state(*sizes: int, last_merged: bool = False, seconds_per_row: float = math.inf, **entry) -> QueueState:
    """A queue of fresh entries of these sizes, oldest first."""
    entries = deque(Entry(n, **entry) for n in sizes)
    return QueueState(entries, sum(n for n in sizes), last_merged, seconds_per_row)


def queue_of(entries: list[Entry], last_merged: bool = False, seconds_per_row: float = math.inf) -> QueueState:
    return QueueState(deque(entries), sum(e.n for e in entries if not e.abandoned), last_merged, seconds_per_row)


def sizes(take: Take) -> list[int]:
    return [e.n for e in take.batch]


# When a batch goes: wait for company only with merging on, and then only after a merged batch
# (adaptive) or always (adaptive off), never once a batch is full or the oldest has waited the delay.


@pytest.mark.parametrize(
    "merge, adaptive, last_merged, queued, now, expected",
    [
        # adaptive: a lone request at low load goes at once; after a merged batch the next waits
        (True, True, False, (1,), 0.0, "take"),
        (True, True, True, (1,), 0.0, DELAY),
        (True, True, True, (1, 1, 1), DELAY / 2, DELAY),
        # adaptive off: every batch waits out the delay, company or not
        (True, False, False, (1,), 0.0, DELAY),
        (True, False, True, (1,), 0.0, DELAY),
        # merge off: never waits to fill
        (False, True, True, (1,), 0.0, "take"),
        (False, False, False, (1,), 0.0, "take"),
        (False, False, True, (1, 1), 0.0, "take"),
        # a full batch goes at once, whatever the delay
        (True, True, True, (2, 2), 0.0, "take"),
        (True, False, False, (4,), 0.0, "take"),
        (True, False, False, (3, 3), 0.0, "take"),
        # the oldest has waited the delay: it goes
        (True, True, True, (1,), DELAY, "take"),
        (True, False, False, (1,), DELAY + 1.0, "take"),
    ],
)
def test_waits_for_company_only_under_adaptive_delay_after_a_merged_batch(
    merge, adaptive, last_merged, queued, now, expected
):
    policy = BatchPolicy(max_rows=4, max_delay=DELAY, merge=merge, adaptive_delay=adaptive)
    decision = policy.decide(state(*queued, last_merged=last_merged), now)
    if expected == "take":
        assert isinstance(decision, Take) and decision.batch
    else:
        assert decision == Wait(expected)


def test_an_empty_queue_waits_for_an_arrival():
    policy = BatchPolicy(max_rows=4, max_delay=DELAY)
    assert policy.decide(QueueState(), 5.0) == Wait(math.inf)
    # a queue of callers that went away holds no rows: nothing to wait for either
    assert policy.decide(queue_of([Entry(2, abandoned=True)]), 5.0) == Wait(math.inf)


def test_the_delay_runs_from_the_oldest_request_still_waiting():
    """A caller that went away does not start the clock: the wait is measured from the next one."""
    policy = BatchPolicy(max_rows=8, max_delay=DELAY, adaptive_delay=False)
    gone, waiting = Entry(1, enqueued=0.0, abandoned=True), Entry(1, enqueued=0.5)
    assert policy.decide(queue_of([gone, waiting]), 0.5 + DELAY / 2) == Wait(0.5 + DELAY)


def test_a_timed_wait_ends_in_a_take_when_the_clock_reaches_it():
    clock = FakeClock(10.0)
    policy = BatchPolicy(max_rows=4, max_delay=DELAY, adaptive_delay=False)
    queue = state(1, 1, enqueued=clock.now)
    decision = policy.decide(queue, clock.now)
    assert decision == Wait(10.0 + DELAY)
    clock.advance(DELAY / 2)
    assert policy.decide(queue, clock.now) == decision  # nothing changed: the same wait
    clock.now = decision.until
    assert sizes(policy.decide(queue, clock.now)) == [1, 1]


# What a batch holds: rows first in, first out, up to max_rows.


@pytest.mark.parametrize(
    "queued, expected, merged",
    [
        ((1,), [1], False),
        ((1, 1, 1), [1, 1, 1], True),
        ((4, 1), [4], True),  # full: the next one waits
        ((3, 2), [3], True),  # first in, first out: 2 does not fit beside 3, and nothing jumps it
        ((3, 2, 1), [3], True),
        ((2, 2), [2, 2], True),
        ((1, 2, 1), [1, 2, 1], True),
    ],
)
def test_a_batch_takes_entries_in_order_while_they_fit(queued, expected, merged):
    policy = BatchPolicy(max_rows=4, max_delay=0.0)
    take = policy.decide(state(*queued), 1.0)
    assert isinstance(take, Take)
    assert sizes(take) == expected and take.rows == sum(expected) and take.merged is merged
    assert take.consumed == len(expected) and not take.expired


@pytest.mark.parametrize("queued", [(1, 1, 1), (4, 4), (2, 1), (1,)])
def test_merge_off_takes_one_entry(queued):
    policy = BatchPolicy(max_rows=4, max_delay=DELAY, merge=False)
    take = policy.decide(state(*queued, last_merged=True), 0.0)
    assert isinstance(take, Take) and sizes(take) == [queued[0]] and take.consumed == 1
    assert take.merged is (len(queued) > 1)  # the rest wait for the next batch


def test_merge_off_passes_expired_entries_to_reach_one_live_entry():
    policy = BatchPolicy(max_rows=4, max_delay=0.0, merge=False)
    old, live, next_ = Entry(1, deadline=0.5), Entry(2), Entry(1)
    take = policy.decide(queue_of([old, live, next_]), 1.0)
    assert take.batch == [live] and list(take.expired) == [old] and take.consumed == 2 and take.merged


@pytest.mark.parametrize(
    "deadlines, expected_batch, expected_expired",
    [
        ((None, None), [0, 1], []),
        ((0.5, None), [1], [0]),  # past its deadline: failed unrun
        ((1.0, None), [1], [0]),  # a deadline equal to now has passed
        ((1.5, None), [0, 1], []),  # still in time
        ((0.5, 0.5), [], [0, 1]),
        ((None, 0.9, None), [0, 2], [1]),
    ],
)
def test_expired_entries_are_dropped(deadlines, expected_batch, expected_expired):
    policy = BatchPolicy(max_rows=8, max_delay=0.0)
    entries = [Entry(2, deadline=d) for d in deadlines]
    take = policy.decide(queue_of(entries), 1.0)
    assert take.batch == [entries[i] for i in expected_batch]
    assert list(take.expired) == [entries[i] for i in expected_expired]
    assert take.rows == 2 * len(expected_batch) and take.consumed == len(deadlines)


def test_expired_rows_do_not_count_toward_the_batch():
    policy = BatchPolicy(max_rows=4, max_delay=0.0)
    entries = [Entry(3, deadline=0.5), Entry(4)]
    take = policy.decide(queue_of(entries), 1.0)
    assert take.batch == [entries[1]] and list(take.expired) == [entries[0]] and take.rows == 4


def test_abandoned_entries_are_passed_over_whatever_their_size():
    policy = BatchPolicy(max_rows=4, max_delay=0.0)
    entries = [Entry(1), Entry(4, abandoned=True), Entry(2), Entry(3, abandoned=True)]
    take = policy.decide(queue_of(entries), 1.0)
    assert take.batch == [entries[0], entries[2]] and take.consumed == 4 and not take.expired
    assert take.merged  # two entries in it
    lone = policy.decide(queue_of([Entry(1), Entry(2, abandoned=True)], seconds_per_row=0.0), 1.0)
    assert lone.consumed == 2 and not lone.merged  # a caller that left is not company


# Where a batch runs: inline (on the event loop) only when it is lone, small and quick, on CPU.

CPU, GPU = INLINE_SECONDS, 0.0


@pytest.mark.parametrize(
    "inline_seconds, seconds_per_row, queued, merge, inline",
    [
        (CPU, 1e-6, (1,), True, True),  # lone, small, quick: inline
        (CPU, 1e-6, (4,), True, True),
        (CPU, math.inf, (1,), True, False),  # nothing measured yet
        (CPU, INLINE_SECONDS, (1,), True, False),  # expected to take the whole budget: not under it
        (CPU, 1e-4, (8,), True, False),  # lone but slow: 8e-4 s
        (CPU, 1e-6, (1, 1), True, False),  # two merged
        (CPU, 1e-6, (8, 1), True, False),  # lone in its batch, but another waits behind it
        (CPU, 1e-6, (1, 1), False, False),  # merge off, another waiting
        (GPU, 0.0, (1,), True, False),  # never on a GPU
        (GPU, 1e-9, (1,), True, False),
    ],
)
def test_inline_only_for_a_lone_small_quick_batch_on_cpu(inline_seconds, seconds_per_row, queued, merge, inline):
    policy = BatchPolicy(max_rows=8, max_delay=0.0, merge=merge, inline_seconds=inline_seconds)
    take = policy.decide(state(*queued, seconds_per_row=seconds_per_row), 1.0)
    assert isinstance(take, Take) and take.inline is inline


# Properties, over random queues and policies.


@st.composite
def scenarios(draw):
    max_rows = draw(st.integers(1, 8))
    policy = BatchPolicy(
        max_rows=max_rows,
        max_delay=draw(st.sampled_from([0.0, 0.001, 0.5])),
        merge=draw(st.booleans()),
        adaptive_delay=draw(st.booleans()),
        inline_seconds=draw(st.sampled_from([0.0, INLINE_SECONDS])),
    )
    times = sorted(draw(st.lists(st.floats(0.0, 1.0), min_size=0, max_size=12)))
    entries = [
        Entry(
            n=draw(st.integers(1, max_rows)),
            enqueued=t,
            deadline=draw(st.one_of(st.none(), st.floats(0.0, 2.0))),
            abandoned=draw(st.integers(0, 4)) == 0,  # a caller that went away, now and then
        )
        for t in times
    ]
    queue = queue_of(
        entries,
        last_merged=draw(st.booleans()),
        seconds_per_row=draw(st.sampled_from([math.inf, 0.0, 1e-6, 1e-3])),
    )
    now = max(times, default=0.0) + draw(st.sampled_from([0.0, 0.0005, 0.001, 0.6, 1.0]))
    return policy, queue, now


property_settings = settings(max_examples=400, deadline=None, suppress_health_check=list(HealthCheck), database=None)


@property_settings
@given(scenarios())
def test_a_batch_never_exceeds_max_rows_and_takes_a_prefix_of_the_queue(scenario):
    policy, queue, now = scenario
    decision = policy.decide(queue, now)
    if isinstance(decision, Wait):
        return
    entries = list(queue.entries)
    assert decision.rows == sum(e.n for e in decision.batch) <= policy.max_rows
    # first in, first out: the batch and the expired are the live entries of a prefix of the queue, in order
    live_prefix = [e for e in entries[: decision.consumed] if not e.abandoned]
    assert decision.batch == [e for e in live_prefix if e not in decision.expired]
    assert list(decision.expired) == [e for e in live_prefix if e in decision.expired]
    assert all(e.deadline is not None and e.deadline <= now for e in decision.expired)
    assert all(e.deadline is None or e.deadline > now for e in decision.batch)
    if not policy.merge:
        assert len(decision.batch) <= 1
    if decision.inline:
        assert len(decision.batch) == 1 and policy.inline_seconds > 0


@property_settings
@given(scenarios())
def test_never_short_while_rows_wait_and_the_worker_is_free_past_the_delay(scenario):
    policy, queue, now = scenario
    live = [e for e in queue.entries if not e.abandoned]
    if not live:
        return
    now = max(now, live[0].enqueued + policy.max_delay)  # the oldest has waited the delay
    decision = policy.decide(queue, now)
    assert isinstance(decision, Take)  # the worker is free (it is asking): never a wait
    left = [e for e in live if e not in decision.batch and e not in decision.expired]
    if left:  # something is left behind only when it cannot join: the batch is full for it, or merge is off
        assert decision.rows + left[0].n > policy.max_rows or (not policy.merge and len(decision.batch) == 1)
        assert decision.merged


@property_settings
@given(scenarios())
def test_a_wait_is_only_for_company_and_ends_when_the_oldest_has_waited_the_delay(scenario):
    policy, queue, now = scenario
    decision = policy.decide(queue, now)
    if isinstance(decision, Take):
        return
    if queue.rows == 0:
        assert decision.until == math.inf
        return
    oldest = next(e for e in queue.entries if not e.abandoned)
    assert policy.merge and (queue.last_merged or not policy.adaptive_delay)
    assert queue.rows < policy.max_rows
    assert now < decision.until == oldest.enqueued + policy.max_delay


@property_settings
@given(
    st.integers(1, 6),
    st.booleans(),
    st.lists(st.tuples(st.integers(1, 6), st.floats(0.0, 0.01), st.booleans()), max_size=30),
)
def test_run_with_a_fake_clock_every_live_entry_is_served_once_in_order(max_rows, merge, arrivals):
    """Play the mechanism's part with a clock that moves only when told: requests arrive, the policy
    decides, a batch takes a fixed time. Every entry whose caller stays is served once, in order."""
    policy = BatchPolicy(max_rows=max_rows, max_delay=DELAY, merge=merge)
    clock, queue, served, compute = FakeClock(), QueueState(), [], 0.003
    pending = deque()
    at = 0.0
    for n, gap, gone in arrivals:
        at += gap
        pending.append((at, Entry(min(n, max_rows), enqueued=at, abandoned=gone)))
    everyone = [entry for _, entry in pending]
    while pending or queue.rows:
        while pending and pending[0][0] <= clock.now:  # arrivals up to now join the queue
            _, entry = pending.popleft()
            queue.entries.append(entry)
            queue.rows += 0 if entry.abandoned else entry.n
        decision = policy.decide(queue, clock.now)
        if isinstance(decision, Wait):
            if decision.until == math.inf:
                assert queue.rows == 0  # a wait without end only when nothing waits
            if not pending and decision.until == math.inf:
                break
            clock.now = min(decision.until, pending[0][0] if pending else math.inf)
            continue
        assert decision.rows <= max_rows and decision.batch
        for _ in range(decision.consumed):
            entry = queue.entries.popleft()
            queue.rows -= 0 if entry.abandoned else entry.n
        served.extend(decision.batch)
        queue.last_merged = decision.merged
        clock.advance(compute)
    assert served == [e for e in everyone if not e.abandoned]


# The mechanism: a cancelled call leaves the queue count at once.


async def _until(condition, turns: int = 100_000) -> None:
    """Yield to the event loop until `condition()` holds: ordered by events, not by the clock; a
    bounded number of loop turns, so a regression fails rather than hangs."""
    for _ in range(turns):
        if condition():
            return
        await asyncio.sleep(0)
    raise AssertionError("condition not reached")


def test_a_cancelled_call_leaves_the_queue_count_at_once():
    """Calls queued behind a busy graph and then cancelled free their rows before the next batch
    forms: the depth gauge drops, a new call fits in the freed room, and each is counted once."""
    run = HeldGraph()
    started, release = run.computing, run.release

    async def scenario() -> dict[str, float]:
        metrics = Metrics()
        sample = metrics.registry.get_sample_value
        depth = lambda: sample("vae_queue_rows", {"graph": "test"})  # noqa: E731
        cancelled = lambda: sample("vae_rejections_total", {"reason": "cancelled"}) or 0.0  # noqa: E731
        batcher = Batcher("test", run, metrics, max_rows=2, max_delay=0.0, max_queue_rows=4, inline_seconds=0.0)
        batcher.start()
        seen = {}
        try:
            first = asyncio.ensure_future(batcher.submit(np.ones((2, 1))))
            assert await asyncio.to_thread(started.wait, 30)  # the first batch holds the graph
            calls = [asyncio.ensure_future(batcher.submit(np.ones((k, 1)))) for k in (1, 2, 1)]
            await _until(lambda: depth() == 4.0)
            with pytest.raises(QueueFull):
                await batcher.submit(np.ones((1, 1)))  # the queue is full
            for call in calls:
                call.cancel()
            await asyncio.gather(*calls, return_exceptions=True)  # their callers have seen the cancellation
            seen["after cancel"] = depth()
            seen["cancelled"] = cancelled()
            later = asyncio.ensure_future(batcher.submit(np.ones((2, 1))))  # room freed: admitted, not refused
            more = asyncio.ensure_future(batcher.submit(np.ones((2, 1))))
            await _until(lambda: depth() == 4.0 or later.done() or more.done())
            seen["refilled"] = depth()
            release.set()
            outs = await asyncio.wait_for(asyncio.gather(first, later, more), 10)
            seen["answered"] = sum(len(out[0]) for out in outs)
            seen["cancelled at the end"] = cancelled()  # passing the dead entries counts nothing again
            seen["at the end"] = depth()
            return seen
        finally:
            release.set()
            await batcher.close()

    assert asyncio.run(scenario()) == {
        "after cancel": 0.0,
        "cancelled": 3.0,
        "refilled": 4.0,
        "answered": 6,
        "cancelled at the end": 3.0,
        "at the end": 0.0,
    }


def test_a_call_cancelled_under_a_forming_batch_is_counted_once():
    """If the batch forms between the caller's cancellation and its own clean-up, the batcher takes
    its rows off and counts it; the clean-up that follows counts nothing more."""
    run = HeldGraph()
    started, release = run.computing, run.release

    async def scenario() -> tuple[int, float, bool]:
        metrics = Metrics()
        batcher = Batcher("test", run, metrics, max_rows=2, max_delay=0.0, inline_seconds=0.0)
        batcher.start()
        try:
            first = asyncio.ensure_future(batcher.submit(np.ones((2, 1))))
            assert await asyncio.to_thread(started.wait, 30)
            call = asyncio.ensure_future(batcher.submit(np.ones((1, 1))))
            await _until(lambda: batcher.queue.rows == 1)
            call.cancel()  # the entry's future is cancelled now; the caller's clean-up runs on its next step
            loop = asyncio.get_running_loop()
            take = batcher.policy.decide(batcher.queue, loop.time())
            assert isinstance(take, Take) and take.consumed == 1 and not take.batch
            batcher._pop(take, loop.time())  # the batcher gets there first
            await asyncio.gather(call, return_exceptions=True)
            release.set()
            await first
            count = metrics.registry.get_sample_value("vae_rejections_total", {"reason": "cancelled"})
            return batcher.queue.rows, count, call.cancelled()
        finally:
            release.set()
            await batcher.close()

    assert asyncio.run(scenario()) == (0, 1.0, True)


def test_closing_with_calls_queued_leaves_the_count_at_zero():
    run = HeldGraph()
    started, release = run.computing, run.release

    async def scenario() -> tuple[int, list]:
        batcher = Batcher("test", run, Metrics(), max_rows=2, max_delay=0.0, inline_seconds=0.0)
        batcher.start()
        first = asyncio.ensure_future(batcher.submit(np.ones((2, 1))))
        assert await asyncio.to_thread(started.wait, 30)
        queued = [asyncio.ensure_future(batcher.submit(np.ones((k, 1)))) for k in (1, 3)]
        await _until(lambda: batcher.queue.rows == 4)
        await batcher.close()
        results = await asyncio.gather(first, *queued, return_exceptions=True)
        release.set()
        return batcher.queue.rows, [type(r).__name__ for r in results]

    assert asyncio.run(scenario()) == (0, ["Closed", "Closed", "Closed"])
