"""`python -m bench [--quick] --model-repo DIR --json OUT`: the service's throughput and latency,
each figure beside the limit it chases, all measured in the same run on the same machine.

Limits: (a) ONNX Runtime in-process at the same batch size, the best over 1 .. the available cores
intra-op threads (compute; the figure at the server's own thread count is kept beside it), (b) a bare
grpc.aio server answering Sample with a prebuilt response of the same size (transport), loaded in
turns with the service, slice by slice, and (c) the service itself with batching off. Then the
mixes of bench/mixes.py: small calls beside a huge Score, one load over four models, memory per
added model, and, for a flow-prior model, Sample(256) against the same graphs under N(0, I).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import tempfile
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import onnxruntime as ort

from bench.limits import graph_rows_per_s
from bench.load import LoadResult, run_load
from bench.mixes import fairness, many_models, memory_by_models, prior_cost
from bench.processes import EchoProcess, ServiceProcess, rss_mb
from service.api.vae.v1 import vae_pb2 as pb
from service.api.vae.v1 import vae_pb2_grpc
from service.repository import ModelSpec, load_spec
from service.runtime import RuntimeOptions, available_cores, intra_op_threads
from service.tensors import from_array


@dataclass(frozen=True)
class Scenario:
    rpc: str
    rows: int
    concurrency: int
    batching: str = "on"
    k: int = 0  # Score's importance samples


SCENARIOS = [
    Scenario("Sample", 1, 1),
    Scenario("Sample", 1, 16),
    Scenario("Sample", 1, 64),
    Scenario("Sample", 1, 64, batching="off"),
    Scenario("Sample", 256, 4),
    Scenario("Encode", 64, 8),
    Scenario("Decode", 64, 8),
    Scenario("Score", 4, 4, k=64),
]


def make_request(spec: ModelSpec, s: Scenario) -> tuple[str, Any]:
    rng = np.random.default_rng(0)
    images = from_array((rng.random((s.rows, *spec.image_shape)) < 0.3).astype(np.float32))
    if s.rpc == "Sample":
        return "Sample", pb.SampleRequest(num_samples=s.rows, seed=1)
    if s.rpc == "Encode":
        return "Encode", pb.EncodeRequest(images=images)
    if s.rpc == "Decode":
        return "Decode", pb.DecodeRequest(latents=from_array(rng.standard_normal((s.rows, spec.latent_dim), dtype=np.float32)))
    return "Score", pb.ScoreRequest(images=images, importance_samples=s.k, seed=1)


async def load(target: str, method: str, request: Any, concurrency: int, duration: float, warmup: float) -> LoadResult:
    async with grpc.aio.insecure_channel(target, options=[("grpc.max_receive_message_length", 64 << 20)]) as channel:
        call = getattr(vae_pb2_grpc.VaeServiceStub(channel), method)
        return await run_load(lambda: call(request), concurrency, duration, warmup)


def side_by_side(
    targets: list[str], method: str, request: Any, concurrency: int, duration: float, warmup: float, rounds: int = 3
) -> list[LoadResult]:
    """Load each target in turn, in `rounds` slices of duration/rounds: the machine's drift (it is
    shared) then falls on all of them alike, and their ratio holds where absolute figures move."""
    slices: list[list[LoadResult]] = [[] for _ in targets]
    for _ in range(rounds):
        for target, parts in zip(targets, slices):
            parts.append(asyncio.run(load(target, method, request, concurrency, duration / rounds, warmup / rounds)))
    return [LoadResult.combine(parts) for parts in slices]


def summarise(s: Scenario, r: LoadResult, limit: dict[str, Any]) -> dict[str, Any]:
    rps = r.ok / r.seconds
    rows_per_s = rps * s.rows
    measured = rows_per_s if limit["unit"] == "rows/s" else rps
    same = limit.get("same_threads_value")
    return {
        "rpc": s.rpc + (f"(k={s.k})" if s.k else ""),
        "rows_per_request": s.rows,
        "concurrency": s.concurrency,
        "batching": s.batching,
        "requests_per_s": round(rps, 1),
        "rows_per_s": round(rows_per_s, 1),
        "p50_ms": round(r.percentile_ms(50), 2),
        "p90_ms": round(r.percentile_ms(90), 2),
        "p99_ms": round(r.percentile_ms(99), 2),
        "errors": r.errors,
        "limit": limit,
        "ratio_to_limit": round(measured / limit["value"], 3) if limit["value"] else None,
        "ratio_to_same_threads_limit": round(measured / same, 3) if same else None,
    }


def compute_limits(spec: ModelSpec, seconds: float, options: RuntimeOptions) -> dict[tuple[str, int, int], float]:
    """Rows/s by (graph, batch size, intra-op threads), at 1 .. the available cores threads and at
    the server's own count."""
    sizes = {("decoder", 1), ("decoder", 64), ("decoder", 256), ("encoder", 64), ("encoder", 4)}
    counts = sorted({*range(1, available_cores() + 1), intra_op_threads(options.intra_op_threads)})
    return {
        (graph, batch, t): graph_rows_per_s(spec, graph, batch, replace(options, intra_op_threads=t), seconds)
        for graph, batch in sorted(sizes) for t in counts
    }  # fmt: skip


