"""Memory by bytes (service/memory.py, service/costs.py): the budget's own rules on a real event loop,
the cgroup limit as the kernel's files give it, a request's cost against the peak it really takes
on a real server, loads refused for memory while the old version serves, and the storm of the
issue against a server in a 1 GiB memory cgroup (root: CI runs it; elsewhere it skips)."""

from __future__ import annotations

import asyncio
import json
import math
import os
import random
import shutil
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import grpc
import httpx
import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from bench.cgroup import MemoryCgroup
from service.costs import Work
from service.errors import DeadlineExceeded
from service.memory import MemoryBudget, MemoryExhausted, MiB, cgroup_limit, parse_size, peak_from_now, status_bytes
from service.metrics import Metrics
from tests.conftest import ServerProcess
from tests.helpers import metric, scrape
from tests.test_http_robustness import request as fuzz_request

GiB = 1 << 30


# ---- sizes and limits ------------------------------------------------------------------------------


@given(number=st.integers(0, 1 << 20), unit=st.sampled_from(["", "K", "M", "G", "T"]),
       suffix=st.sampled_from(["", "B", "iB"]), lower=st.booleans())  # fmt: skip
def test_sizes_read_as_binary_multiples(number, unit, suffix, lower):
    text = f"{number}{unit}{suffix if unit else ''}"
    assert parse_size(text.lower() if lower else text) == number * (1 << (10 * " KMGT".index(unit or " ")))


@pytest.mark.parametrize("text", ["", "M", "1.2.3G", "-5M", "12X", "1 G B"])
def test_a_size_that_is_none_says_so(text):
    with pytest.raises(ValueError, match="is no size"):
        parse_size(text)


def _cgroups(tmp_path: Path, proc: str, files: dict[str, str]) -> int | None:
    for name, text in files.items():
        (tmp_path / "sys" / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / "sys" / name).write_text(text)
    (tmp_path / "cgroup").write_text(proc)
    return cgroup_limit(tmp_path / "cgroup", tmp_path / "sys")


def test_cgroup_v1_limits_are_read_up_the_hierarchy(tmp_path):
    proc = "4:memory:/pod/server\n3:cpu,cpuacct:/pod/server\n0::/\n"
    unlimited = str(9223372036854771712)
    assert _cgroups(tmp_path, proc, {
        "memory/pod/server/memory.limit_in_bytes": unlimited, "memory/pod/memory.limit_in_bytes": str(GiB),
        "memory/memory.limit_in_bytes": unlimited,
    }) == GiB  # fmt: skip


def test_cgroup_v2_limit_of_a_container_is_its_root(tmp_path):
    """Inside a container the cgroup namespace makes the process's cgroup the root ('0::/')."""
    assert _cgroups(tmp_path, "0::/\n", {"cgroup.controllers": "cpu memory", "memory.max": "536870912\n"}) == 512 * MiB


def test_cgroup_v2_max_means_no_limit_unless_a_parent_sets_one(tmp_path):
    files = {"cgroup.controllers": "memory", "a/b/memory.max": "max\n", "a/memory.max": "max\n"}
    assert _cgroups(tmp_path, "0::/a/b\n", files) is None
    assert _cgroups(tmp_path, "0::/a/b\n", {**files, "a/memory.max": str(3 * GiB)}) == 3 * GiB


def test_no_cgroup_files_is_no_limit(tmp_path):
    assert _cgroups(tmp_path, "0::/\n", {}) is None
    assert cgroup_limit(tmp_path / "missing", tmp_path) is None


# ---- the budget's rules ----------------------------------------------------------------------------


def _budget(total: float) -> MemoryBudget:
    return MemoryBudget(total, Metrics())


