"""The batch policy on its own: tables of cases and properties, no asyncio, a fake clock passed in.

`BatchPolicy.decide(queue, now)` answers Take (these rows of these requests now) or Wait (until a
time). The entries of a single decision are plain records; time is a number the test moves. Where
a test follows a queue across several batches, each decision is carried out by the real
mechanism, `Batcher._take`, on the real entries `Batcher.submit` queues (`ByHand`), so the test
and the code cannot drift apart. The asyncio tests at the end check the rest of the mechanism: a
cancelled call's rows leave the queue count at once, a small call queued behind a huge one rides
the next batch, a request spread over several batches is put back together in order, and the
metrics carry the model's labels. They are ordered by events (a batch seen computing, loop turns,
a clock that moves only when told), never by sleeps.
"""

from __future__ import annotations

import asyncio
import math
from collections import deque
from dataclasses import asdict, dataclass

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from service.batcher import (
    INLINE_SECONDS,
    Batcher,
    BatchFailed,
    BatchPolicy,
    DeadlineExpired,
    QueueFull,
    QueueState,
    Take,
    Wait,
    _Entry,
)
from service.metrics import Metrics
from tests.conftest import HeldGraph

DELAY = 0.002
UNLABELLED = {"model": "", "version": ""}


@dataclass(eq=False)
class Entry:
    n: int
    enqueued: float = 0.0
    deadline: float | None = None
    abandoned: bool = False
    taken: int = 0
    background: bool = False

    @property
    def wanted(self) -> int:
        return self.n - self.taken


class FakeClock:
    """Time that moves only when told."""

    def __init__(self, now: float = 0.0) -> None:
        self.now = now

    def advance(self, seconds: float) -> float:
        self.now += seconds
        return self.now


def state(
    *sizes: int, last_merged: bool = False, last_shared: bool = False, seconds_per_row: float = math.inf, **entry
) -> QueueState:
    """A queue of fresh entries of these sizes, oldest first."""
    entries = deque(Entry(n, **entry) for n in sizes)
    background = sum(sizes) if entry.get("background") else 0
    return QueueState(entries, sum(n for n in sizes), last_merged, last_shared, seconds_per_row, background)


def queue_of(
    entries: list[Entry], last_merged: bool = False, last_shared: bool = False, seconds_per_row: float = math.inf
) -> QueueState:
    rows = sum(e.wanted for e in entries if not e.abandoned)
    background = sum(e.wanted for e in entries if not e.abandoned and e.background)
    return QueueState(deque(entries), rows, last_merged, last_shared, seconds_per_row, background)


def batch(take: Take) -> list[Entry]:
    return [e for e, _ in take.slices]


def shares(take: Take) -> list[int]:
    return [k for _, k in take.slices]


class ByHand:
    """The real mechanism's bookkeeping, driven by hand: a `Batcher` with the policy under test,
    whose queue holds real entries (their futures on an event loop that never runs). The test asks
    the policy and hands each decision to `Batcher._take`, as `_serve` does between batches; no
    graph is called, and time is the `now` the test passes."""

    def __init__(self, policy: BatchPolicy) -> None:
        self.loop = asyncio.new_event_loop()
        self.batcher = Batcher("test", self.no_graph, Metrics(), **asdict(policy))
        assert self.batcher.policy == policy
        self.queue = self.batcher.queue

    @staticmethod
    def no_graph(x: np.ndarray) -> list[np.ndarray]:
        raise AssertionError("no batch is computed by hand")

    def arrive(self, n: int, enqueued: float = 0.0, deadline: float | None = None, gone: bool = False) -> _Entry:
        """A request of `n` rows joins the queue, as `Batcher.submit` queues it; `gone`: its caller
        then goes away (`Batcher._withdraw`), so its rows no longer count."""
        entry = _Entry(np.zeros((n, 1), np.float32), n, self.loop.create_future(), deadline, enqueued)
        self.queue.entries.append(entry)
        self.queue.rows += n
        if gone:
            self.batcher._withdraw(entry)
        return entry

    def carry_out(self, take: Take, now: float) -> None:
        """The rows taken, the expired failed (their rows leave the count), the finished entries
        dropped from the scanned prefix only, and what the batch showed noted for the next decision."""
        self.batcher._take(take, now)

    def __enter__(self) -> ByHand:
        return self

    def __exit__(self, *exc) -> None:
        self.loop.close()


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
        (True, False, False, (9,), 0.0, "take"),  # one request larger than a batch
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
        assert isinstance(decision, Take) and decision.slices
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
    assert shares(policy.decide(queue, clock.now)) == [1, 1]


def test_a_request_partly_served_long_ago_does_not_wait_for_company():
    """The delay counts from when the request arrived, not from its last batch: the rest of a large
    request goes at once even after a merged batch."""
    policy = BatchPolicy(max_rows=8, max_delay=DELAY)
    take = policy.decide(queue_of([Entry(20, enqueued=0.0, taken=16)], last_merged=True), 1.0)
    assert isinstance(take, Take) and shares(take) == [4] and not take.merged


# What a batch holds: every waiting row when they fit, in order; max-min fair shares when they do not.