def limit_for(
    s: Scenario, compute: dict[tuple[str, int, int], float], echo: LoadResult | None, same_threads: int
) -> dict[str, Any]:
    """The limit a scenario chases: the echo, or the best in-process rows/s over thread counts
    (`threads` says which gave it), with the figure at the server's own count beside it."""
    if echo is not None:
        return {"kind": f"bare grpc.aio echo, same response size, concurrency {s.concurrency}, measured alternately",
                "unit": "requests/s", "value": round(echo.ok / echo.seconds, 1)}  # fmt: skip
    counts = sorted({t for (_, _, t) in compute})
    if s.rpc == "Score":  # one thread count for both graphs, as the server has
        kind = f"onnxruntime in-process, encoder batch {s.rows} + decoder batch {s.rows * s.k}"
        by_threads = {t: 1 / (1 / compute[("encoder", 4, t)] + s.k / compute[("decoder", 256, t)]) for t in counts}
    else:
        graph = "encoder" if s.rpc == "Encode" else "decoder"
        kind = f"onnxruntime in-process {graph} at batch {s.rows}"
        by_threads = {t: compute[(graph, s.rows, t)] for t in counts}
    best = max(by_threads, key=by_threads.__getitem__)
    return {"kind": kind, "unit": "rows/s", "value": round(by_threads[best], 1), "threads": best,
            "same_threads": same_threads, "same_threads_value": round(by_threads[same_threads], 1)}  # fmt: skip


def table(results: list[dict[str, Any]]) -> str:
    """One row per scenario; `thr` is the thread count that gave the best in-process limit, `same`
    the limit at the server's own count and `ratio` the figure's to each."""
    head = (f"{'rpc':<12}{'rows':>5}{'conc':>5}{'batch':>6}{'req/s':>9}{'rows/s':>10}{'p50 ms':>8}{'p90 ms':>8}"
            f"{'p99 ms':>8}{'err':>5}{'limit':>10}{'thr':>4}{'ratio':>7}{'same':>10}{'ratio':>7}  limit is")
    lines = [head, "-" * len(head)]
    for r in results:
        limit, same = r["limit"], " " * 17
        if "threads" in limit:
            same = f"{limit['same_threads_value']:>10.0f}{r['ratio_to_same_threads_limit']:>7.2f}"
        lines.append(
            f"{r['rpc']:<12}{r['rows_per_request']:>5}{r['concurrency']:>5}{r['batching']:>6}{r['requests_per_s']:>9.1f}"
            f"{r['rows_per_s']:>10.0f}{r['p50_ms']:>8.2f}{r['p90_ms']:>8.2f}{r['p99_ms']:>8.2f}{r['errors']:>5}"
            f"{limit['value']:>10.0f}{limit.get('threads', ''):>4}{r['ratio_to_limit']:>7.2f}{same}"
            f"  {limit['kind']} ({limit['unit']})"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__.splitlines()[0])
    parser.add_argument("--model-repo", type=Path, required=True)
    parser.add_argument("--json", type=Path, required=True)
    parser.add_argument("--quick", action="store_true", help="3 s per scenario instead of 10")
    parser.add_argument("--threads", type=int, default=0,
                        help="the server's --intra-op-threads, and the limits' same-threads count")  # fmt: skip
    parser.add_argument("--cpu-arena", choices=("on", "off"), default="on", help="onnxruntime's CPU arena, likewise")
    parser.add_argument("--part", choices=("all", "single", "mixes", "prior"), default="all",
                        help="single: one model's scenarios beside their limits; mixes: several kinds of traffic at once; "
                             "prior: a flow-prior model against its graphs under N(0, I) (all runs it for flow models)")  # fmt: skip
    args = parser.parse_args(argv)
    duration, warmup = (3.0, 1.0) if args.quick else (10.0, 2.0)
    spec = load_spec(args.model_repo)
    if args.part == "prior" and spec.prior != "flow":
        parser.error(f"--part prior needs a flow-prior model; {spec.name} v{spec.version} has prior {spec.prior!r}")
    logs = Path(tempfile.mkdtemp(prefix="bench-"))
    threads = ["--intra-op-threads", str(args.threads), "--cpu-arena", args.cpu_arena]

    print(f"model {spec.name} v{spec.version} {list(spec.image_shape)} latent {spec.latent_dim}; "
          f"{os.cpu_count()} cores; {duration:.0f} s per scenario", flush=True)  # fmt: skip
    report: dict[str, Any] = {
        "model": {"name": spec.name, "version": spec.version, "image_shape": list(spec.image_shape), "latent_dim": spec.latent_dim},
        "machine": {"cores": os.cpu_count(), "python": platform.python_version(), "onnxruntime": ort.__version__},
        "quick": args.quick,
        "seconds_per_scenario": duration,
    }
    if args.part in ("all", "single"):
        report |= single_model(args, spec, duration, warmup, threads, logs)
    if args.part in ("all", "mixes"):
        report |= mixes(spec, duration, warmup, threads, logs)
    if args.part in ("all", "prior") and spec.prior == "flow":
        report |= prior(spec, duration, warmup, threads, logs)
    report["created"] = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {args.json}")


