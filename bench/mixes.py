"""Scenarios of several kinds of traffic at once: small calls beside a huge one (fair batching), one
load spread over several models, the memory each added model costs, and what a flow prior costs
against the same model under N(0, I).

Each compares the service with itself in the same run: the ratio holds on a shared machine where
absolute figures drift. Models are hard-linked copies of the one given, under other names.
"""

from __future__ import annotations

import asyncio
import errno
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import grpc
import numpy as np

from bench.load import LoadResult, run_load
from bench.processes import ServiceProcess, rss_mb
from service.api.vae.v1 import vae_pb2 as pb
from service.api.vae.v1 import vae_pb2_grpc
from service.manifest import PRIOR_ROLES, ModelSpec, derive_manifest
from service.tensors import from_array


def link(source: Path, target: Path) -> None:
    """A hard link (no copy on disk), or a copy where the two lie on different filesystems."""
    try:
        os.link(source, target)
    except OSError as err:
        if err.errno != errno.EXDEV:
            raise
        shutil.copy2(source, target)


def linked_repository(spec: ModelSpec, names: list[str]) -> Path:
    """A repository holding the spec's version under each name, hard-linked where it can be."""
    repo = Path(tempfile.mkdtemp(prefix="bench-models-"))
    for name in names:
        folder = repo / name / str(spec.version)
        folder.mkdir(parents=True)
        for file in spec.folder.iterdir():
            if file.is_file():
                link(file, folder / file.name)
    return repo


def _stub(channel: grpc.aio.Channel) -> vae_pb2_grpc.VaeServiceStub:
    return vae_pb2_grpc.VaeServiceStub(channel)


def _figures(r: LoadResult) -> dict[str, Any]:
    return {
        "requests_per_s": round(r.ok / r.seconds, 1), "p50_ms": round(r.percentile_ms(50), 2),
        "p99_ms": round(r.percentile_ms(99), 2), "errors": r.errors,
    }  # fmt: skip


async def _sample_beside_score(target: str, spec: ModelSpec, duration: float, warmup: float, score: bool) -> dict[str, Any]:
    """16 callers of Sample(1), and (with `score`) one caller of Score(16 images, k=1000) back to back."""
    rng = np.random.default_rng(0)
    images = from_array((rng.random((16, *spec.image_shape)) < 0.3).astype(np.float32))
    async with grpc.aio.insecure_channel(target, options=[("grpc.max_receive_message_length", 64 << 20)]) as channel:
        stub = _stub(channel)
        sample = pb.SampleRequest(num_samples=1, seed=1)
        scoring = pb.ScoreRequest(images=images, importance_samples=1000, seed=1)
        loads = [run_load(lambda: stub.Sample(sample), 16, duration, warmup)]
        if score:  # from the start, recorded: one Score can take longer than the window
            loads.append(run_load(lambda: stub.Score(scoring, timeout=600), 1, duration + warmup, 0.0))
        results = await asyncio.gather(*loads)
    out = {"sample": _figures(results[0])}
    if score:
        out["score"] = _figures(results[1])
    return out


def fairness(spec: ModelSpec, duration: float, warmup: float, extra: list[str], logs: Path) -> dict[str, Any]:
    """Sample(1) at concurrency 16 alone, then beside Score(16 images, k = 1000): the p99 ratio."""
    repo = linked_repository(spec, [spec.name])
    server = ServiceProcess(repo, logs / "fairness.log", *extra)
    try:
        alone = asyncio.run(_sample_beside_score(server.target, spec, duration, warmup, score=False))
        mixed = asyncio.run(_sample_beside_score(server.target, spec, duration, warmup, score=True))
    finally:
        server.stop()
    return {
        "alone": alone, "beside_score": mixed,
        "p99_ratio": round(mixed["sample"]["p99_ms"] / alone["sample"]["p99_ms"], 2),
    }  # fmt: skip


async def _spread(target: str, models: list[str], concurrency: int, duration: float, warmup: float) -> LoadResult:
    """Sample(1) callers, each bound to one model, the models taken in turn."""
    async with grpc.aio.insecure_channel(target) as channel:
        stub = _stub(channel)
        per_model = concurrency // len(models)
        results = await asyncio.gather(*(
            run_load(lambda r=pb.SampleRequest(num_samples=1, seed=1, model_name=name): stub.Sample(r), per_model, duration, warmup)
            for name in models
        ))  # fmt: skip
    return LoadResult.combine_concurrent(results)