@pytest.mark.parametrize(
    "max_rows, max_share_rows, queued, expected, merged",
    [
        # everything fits: all of it, in queue order
        (4, None, (1,), [1], False),
        (4, None, (1, 1, 1), [1, 1, 1], True),
        (4, None, (2, 2), [2, 2], True),
        (4, None, (1, 2, 1), [1, 2, 1], True),
        (4, None, (3, 1), [3, 1], True),  # no cap when nothing is left waiting: the batch is simply full
        (4, None, (4,), [4], False),
        # a request alone gets full batches, however large
        (4, None, (9,), [4], True),
        (8, None, (20,), [8], True),
        # plain max-min (the cap out of the way): small wants met, the large ones split the rest
        (4, 4, (4, 1), [3, 1], True),
        (4, 4, (3, 2), [2, 2], True),  # an even split: 2 no longer waits behind 3
        (4, 4, (3, 2, 1), [2, 1, 1], True),  # the 1 is met; 3 and 2 split 3 rows, the older takes the odd one
        (4, 4, (4, 4), [2, 2], True),
        (4, 4, (1, 5, 5), [1, 2, 1], True),
        (6, 6, (1, 5, 5), [1, 3, 2], True),
        # more requests than rows: the oldest max_rows get one row each
        (4, None, (1, 1, 1, 1, 1), [1, 1, 1, 1], True),
        (4, 4, (3, 2, 2, 2, 2), [1, 1, 1, 1], True),
        # the cap while a small one waits (default max_rows // 8): short batches, the small ones all in
        (16, None, (20, 1), [2, 1], True),
        (8, None, (5, 5), [4, 4], True),  # large ones among themselves: no cap, a full batch
        (8, None, (9, 1, 1, 1, 1, 1, 1, 1), [1, 1, 1, 1, 1, 1, 1, 1], True),  # fair level 1: the cap does not bind
        (8, 3, (9, 1, 1), [3, 1, 1], True),
        (8, 1, (9, 9), [4, 4], True),
        (8, 3, (9, 9, 2), [3, 3, 2], True),
    ],
)
def test_a_batch_holds_everything_that_fits_or_fair_shares(max_rows, max_share_rows, queued, expected, merged):
    policy = BatchPolicy(max_rows=max_rows, max_delay=0.0, max_share_rows=max_share_rows)
    queue = state(*queued)
    take = policy.decide(queue, 1.0)
    assert isinstance(take, Take)
    assert batch(take) == list(queue.entries)[: len(expected)]  # in queue order, the oldest first
    assert shares(take) == expected and take.rows == sum(expected) and take.merged is merged
    assert not take.expired


def test_a_huge_request_does_not_hold_back_the_small_ones_queued_behind_it():
    """The measured case: 16,000 decoder rows queued first, then 16 one-row Sample calls. The next
    batch holds every small row and the large request's share beside them."""
    policy = BatchPolicy(max_rows=256, max_delay=0.0)
    with ByHand(policy) as hand:
        for n in (16_000, *[1] * 16):
            hand.arrive(n)
        queue = hand.queue
        take = policy.decide(queue, 1.0)
        assert shares(take) == [32] + [1] * 16  # the cap: max_rows // 8 while others wait
        assert batch(take) == list(queue.entries) and take.scanned == 17 and take.merged
        # plain max-min: the large one takes all that the small ones leave, and the batch is full
        uncapped = BatchPolicy(max_rows=256, max_delay=0.0, max_share_rows=256).decide(state(16_000, *[1] * 16), 1.0)
        assert shares(uncapped) == [240] + [1] * 16
        # the small callers answered are likely sending again: the next batch stays short, although
        # the large one waits alone; after a batch of its own, it gets full batches again
        hand.carry_out(take, 1.0)
        assert [e.n - e.taken for e in queue.entries] == [16_000 - 32] and queue.last_shared
        alone = policy.decide(queue, 1.0)
        assert shares(alone) == [32]
        hand.carry_out(alone, 1.0)
        assert shares(policy.decide(queue, 1.0)) == [256]


@pytest.mark.parametrize(
    "queued, last_shared, expected",
    [
        ((20,), False, [8]),  # alone, and alone in the last batch: a full batch
        ((20,), True, [2]),  # alone now, but the last batch was shared: company is on its way
        ((5,), True, [5]),  # everything fits: all of it, no cap
        ((20, 1), False, [2, 1]),  # a small one waiting: capped whatever the last batch held
        ((20, 20), False, [4, 4]),  # large ones among themselves: plain max-min, a full batch
    ],
)
def test_the_cap_holds_while_requests_come_together(queued, last_shared, expected):
    policy = BatchPolicy(max_rows=8, max_delay=0.0, max_share_rows=2)
    take = policy.decide(state(*queued, last_shared=last_shared), 1.0)
    assert shares(take) == expected and take.merged is (sum(queued) > sum(expected) or len(queued) > 1)


def test_a_partly_served_request_is_shared_by_the_rows_it_still_wants():
    policy = BatchPolicy(max_rows=8, max_delay=0.0, max_share_rows=8)
    entries = [Entry(100, taken=97), Entry(6)]
    take = policy.decide(queue_of(entries), 1.0)
    assert shares(take) == [3, 5] and take.rows == 8  # 3 rows left of the first: all of them