def test_what_fits_runs_and_what_does_not_waits_first_come_first_served():
    async def main():
        budget = _budget(100)
        order = []

        async def call(name: str, cost: int, done: asyncio.Event | None = None):
            async with budget.hold(cost, "sample", name):
                order.append(name)
                if done is not None:
                    await done.wait()

        first_done = asyncio.Event()
        first = asyncio.ensure_future(call("first", 70, first_done))
        await asyncio.sleep(0)
        assert order == ["first"] and budget.requests == 70
        big = asyncio.ensure_future(call("big", 60))
        small = asyncio.ensure_future(call("small", 10))  # fits now, but waits behind the older one
        await asyncio.sleep(0)
        assert order == ["first"] and [w.cost for w in budget.waiting] == [60, 10]
        first_done.set()
        await asyncio.gather(first, big, small)
        assert order == ["first", "big", "small"]
        assert budget.requests == 0 and not budget.waiting

    asyncio.run(main())


def test_a_cost_that_can_never_fit_is_refused_at_once_naming_both_figures():
    async def main():
        budget = _budget(100 * MiB)
        budget.models = 30 * MiB
        with pytest.raises(
            MemoryExhausted,
            match=r"Score of 16 images needs 80 MiB .* budget is 100 MiB, of which loaded models hold 30 MiB",
        ):
            async with budget.hold(80 * MiB, "score", "Score of 16 images"):
                pass
        assert budget.requests == 0 and not budget.waiting

    asyncio.run(main())


def test_a_waiter_whose_deadline_passes_leaves_and_lets_the_next_in():
    async def main():
        budget = _budget(100)
        loop = asyncio.get_running_loop()
        release = asyncio.Event()

        async def holder():
            async with budget.hold(90, "sample", "holder"):
                await release.wait()

        task = asyncio.ensure_future(holder())
        await asyncio.sleep(0)
        blocked = asyncio.ensure_future(budget.acquire(50, "Score of 4 images", loop.time() + 0.05))
        behind = asyncio.ensure_future(budget.acquire(10, "Sample of 1 images", None))
        with pytest.raises(DeadlineExceeded, match="waited for memory"):
            await blocked
        await behind  # 10 fits beside 90 once the 50 ahead of it left
        assert budget.requests == 100 and not budget.waiting
        release.set()
        await task
        assert budget.requests == 10

    asyncio.run(main())


def test_a_cancelled_waiter_takes_nothing_with_it():
    async def main():
        budget = _budget(100)
        await budget.acquire(100, "a", None)
        waiter = asyncio.ensure_future(budget.acquire(40, "b", None))
        await asyncio.sleep(0)
        waiter.cancel()
        with pytest.raises(asyncio.CancelledError):
            await waiter
        budget.release(100)
        assert budget.requests == 0 and budget.free == 100 and not budget.waiting

    asyncio.run(main())


def test_resident_memory_past_the_ceiling_holds_a_request_until_the_running_ones_finish():
    """The budget has room, but the process's resident memory does not: the request waits (the heap
    is trimmed meanwhile), and runs once no other request does."""

    async def main():
        budget = MemoryBudget(1 << 40, Metrics(), ceiling=1)  # any resident memory is past it
        await budget.acquire(10, "first", None)  # none running: the accounting alone decides
        second = asyncio.ensure_future(budget.acquire(10, "second", None))
        await asyncio.sleep(0)
        assert not second.done() and budget.trimming
        budget.release(10)
        await second
        assert budget.requests == 10 and not budget.waiting

    asyncio.run(main())


def test_loads_hold_their_bytes_as_the_models_and_resize_to_what_they_measured():
    async def main():
        budget = _budget(100)
        await budget.acquire(60, "loading m v1", None, load=True)
        budget.resize(60, 20)
        assert (budget.models, budget.requests) == (20, 0)
        with pytest.raises(MemoryExhausted, match="cannot be loaded"):
            await budget.acquire(90, "loading m v2", None, load=True)
        budget.release(20, load=True)
        assert budget.models == 0

    asyncio.run(main())


@given(runs=st.lists(st.tuples(st.integers(1, 512), st.integers(0, 1 << 30)), min_size=2, max_size=5),
       floor=st.integers(1, 1 << 20))  # fmt: skip
def test_work_is_never_below_the_outputs_it_hands_back(runs, floor):
    work = Work.fit(runs, floor)
    assert work.per_row >= floor and work.fixed >= 0


def test_work_without_measurements_is_twice_the_outputs():
    assert Work.fit([(1, None), (256, None)], 1000) == Work(0, 2000)


