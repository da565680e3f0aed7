"""Reliability on the real server: model updates under load, broken updates refused, SIGTERM under
load, overload, faults inside one batch, and a fuzz run of malformed requests."""

import asyncio
import json
import shutil
import signal
import threading
import time
from collections import Counter
from pathlib import Path

import grpc
import numpy as np
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from service.api.vae.v1 import vae_pb2 as pb
from service.api.vae.v1 import vae_pb2_grpc
from service.batcher import Batcher, BatchFailed
from service.client import VaeClient
from service.metrics import Metrics
from tests.conftest import HeldGraph, ServerProcess, expected_sample, wait_for
from tests.helpers import Load, metric, scrape, train


@pytest.fixture(scope="module")
def second_model(tmp_path_factory, digits):
    """Another real model, trained with another seed: its answers differ from the first's."""
    return train(digits, tmp_path_factory.mktemp("second"), epochs=3, seed=5)


@pytest.fixture
def repo(model_repo, tmp_path):
    """A private copy of the model repository, so a test can add versions to it."""
    shutil.copytree(model_repo, tmp_path / "models")
    return tmp_path / "models"


def publish_broken(repo: Path, version: int, break_it) -> None:
    """A version whose model.json checks out (hashes match) but whose graphs cannot serve."""
    import hashlib

    staging = repo / "digits" / f".staging-{version}"
    shutil.copytree(repo / "digits" / "1", staging)
    info = json.loads((staging / "model.json").read_text())
    break_it(staging, info)
    for role in ("encoder", "decoder"):
        info["graphs"][role]["sha256"] = hashlib.sha256((staging / f"{role}.onnx").read_bytes()).hexdigest()
    info["version"] = version
    (staging / "model.json").write_text(json.dumps(info))
    staging.rename(repo / "digits" / str(version))


def test_hot_swap_under_load_then_broken_versions_are_refused(repo, second_model, tmp_path):
    from export.repository import publish

    proc = ServerProcess(repo, tmp_path / "swap.log", "--watch-seconds", "0.2")
    request = pb.SampleRequest(num_samples=3, seed=11)
    try:
        with VaeClient(proc.target) as client:
            v1_answer = client.sample(3, seed=11)
            load = Load(proc.target, request)
            wait_for(lambda: len(load.calls) >= 30)  # load on v1
            model, cfg = second_model
            publish(model, cfg, repo, "digits")  # version 2, renamed into place atomically
            wait_for(lambda: client.info().version == 2)
            swapped = len(load.calls)
            wait_for(lambda: len(load.calls) >= swapped + 30)  # load on v2
            codes = load.stop()
            assert codes == Counter({"OK": codes["OK"]}) and codes["OK"] > 50, codes
            answers = {data for _, _, data in load.calls}
            assert len(answers) == 2  # the v1 answer, then the v2 answer: nothing in between
            v2_answer = client.sample(3, seed=11)
            assert not np.array_equal(v2_answer, v1_answer)
            np.testing.assert_allclose(v2_answer, expected_sample(model, 3, 11), atol=1e-5)

            publish_broken(repo, 3, lambda folder, info: (folder / "decoder.onnx").write_bytes(b"not an onnx graph"))
            wait_for(lambda: metric(scrape(proc), "vae_model_reloads_total", result="refused") == 1)
            publish_broken(repo, 4, lambda folder, info: info.update(image_shape=[1, 9, 9], preprocessing=info["preprocessing"] | {"size": [9, 9]}))
            wait_for(lambda: metric(scrape(proc), "vae_model_reloads_total", result="refused") == 2)
            assert client.info().version == 2 and np.array_equal(client.sample(3, seed=11), v2_answer)
            text = scrape(proc)
            assert metric(text, "vae_model_info", name="digits", version="2", provider="CPUExecutionProvider") == 1
            assert metric(text, "vae_model_reloads_total", result="swapped") == 1
    finally:
        assert proc.terminate() == 0
    log = proc.log.read_text()
    assert "model updated: digits v1 -> v2" in log and "retired v1" in log
    assert log.count("model update refused, still serving v2") == 2
    assert "cannot load the graphs" in log and "changes the interface of v2 (image_shape (1, 8, 8) -> (1, 9, 9)" in log