def test_with_more_requests_than_rows_the_scan_stops_at_the_batch():
    """The oldest max_rows requests each take a row; the decision looks no further into the queue."""
    policy = BatchPolicy(max_rows=256, max_delay=0.0)
    queue = state(*[1] * 1000)
    take = policy.decide(queue, 1.0)
    assert take.rows == 256 and shares(take) == [1] * 256 and take.scanned == 256 and take.merged
    assert batch(take) == list(queue.entries)[:256]


@pytest.mark.parametrize("queued", [(1, 1, 1), (4, 4), (2, 1), (1,)])
def test_merge_off_takes_one_entry(queued):
    policy = BatchPolicy(max_rows=4, max_delay=DELAY, merge=False)
    take = policy.decide(state(*queued, last_merged=True), 0.0)
    assert isinstance(take, Take) and shares(take) == [queued[0]] and take.scanned == 1
    assert take.merged is (len(queued) > 1)  # the rest wait for the next batch


def test_merge_off_takes_a_large_request_a_batch_at_a_time():
    policy = BatchPolicy(max_rows=4, max_delay=0.0, merge=False)
    sizes = []
    with ByHand(policy) as hand:
        hand.arrive(10)
        hand.arrive(1)
        while hand.queue.rows:
            take = policy.decide(hand.queue, 1.0)
            sizes.append(shares(take))
            hand.carry_out(take, 1.0)
    assert sizes == [[4], [4], [2], [1]]  # first in, first out: batching off is the unshared baseline


def test_merge_off_passes_expired_entries_to_reach_one_live_entry():
    policy = BatchPolicy(max_rows=4, max_delay=0.0, merge=False)
    old, live, next_ = Entry(1, deadline=0.5), Entry(2), Entry(1)
    take = policy.decide(queue_of([old, live, next_]), 1.0)
    assert take.slices == [(live, 2)] and list(take.expired) == [old] and take.scanned == 2 and take.merged


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
    assert batch(take) == [entries[i] for i in expected_batch]
    assert list(take.expired) == [entries[i] for i in expected_expired]
    assert take.rows == 2 * len(expected_batch) and take.scanned == len(deadlines)


def test_expired_rows_do_not_count_toward_the_batch():
    """The expired one's rows made the queue look larger than a batch; the live rows all fit."""
    policy = BatchPolicy(max_rows=4, max_delay=0.0)
    entries = [Entry(3, deadline=0.5), Entry(4)]
    take = policy.decide(queue_of(entries), 1.0)
    assert take.slices == [(entries[1], 4)] and list(take.expired) == [entries[0]] and take.rows == 4


def test_a_request_that_expires_midway_is_failed_and_its_rows_stop_being_taken():
    policy = BatchPolicy(max_rows=4, max_delay=0.0)
    with ByHand(policy) as hand:
        big, _ = hand.arrive(10, deadline=2.0), hand.arrive(1)  # the one-row request shares the first batch
        queue = hand.queue
        first = policy.decide(queue, 1.0)
        assert shares(first) == [1, 1]  # the default cap with max_rows 4: one row each
        hand.carry_out(first, 1.0)
        assert list(queue.entries) == [big] and queue.rows == 9
        late = policy.decide(queue, 2.0)  # its deadline has come while 9 of its rows wait
        assert list(late.expired) == [big] and not late.slices
        hand.carry_out(late, 2.0)
        assert queue.rows == 0 and not queue.entries
        assert isinstance(big.future.exception(), DeadlineExpired) and "1 of its 10 rows" in str(big.future.exception())


def test_abandoned_entries_are_passed_over_whatever_their_size():
    policy = BatchPolicy(max_rows=4, max_delay=0.0)
    entries = [Entry(1), Entry(4, abandoned=True), Entry(2), Entry(3, abandoned=True)]
    take = policy.decide(queue_of(entries), 1.0)
    assert batch(take) == [entries[0], entries[2]] and take.scanned == 4 and not take.expired
    assert take.merged  # two entries in it
    lone = policy.decide(queue_of([Entry(1), Entry(2, abandoned=True)], seconds_per_row=0.0), 1.0)
    assert lone.scanned == 2 and not lone.merged  # a caller that left is not company


def test_shares_are_max_min_fair_on_their_own():
    policy = BatchPolicy(max_rows=10, max_delay=0.0, max_share_rows=10)
    assert policy.shares([1, 100, 2, 100]) == [1, 4, 2, 3]  # 7 rows split 4 and 3, the older the 4
    assert policy.shares([100]) == [10]
    assert policy.shares([1] * 12) == [1] * 10 + [0, 0]  # more requests than rows: the oldest
    assert BatchPolicy(max_rows=16, max_delay=0.0).shares([100, 1]) == [2, 1]  # the cap, 16 // 8
    assert BatchPolicy(max_rows=16, max_delay=0.0).shares([100], company=True) == [2]  # alone, after company