def many_models(
    spec: ModelSpec, duration: float, warmup: float, extra: list[str], logs: Path, rounds: int = 3
) -> dict[str, Any]:
    """Sample(1) at concurrency 64 over one model, and over 4 models (16 callers each) of one server:
    aggregate requests/s, the two loaded in turns, slice by slice."""
    one = ServiceProcess(linked_repository(spec, ["m0"]), logs / "one-model.log", *extra)
    four = ServiceProcess(linked_repository(spec, [f"m{i}" for i in range(4)]), logs / "four-models.log", *extra)
    slices: dict[str, list[LoadResult]] = {"one": [], "four": []}
    try:
        for _ in range(rounds):
            slices["one"].append(asyncio.run(_spread(one.target, ["m0"], 64, duration / rounds, warmup / rounds)))
            slices["four"].append(asyncio.run(_spread(four.target, [f"m{i}" for i in range(4)], 64, duration / rounds, warmup / rounds)))
    finally:
        one.stop()
        four.stop()
    one_r, four_r = (LoadResult.combine(parts) for parts in slices.values())
    return {
        "one_model": _figures(one_r), "four_models": _figures(four_r),
        "ratio": round((four_r.ok / four_r.seconds) / (one_r.ok / one_r.seconds), 3),
    }  # fmt: skip


def memory_by_models(spec: ModelSpec, counts: tuple[int, ...], extra: list[str], logs: Path) -> dict[str, Any]:
    """Resident memory of the server serving 1, 4, 8 ... copies of the model, after warm-up and after
    one Sample at the batch limit per model (each model's arena and queues in use)."""
    out: dict[str, Any] = {}
    for n in counts:
        names = [f"m{i}" for i in range(n)]
        server = ServiceProcess(linked_repository(spec, names), logs / f"memory-{n}.log", *extra)
        try:
            warm = rss_mb(server.proc.pid)
            with grpc.insecure_channel(server.target, options=[("grpc.max_receive_message_length", 64 << 20)]) as channel:
                stub = vae_pb2_grpc.VaeServiceStub(channel)
                for name in names:
                    stub.Sample(pb.SampleRequest(num_samples=256, seed=1, model_name=name), timeout=60)
            out[str(n)] = {"after_warmup_mb": round(warm, 1), "after_calls_mb": round(rss_mb(server.proc.pid), 1)}
        finally:
            server.stop()
    first, last = min(counts), max(counts)
    added = (out[str(last)]["after_calls_mb"] - out[str(first)]["after_calls_mb"]) / (last - first)
    out["mb_per_added_model"] = round(added, 1)
    return out


def standard_prior_twin(spec: ModelSpec, repo: Path, name: str) -> None:
    """The flow model's encoder and decoder served under N(0, I), as repo/name: the same graphs and
    weights without the prior's two, so Sample differs only by the flow's f(eps)."""
    folder = repo / name / str(spec.version)
    folder.mkdir(parents=True)
    for file in spec.folder.glob("*.onnx"):
        if file.stem not in PRIOR_ROLES[spec.prior]:
            link(file, folder / file.name)
    derive_manifest(spec.folder, folder, drop=PRIOR_ROLES[spec.prior], name=name, prior="standard")


async def _sample_rows(target: str, model: str, rows: int, concurrency: int, duration: float, warmup: float) -> LoadResult:
    async with grpc.aio.insecure_channel(target, options=[("grpc.max_receive_message_length", 64 << 20)]) as channel:
        stub, request = _stub(channel), pb.SampleRequest(num_samples=rows, seed=1, model_name=model)
        return await run_load(lambda: stub.Sample(request), concurrency, duration, warmup)


def prior_cost(
    spec: ModelSpec, duration: float, warmup: float, extra: list[str], logs: Path, rounds: int = 3
) -> dict[str, Any]:
    """Sample(256) at concurrency 4 from a flow-prior model and from its standard-prior twin, both
    served by one server and loaded in turns, slice by slice: rows/s and their ratio."""
    repo = linked_repository(spec, ["flow"])
    standard_prior_twin(spec, repo, "standard")
    server = ServiceProcess(repo, logs / "prior-cost.log", *extra)
    slices: dict[str, list[LoadResult]] = {"flow": [], "standard": []}
    try:
        for _ in range(rounds):
            for model, parts in slices.items():
                parts.append(asyncio.run(_sample_rows(server.target, model, 256, 4, duration / rounds, warmup / rounds)))
    finally:
        server.stop()
    flow, standard = (LoadResult.combine(parts) for parts in slices.values())
    rows = {name: round(256 * r.ok / r.seconds, 1) for name, r in (("flow", flow), ("standard", standard))}
    return {
        "flow": _figures(flow) | {"rows_per_s": rows["flow"]},
        "standard": _figures(standard) | {"rows_per_s": rows["standard"]},
        "flow_over_standard": round(rows["flow"] / rows["standard"], 3) if rows["standard"] else None,
    }  # fmt: skip
