"""Ratios from interleaved slices: two things measured in turns, a ratio from each back-to-back pair.

On a shared machine the load of others drifts over seconds to minutes; a ratio of two figures taken
minutes apart carries that drift (Sample(1)@64 read 0.41 to 1.04 of the echo in four runs). Measured
in short turns, both sides of a pair see nearly the same machine, so each pair's ratio holds where
the absolute figures move; the median over pairs drops the pairs a burst of load fell across.

Interleaving cancels slow drift, not a burst inside a round: another process that takes a core
takes it from the two sides unevenly. So each slice also reads, from /proc, the CPU that processes
other than the benchmark's used meanwhile; a round where they used more than QUIET_CORES is
disturbed, the benchmark waits for the machine to calm down and measures another round, and the
ratios come from the quiet rounds (the report says how many rounds were measured and disturbed).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import statistics
import time
from collections.abc import Awaitable, Callable, Hashable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Generic, TypeVar

from bench.limits import Probe
from bench.load import LoadResult, run_load


# Rounds per scenario: with 10 (0.3 s slices in a quick run), three consecutive quick runs on the
# MNIST architecture agreed within +-0.025 on every ratio to the echo (docs/benchmarks.md).
SLICES = 10
SLICE_WARMUP = 0.1  # seconds of calls before each later slice is recorded: the callers ramp up again
QUIET_CORES = 0.2  # other processes using more than this, a round is disturbed and measured again
MIN_QUIET = 3  # fewer quiet rounds than this, and the ratios use every round (flagged in the report)
WAIT_SHARE = 1.0  # waiting for quiet, at most this share of the time the measuring itself takes
TICKS = os.sysconf("SC_CLK_TCK")


@dataclass(frozen=True)
class Slice:
    value: float  # the figure a ratio uses: requests/s or rows/s
    load: LoadResult | None = None  # the calls behind it, when the slice was a load
    others: float = 0.0  # cores that processes other than the benchmark's used meanwhile


K = TypeVar("K", bound=Hashable)  # what names a measure: a str, or a thread count
# A measure runs one slice: (seconds recorded, seconds of warm-up before them) -> the slice.
Measure = Callable[[float, float], Awaitable[Slice]]


@dataclass(frozen=True)
class Slicing:
    """How a scenario is cut: `slices` rounds of `seconds` recorded per measure. The first round
    warms each measure up for `first_warmup` (connections, the server's first batches), later
    rounds for `slice_warmup` (the callers ramping up again). A round during which other processes
    used more than `quiet_cores` is measured again, up to `slices` more rounds."""

    slices: int
    seconds: float
    first_warmup: float
    slice_warmup: float = SLICE_WARMUP
    quiet_cores: float = QUIET_CORES

    @classmethod
    def of(cls, quick: bool, slices: int) -> Slicing:
        """A benchmark's slicing: 10 s per scenario and side (3 with --quick) in `slices` slices."""
        duration, warmup = (3.0, 1.0) if quick else (10.0, 2.0)
        return cls(slices, duration / slices, warmup)

    @property
    def duration(self) -> float:
        return self.slices * self.seconds


def slice_count(text: str) -> int:
    """--slices, as argparse reads it: at least one."""
    n = int(text)
    if n < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {n}")
    return n


@dataclass(frozen=True)
class Rounds(Generic[K]):
    """What `interleave` measured: the rounds the ratios use (the quiet ones, or all of them when
    fewer than MIN_QUIET were quiet), and how many rounds were measured and disturbed in all."""

    parts: dict[K, list[Slice]]
    measured: int
    disturbed: int

    def to_json(self) -> dict[str, int]:
        return {"rounds": self.measured, "disturbed": self.disturbed, "used": len(next(iter(self.parts.values())))}


def used(rounds: dict[str, int]) -> str:
    """Rounds (`Rounds.to_json`) the ratios used of those measured: the quiet ones, or all (marked !)
    if too few were."""
    return f"{rounds['used']}/{rounds['rounds']}{'!' if rounds['used'] == rounds['rounds'] and rounds['disturbed'] else ''}"


def cpu_ticks(pids: tuple[int, ...]) -> tuple[int, int]:
    """(busy ticks of the whole machine, ticks of the processes `pids`), from /proc (Linux)."""
    fields = [int(v) for v in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:9]]
    machine = sum(fields) - fields[3] - fields[4]  # all but idle and iowait
    ours = 0
    for pid in pids:
        with contextlib.suppress(OSError):
            stat = Path(f"/proc/{pid}/stat").read_text()
            utime, stime = stat[stat.rindex(")") + 2 :].split()[11:13]
            ours += int(utime) + int(stime)
    return machine, ours


class Others:
    """The cores that processes other than `pids` used since the last `lap`."""

    def __init__(self, pids: tuple[int, ...]) -> None:
        self.pids = pids
        self.machine, self.ours = cpu_ticks(pids)
        self.started = time.perf_counter()

    def lap(self) -> float:
        machine, ours = cpu_ticks(self.pids)
        now = time.perf_counter()
        cores = max(0, (machine - self.machine) - (ours - self.ours)) / TICKS / (now - self.started)
        self.machine, self.ours, self.started = machine, ours, now
        return cores