# ---- on a real server ------------------------------------------------------------------------------


def colour_repo(root: Path, size: int = 64, name: str = "emoji64", classes: int = 0) -> Path:
    """A colour model of the Twemoji recipe's shape (5-component logistic mixture, widths 64,128,
    512 hidden, 64 latents) at `size` x `size`, exported untrained: memory does not depend on the
    weights, and training one would cost the suite minutes. With `classes`, a conditional one."""
    import torch

    from export.repository import publish
    from training.config import ModelConfig, TrainConfig
    from training.model import VAE

    cfg = ModelConfig(image_shape=(3, size, size), latent_dim=64, widths=(64, 128), hidden=512,
                      likelihood="logistic-mixture", mixtures=5, classes=classes)  # fmt: skip
    names = [f"class {i}" for i in range(classes)] if classes else None
    means = torch.zeros(classes, 64) if classes else None
    publish(VAE(cfg).eval(), TrainConfig(model=cfg), root, name, classes=names, class_means=means)
    return root


@pytest.fixture(scope="module")
def emoji_repo(tmp_path_factory):
    return colour_repo(tmp_path_factory.mktemp("emoji-models"))


@pytest.fixture(scope="module")
def emoji_pair_repo(tmp_path_factory):
    """The 64x64 colour model, and a conditional one of nine classes (Twemoji's) beside it."""
    return colour_repo(colour_repo(tmp_path_factory.mktemp("emoji-pair")), name="emoji64c", classes=9)


def test_a_requests_cost_is_within_half_again_of_the_peak_it_takes(emoji_pair_repo, tmp_path):
    """Each operation alone on the 64x64 model: the server's cost for it (vae_request_cost_bytes)
    against the peak resident memory it added (VmHWM reset before it). Large blocks are mapped
    fresh here (MALLOC_MMAP_THRESHOLD_), so the peak is the request's own, not what the heap kept
    from the ones before."""
    from service.client import VaeClient

    env = {"MALLOC_MMAP_THRESHOLD_": "131072"}
    old = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    try:
        server = ServerProcess(emoji_pair_repo, tmp_path / "server.log", "--max-batch-delay-ms", "0")
    finally:
        for k, v in old.items():
            if v is None:
                os.environ.pop(k)
            else:
                os.environ[k] = v
    rng = np.random.default_rng(0)
    images = rng.uniform(0, 1, (64, 3, 64, 64)).astype(np.float32)
    calls = {
        "sample": lambda c: c.sample(256, seed=1),
        "encode": lambda c: c.encode(images),
        "decode": lambda c: c.decode(rng.normal(size=(256, 64)).astype(np.float32)),
        "reconstruct": lambda c: c.reconstruct(images),
        "interpolate": lambda c: c.interpolate(images[0], images[1], steps=256),
        "score": lambda c: c.score(images[:16], k=64, seed=2),
        # the conditional model's: every class scored (Score's marginal and Classify), and an edit
        "conditional score": lambda c: c.score(images[:4], k=32, seed=2),
        "classify": lambda c: c.classify(images[:4], k=32, seed=2),
        "edit": lambda c: c.edit(images[:8], target="class 3"),
    }
    ratios = {}
    try:
        with VaeClient(server.target, timeout=300, model="emoji64") as client:
            client.sample(2, seed=0)
            for label, call in calls.items():
                client.model = "emoji64c" if label in ("conditional score", "classify", "edit") else "emoji64"
                operation = label.removeprefix("conditional ")
                before_cost = metric(scrape(server), "vae_request_cost_bytes_sum", operation=operation)
                idle = status_bytes("VmRSS:", server.proc.pid)
                assert peak_from_now(server.proc.pid)
                call(client)
                peak = status_bytes("VmHWM:", server.proc.pid) - idle
                cost = metric(scrape(server), "vae_request_cost_bytes_sum", operation=operation) - before_cost
                ratios[label] = (cost / MiB, peak / MiB, cost / max(peak, 1))
    finally:
        server.terminate()
    shown = {op: f"cost {c:.0f} MiB, peak {p:.0f} MiB, ratio {r:.2f}" for op, (c, p, r) in ratios.items()}
    assert all(1 / 1.5 <= r <= 1.5 for _, _, r in ratios.values()), json.dumps(shown, indent=1)


