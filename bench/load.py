"""A closed-loop load generator on grpc.aio: N callers, each sending its next call when the last returns."""

from __future__ import annotations

import asyncio
from collections import Counter
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

import grpc
import numpy as np


@dataclass
class LoadResult:
    concurrency: int
    seconds: float
    latencies: list[float] = field(default_factory=list)  # of successful calls, seconds
    codes: Counter = field(default_factory=Counter)
    # Successful calls, each counted by the share of its time that fell in the recorded window: a
    # rate over a window as short as a few calls (an interleaved slice), without counting a whole
    # call for the part of it that ran before or after.
    in_window: float = 0.0

    @property
    def ok(self) -> int:
        return self.codes.get("OK", 0)

    @property
    def errors(self) -> int:
        return sum(self.codes.values()) - self.ok

    @classmethod
    def combine(cls, parts: list[LoadResult]) -> LoadResult:
        """Several recorded slices of the same load as one result."""
        return cls(parts[0].concurrency, sum(p.seconds for p in parts))._add(parts)

    @classmethod
    def combine_concurrent(cls, parts: list[LoadResult]) -> LoadResult:
        """Loads that ran side by side over the same window as one load of their total concurrency."""
        return cls(sum(p.concurrency for p in parts), max(p.seconds for p in parts))._add(parts)

    def _add(self, parts: list[LoadResult]) -> LoadResult:
        """This result with every call of `parts` counted in."""
        for p in parts:
            self.latencies += p.latencies
            self.codes += p.codes
            self.in_window += p.in_window
        return self

    def percentile_ms(self, q: float) -> float:
        return float(np.percentile(np.array(self.latencies) * 1000, q)) if self.latencies else float("nan")


class CallFailed(Exception):
    """A call that did not succeed, for callers that are not gRPC (HTTP): its code names why."""

    def __init__(self, code: str) -> None:
        super().__init__(code)
        self.code = code


async def run_load(
    call: Callable[[], Awaitable[object]], concurrency: int, duration: float, warmup: float
) -> LoadResult:
    """Warm up for `warmup` seconds (not recorded), then record every call that starts in the next
    `duration` seconds, and the share of every successful call that ran in them (`in_window`)."""
    result = LoadResult(concurrency, duration)
    loop = asyncio.get_running_loop()
    start = loop.time()
    record_from, stop = start + warmup, start + warmup + duration

    async def caller() -> None:
        while (now := loop.time()) < stop:
            try:
                await call()
                code = "OK"
            except grpc.aio.AioRpcError as err:
                code = err.code().name
            except CallFailed as err:
                code = err.code
            done = loop.time()
            if now >= record_from:
                result.codes[code] += 1
                if code == "OK":
                    result.latencies.append(done - now)
            overlap = min(done, stop) - max(now, record_from)
            if code == "OK" and overlap > 0:
                result.in_window += overlap / (done - now)

    await asyncio.gather(*(caller() for _ in range(concurrency)))
    return result
