"""The process's memory, by bytes: one budget that every loaded version and every request draws on.

Rows are not bytes: a row of a 64x64 colour model's decoder holds 160 times what an MNIST row does,
so limits in rows either starve the small models or let the large ones run the process out of its
container. Here a loaded version holds its footprint for as long as it is loaded, and a request its
computed cost (`service.costs`) while it runs. A request that fits what is left runs at once; one
that does not waits, first come first served, until earlier holders release (or its deadline
passes); one that could never fit is refused at once with RESOURCE_EXHAUSTED naming both figures.
First come first served, so that a large request is not passed over for ever by a stream of small
ones; Triton's rate limiter admits by declared resources in the same way.

The default budget is the container's memory limit (cgroup v2 `memory.max` or v1
`memory.limit_in_bytes`, the smallest on the way up the hierarchy) or, on a host without one, half
the machine's memory; less the process's footprint before any model is loaded, and a margin for
what no cost counts (gRPC's and the HTTP server's buffers, Python objects, the allocator's slack).
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import functools
import math
import os
import re
import sys
from collections import deque
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

from service.errors import DeadlineExceeded, ResourceExhausted

if TYPE_CHECKING:
    from service.metrics import Metrics

MiB = 1 << 20
UNLIMITED = 1 << 60  # cgroup v1 writes "no limit" as a page-rounded 2^63 - 1
MACHINE_SHARE = 0.5  # of the machine's memory, where no cgroup limits the process
MARGIN_SHARE, MIN_MARGIN = 0.15, 64 * MiB  # of the limit, kept back from the budget for what no cost counts
_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([kmgt]?)(i?b?)\s*$", re.IGNORECASE)


class MemoryExhausted(ResourceExhausted):
    """A request (or a load) that can never fit the memory budget."""


def parse_size(text: str) -> int:
    """'800M', '1.5G', '1GiB', '1073741824' as bytes (binary multiples: 1M = 2^20)."""
    match = _SIZE.match(text)
    if not match:
        raise ValueError(f"{text!r} is no size; write bytes or a number with K, M, G or T (1G = 2^30 bytes)")
    number, unit = float(match.group(1)), match.group(2).lower()
    return int(number * (1 << (10 * " kmgt".index(unit or " "))))


def show(size: float) -> str:
    """Bytes for a person: '790 MiB', '1.5 GiB'."""
    if size >= 10 * (1 << 30):
        return f"{size / (1 << 30):.0f} GiB"
    if size >= 1 << 30:
        return f"{size / (1 << 30):.1f} GiB"
    return f"{size / MiB:.0f} MiB" if size >= 10 * MiB else f"{size / MiB:.1f} MiB"


def cgroup_limit(proc: Path = Path("/proc/self/cgroup"), root: Path = Path("/sys/fs/cgroup")) -> int | None:
    """The memory limit of this process's cgroup: the smallest of its own and its ancestors' (a
    container's limit may sit on a parent), v2 or v1; None where none is set or none can be read."""
    try:
        lines = proc.read_text().splitlines()
    except OSError:
        return None
    limits: list[int] = []
    for line in lines:
        _, controllers, path = line.split(":", 2)
        if controllers == "" and (root / "cgroup.controllers").exists():  # v2, unified at the root
            limits += _limits(root, path, "memory.max")
        elif controllers == "":  # v2 beside v1 (hybrid): the unified tree is mounted below
            limits += _limits(root / "unified", path, "memory.max")
        elif "memory" in controllers.split(","):
            limits += _limits(root / "memory", path, "memory.limit_in_bytes")
    found = [limit for limit in limits if limit < UNLIMITED]
    return min(found) if found else None


def _limits(mount: Path, path: str, name: str) -> list[int]:
    """The limit files from the process's cgroup up to the mount's root. Inside a container the
    cgroup namespace makes the process's own cgroup the root, so the root's file counts too."""
    found = []
    folder = mount / path.lstrip("/")
    while True:
        try:
            text = (folder / name).read_text().strip()
            found.append(UNLIMITED if text == "max" else int(text))
        except (OSError, ValueError):
            pass
        if folder == mount or mount not in folder.parents:
            return found
        folder = folder.parent


def machine_memory(meminfo: Path = Path("/proc/meminfo")) -> int:
    """MemTotal in bytes; os.sysconf where /proc is not there."""
    try:
        for line in meminfo.read_text().splitlines():
            if line.startswith("MemTotal:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def status_bytes(field: str, pid: int | str = "self") -> int:
    """A size field of a process's /proc status (VmRSS, VmHWM, RssFile) in bytes; 0 where there is none."""
    try:
        with open(f"/proc/{pid}/status") as status:
            for line in status:
                if line.startswith(field):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


_PAGE = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096
_statm: list[int] = []  # an open /proc/self/statm, read again with pread: admission reads it per call


def resident() -> int:
    """The process's resident memory now, in bytes (0 where /proc is not there)."""
    try:
        if not _statm:
            _statm.append(os.open("/proc/self/statm", os.O_RDONLY))
        return int(os.pread(_statm[0], 128, 0).split()[1]) * _PAGE
    except OSError:
        return 0


def trim() -> None:
    """Hand the heap's free memory back to the system (glibc's malloc_trim): what earlier requests
    freed but the heap kept for reuse, so that resident memory shows what is in use."""
    libc = _libc()
    if libc is not None:
        libc.malloc_trim(0)


def peak_from_now(pid: int | str = "self") -> bool:
    """Reset a process's peak resident memory (VmHWM) to what it holds now, so the next peak is
    that of what runs next (Linux 4.0+); False where the kernel does not allow it, and peaks cannot
    be measured."""
    try:
        Path(f"/proc/{pid}/clear_refs").write_text("5")
    except OSError:
        return False
    return True


def peak() -> int:
    """The process's peak resident memory since `peak_from_now`, in bytes."""
    return status_bytes("VmHWM:")


M_TRIM_THRESHOLD, M_MMAP_THRESHOLD, M_ARENA_MAX = -1, -3, -8  # glibc's malloc.h
SERVING_MMAP_THRESHOLD = 32 * MiB  # blocks this large are mapped apart, and unmapped when freed
SERVING_TRIM_THRESHOLD = 64 * MiB  # a free heap top this large goes back
MEASURING_MMAP_THRESHOLD = 128 << 10  # glibc's own default: every large block mapped fresh


@functools.cache
def _libc() -> Any:
    """glibc, loaded once (the heap is trimmed from it while requests wait); None elsewhere."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        return ctypes.CDLL("libc.so.6")
    except OSError:
        return None


def tune_allocator(arenas: int = 1) -> None:
    """glibc's malloc, set so that resident memory follows what requests hold. onnxruntime's
    tensors live in its own arena; what glibc serves is the arrays around them (batch outputs,
    answers, Score's arithmetic). One arena rather than one per allocating thread, and not two:
    which threads shared the second depended on the order they first allocated in, and what it
    held stayed resident, so a model's idle footprint changed from start to start by a third
    (docs/benchmarks.md, "One malloc arena"). Blocks of SERVING_MMAP_THRESHOLD or more are mapped
    apart and unmapped when freed, and a free heap top of SERVING_TRIM_THRESHOLD goes back; by
    default glibc raises its threshold to whatever block was last freed, and serves ever larger
    blocks from a heap that keeps them. Smaller blocks are reused from the heap batch after batch:
    mapping every block of 8 MiB or more afresh cost a third of a 32x32 colour model's Encode
    rows/s in page faults. What the heap keeps is the resident-memory check's to see
    (`MemoryBudget`). An environment that sets MALLOC_ARENA_MAX or MALLOC_MMAP_THRESHOLD_ keeps its
    own choice; a libc other than glibc is left alone."""
    libc = _libc()
    if libc is None:
        return
    if "MALLOC_ARENA_MAX" not in os.environ:
        libc.mallopt(M_ARENA_MAX, arenas)
    if "MALLOC_MMAP_THRESHOLD_" not in os.environ:
        libc.mallopt(M_MMAP_THRESHOLD, SERVING_MMAP_THRESHOLD)
        libc.mallopt(M_TRIM_THRESHOLD, SERVING_TRIM_THRESHOLD)


@contextlib.contextmanager
def fresh_blocks() -> Iterator[None]:
    """While measuring peaks: every large block mapped fresh, so a run's peak is its own working
    memory rather than whatever earlier runs left in the heap for it to reuse. Process-wide, so a
    load measured while other models serve slows their allocations for that long."""
    libc = _libc()
    tuned = libc is not None and "MALLOC_MMAP_THRESHOLD_" not in os.environ
    if tuned:
        libc.mallopt(M_MMAP_THRESHOLD, MEASURING_MMAP_THRESHOLD)
        libc.malloc_trim(0)
    try:
        yield
    finally:
        if tuned:
            libc.mallopt(M_MMAP_THRESHOLD, SERVING_MMAP_THRESHOLD)


def budget_from(setting: str, base: int) -> tuple[float, str]:
    """The budget in bytes for `--memory-budget` (auto, off, or a size) and how it was reached,
    given the process's footprint `base` before any model."""
    if setting == "off":
        return math.inf, "off: requests are not admitted by bytes"
    if setting != "auto":
        size = parse_size(setting)
        return size, f"{show(size)} (--memory-budget)"
    limit, where = cgroup_limit(), "the cgroup's memory limit"
    if limit is None:
        limit, where = int(machine_memory() * MACHINE_SHARE), f"{MACHINE_SHARE:.0%} of the machine's memory"
    margin = max(MIN_MARGIN, int(MARGIN_SHARE * limit))
    budget = limit - base - margin
    return budget, (f"{show(budget)}: {where} {show(limit)}, less the process's {show(base)} before any model "
                    f"and a margin of {show(margin)}")  # fmt: skip


class _Waiter:
    __slots__ = ("cost", "future")

    def __init__(self, cost: int, future: asyncio.Future) -> None:
        self.cost, self.future = cost, future


class MemoryBudget:
    """Bytes held by loaded versions and by requests, against one total; and, as a second check,
    the process's resident memory against `ceiling`.

    Costs count what requests hold, not what the allocator keeps: freed blocks stay in the heap for
    reuse (the speed of a warm allocator), and a storm of large requests leaves more there than
    any cost shows. So a request is admitted only while resident memory leaves room for it too;
    when that is what holds it back, the heap's free memory is handed back (`trim`, off the event
    loop) and it is checked again. With no request running, only the accounting applies, so a
    process whose memory will not go back does not stop serving."""

    def __init__(self, total: float, metrics: Metrics, ceiling: float = math.inf) -> None:
        """`ceiling`: the resident memory the process must stay within (its footprint before any
        model plus `total`); inf: no such check."""
        self.total = total
        self.ceiling = ceiling
        self.models = 0  # held by loaded versions (and loads under way)
        self.requests = 0  # held by requests running
        self.waiting: deque[_Waiter] = deque()
        self.trimming = False
        self.metrics = metrics
        metrics.memory_budget.set(total if math.isfinite(total) else 0)
        metrics.memory_held.labels(holder="models").set_function(lambda: self.models)
        metrics.memory_held.labels(holder="requests").set_function(lambda: self.requests)
        metrics.memory_waiting.set_function(lambda: sum(w.cost for w in self.waiting))

    @property
    def free(self) -> float:
        return self.total - self.models - self.requests

    def hold(self, cost: int, operation: str, what: str, deadline: float | None = None, model: str = "") -> Hold:
        """`async with budget.hold(cost, "score", "Score of 16 images", deadline):` holds `cost`
        bytes for the block: waits for them, or refuses a cost that can never fit."""
        return Hold(self, cost, operation, what, deadline, model)

    async def acquire(self, cost: int, what: str, deadline: float | None, model: str = "", load: bool = False) -> None:
        """Take `cost` bytes for a request (or, with `load`, for a version being loaded); see `hold`."""
        room = self.total - self.models
        if cost > room:
            self.metrics.rejections.labels(reason="memory", model=model).inc()
            held = f", of which loaded models hold {show(self.models)}" if self.models else ""
            raise MemoryExhausted(
                f"{what} needs {show(cost)} of memory; the server's memory budget is {show(self.total)}{held}, "
                + ("so it cannot be loaded" if load else "so it can never run: ask for less in one call")
            )
        if not self.waiting and self._fits(cost):
            self._take(cost, load)
            return
        waiter = _Waiter(cost, asyncio.get_running_loop().create_future())
        self.waiting.append(waiter)
        self._grant()  # perhaps resident memory alone holds it: trim, then look again
        try:
            if deadline is None:
                await waiter.future
            else:
                async with asyncio.timeout_at(deadline):
                    await waiter.future
        except BaseException as err:
            if waiter.future.done() and not waiter.future.cancelled():
                self._give(cost, False)  # granted (as a request) just as it was cancelled: hand the bytes on
            else:
                waiter.future.cancel()
                self.waiting.remove(waiter)
                self._grant()  # it may have held up smaller ones behind it
            if isinstance(err, TimeoutError):
                self.metrics.rejections.labels(reason="deadline", model=model).inc()
                raise DeadlineExceeded(f"deadline passed while {what} waited for memory") from None
            raise
        if load:  # granted as a request: a load's bytes are the models'
            self.requests -= cost
            self.models += cost

    def release(self, cost: int, load: bool = False) -> None:
        self._give(cost, load)

    def resize(self, estimate: int, footprint: int) -> None:
        """A loaded version holds its measured footprint in place of its load's estimate."""
        self.models += footprint - estimate
        self._grant()

    def _take(self, cost: int, load: bool) -> None:
        if load:
            self.models += cost
        else:
            self.requests += cost

    def _give(self, cost: int, load: bool) -> None:
        if load:
            self.models -= cost
        else:
            self.requests -= cost
        if self.waiting:
            self._grant()

    def _fits(self, cost: int) -> bool:
        if cost > self.free:
            return False
        return self.requests == 0 or math.isinf(self.ceiling) or resident() + cost <= self.ceiling

    def _grant(self, trim_heap: bool = True) -> None:
        """Admit waiters from the front while they fit; when the budget has room for the first but
        resident memory has not, trim the heap and look again, once: a trim that frees too little
        waits for the next release rather than trimming again at once."""
        while self.waiting and self._fits(self.waiting[0].cost):
            waiter = self.waiting.popleft()
            self.requests += waiter.cost
            waiter.future.set_result(None)
        if trim_heap and self.waiting and self.waiting[0].cost <= self.free and not self.trimming:
            self.trimming = True
            asyncio.get_running_loop().run_in_executor(None, trim).add_done_callback(self._trimmed)

    def _trimmed(self, _: Any) -> None:
        self.trimming = False
        if self.waiting:
            self._grant(trim_heap=False)


class Hold:
    """A request's bytes for the length of an `async with`."""

    __slots__ = ("budget", "cost", "deadline", "model", "operation", "what")

    def __init__(
        self, budget: MemoryBudget, cost: int, operation: str, what: str, deadline: float | None, model: str
    ) -> None:
        self.budget, self.cost, self.operation, self.what = budget, cost, operation, what
        self.deadline, self.model = deadline, model

    async def __aenter__(self) -> None:
        self.budget.metrics.request_cost.labels(operation=self.operation).observe(self.cost)
        await self.budget.acquire(self.cost, self.what, self.deadline, self.model)

    async def __aexit__(self, *exc: object) -> bool:
        self.budget.release(self.cost)
        return False