def test_a_load_that_cannot_fit_is_refused_and_the_old_version_keeps_serving(model_repo, tmp_path):
    """A budget that holds one version of the digits model: a second model is refused by LoadModel,
    and so is a new version (a swap holds both), with the memory in the reason; v1 serves on."""
    from export.repository import publish
    from service.api.vae.v1 import vae_pb2 as pb
    from service.client import VaeClient
    from service.engine import BatchSettings, load_estimate
    from service.manifest import read_manifest
    from training.checkpoint import load_model

    repo = tmp_path / "models"
    shutil.copytree(model_repo / "digits", repo / "digits")
    estimate = load_estimate(read_manifest(repo / "digits" / "1"), BatchSettings(), math.inf)
    probe = ServerProcess(repo, tmp_path / "probe.log", "--memory-budget", "1G")
    try:
        footprint = metric(scrape(probe), "vae_memory_held_bytes", holder="models")
    finally:
        probe.terminate()
    assert footprint > 0
    budget = int(estimate + footprint / 2)  # one load fits; a second beside the first does not
    server = ServerProcess(repo, tmp_path / "server.log", "--memory-budget", str(budget), "--watch-seconds", "0")
    try:
        shutil.copytree(repo / "digits", repo / "other")
        with VaeClient(server.target, model="digits") as client:
            with pytest.raises(grpc.RpcError) as refused:
                client.load("other")
            assert refused.value.code() == grpc.StatusCode.FAILED_PRECONDITION
            assert "memory budget" in refused.value.details() and "cannot be loaded" in refused.value.details()
            model, cfg, _ = load_model(next(model_repo.parent.glob("digits-run*")) / "best.pt")
            publish(model, cfg, repo, "digits")  # v2
            with pytest.raises(grpc.RpcError) as swap:
                client.load("digits")
            assert "memory budget" in swap.value.details()
            assert len(client.sample(2, seed=3)) == 2 and client.answered_by == ("digits", 1)
            states = {(s.name, s.version): pb.ModelState.Name(s.state) for s in client.models().models}
            assert states[("digits", 1)].endswith("READY") and states[("digits", 2)].endswith("UNAVAILABLE"), states
        assert metric(scrape(server), "vae_rejections_total", reason="memory") >= 2
    finally:
        server.terminate()


def test_a_request_over_the_budget_is_refused_in_one_line_and_the_server_serves_on(model_repo, tmp_path):
    """Score streams, so no Score of the digits model can outgrow a budget; a Sample of 200,000 images
    (allowed by the row limits here) holds them all, 100 MiB and more, and can never fit 48 MiB."""
    from service.client import VaeClient

    server = ServerProcess(model_repo, tmp_path / "server.log", "--memory-budget", "48M", "--max-request-rows", "200000", "--max-queue-rows", "200000",
                           http=True)  # fmt: skip
    try:
        text = scrape(server)
        assert metric(text, "vae_memory_budget_bytes") == 48 * MiB
        with VaeClient(server.target) as client:
            with pytest.raises(grpc.RpcError) as refused:
                client.sample(200_000, seed=1)
            assert refused.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
            assert "needs" in refused.value.details() and "budget is 48 MiB" in refused.value.details()
            assert "\n" not in refused.value.details()
            assert len(client.sample(4, seed=1)) == 4
            scores = client.score(np.zeros((2, 1, 8, 8), np.float32), k=5000, seed=1)  # k costs time, not memory
            assert len(scores["elbo"]) == 2
        import urllib.error
        import urllib.request

        body = json.dumps({"num_samples": 200_000}).encode()
        request = urllib.request.Request(
            f"{server.http_url}/v1/models/digits/sample", body, {"Content-Type": "application/json"}
        )
        with pytest.raises(urllib.error.HTTPError) as http:
            urllib.request.urlopen(request, timeout=60)
        answer = http.value.read()
        assert http.value.code == 429 and "budget" in json.loads(answer)["error"], answer
        assert metric(scrape(server), "vae_rejections_total", reason="memory") == 2
    finally:
        server.terminate()


