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

    @property
    def ok(self) -> int:
        return self.codes.get("OK", 0)

    @property
    def errors(self) -> int:
        return sum(self.codes.values()) - self.ok

    @classmethod
    def combine(cls, parts: list[LoadResult]) -> LoadResult:
        """Several recorded slices of the same load as one result."""
        whole = cls(parts[0].concurrency, sum(p.seconds for p in parts))
        for p in parts:
            whole.latencies += p.latencies
            whole.codes += p.codes
        return whole

    @classmethod
    def combine_concurrent(cls, parts: list[LoadResult]) -> LoadResult:
        """Loads that ran side by side over the same window as one load of their total concurrency."""
        whole = cls(sum(p.concurrency for p in parts), max(p.seconds for p in parts))
        for p in parts:
            whole.latencies += p.latencies
            whole.codes += p.codes
        return whole

    def percentile_ms(self, q: float) -> float:
        return float(np.percentile(np.array(self.latencies) * 1000, q)) if self.latencies else float("nan")


async def run_load(
    call: Callable[[], Awaitable[object]], concurrency: int, duration: float, warmup: float
) -> LoadResult:
    """Warm up for `warmup` seconds (not recorded), then record every call for `duration` seconds."""
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
            done = loop.time()
            if now >= record_from:
                result.codes[code] += 1
                if code == "OK":
                    result.latencies.append(done - now)

    await asyncio.gather(*(caller() for _ in range(concurrency)))
    return result