def test_the_share_must_hold_a_row():
    with pytest.raises(ValueError):
        BatchPolicy(max_share_rows=0)
    with pytest.raises(ValueError):
        BatchPolicy(max_rows=0)
    assert BatchPolicy(max_rows=2).shares([5, 5]) == [1, 1]  # the default cap never drops under a row


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
        (CPU, 1e-6, (8, 1), True, False),  # two waiting: shared
        (CPU, 1e-6, (20,), True, False),  # lone in its batch, but its own rows wait behind it
        (CPU, 1e-6, (1, 1), False, False),  # merge off, another waiting
        (CPU, 1e-6, (20,), False, False),  # merge off, its own rows waiting
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
def policies(draw, max_rows: int | None = None) -> BatchPolicy:
    max_rows = max_rows or draw(st.integers(1, 8))
    return BatchPolicy(
        max_rows=max_rows,
        max_delay=draw(st.sampled_from([0.0, 0.001, 0.5])),
        merge=draw(st.booleans()),
        adaptive_delay=draw(st.booleans()),
        inline_seconds=draw(st.sampled_from([0.0, INLINE_SECONDS])),
        max_share_rows=draw(st.one_of(st.none(), st.integers(1, max_rows + 1))),
        background_share=draw(st.floats(0.01, 1.0)),
    )