def mixes(spec: ModelSpec, duration: float, warmup: float, threads: list[str], logs: Path) -> dict[str, Any]:
    out = {"fairness": fairness(spec, duration, warmup, threads, logs)}
    f = out["fairness"]
    print(f"  Sample(1) c=16 p99 {f['alone']['sample']['p99_ms']} ms alone, {f['beside_score']['sample']['p99_ms']} ms "
          f"beside Score(16, k=1000): {f['p99_ratio']}x; Score {f['beside_score']['score']['requests_per_s']} req/s", flush=True)  # fmt: skip
    out["many_models"] = many_models(spec, duration, warmup, threads, logs)
    m = out["many_models"]
    print(f"  Sample(1) c=64: {m['one_model']['requests_per_s']} req/s on one model, {m['four_models']['requests_per_s']} "
          f"over four: {m['ratio']} of it", flush=True)  # fmt: skip
    out["memory_by_models"] = memory_by_models(spec, (1, 4, 8), threads, logs)
    print(f"  resident memory by models served: {out['memory_by_models']}", flush=True)
    return out


def prior(spec: ModelSpec, duration: float, warmup: float, threads: list[str], logs: Path) -> dict[str, Any]:
    p = prior_cost(spec, duration, warmup, threads, logs)
    print(f"  Sample(256) c=4: {p['flow']['rows_per_s']} rows/s with the flow prior, {p['standard']['rows_per_s']} "
          f"under N(0, I): {p['flow_over_standard']} of it", flush=True)  # fmt: skip
    return {"prior_cost": p}


def single_model(
    args: argparse.Namespace, spec: ModelSpec, duration: float, warmup: float, threads: list[str], logs: Path
) -> dict[str, Any]:
    options = RuntimeOptions("cpu", args.threads, cpu_arena=args.cpu_arena == "on")
    compute = compute_limits(spec, duration / 2, options)
    same_threads = intra_op_threads(args.threads)

    echo = EchoProcess(spec.image_shape, logs / "echo.log")
    servers: dict[str, ServiceProcess] = {}
    results, memory = [], {}
    try:
        for batching in ("on", "off"):  # started one after the other, so each start is timed alone
            servers[batching] = ServiceProcess(args.model_repo, logs / f"service-{batching}.log", *threads, "--batching", batching)
        memory["after_warmup_mb"] = round(rss_mb(servers["on"].proc.pid), 1)
        for s in SCENARIOS:
            method, request = make_request(spec, s)
            target = servers[s.batching].target
            if s.rpc == "Sample" and s.rows == 1:  # transport-bound: the echo is loaded alternately with it
                r, echo_r = side_by_side([target, echo.target], method, request, s.concurrency, duration, warmup)
            else:
                r, echo_r = asyncio.run(load(target, method, request, s.concurrency, duration, warmup)), None
            results.append(summarise(s, r, limit_for(s, compute, echo_r, same_threads)))
            print(f"  {s.rpc}({s.rows}) c={s.concurrency} batching {s.batching}: {results[-1]['requests_per_s']} req/s, "
                  f"{results[-1]['ratio_to_limit']} of its limit", flush=True)  # fmt: skip
        memory["after_load_mb"] = round(rss_mb(servers["on"].proc.pid), 1)
    finally:
        for process in (echo, *servers.values()):
            process.stop()

    on = next(r for r in results if r["rows_per_request"] == 1 and r["concurrency"] == 64 and r["batching"] == "on")
    off = next(r for r in results if r["batching"] == "off")
    report = {
        "cold_start_to_serving_s": round(servers["on"].cold_start_s, 3),
        "resident_memory": memory,
        "batching_gain_sample1_c64": round(on["requests_per_s"] / off["requests_per_s"], 2),
        "compute_limits_rows_per_s": {f"{g}@{b}/{t}t": round(v, 1) for (g, b, t), v in compute.items()},
        "scenarios": results,
    }
    print()
    print(table(results))
    print(f"\ncold start to SERVING {report['cold_start_to_serving_s']} s; resident memory {memory} MB; "
          f"batching on/off at Sample(1) c=64: {report['batching_gain_sample1_c64']}x", flush=True)  # fmt: skip
    return report


if __name__ == "__main__":
    main()