def test_a_refused_version_is_served_once_its_files_are_fixed(repo, tmp_path):
    """A version seen half-written is refused, not retried while its files stay as they are, and
    served as soon as they are complete, without a newer version or a SIGHUP."""
    proc = ServerProcess(repo, tmp_path / "fix.log", "--watch-seconds", "0.1")
    try:
        publish_broken(repo, 2, lambda folder, info: (folder / "decoder.onnx").write_bytes(b"half a graph"))
        wait_for(lambda: metric(scrape(proc), "vae_model_reloads_total", result="refused") == 1)
        # The folder's files are fixed in one step (moved aside, put back whole), so the server never
        # sees a state between broken and fixed.
        staging = repo / "digits" / ".fixing"
        shutil.copytree(repo / "digits" / "2", staging)
        shutil.copyfile(repo / "digits" / "1" / "decoder.onnx", staging / "decoder.onnx")
        good = json.loads((repo / "digits" / "1" / "model.json").read_text())["graphs"]["decoder"]["sha256"]
        info = json.loads((staging / "model.json").read_text())
        info["graphs"]["decoder"]["sha256"] = good
        (staging / "model.json").write_text(json.dumps(info))
        (repo / "digits" / "2").rename(tmp_path / "broken-2")
        staging.rename(repo / "digits" / "2")
        with VaeClient(proc.target) as client:
            wait_for(lambda: client.info().version == 2)
        text = scrape(proc)
        # Polled every 0.1 s while broken, but tried once: the refusal held until the files changed.
        assert metric(text, "vae_model_reloads_total", result="refused") == 1
        assert metric(text, "vae_model_reloads_total", result="swapped") == 1
    finally:
        assert proc.terminate() == 0
    assert "model updated: digits v1 -> v2" in proc.log.read_text()


def test_sighup_reloads(repo, second_model, tmp_path):
    from export.repository import publish

    proc = ServerProcess(repo, tmp_path / "hup.log", "--watch-seconds", "0")
    try:
        publish(*second_model, repo, "digits")
        with VaeClient(proc.target) as client:
            time.sleep(0.3)
            assert client.info().version == 1  # not watching: nothing happens on its own
            proc.proc.send_signal(signal.SIGHUP)
            wait_for(lambda: client.info().version == 2)
    finally:
        assert proc.terminate() == 0