@st.composite
def scenarios(draw):
    policy = draw(policies())
    max_rows = policy.max_rows
    times = sorted(draw(st.lists(st.floats(0.0, 1.0), min_size=0, max_size=12)))
    entries = []
    for t in times:
        n = draw(st.integers(1, 3 * max_rows))  # some larger than a batch
        entries.append(
            Entry(
                n=n,
                enqueued=t,
                deadline=draw(st.one_of(st.none(), st.floats(0.0, 2.0))),
                abandoned=draw(st.integers(0, 4)) == 0,  # a caller that went away, now and then
                taken=draw(st.sampled_from([0, 0, 0, n - 1, n // 2])),  # some partly served already
            )
        )
    queue = queue_of(
        entries,
        last_merged=draw(st.booleans()),
        last_shared=draw(st.booleans()),
        seconds_per_row=draw(st.sampled_from([math.inf, 0.0, 1e-6, 1e-3])),
    )
    now = max(times, default=0.0) + draw(st.sampled_from([0.0, 0.0005, 0.001, 0.6, 1.0]))
    return policy, queue, now


property_settings = settings(max_examples=400, deadline=None, suppress_health_check=list(HealthCheck), database=None)


def waiting(queue: QueueState, now: float) -> list[Entry]:
    """The requests a batch may take rows from now: not abandoned, not expired, oldest first."""
    return [e for e in queue.entries if not e.abandoned and (e.deadline is None or e.deadline > now)]


def cap(policy: BatchPolicy, wanted: list[int], company: bool) -> int:
    """The most rows one request may take: the share cap while a small request is about."""
    about = company or (len(wanted) > 1 and min(wanted) <= policy.share_cap)
    return policy.share_cap if about else policy.max_rows


@property_settings
@given(scenarios())
def test_a_batch_never_exceeds_max_rows_and_takes_only_from_the_scanned_prefix(scenario):
    policy, queue, now = scenario
    decision = policy.decide(queue, now)
    if isinstance(decision, Wait):
        return
    entries = list(queue.entries)
    prefix = entries[: decision.scanned]
    taken = batch(decision)
    assert decision.rows == sum(shares(decision)) <= policy.max_rows
    assert all(1 <= k <= e.wanted for e, k in decision.slices)  # every slice takes rows the request still wants
    # in queue order, each request once, all of them (and the expired) within the scanned prefix
    assert taken == [e for e in prefix if e in taken]
    assert list(decision.expired) == [e for e in prefix if e in decision.expired]
    assert not any(e.abandoned for e in [*taken, *decision.expired])
    assert all(e.deadline is not None and e.deadline <= now for e in decision.expired)
    assert all(e.deadline is None or e.deadline > now for e in taken)
    if policy.merge:  # every live request the decision looked at takes a row
        assert taken == [e for e in prefix if e in waiting(queue, now)]
    else:
        assert len(taken) <= 1
    if decision.inline:
        assert len(taken) == 1 and policy.inline_seconds > 0
        assert decision.rows == sum(e.wanted for e in waiting(queue, now))  # nothing left waiting


@property_settings
@given(scenarios())
def test_shares_are_max_min_fair_and_the_oldest_request_is_always_served(scenario):
    policy, queue, now = scenario
    decision = policy.decide(queue, now)
    live = waiting(queue, now)
    if isinstance(decision, Wait) or not live:
        return
    got = dict((id(e), k) for e, k in decision.slices)
    share = [got.get(id(e), 0) for e in live]
    assert share[0] >= 1  # the oldest waiting request always gets a row
    if not policy.merge:
        assert share == [min(live[0].wanted, policy.max_rows)] + [0] * (len(live) - 1)
        return
    wanted = [e.wanted for e in live]
    if sum(wanted) <= policy.max_rows:
        assert share == wanted  # everything fits: everything goes
        return
    limit = [min(w, cap(policy, wanted, queue.last_shared)) for w in wanted]
    assert all(s <= c for s, c in zip(share, limit))
    short = [i for i, (s, c) in enumerate(zip(share, limit)) if s < c]  # held back by fairness, not the cap
    assert decision.rows == policy.max_rows or not short  # a short batch only when every request met its cap
    for i in short:  # max-min: no one gets more than a held-back request, but for one odd row to an older one
        assert all(s <= share[i] + 1 for s in share)
        assert all(s <= share[i] for s in share[i + 1 :])


@property_settings
@given(scenarios())
def test_never_short_while_rows_wait_past_the_delay_except_for_the_share_cap(scenario):
    """Rows are left behind only when the batch is full, batching is off, or requests come together
    and every one in the batch took its capped share."""
    policy, queue, now = scenario
    live = [e for e in queue.entries if not e.abandoned]
    if not live:
        return
    now = max(now, live[0].enqueued + policy.max_delay)  # the oldest has waited the delay
    decision = policy.decide(queue, now)
    assert isinstance(decision, Take)  # the worker is free (it is asking): never a wait
    got = dict((id(e), k) for e, k in decision.slices)
    left = [e for e in waiting(queue, now) if got.get(id(e), 0) < e.wanted]
    if left:  # rows are left behind only when the batch is full, merge is off, or every share is at its cap
        assert decision.merged
        limit = cap(policy, [e.wanted for e in waiting(queue, now)], queue.last_shared)
        assert (
            decision.rows == policy.max_rows
            or not policy.merge
            or (limit < policy.max_rows and all(k == min(e.wanted, limit) for e, k in decision.slices))
        )


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
    policies(),
    st.lists(
        st.tuples(st.integers(1, 20), st.floats(0.0, 0.01), st.booleans(), st.one_of(st.none(), st.floats(0.0, 0.05))),
        max_size=30,
    ),
)
def test_run_with_a_fake_clock_every_row_of_every_live_request_is_served_once(policy, arrivals):
    """Run the policy and the mechanism's bookkeeping (`ByHand`) with a clock that moves only when
    told: requests (some larger than a batch) arrive, the policy decides, `Batcher._take` carries
    the decision out, a batch takes a fixed time. Every row of every request whose caller stays is
    served exactly once, in order, unless its deadline passes first: then it fails once and no row
    of it is taken at or after its deadline. Every batch serves the oldest request."""
    clock, compute = FakeClock(), 0.003
    served: dict[int, list[tuple[int, int]]] = {}  # per request: (first row, rows) of each slice
    expired: dict[int, list[float]] = {}
    pending = deque()  # (arrival time, rows, caller gone, deadline)
    at = 0.0
    for n, gap, gone, patience in arrivals:
        at += gap
        pending.append((at, n, gone, None if patience is None else at + patience))
    everyone = []
    with ByHand(policy) as hand:
        queue = hand.queue
        for _ in range(10_000):
            while pending and pending[0][0] <= clock.now:  # arrivals up to now join the queue
                at, n, gone, deadline = pending.popleft()
                everyone.append(hand.arrive(n, enqueued=at, deadline=deadline, gone=gone))
            if not pending and not queue.rows:
                break
            decision = policy.decide(queue, clock.now)
            if isinstance(decision, Wait):
                if decision.until == math.inf:
                    assert queue.rows == 0  # a wait without end only when nothing waits
                clock.now = min(decision.until, pending[0][0] if pending else math.inf)
                continue
            assert decision.rows <= policy.max_rows
            oldest = waiting(queue, clock.now)
            assert not oldest or (decision.slices and decision.slices[0][0] is oldest[0])
            for entry, k in decision.slices:
                served.setdefault(id(entry), []).append((entry.taken, k))
            for entry in decision.expired:
                expired.setdefault(id(entry), []).append(clock.now)
            hand.carry_out(decision, clock.now)
            assert queue.rows == sum(e.n - e.taken for e in queue.entries if not e.abandoned)
            if decision.slices:
                clock.advance(compute)
        else:
            raise AssertionError("the queue never drained")
    assert queue.rows == 0 and all(e.abandoned for e in queue.entries)  # withdrawn callers wait to be passed over
    for entry in everyone:
        slices = served.get(id(entry), [])
        assert [start for start, _ in slices] == list(np.cumsum([0] + [k for _, k in slices])[:-1])  # in order, no gap
        rows = sum(k for _, k in slices)
        if entry.abandoned and id(entry) not in expired:  # a caller that went away: nothing computed
            assert not slices
        elif id(entry) in expired:
            assert len(expired[id(entry)]) == 1 and expired[id(entry)][0] >= entry.deadline and rows < entry.n
            assert isinstance(entry.future.exception(), DeadlineExpired)  # failed, as its caller sees it
        else:
            assert rows == entry.n  # every row, once


# The mechanism.


async def _until(condition, turns: int = 100_000) -> None:
    """Yield to the event loop until `condition()` holds: ordered by events, not by the clock; a
    bounded number of loop turns, so a regression fails rather than hangs."""
    for _ in range(turns):
        if condition():
            return
        await asyncio.sleep(0)
    raise AssertionError("condition not reached")


def sample(metrics: Metrics, name: str, **labels: str) -> float:
    return metrics.registry.get_sample_value(name, labels) or 0.0


class NumberedGraph(HeldGraph):
    """HeldGraph's holding (the first batch waits for `release`), answering each row with itself
    and the number of the batch that computed it: the test counts batches, not seconds."""

    def __init__(self) -> None:
        super().__init__()
        self.batches: list[int] = []  # the rows in each batch, in order

    def __call__(self, x: np.ndarray) -> list[np.ndarray]:
        self.batches.append(len(x))
        number = len(self.batches) - 1
        (out,) = super().__call__(x)
        return [out, np.full(len(x), number)]


def test_a_small_call_behind_a_huge_one_rides_the_next_batch():
    """A 1-row call queued behind a 10,000-row one is answered by the second batch, beside the large
    one's share, not after the large one's 40 batches; the large one's answer is its rows in order."""
    run = NumberedGraph()

    async def scenario():
        batcher = Batcher("test", run, Metrics(), max_rows=256, max_delay=0.0, max_queue_rows=20_000, inline_seconds=0)
        batcher.start()
        try:
            rows = np.arange(10_000, dtype=np.float32).reshape(-1, 1)
            big = asyncio.ensure_future(batcher.submit(rows))
            assert await asyncio.to_thread(run.computing.wait, 30)  # its first batch holds the graph
            small = asyncio.ensure_future(batcher.submit(np.full((1, 1), -1.0, np.float32)))
            await _until(lambda: batcher.queue.rows == 10_000 - 256 + 1)
            run.release.set()
            small_out = await asyncio.wait_for(small, 10)
            big_out = await asyncio.wait_for(big, 30)
            return rows, small_out, big_out
        finally:
            run.release.set()
            await batcher.close()

    rows, small_out, big_out = asyncio.run(scenario())
    assert small_out[0].tolist() == [[-1.0]] and int(small_out[1][0]) <= 1  # in the first two batches
    assert run.batches[:2] == [256, 32 + 1]  # the second: the large one's capped share and the small row
    assert np.array_equal(big_out[0], rows)  # every row, in order
    assert np.all(np.diff(big_out[1]) >= 0) and sum(run.batches) == 10_001


def test_requests_spread_over_several_batches_answer_as_if_run_alone():
    """Large and small requests queued together and shared across batches: each gets exactly what
    the graph gives for its rows alone, every output put back together in row order."""

    def run(x: np.ndarray) -> list[np.ndarray]:
        return [x * 2 + 1, x.sum(axis=1)]

    async def scenario(requests: list[np.ndarray]) -> list[list[np.ndarray]]:
        batcher = Batcher("test", run, Metrics(), max_rows=8, max_delay=0.0, max_share_rows=3, inline_seconds=0)
        batcher.start()
        try:
            return await asyncio.wait_for(asyncio.gather(*(batcher.submit(r) for r in requests)), 30)
        finally:
            await batcher.close()

    rng = np.random.default_rng(0)
    requests = [rng.normal(size=(n, 3)).astype(np.float32) for n in (50, 1, 3, 17, 1, 8, 9, 2)]
    for rows, outs in zip(requests, asyncio.run(scenario(requests))):
        want = run(rows)
        assert len(outs) == len(want) and all(np.array_equal(o, w) for o, w in zip(outs, want))


def test_a_failed_batch_fails_a_spread_request_once_and_frees_its_waiting_rows():
    """A request spread over batches fails with the batch that fails; its rows still waiting leave
    the count at once, without being counted as cancelled, and no later batch takes them."""
    batches: list[int] = []

    def run(x: np.ndarray) -> list[np.ndarray]:
        batches.append(len(x))
        if (x < 0).any():
            raise RuntimeError("poisoned rows")
        return [x]

    async def scenario():
        metrics = Metrics()
        batcher = Batcher("test", run, metrics, max_rows=2, max_delay=0.0, inline_seconds=0)
        batcher.start()
        try:
            rows = np.array([[1.0], [2.0], [-3.0], [4.0], [5.0]])  # its second batch is poisoned
            result = await asyncio.gather(batcher.submit(rows), return_exceptions=True)
            return result[0], batcher.queue.rows, sample(metrics, "vae_rejections_total", reason="cancelled", model="")
        finally:
            await batcher.close()

    error, left, cancelled = asyncio.run(scenario())
    assert isinstance(error, BatchFailed) and "poisoned rows" in str(error)
    assert (batches, left, cancelled) == ([2, 2], 0, 0.0)


class FakeClockLoop(asyncio.SelectorEventLoop):
    """An event loop whose time moves only when the test says: deadlines fall between events."""

    now = 0.0

    def time(self) -> float:
        return self.now


def test_a_deadline_passing_midway_fails_the_request_and_frees_its_rows():
    """Deadlines on the loop's clock, moved by hand between batches: a request whose first batch ran
    fails at the next decision, unfinished, and one never taken is dropped unrun; their rows leave
    the count and each counts once as a deadline rejection."""
    run = NumberedGraph()

    async def scenario():
        loop = asyncio.get_running_loop()
        metrics = Metrics()
        batcher = Batcher("test", run, metrics, max_rows=2, max_delay=0.0, inline_seconds=0)
        batcher.start()
        try:
            spread = asyncio.ensure_future(batcher.submit(np.ones((5, 1)), deadline=1.0))
            assert await asyncio.to_thread(run.computing.wait, 30)  # its first 2 rows are computing
            unrun = asyncio.ensure_future(batcher.submit(np.ones((1, 1)), deadline=1.0))
            await _until(lambda: batcher.queue.rows == 3 + 1)
            loop.now = 1.0  # both deadlines have come
            run.release.set()
            results = await asyncio.wait_for(asyncio.gather(spread, unrun, return_exceptions=True), 10)
            return results, batcher.queue.rows, sample(metrics, "vae_rejections_total", reason="deadline", model="")
        finally:
            run.release.set()
            await batcher.close()

    with asyncio.Runner(loop_factory=FakeClockLoop) as runner:
        (spread, unrun), left, rejected = runner.run(scenario())
    assert isinstance(spread, DeadlineExpired) and "2 of its 5 rows" in str(spread)
    assert isinstance(unrun, DeadlineExpired) and "not computed" in str(unrun)
    assert (run.batches, left, rejected) == ([2], 0, 2.0)


def test_metrics_carry_the_model_and_version():
    run = HeldGraph()

    async def scenario() -> dict[str, float]:
        metrics = Metrics()
        labels = {"model": "mnist", "version": "7", "graph": "decoder"}
        batcher = Batcher(
            "decoder", run, metrics, max_rows=2, max_delay=0.0, max_queue_rows=3, inline_seconds=0,
            labels={"model": "mnist", "version": "7"},
        )  # fmt: skip
        batcher.start()
        try:
            first = asyncio.ensure_future(batcher.submit(np.ones((2, 1))))
            assert await asyncio.to_thread(run.computing.wait, 30)
            queued = asyncio.ensure_future(batcher.submit(np.ones((3, 1))))
            await _until(lambda: batcher.queue.rows == 3)
            seen = {"queued": sample(metrics, "vae_queue_rows", **labels)}
            with pytest.raises(QueueFull):
                await batcher.submit(np.ones((1, 1)))
            run.release.set()
            await asyncio.wait_for(asyncio.gather(first, queued), 10)
            seen["batches"] = sample(metrics, "vae_batch_rows_count", **labels)
            seen["rows"] = sample(metrics, "vae_batch_rows_sum", **labels)
            seen["computed"] = sample(metrics, "vae_compute_seconds_count", **labels)
            seen["waits"] = sample(metrics, "vae_queue_wait_seconds_count", **labels)  # one per request
            seen["full"] = sample(metrics, "vae_rejections_total", reason="queue_full", model="mnist")
            seen["after"] = sample(metrics, "vae_queue_rows", **labels)
            return seen
        finally:
            run.release.set()
            await batcher.close()

    assert asyncio.run(scenario()) == {
        "queued": 3.0, "batches": 3.0, "rows": 5.0, "computed": 3.0, "waits": 2.0, "full": 1.0, "after": 0.0,
    }  # fmt: skip


def test_a_cancelled_call_leaves_the_queue_count_at_once():
    """Calls queued behind a busy graph and then cancelled free their rows before the next batch
    forms: the depth gauge drops, a new call fits in the freed room, and each is counted once."""
    run = HeldGraph()
    started, release = run.computing, run.release

    async def scenario() -> dict[str, float]:
        metrics = Metrics()
        depth = lambda: sample(metrics, "vae_queue_rows", graph="test", **UNLABELLED)  # noqa: E731
        cancelled = lambda: sample(metrics, "vae_rejections_total", reason="cancelled", model="")  # noqa: E731
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


def test_a_spread_request_cancelled_midway_frees_its_rows_once():
    """A caller that goes away while its request is partly served: the rows it still had waiting
    leave the count at once, it is counted once, and no later batch takes its rows."""
    run = NumberedGraph()

    async def scenario():
        metrics = Metrics()
        batcher = Batcher("test", run, metrics, max_rows=2, max_delay=0.0, inline_seconds=0)
        batcher.start()
        try:
            call = asyncio.ensure_future(batcher.submit(np.ones((7, 1))))
            assert await asyncio.to_thread(run.computing.wait, 30)  # its first 2 rows are computing
            await _until(lambda: batcher.queue.rows == 5)
            call.cancel()
            await asyncio.gather(call, return_exceptions=True)
            left = batcher.queue.rows
            run.release.set()
            after = await asyncio.wait_for(batcher.submit(np.ones((1, 1))), 10)  # the next batch: this call alone
            count = sample(metrics, "vae_rejections_total", reason="cancelled", model="")
            return left, int(after[1][0]), count, batcher.queue.rows
        finally:
            run.release.set()
            await batcher.close()

    assert asyncio.run(scenario()) == (0, 1, 1.0, 0)
    assert run.batches == [2, 1]


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
            assert isinstance(take, Take) and take.scanned == 1 and not take.slices
            batcher._take(take, loop.time())  # the batcher gets there first
            await asyncio.gather(call, return_exceptions=True)
            release.set()
            await first
            count = sample(metrics, "vae_rejections_total", reason="cancelled", model="")
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
        first = asyncio.ensure_future(batcher.submit(np.ones((5, 1))))  # spread: 2 rows computing, 3 waiting
        assert await asyncio.to_thread(started.wait, 30)
        queued = [asyncio.ensure_future(batcher.submit(np.ones((k, 1)))) for k in (1, 3)]
        await _until(lambda: batcher.queue.rows == 3 + 4)
        await batcher.close()
        results = await asyncio.gather(first, *queued, return_exceptions=True)
        release.set()
        return batcher.queue.rows, [type(r).__name__ for r in results]

    assert asyncio.run(scenario()) == (0, ["Closed", "Closed", "Closed"])


def test_background_requests_take_their_share_while_interactive_ones_are_about_and_full_batches_alone():
    """Score's chunks are background: four Sample batches and two chunks of draws waiting share a
    64-row batch 48 to 16, not 43 to 21 as six equal requests would. Beside small interactive calls
    they take their share too, and the batch goes short: an interactive call arriving then waits
    behind 16 rows of bulk work, not 52, and fewer rows where their reduce makes each cost more. Alone they take the whole batch, unless a batch answered
    an interactive call within a full batch's time (its caller is likely on the way back)."""
    policy = BatchPolicy(max_rows=64, max_share_rows=64)
    samples = [Entry(64, enqueued=0.1 * i) for i in range(4)]
    draws = [Entry(29, enqueued=0.05 + 0.1 * i, background=True) for i in range(2)]
    taken = dict((id(e), k) for e, k in policy.take(queue_of(sorted([*samples, *draws], key=lambda e: e.enqueued)), 1.0).slices)
    assert [taken[id(e)] for e in samples] == [12, 12, 12, 12] and [taken[id(e)] for e in draws] == [8, 8]
    small = [Entry(4, enqueued=0.1 * i) for i in range(3)]
    beside = policy.take(queue_of([*small, Entry(100, enqueued=0.5, background=True)]), 1.0)
    assert [k for _, k in beside.slices] == [4, 4, 4, 16] and beside.merged
    within = policy.take(queue_of([Entry(10, background=True)]), 1.0)
    assert [k for _, k in within.slices] == [10]  # less than its share: all of it
    costly = queue_of([*small, Entry(100, enqueued=0.5, background=True)])
    costly.bulk_cost = 2.0  # its reduce doubles a row's time: 9 rows of 2 beside 55 of 1 are a quarter of the time
    assert [k for _, k in policy.take(costly, 1.0).slices] == [4, 4, 4, 9]
    eighth = BatchPolicy(max_rows=64, max_share_rows=64, background_share=0.125)  # --background-share 0.125
    assert [k for _, k in eighth.take(queue_of([*small, Entry(100, enqueued=0.5, background=True)]), 1.0).slices] == [4, 4, 4, 8]
    with pytest.raises(ValueError, match="share of a batch"):
        BatchPolicy(background_share=0)

    def alone(interactive_at: float) -> list[int]:
        queue = queue_of([Entry(50, background=True), Entry(50, enqueued=0.1, background=True)], seconds_per_row=0.001)
        queue.interactive_at = interactive_at
        return [k for _, k in policy.take(queue, 1.0).slices]

    assert alone(-math.inf) == [32, 32]
    assert alone(1.0 - 0.06) == [8, 8]  # answered within a full batch's time (64 rows x 1 ms): still about
    assert alone(1.0 - 0.07) == [32, 32]


@property_settings
@given(scenarios(), st.data())
def test_with_background_requests_every_interactive_one_takes_a_row_and_bulk_work_its_share(scenario, data):
    """Every interactive request in the scan takes a row; background ones take the oldest first,
    never more rows than their share while interactive rows wait (however many of them queue: four
    Score calls' chunks once took a row each, most of a 64x64 model's batch), and at least that
    share, or what they want, when the batch has room (and no share cap holds them back)."""
    policy, queue, now = scenario
    for entry in queue.entries:
        entry.background = data.draw(st.booleans())
    queue.background_rows = sum(e.wanted for e in queue.entries if not e.abandoned and e.background)
    decision = policy.decide(queue, now)
    if isinstance(decision, Wait):
        return
    assert decision.rows == sum(shares(decision)) <= policy.max_rows
    assert all(1 <= k <= e.wanted for e, k in decision.slices)
    taken = batch(decision)
    if policy.merge:
        scan = [e for e in list(queue.entries)[: decision.scanned] if e in waiting(queue, now)]
        assert [e for e in taken if not e.background] == [e for e in scan if not e.background]
        back_taken = [e for e in taken if e.background]
        assert back_taken == [e for e in scan if e.background][: len(back_taken)]  # the oldest ones
    if not policy.merge or queue.rows <= queue.background_rows:  # no interactive rows wait: no bulk limit
        return
    bulk = max(1, int(policy.background_share * policy.max_rows))  # a background row costs one row here
    got = sum(k for e, k in decision.slices if e.background)
    assert got <= bulk
    live = waiting(queue, now)
    back, front = [e for e in live if e.background], [e for e in live if not e.background]
    plain = policy.max_share_rows is not None and policy.max_share_rows >= policy.max_rows  # no share cap
    if plain and back and len(live) <= policy.max_rows:
        assert got >= min(bulk, sum(e.wanted for e in back), policy.max_rows - len(front))