async def watched(measure: Measure, seconds: float, warmup: float, pids: tuple[int, ...]) -> Slice:
    """One slice, with the cores other processes used while it ran."""
    others = Others(pids)
    result = await measure(seconds, warmup)
    return replace(result, others=others.lap())


async def settle(pids: tuple[int, ...], cores: float, most: float) -> float:
    """Wait, idle, until other processes use at most `cores` over a fifth of a second, or for `most`
    seconds: after a disturbed round, the next one then likely starts quiet. Returns the wait."""
    others, started = Others(pids), time.perf_counter()
    while time.perf_counter() - started < most:
        await asyncio.sleep(0.2)
        if others.lap() <= cores:
            break
    return time.perf_counter() - started


async def interleave(measures: dict[K, Measure], slicing: Slicing, pids: tuple[int, ...]) -> Rounds[K]:
    """Each measure in turns, round after round, until `slicing.slices` rounds were quiet (or twice
    that many were measured). The order flips every round (a b, b a, a b ...), so neither side is
    always the one that runs just after the other. `pids` are the benchmark's own processes (this
    one is added): what any other process uses during a round disturbs it, since it takes cores
    from the two sides unevenly (a 2-thread in-process run loses more than a 1-thread one). After
    a disturbed round it waits for the machine to calm down, in all up to WAIT_SHARE of the time
    the quiet rounds take."""
    pids = (os.getpid(), *pids)
    rounds: list[dict[K, Slice]] = []
    names = list(measures)
    patience = WAIT_SHARE * slicing.slices * slicing.seconds * len(measures)
    while sum(quiet(r, slicing) for r in rounds) < slicing.slices and len(rounds) < 2 * slicing.slices:
        if rounds and not quiet(rounds[-1], slicing):
            patience -= await settle(pids, slicing.quiet_cores, patience)
        warmup = slicing.first_warmup if not rounds else slicing.slice_warmup
        order = names if len(rounds) % 2 == 0 else names[::-1]
        rounds.append({name: await watched(measures[name], slicing.seconds, warmup, pids) for name in order})
    calm = [r for r in rounds if quiet(r, slicing)]
    used = calm if len(calm) >= MIN_QUIET else rounds
    return Rounds({name: [r[name] for r in used] for name in names}, len(rounds), len(rounds) - len(calm))


def quiet(round_: dict[Any, Slice], slicing: Slicing) -> bool:
    return all(s.others <= slicing.quiet_cores for s in round_.values())


@dataclass(frozen=True)
class Spread:
    """One ratio per pair of slices: the median is the figure, min..max how far the pairs spread."""

    ratios: tuple[float, ...]

    @property
    def median(self) -> float:
        return statistics.median(self.ratios)

    def to_json(self) -> dict[str, Any]:
        return {
            "median": round(self.median, 3), "min": round(min(self.ratios), 3), "max": round(max(self.ratios), 3),
            "slices": [round(r, 3) for r in self.ratios],
        }  # fmt: skip

    def __str__(self) -> str:
        return f"{self.median:.2f} ({min(self.ratios):.2f}-{max(self.ratios):.2f})"


def range_of(spread: dict[str, Any] | None) -> str:
    """A spread's (`Spread.to_json`) min-max, for tables."""
    return f"{spread['min']:.2f}-{spread['max']:.2f}" if spread else ""


def ratios(numerator: list[Slice], denominator: list[Slice]) -> Spread:
    """numerator / denominator, pair by pair (slice i of each was measured in the same round)."""
    return Spread(tuple(n.value / d.value if d.value else float("nan") for n, d in zip(numerator, denominator, strict=True)))


def mean_value(parts: list[Slice]) -> float:
    """The figure over all slices: slices are equally long, so the mean of their rates."""
    return statistics.fmean(p.value for p in parts)


def combined(parts: list[Slice]) -> LoadResult:
    """Every call of a load's slices as one result (absolute figures, percentiles)."""
    return LoadResult.combine([p.load for p in parts if p.load is not None])


def figures(parts: list[Slice], rows: int, percentiles: tuple[int, ...] = (50, 99)) -> dict[str, Any]:
    """A load's absolute figures over its slices: requests/s and rows/s, latency percentiles, errors."""
    r = combined(parts)
    rps = r.in_window / r.seconds
    return {
        "requests_per_s": round(rps, 1), "rows_per_s": round(rps * rows, 1),
        **{f"p{q}_ms": round(r.percentile_ms(q), 2) for q in percentiles}, "errors": r.errors,
    }  # fmt: skip


def load_measure(call: Callable[[], Awaitable[object]], concurrency: int, rows: int = 1) -> Measure:
    """A closed-loop load of `call` as a measure: requests/s, or rows/s with `rows` per request,
    from the share of each call that ran in the slice (a slice may be only a few calls long: counting
    whole calls would move it by up to `concurrency` calls). The caller keeps the channel open
    across slices, so a slice pays no connection set-up."""

    async def measure(seconds: float, warmup: float) -> Slice:
        r = await run_load(call, concurrency, seconds, warmup)
        return Slice(rows * r.in_window / r.seconds, r)

    return measure


def probe_measure(probe: Probe) -> Measure:
    """The graphs alone, in this process, as a measure (rows/s). It holds the event loop for the
    slice: nothing else runs during a limit's slice, by design."""

    async def measure(seconds: float, warmup: float) -> Slice:
        return Slice(probe.rows_per_s(seconds))

    return measure