# ---- the storm, in a 1 GiB memory cgroup -----------------------------------------------------------


@pytest.fixture
def cgroup():
    try:
        group = MemoryCgroup(GiB, prefix="vae-test")
    except OSError as err:
        if os.environ.get("CI") == "true":
            raise AssertionError(f"CI runs as root and must make a memory cgroup: {err}") from err
        pytest.skip(f"cannot make a memory cgroup here (needs root): {err}")
    yield group
    group.remove()


def test_the_storm_in_a_1gib_cgroup_is_answered_and_the_server_lives(emoji_repo, tmp_path, cgroup):
    """The issue's storm on the 64x64 colour model at once: Sample(256) from 4 callers, four
    Score(16) (k=64: k only makes it longer), Encode(64) from 8 callers and malformed HTTP. Every
    call is answered or refused with RESOURCE_EXHAUSTED (or DEADLINE_EXCEEDED), no process is
    OOM-killed, the peak stays under the limit, and the server is SERVING after."""
    from service.client import VaeClient
    from tests.reach import grpc_health

    (tmp_path / "admin").write_text("admin-only\n")  # model control stays out of the fuzz's reach
    server = ServerProcess(emoji_repo, tmp_path / "server.log", "--admin-token-file", str(tmp_path / "admin"), http=True,
                           launcher=cgroup.launcher)  # fmt: skip
    log = (tmp_path / "server.log").read_text()
    assert "the cgroup's memory limit 1.0 GiB" in log, log
    rng = np.random.default_rng(0)
    images = rng.uniform(0, 1, (64, 3, 64, 64)).astype(np.float32)
    outcomes: dict[str, list[str]] = {}

    def calls(kind: str, count: int, call) -> None:
        with VaeClient(server.target, timeout=240) as client:
            for i in range(count):
                try:
                    call(client, i)
                    outcomes.setdefault(kind, []).append("OK")
                except grpc.RpcError as err:
                    outcomes.setdefault(kind, []).append(err.code().name)

    def fuzz(seed: int) -> None:
        """The HTTP fuzz of tests/test_http_robustness.py, sent to this model."""
        rng = random.Random(seed)
        with httpx.Client(base_url=server.http_url, timeout=240) as web:
            for _ in range(300):
                spec = fuzz_request(rng)
                spec["url"] = spec["url"].replace("digits", "emoji64")
                outcomes.setdefault("http", []).append(str(web.request(**spec).status_code))

    try:
        with VaeClient(server.target, timeout=240) as client:
            assert len(client.score(images[:16], k=64, seed=0)["elbo"]) == 16  # alone, it is answered
        with ThreadPoolExecutor(4 + 4 + 8 + 2) as pool:
            jobs = [pool.submit(calls, "sample", 3, lambda c, i: c.sample(256, seed=i)) for _ in range(4)]
            jobs += [pool.submit(calls, "score", 1, lambda c, i: c.score(images[:16], k=64, seed=i)) for _ in range(4)]
            jobs += [pool.submit(calls, "encode", 8, lambda c, i: c.encode(images)) for _ in range(8)]
            jobs += [pool.submit(fuzz, i) for i in range(2)]
            for job in jobs:
                job.result()
        assert server.proc.poll() is None, (tmp_path / "server.log").read_text()[-3000:]
        assert grpc_health("127.0.0.1", server.port) == "SERVING"
        allowed = {"OK", "RESOURCE_EXHAUSTED", "DEADLINE_EXCEEDED"}
        for kind in ("sample", "score", "encode"):
            assert set(outcomes[kind]) <= allowed and "OK" in outcomes[kind], outcomes
        assert all(int(code) < 500 for code in outcomes["http"]), sorted(set(outcomes["http"]))
        assert cgroup.oom_kills() == 0
        # The peak of what the process itself holds: its resident peak less the shared libraries'
        # pages, which the page cache holds for every process that maps them.
        assert status_bytes("VmHWM:", server.proc.pid) - status_bytes("RssFile:", server.proc.pid) < GiB
    finally:
        server.terminate()