def test_corrupt_repository_at_start_exits_with_a_message(repo, tmp_path):
    import subprocess
    import sys

    from tests.conftest import ROOT

    publish_broken(repo, 2, lambda folder, info: (folder / "encoder.onnx").write_bytes(b"\x00garbage"))
    done = subprocess.run(
        [sys.executable, "-m", "service", "--model-repo", str(repo), "--port", "0", "--metrics-port", "0", "--http-port", "0"],
        cwd=ROOT, capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert done.returncode == 2
    assert "cannot serve" in done.stderr and "cannot load the graphs" in done.stderr


def test_sigterm_under_load_fails_no_admitted_call(model_repo, tmp_path):
    """Every call the server admitted before it began to drain finishes OK. Which calls those were
    is the server's to say, not a clock's: a call it refuses gets UNAVAILABLE, and one it would
    have to cut short it reports in the log ("after the grace period")."""
    proc = ServerProcess(model_repo, tmp_path / "term.log", "--grace-seconds", "30")
    load = Load(proc.target, pb.SampleRequest(num_samples=16, seed=1), concurrency=16)
    wait_for(lambda: len(load.calls) >= 30)
    proc.proc.send_signal(signal.SIGTERM)
    assert proc.proc.wait(60) == 0
    load.stop()
    log = proc.log.read_text()
    assert "shutting down: draining" in log and "stopped" in log
    assert "after the grace period" not in log  # no admitted call was cancelled
    codes = Counter(code for _, code, _ in load.calls)
    assert codes["OK"] >= 30 and set(codes) <= {"OK", "UNAVAILABLE", "CANCELLED"}, codes
    # Per caller, calls run one after another: once refused, never served again (no call slipped
    # in after the drain began), so each caller's codes read OK... then only refusals.
    for caller in load.callers():
        first_refusal = next((i for i, code in enumerate(caller) if code != "OK"), len(caller))
        assert "OK" not in caller[first_refusal:], caller


def test_overload_refuses_at_once_and_memory_comes_back(model_repo, tmp_path):
    proc = ServerProcess(
        model_repo, tmp_path / "overload.log", "--max-queue-rows", "256", "--max-batch-rows", "64", "--max-interpolation-steps", "256",
        "--max-request-rows", "256",
    )  # fmt: skip
    try:
        pid = proc.proc.pid
        rss = lambda: int(next(l for l in open(f"/proc/{pid}/status") if l.startswith("VmRSS")).split()[1])  # noqa: E731
        with VaeClient(proc.target) as client:
            client.sample(256, seed=0)  # every buffer size the load will need, once
        before = rss()
        load = Load(proc.target, pb.SampleRequest(num_samples=128, seed=2), concurrency=24)  # ~12x the queue
        seen = lambda code: sum(1 for _, c, _ in load.calls if c == code)  # noqa: E731
        wait_for(lambda: seen("OK") > 10 and seen("RESOURCE_EXHAUSTED") > 10)
        codes = load.stop()
        assert set(codes) == {"OK", "RESOURCE_EXHAUSTED"} and codes["OK"] > 10 and codes["RESOURCE_EXHAUSTED"] > 10, codes
        text = scrape(proc)
        refused = metric(text, "vae_rejections_total", reason="queue_full")
        assert refused == codes["RESOURCE_EXHAUSTED"]
        assert metric(text, "vae_queue_wait_seconds_count", graph="decoder") >= codes["OK"]
        assert metric(text, "vae_queue_rows", graph="decoder") == 0  # every call answered: nothing held
        assert rss() < before * 1.3 + 20_000, (before, rss())  # kB: no growth that stays
        with VaeClient(proc.target) as client:
            assert client.sample(2, seed=0).shape == (2, 1, 8, 8)
    finally:
        assert proc.terminate() == 0


def test_a_failing_batch_fails_only_its_own_calls():
    """The real batcher, with a graph that fails on one poisoned batch: neighbours in later batches succeed."""

    def run(x: np.ndarray) -> list[np.ndarray]:
        if (x < 0).any():
            raise RuntimeError("poisoned batch")
        return [x * 2]

    async def scenario() -> tuple[list, list]:
        batcher = Batcher("test", run, Metrics(), max_rows=4, max_delay=0.05, max_queue_rows=64)
        batcher.start()
        try:
            poisoned = [batcher.submit(np.array([[-1.0]])), batcher.submit(np.array([[1.0]]))]  # one batch
            first = await asyncio.gather(*poisoned, return_exceptions=True)
            later = await asyncio.gather(*(batcher.submit(np.array([[float(i)]])) for i in range(3)))
            return first, later
        finally:
            await batcher.close()

    first, later = asyncio.run(scenario())
    assert all(isinstance(r, BatchFailed) and "poisoned batch" in str(r) for r in first)
    assert [float(out[0][0, 0]) for out in later] == [0.0, 2.0, 4.0]


def test_closing_a_batcher_fails_the_batch_in_flight():
    """Callers in the batch being computed get Closed at once, not a wait for an answer that never comes."""
    run = HeldGraph()
    computing, release = run.computing, run.release

    async def scenario() -> BaseException:
        batcher = Batcher("test", run, Metrics(), max_rows=4, max_delay=0.0, max_queue_rows=64, inline_seconds=0)
        batcher.start()
        call = asyncio.ensure_future(batcher.submit(np.ones((1, 1))))
        assert await asyncio.to_thread(computing.wait, 30)  # the batch is in the worker thread now
        await batcher.close()
        result = (await asyncio.wait_for(asyncio.gather(call, return_exceptions=True), 5))[0]  # fails, never hangs
        release.set()
        return result

    from service.batcher import Closed

    assert isinstance(asyncio.run(scenario()), Closed)


def test_lone_quick_batches_run_on_the_event_loop_and_the_rest_on_the_worker():
    """Where a batch runs follows the policy's decision (its rule, from the time per row, is tested
    in tests/test_batch_policy.py): here with thresholds no measured time can cross, so the outcome
    does not depend on how fast this machine is."""
    threads: list[str] = []

    def run(x: np.ndarray) -> list[np.ndarray]:
        threads.append("loop" if threading.current_thread() is threading.main_thread() else "worker")
        return [x]

    async def scenario(inline_seconds: float) -> list[str]:
        threads.clear()
        batcher = Batcher("test", run, Metrics(), max_rows=512, max_delay=0.0, inline_seconds=inline_seconds)
        batcher.start()
        try:
            await batcher.submit(np.ones((1, 1)))  # nothing measured yet: the worker
            await batcher.submit(np.ones((1, 1)))  # lone, and any measured time is under the threshold: the loop
            await batcher.submit(np.ones((30, 1)))
            await asyncio.gather(*(batcher.submit(np.ones((1, 1))) for _ in range(8)))  # company: the worker
        finally:
            await batcher.close()
        return list(threads)

    always = asyncio.run(scenario(inline_seconds=1e9))
    assert always[:3] == ["worker", "loop", "loop"] and always[-1] == "worker", always
    assert set(asyncio.run(scenario(inline_seconds=0.0))) == {"worker"}  # inlining off (as on a GPU)


def test_a_full_batch_goes_at_once_and_a_partial_one_when_the_delay_ends():
    """With the delay always spent (adaptive off), a batch that fills leaves without waiting for it,
    and one that never fills leaves when the timer ends the wait."""
    batch_sizes: list[int] = []

    def run(x: np.ndarray) -> list[np.ndarray]:
        batch_sizes.append(len(x))
        return [x]

    async def scenario(max_delay: float, requests: int) -> None:
        batcher = Batcher("test", run, Metrics(), max_rows=4, max_delay=max_delay, adaptive_delay=False)
        batcher.start()
        try:  # 60 s of delay would outlast the 10 s allowed: only a full batch can finish in time
            await asyncio.wait_for(asyncio.gather(*(batcher.submit(np.ones((1, 1))) for _ in range(requests))), 10)
        finally:
            await batcher.close()

    asyncio.run(scenario(max_delay=60.0, requests=4))
    asyncio.run(scenario(max_delay=0.05, requests=3))
    assert batch_sizes == [4, 3]


def test_queue_depth_gauge_reads_the_waiting_rows():
    """vae_queue_rows is read at scrape time: rows queued behind a busy graph show, and go when served."""
    run = HeldGraph()
    computing, release = run.computing, run.release

    async def scenario() -> tuple[float, float]:
        metrics = Metrics()
        depth = lambda: metrics.registry.get_sample_value("vae_queue_rows", {"graph": "test", "model": "", "version": ""})  # noqa: E731
        batcher = Batcher("test", run, metrics, max_rows=2, max_delay=0.0, max_queue_rows=64, inline_seconds=0)
        batcher.start()
        try:
            first = asyncio.ensure_future(batcher.submit(np.ones((2, 1))))
            assert await asyncio.to_thread(computing.wait, 30)  # the first batch holds the graph
            waiting = [asyncio.ensure_future(batcher.submit(np.ones((k, 1)))) for k in (1, 2)]
            for _ in range(100):  # let both calls reach the queue: loop turns, not time
                await asyncio.sleep(0)
            queued = depth()
            release.set()
            await asyncio.gather(first, *waiting)
            return queued, depth()
        finally:
            await batcher.close()

    queued, after = asyncio.run(scenario())
    assert (queued, after) == (3.0, 0.0)


tensors = st.builds(
    pb.Tensor,
    shape=st.lists(st.integers(-5, 2**40), max_size=5),
    dtype=st.integers(0, 5),
    data=st.binary(max_size=600),
)
floats = st.floats(allow_nan=True, allow_infinity=True, width=32)
requests = st.one_of(
    st.builds(lambda n, s, t, f, c: ("Sample", pb.SampleRequest(num_samples=n, seed=s, temperature=t, format=f, chunk_rows=c)),
              st.integers(0, 2**32 - 1), st.integers(0, 2**64 - 1), floats, st.integers(0, 9), st.integers(0, 2**32 - 1)),
    st.builds(lambda n, t: ("SampleStream", pb.SampleRequest(num_samples=n, temperature=t, chunk_rows=7)),
              st.integers(0, 40), floats),
    st.builds(lambda t, s: ("Encode", pb.EncodeRequest(images=t, sample=s)), tensors, st.booleans()),
    st.builds(lambda t, f: ("Decode", pb.DecodeRequest(latents=t, format=f)), tensors, st.integers(0, 9)),
    st.builds(lambda t: ("Reconstruct", pb.ReconstructRequest(images=t)), tensors),
    st.builds(lambda a, b, n, m: ("Interpolate", pb.InterpolateRequest(start_latent=a, end_image=b, steps=n, method=m)),
              tensors, tensors, st.integers(0, 2**32 - 1), st.integers(0, 9)),
    st.builds(lambda t, k: ("Score", pb.ScoreRequest(images=t, importance_samples=k)), tensors, st.integers(0, 2**32 - 1)),
    st.builds(lambda x: ("Decode", pb.DecodeRequest(latents=pb.Tensor(shape=[1, 8], dtype=1, data=x.tobytes()))),
              st.lists(floats, min_size=8, max_size=8).map(lambda v: np.array(v, np.float32))),
    st.builds(lambda name, v: ("Sample", pb.SampleRequest(num_samples=1, model_name=name, model_version=v)),
              st.text(max_size=20), st.integers(-(2**63), 2**63 - 1)),
    st.builds(lambda name, v: ("GetModelInfo", pb.GetModelInfoRequest(model_name=name, model_version=v)),
              st.text(max_size=20), st.integers(-(2**63), 2**63 - 1)),
    st.just(("ListModels", pb.ListModelsRequest())),
    # Model control with any name but the served one's: the shared server must keep serving it.
    st.builds(lambda name, v, kind: (kind.__name__.removesuffix("Request"), kind(model_name=name, model_version=v)),
              st.text(max_size=20).filter(lambda name: name != "digits"), st.integers(-(2**63), 2**63 - 1),
              st.sampled_from([pb.LoadModelRequest, pb.UnloadModelRequest])),
)  # fmt: skip
BAD_FOR_BAD_INPUT = {"INTERNAL", "UNKNOWN"}


def test_fuzz_malformed_requests(server):
    tried: Counter = Counter()
    with grpc.insecure_channel(server.target) as channel:
        stub = vae_pb2_grpc.VaeServiceStub(channel)
        methods = ("Sample", "Encode", "Decode", "Score", "Interpolate", "ListModels", "LoadModel", "UnloadModel")
        raw = {m: channel.unary_unary(f"/vae.v1.VaeService/{m}") for m in methods}

        @settings(max_examples=2500, deadline=None, suppress_health_check=list(HealthCheck), database=None)
        @given(requests)
        def typed(case):
            method, request = case
            try:
                result = getattr(stub, method)(request, timeout=10)
                if method == "SampleStream":
                    list(result)
                code = "OK"
            except grpc.RpcError as err:
                code = err.code().name
            tried[code] += 1
            assert code not in BAD_FOR_BAD_INPUT, (method, request, code)

        @settings(max_examples=1000, deadline=None, suppress_health_check=list(HealthCheck), database=None)
        @given(st.sampled_from(sorted(raw)), st.binary(max_size=300))
        def garbage(method, payload):
            try:
                raw[method](payload, timeout=10)
                code = "OK"
            except grpc.RpcError as err:
                code = err.code().name
            tried[code] += 1
            assert code not in BAD_FOR_BAD_INPUT, (method, payload, code)

        typed()
        garbage()
        status = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest()).status
        assert status == health_pb2.HealthCheckResponse.SERVING
    print(f"\nfuzz: {sum(tried.values())} requests, by status: {dict(tried)}")
    assert sum(tried.values()) >= 3000 and tried["INVALID_ARGUMENT"] > 1000
