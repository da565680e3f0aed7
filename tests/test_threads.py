"""Which threads compute which batches (service/runtime.py::split_rows), and the promise that makes
the choice invisible to clients: a row's outputs are the same bytes whatever its batch size, its
batch neighbours and the intra-op thread count. No timing here; the speeds are in
docs/benchmarks.md."""

import threading

import numpy as np
import pytest

from service import runtime
from service.repository import load_spec
from service.runtime import CPU, CUDA, Graph, RuntimeOptions, split_rows


def test_large_batches_split_only_when_the_pool_leaves_a_core():
    options = RuntimeOptions("cpu", intra_op_threads=1, split_rows=128)
    assert split_rows(options, CPU, cores=2) == 128  # the default on 2 cores: one pool thread, one core lent
    assert split_rows(RuntimeOptions("cpu", intra_op_threads=3, split_rows=128), CPU, cores=4) == 128
    assert split_rows(options, CPU, cores=1) == 0  # no core to lend
    whole_pool = RuntimeOptions("cpu", intra_op_threads=2, split_rows=128)
    assert split_rows(whole_pool, CPU, cores=2) == 0  # the pool has every core
    assert split_rows(options, CUDA, cores=2) == 0  # a GPU runs the batch whole
    assert split_rows(RuntimeOptions("cpu", intra_op_threads=1), CPU, cores=2) == 0  # off unless asked (bench, tools)


class Recording:
    """A session's stand-in that notes which thread ran how many rows."""

    def __init__(self, session) -> None:
        self.session, self.calls, self.lock = session, [], threading.Lock()

    def run(self, names, feeds):
        with self.lock:
            self.calls.append((threading.current_thread().name.split("_")[0], len(next(iter(feeds.values())))))
        return self.session.run(names, feeds)


@pytest.fixture
def decoder(model_repo, monkeypatch):
    monkeypatch.setattr(runtime, "available_cores", lambda: 2)  # whatever this machine has
    spec = load_spec(model_repo)
    return spec, str(spec.graph("decoder"))


def test_a_large_batch_runs_in_halves_on_the_calling_thread_and_a_helper(decoder):
    spec, path = decoder
    graph = Graph(path, RuntimeOptions("cpu", 1, split_rows=8), [CPU])
    whole = Graph(path, RuntimeOptions("cpu", 1), [CPU])
    assert graph.split_rows == 8 and whole.split_rows == 0 and whole.helpers is None
    graph.session = Recording(graph.session)
    z = np.random.default_rng(0).standard_normal((9, spec.latent_dim), dtype=np.float32)

    small = graph.run(z[:7])
    assert graph.session.calls == [("MainThread", 7)]
    graph.session.calls.clear()
    large = graph.run(z)
    assert sorted(graph.session.calls) == [("MainThread", 4), ("split", 5)]
    assert np.array_equal(large[0], whole.run(z)[0]) and np.array_equal(small[0], large[0][:7])

    graph.session.calls.clear()
    _, idle = graph.helpers
    busy = 0
    while idle.acquire(blocking=False):  # every helper busy with another graph's half
        busy += 1
    try:
        assert busy and np.array_equal(graph.run(z)[0], large[0])
    finally:
        for _ in range(busy):
            idle.release()
    assert graph.session.calls == [("MainThread", 9)]  # so this batch ran whole rather than wait


def test_rows_do_not_depend_on_batch_size_or_thread_count(model_repo):
    """The promise behind the split (and behind batching itself): each graph gives a row the same
    bytes alone, in any batch, in halves, and at 1, 2 or 3 intra-op threads."""
    spec = load_spec(model_repo)
    rng = np.random.default_rng(1)
    inputs = {
        "encoder": rng.random((64, *spec.image_shape), dtype=np.float32),
        "decoder": rng.standard_normal((64, spec.latent_dim), dtype=np.float32),
    }
    for role, x in inputs.items():
        reference = Graph(str(spec.graph(role)), RuntimeOptions("cpu", 1), [CPU]).run(x)
        for threads in (1, 2, 3):
            graph = Graph(str(spec.graph(role)), RuntimeOptions("cpu", threads), [CPU])
            for size in (1, 7, 32, 64):
                parts = [graph.run(x[i : i + size]) for i in range(0, len(x), size)]
                for j, want in enumerate(reference):
                    got = np.concatenate([p[j] for p in parts])
                    assert np.array_equal(got, want), f"{role} output {j}: {threads} threads, batches of {size}"
