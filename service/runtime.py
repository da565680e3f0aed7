"""ONNX Runtime sessions for a version's graphs (encoder and decoder, and a flow prior's
prior_sample and prior_density), on CUDA when asked for (or found) and CPU otherwise.

The provider choice is a plain function of what was asked and what onnxruntime reports, so it is
tested without a GPU; after a session is made we check what it really got, because ONNX Runtime
falls back to CPU silently when CUDA libraries are missing.
"""

from __future__ import annotations

import logging
import os
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import onnxruntime as ort

from service.likelihood import Likelihood
from service.manifest import IMAGE, ModelSpec

log = logging.getLogger(__name__)

CUDA = "CUDAExecutionProvider"
CPU = "CPUExecutionProvider"


class ModelLoadError(RuntimeError):
    """ONNX Runtime could not open a version's graphs, or they failed their warm-up; the files
    themselves passed the repository's checks."""


@dataclass(frozen=True)
class RuntimeOptions:
    device: str = "auto"  # auto | cpu | cuda
    intra_op_threads: int = 0  # 0: see intra_op_threads()
    inter_op_threads: int = 1
    cuda_device_id: int = 0
    cuda_mem_limit_bytes: int = 0  # 0: no limit
    cpu_arena: bool = True
    decoder_precision: str = "fp32"  # fp16 or int8: serve that export option's decoder graph instead
    shared_threads: bool = False  # every session on one process-wide pool (the server); else a pool per session
    split_rows: int = 0  # batches of this many rows or more run in two halves at once (see split_rows()); 0: never


def choose_providers(options: RuntimeOptions, available: list[str]) -> list[str | tuple[str, dict[str, object]]]:
    """The provider list for InferenceSession: CUDA (with deliberate options) then CPU, or CPU alone."""
    if options.device not in ("auto", "cpu", "cuda"):
        raise ValueError(f"device must be auto, cpu or cuda, got {options.device!r}")
    if options.device == "cpu":
        return [CPU]
    if CUDA not in available:
        level = logging.WARNING if options.device == "cuda" else logging.INFO
        log.log(level, "device %s: onnxruntime offers no CUDA provider (only %s), serving on CPU", options.device, available)
        return [CPU]
    cuda_options: dict[str, object] = {
        "device_id": options.cuda_device_id,
        # Exhaustive search benchmarks every conv algorithm per new shape: seconds of stall per new batch size.
        "cudnn_conv_algo_search": "HEURISTIC",
        # Grow the arena by what is asked, not by powers of two, so memory stays near the real need.
        "arena_extend_strategy": "kSameAsRequested",
        "do_copy_in_default_stream": True,
    }
    if options.cuda_mem_limit_bytes:
        cuda_options["gpu_mem_limit"] = options.cuda_mem_limit_bytes
    return [(CUDA, cuda_options), CPU]


CGROUP_CPU_MAX = Path("/sys/fs/cgroup/cpu.max")


def available_cores(cpu_max: Path = CGROUP_CPU_MAX) -> int:
    """Cores this process may use: its CPU affinity, capped by a cgroup v2 CPU quota (a container's
    CPU limit), which neither the affinity nor os.cpu_count() shows."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    try:
        quota, period = cpu_max.read_text().split()
        if quota != "max":
            cores = min(cores, max(1, int(quota) // int(period)))
    except (OSError, ValueError):
        pass
    return cores


def intra_op_threads(asked: int) -> int:
    """Threads per graph; 0 asks for one fewer than the available cores (at least one), because
    the event loop and gRPC's threads need a core of their own: ONNX Runtime's own default, one
    per physical core, made small requests slower (docs/benchmarks.md)."""
    return asked if asked > 0 else max(1, available_cores() - 1)


_environment_threads: list[int | None] = []  # set once: what the process's environment was made with


def shared_environment(threads: int | None, inter_op_threads: int) -> None:
    """Set up ONNX Runtime's process-wide environment, once, before its first session.

    threads: with a number, every session that opts in (`use_per_session_threads = False`) runs on
    one global intra-op pool of that size, so M models on C cores use the same threads as one
    model, not M x 2 pools (ONNX Runtime's answer for many models in one process). The global
    pool's size cannot change once the environment exists, so it is fixed by the first call.

    Also one CPU arena for all the process's sessions, grown by what is asked rather than by powers
    of two, so graphs do not keep a peak each. Growing by exactly what is asked fragments when
    batches grow step by step; Engine.warm_up runs the largest batch before any traffic, so the
    arena holds its peak from the start."""
    if _environment_threads:
        return
    _environment_threads.append(threads)
    if threads is not None:
        ort.set_global_thread_pool_sizes(threads, inter_op_threads)
    info = ort.OrtMemoryInfo("Cpu", ort.OrtAllocatorType.ORT_ARENA_ALLOCATOR, 0, ort.OrtMemType.DEFAULT)
    ort.create_and_register_allocator(info, ort.OrtArenaCfg(0, 1, -1, -1))  # max_mem default, kSameAsRequested


def split_rows(options: RuntimeOptions, provider: str, cores: int | None = None) -> int:
    """Rows from which a batch runs in two halves side by side, one on the calling thread and one on
    a helper thread; 0: never.

    Why: the intra-op pool is one fewer than the cores so that the event loop keeps one, which small
    batches need: a pool over every core cost Sample(1) at 16 and 64 callers a fifth to a quarter
    of their requests/s on 2 cores, the global pool's threads spinning after every batch on the
    event loop's core (its Python API cannot turn spinning off). A large batch leaves the event
    loop nearly idle, so it borrows that core: as two runs at once, each on the shared pool, it
    uses the pool's threads and two calling threads, every core. Two halves scale better than one
    run on more intra-op threads (in-process on 2 cores, batch 256: 1.9x against 1.0-1.7x), and a
    row's outputs do not depend on its batch neighbours or the thread count, so the answer is the
    same bytes (tests/test_threads.py; figures in docs/benchmarks.md). Only on CPU, and only when
    the pool leaves a core: a GPU runs a batch as one kernel sequence, and a second stream of it
    would only queue."""
    cores = available_cores() if cores is None else cores
    if provider != CPU or options.split_rows <= 0 or intra_op_threads(options.intra_op_threads) >= cores:
        return 0
    return max(2, options.split_rows)


class _Helpers:
    """The helper threads that run the second halves of split batches: one per core the intra-op
    pool leaves free (one, by default), for the whole process, so they do not multiply with models.
    A split takes a helper only if one is idle; otherwise its batch runs whole, as it would unsplit."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.pool: ThreadPoolExecutor | None = None
        self.idle: threading.Semaphore | None = None

    def get(self, options: RuntimeOptions) -> tuple[ThreadPoolExecutor, threading.Semaphore]:
        with self._lock:
            if self.pool is None:
                n = max(1, available_cores() - intra_op_threads(options.intra_op_threads))
                self.pool, self.idle = ThreadPoolExecutor(n, thread_name_prefix="split"), threading.Semaphore(n)
            assert self.idle is not None
            return self.pool, self.idle


_helpers = _Helpers()


def _environment(options: RuntimeOptions) -> None:
    threads = intra_op_threads(options.intra_op_threads) if options.shared_threads else None
    shared_environment(threads, options.inter_op_threads)


class Graph:
    """One ONNX graph and its session: numpy in, numpy out."""

    def __init__(self, path: str, options: RuntimeOptions, providers: list) -> None:
        so = ort.SessionOptions()
        so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        _environment(options)
        if options.shared_threads:
            so.use_per_session_threads = False
        else:
            so.intra_op_num_threads = intra_op_threads(options.intra_op_threads)
            so.inter_op_num_threads = options.inter_op_threads
        so.log_severity_level = 3
        # Spinning worker threads keep the cores busy between runs, starving the event loop and the
        # gRPC threads that share them; a served model runs in bursts, so let them sleep. This holds
        # for per-session pools only: the global pool's threads spin after each parallel section
        # whatever these say, and its Python API cannot change that (docs/benchmarks.md); with the
        # default one thread on 2 cores it has no threads to spin.
        so.add_session_config_entry("session.intra_op.allow_spinning", "0")
        so.add_session_config_entry("session.inter_op.allow_spinning", "0")
        # The CPU arena keeps the peak of the largest batch it has seen: faster for large batches,
        # but resident for good.
        so.enable_cpu_mem_arena = options.cpu_arena
        if options.cpu_arena:
            so.add_session_config_entry("session.use_env_allocators", "1")
        # Memory patterns are planned and kept per input shape; with a batch size that changes from
        # call to call they pile up in the arena, for no speed.
        so.enable_mem_pattern = False
        self.session = ort.InferenceSession(path, so, providers=providers)
        self.arena = options.cpu_arena
        self.input_name = self.session.get_inputs()[0].name
        self.output_names = [o.name for o in self.session.get_outputs()]
        self.provider = self.session.get_providers()[0]
        self.split_rows = split_rows(options, self.provider)
        self.helpers = _helpers.get(options) if self.split_rows else None

    def run(self, batch: np.ndarray) -> list[np.ndarray]:
        """The graph's outputs for a batch; from split_rows rows on, computed in two halves at
        once when a helper thread is idle (the same bytes either way)."""
        if len(batch) < self.split_rows:
            return self._run(batch)
        return self.in_halves(lambda start, stop: self._run(batch[start:stop]), len(batch))

    def in_halves(self, fn: Callable[[int, int], list[np.ndarray]], rows: int) -> list[np.ndarray]:
        """fn(start, stop) over rows 0..rows, in two halves at once when this graph's batches split
        and a helper thread is idle, else whole: for work done row by row, whose rows do not depend
        on their neighbours (a batch; Score's log p(x|z) of a batch's rows, which would otherwise
        keep one core idle after the batch's split halves)."""
        if self.helpers is None or rows < 2 or not self.helpers[1].acquire(blocking=False):
            return fn(0, rows)
        pool, idle = self.helpers
        half = rows // 2
        try:
            second = pool.submit(fn, half, rows)
        except BaseException:
            idle.release()
            raise
        second.add_done_callback(lambda _: idle.release())
        first = fn(0, half)
        return [np.concatenate(pair) for pair in zip(first, second.result())]

    def _run(self, batch: np.ndarray) -> list[np.ndarray]:
        outputs = self.session.run(self.output_names, {self.input_name: batch})
        if self.arena:
            # Outputs come back as views of the arena's blocks: a caller that keeps them (a batch's
            # images being read) keeps those blocks, and the arena grows past them for good.
            # Copied out, the blocks are free for the next batch at once.
            return [np.array(output) for output in outputs]
        return outputs


@dataclass
class Runtime:
    encoder: Graph
    decoder: Graph
    priors: dict[str, Graph] = field(default_factory=dict)  # by role: a flow's two graphs; none for N(0, I)
    family: dict[str, Graph] = field(default_factory=dict)  # by role: the family's own (a hierarchical model's posterior)

    @property
    def provider(self) -> str:
        return self.decoder.provider

    @property
    def decoder_images(self) -> bool:
        """Whether the decoder graph gives the images itself (exports before it gave parameters alone)."""
        return IMAGE in self.decoder.output_names

    def images_per_batch(self, distribution: Likelihood) -> bool:
        """Whether each decoder batch comes with its images: the graph's own, or the distribution's
        where they are cheap (a mixture's mean is taken only for the requests that show images)."""
        return self.decoder_images or distribution.image_per_batch

    def decode(self, z: np.ndarray, image: Callable[[np.ndarray], np.ndarray] | None) -> list[np.ndarray]:
        """The decoder on one batch: its parameters, and their images, the graph's own where it
        gives them, else `image(params)` where one is given."""
        outputs = self.decoder.run(z)
        if len(outputs) == 2 or image is None:
            return outputs
        return [outputs[0], image(outputs[0])]

    def cap_batches(self, rows: int) -> None:
        """Batches are capped at `rows`: where that is below twice the split size, a batch of half
        the cap splits, so capped batches still take the core the intra-op pool leaves free, also
        when they go short (a share of a batch while interactive calls are about)."""
        for graph in (self.encoder, self.decoder, *self.priors.values(), *self.family.values()):
            if graph.split_rows:
                graph.split_rows = max(2, min(graph.split_rows, rows // 2))


def load_runtime(spec: ModelSpec, options: RuntimeOptions) -> Runtime:
    providers = choose_providers(options, ort.get_available_providers())
    runtime = Runtime(
        encoder=Graph(str(spec.graph("encoder")), options, providers),
        decoder=Graph(str(spec.decoder(options.decoder_precision)), options, providers),
        priors={role: Graph(str(spec.graph(role)), options, providers) for role in spec.prior_graphs},
        family={role: Graph(str(spec.graph(role)), options, providers) for role in spec.family_graphs},
    )
    wanted = providers[0] if isinstance(providers[0], str) else providers[0][0]
    if runtime.provider != wanted:
        log.warning("asked onnxruntime for %s but the session runs on %s (CUDA libraries missing?)", wanted, runtime.provider)
    if options.shared_threads:
        how = f"the process's shared pool of {intra_op_threads(options.intra_op_threads)} intra-op threads"
    else:
        how = f"{runtime.decoder.session.get_session_options().intra_op_num_threads} intra-op threads each"
    if runtime.decoder.split_rows:
        how += f"; batches of {runtime.decoder.split_rows} rows or more in two halves at once"
    if options.decoder_precision != "fp32":
        how += f"; the {options.decoder_precision} decoder"
        if options.decoder_precision == "int8" and runtime.provider == CUDA:  # integer kernels are CPU ones
            log.warning("%s v%d: the int8 decoder is meant for CPUs; on CUDA its quantized nodes may run on the CPU",
                        spec.name, spec.version)  # fmt: skip
    log.info("%s v%d: graphs loaded on %s, %s", spec.name, spec.version, runtime.provider, how)
    return runtime
