"""`python -m bench [--quick] --model-repo DIR --json OUT`: the service's throughput and latency,
each figure beside the limit it chases, all measured in the same run on the same machine.

Limits: (a) ONNX Runtime in-process at the same batch size (compute), at the thread count of 1 ..
the available cores that measured best up front (the figure at the server's own thread count is
kept beside it), (b) a bare grpc.aio server answering Sample with a prebuilt response of the same
size (transport), and (c) the service itself with batching off; over the HTTP port (bench/http.py),
a bare uvicorn echo replaying the service's own reply and the same server's gRPC path. Every ratio comes from interleaved
slices (bench/interleave.py): the limit and the service measured in turns, one ratio per pair of
slices, the median reported with the pairs' min..max. Then the mixes of bench/mixes.py: small calls
beside a huge Score, one load over four models, memory per added model, and, for a flow-prior
model, Sample(256) against the same graphs under N(0, I).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import tempfile
import time
from pathlib import Path
from typing import Any

import onnxruntime as ort

from bench.http import http_part
from bench.interleave import (
    SLICES, Measure, Rounds, Slicing, figures, interleave, load_measure, mean_value, probe_measure, range_of, ratios,
    slice_count, used,
)  # fmt: skip
from bench.limits import Probe, graph_input, sessions
from bench.mixes import fairness, many_models, memory_by_models, prior_cost
from bench.processes import EchoProcess, ServiceProcess, one_model, rss_mb
from bench.scenarios import Scenario, caller, grpc_slices, make_request
from service import commands
from service.commands import Parser, writable_folder
from service.repository import ModelSpec
from service.runtime import Graph, RuntimeOptions, available_cores, intra_op_threads

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


def chases_echo(s: Scenario) -> bool:
    """Sample(1) chases the transport (the echo); everything else the graphs."""
    return s.rpc == "Sample" and s.rows == 1


def graph_steps(s: Scenario, family: str = "vae") -> tuple[tuple[str, int], ...]:
    """The graph runs, (graph, batch), that one request of a compute-bound scenario needs: a
    hierarchical model's Score draws from its posterior graph alone (image and noise in a row)."""
    if s.rpc == "Score":
        return (("posterior", s.rows * s.k),) if family == "hvae" else (("encoder", s.rows), ("decoder", s.rows * s.k))
    return ((("encoder" if s.rpc == "Encode" else "decoder"), s.rows),)


def compute_limits(
    spec: ModelSpec, graphs: dict[tuple[str, int], Graph], seconds: float
) -> dict[tuple[str, int, int], float]:
    """Rows/s by (graph, batch size, intra-op threads), measured once up front: only to choose each
    scenario's thread count (and for the record); the ratios come from the interleaved slices."""
    sizes = {("decoder", 1), *(step for s in SCENARIOS if not chases_echo(s) for step in graph_steps(s, spec.family))}
    return {
        (role, batch, t): Probe(((graph, graph_input(spec, role, batch)),), batch).rows_per_s(seconds)
        for role, batch in sorted(sizes) for (r, t), graph in sorted(graphs.items()) if r == role
    }  # fmt: skip


def candidates(s: Scenario, compute: dict[tuple[str, int, int], float], same_threads: int, family: str) -> list[int]:
    """Thread counts to measure in every round: the two best up front and the server's own (on 2
    cores, every count). Where two counts are close the up-front order flips between runs; taking
    each round's best of them keeps the limit from flipping with it."""
    counts = sorted({t for (_, _, t) in compute})
    rate = {t: s.rows / sum(batch / compute[(role, batch, t)] for role, batch in graph_steps(s, family)) for t in counts}
    return sorted({*sorted(counts, key=rate.__getitem__)[-2:], same_threads})


def limit_kind(s: Scenario, family: str) -> str:
    if chases_echo(s):
        return f"bare grpc.aio echo, same response size, concurrency {s.concurrency}"
    runs = " + ".join(f"{role} batch {batch}" for role, batch in graph_steps(s, family))
    return f"onnxruntime in-process, {runs}"


def probe(spec: ModelSpec, s: Scenario, graphs: dict[tuple[str, int], Graph], threads: int) -> Probe:
    steps = tuple((graphs[(role, threads)], graph_input(spec, role, batch)) for role, batch in graph_steps(s, spec.family))
    return Probe(steps, s.rows)


def summarise(s: Scenario, rounds: Rounds[str], limit: dict[str, Any]) -> dict[str, Any]:
    """Absolute figures over the rounds used; each ratio the median of its pairs, with their spread."""
    parts = rounds.parts
    ratio = ratios(parts["service"], parts["limit"])
    same = ratios(parts["service"], parts["same"]) if "same" in parts else None
    return {
        "rpc": s.rpc + (f"(k={s.k})" if s.k else ""),
        "rows_per_request": s.rows,
        "concurrency": s.concurrency,
        "batching": s.batching,
        **figures(parts["service"], s.rows, (50, 90, 99)),
        "limit": limit,
        "ratio_to_limit": round(ratio.median, 3),
        "ratio_to_limit_spread": ratio.to_json(),
        "ratio_to_same_threads_limit": round(same.median, 3) if same else None,
        "ratio_to_same_threads_limit_spread": same.to_json() if same else None,
        "rounds": rounds.to_json(),
    }


def table(results: list[dict[str, Any]]) -> str:
    """One row per scenario; `thr` is the thread count whose in-process limit was best, `same` the
    limit at the server's own count; each `ratio` is the median over the interleaved pairs of
    slices and `min-max` their range; `used` the rounds they come from, of those measured."""
    head = (f"{'rpc':<12}{'rows':>5}{'conc':>5}{'batch':>6}{'req/s':>9}{'rows/s':>10}{'p50 ms':>8}{'p99 ms':>8}"
            f"{'err':>5}{'limit':>10}{'thr':>4}{'ratio':>7}{'min-max':>11}{'same':>10}{'ratio':>7}{'min-max':>11}"
            f"{'used':>8}  limit is")
    lines = [head, "-" * len(head)]
    for r in results:
        limit, same = r["limit"], " " * 28
        if "threads" in limit:
            same = (f"{limit['same_threads_value']:>10.0f}{r['ratio_to_same_threads_limit']:>7.2f}"
                    f"{range_of(r['ratio_to_same_threads_limit_spread']):>11}")  # fmt: skip
        lines.append(
            f"{r['rpc']:<12}{r['rows_per_request']:>5}{r['concurrency']:>5}{r['batching']:>6}{r['requests_per_s']:>9.1f}"
            f"{r['rows_per_s']:>10.0f}{r['p50_ms']:>8.2f}{r['p99_ms']:>8.2f}{r['errors']:>5}"
            f"{limit['value']:>10.0f}{limit.get('threads', ''):>4}{r['ratio_to_limit']:>7.2f}"
            f"{range_of(r['ratio_to_limit_spread']):>11}{same}{used(r['rounds']):>8}  {limit['kind']} ({limit['unit']})"
        )
    return "\n".join(lines)


def build_parser() -> Parser:
    """The command's parser: a pure reading of the flags (the docs' commands are checked with it)."""
    parser = Parser(prog="python -m bench", description=commands.summary(__doc__))
    parser.add_argument("--model-repo", type=Path, required=True)
    parser.add_argument("--json", type=Path, required=True)
    parser.add_argument("--quick", action="store_true", help="3 s per scenario and side instead of 10")
    parser.add_argument("--slices", type=slice_count, default=SLICES,
                        help="slices per scenario and side, measured in turns with the limit; one ratio per pair")  # fmt: skip
    parser.add_argument("--threads", type=int, default=0,
                        help="the server's --intra-op-threads, and the limits' same-threads count")  # fmt: skip
    parser.add_argument("--cpu-arena", choices=("on", "off"), default="on", help="onnxruntime's CPU arena, likewise")
    parser.add_argument("--part", choices=("all", "single", "http", "mixes", "prior"), default="all",
                        help="single: one model's scenarios beside their limits; http: Sample over the HTTP port beside a "
                             "bare uvicorn echo and the gRPC path; mixes: several kinds of traffic at once; "
                             "prior: a flow-prior model against its graphs under N(0, I) (all runs it for flow models)")  # fmt: skip
    return parser


def main(argv: list[str] | None = None) -> None:
    parser = build_parser()
    args = parser.parse_args(argv)
    slicing = Slicing.of(args.quick, args.slices)
    duration, warmup = slicing.duration, slicing.first_warmup
    spec = one_model(parser, args.model_repo)
    writable_folder(args.json.parent, "--json")
    if args.part == "prior" and spec.prior != "flow":
        parser.error(f"--part prior needs a flow-prior model; {spec.name} v{spec.version} has prior {spec.prior!r}")
    logs = Path(tempfile.mkdtemp(prefix="bench-"))
    threads = ["--intra-op-threads", str(args.threads), "--cpu-arena", args.cpu_arena]

    print(f"model {spec.name} v{spec.version} {list(spec.image_shape)} latent {spec.latent_dim}; "
          f"{os.cpu_count()} cores; {duration:.0f} s per scenario and side in {args.slices} slices", flush=True)  # fmt: skip
    report: dict[str, Any] = {
        "model": {"name": spec.name, "version": spec.version, "image_shape": list(spec.image_shape), "latent_dim": spec.latent_dim},
        "machine": {"cores": os.cpu_count(), "python": platform.python_version(), "onnxruntime": ort.__version__},
        "quick": args.quick,
        "seconds_per_scenario": duration,
        "slices": args.slices,
        "ratio_spread": "min..max of the per-pair ratios of interleaved slices (the quiet rounds: bench/interleave.py); "
                        "the ratio is their median",
    }
    if args.part in ("all", "single"):
        report |= single_model(args, spec, slicing, threads, logs)
    if args.part in ("all", "http"):
        report |= http_part(args.model_repo, spec, slicing, threads, logs)
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


def single_model(args: argparse.Namespace, spec: ModelSpec, slicing: Slicing, threads: list[str], logs: Path) -> dict[str, Any]:
    options = RuntimeOptions("cpu", args.threads, cpu_arena=args.cpu_arena == "on")
    same_threads = intra_op_threads(args.threads)
    counts = sorted({*range(1, available_cores() + 1), same_threads})
    graphs = sessions(spec, {"encoder", "decoder", *spec.family_graphs}, counts, options)
    compute = compute_limits(spec, graphs, slicing.seconds)

    echo = EchoProcess(spec.image_shape, logs / "echo.log")
    servers: dict[str, ServiceProcess] = {}
    results, memory = [], {}
    try:
        for batching in ("on", "off"):  # started one after the other, so each start is timed alone
            servers[batching] = ServiceProcess(args.model_repo, logs / f"service-{batching}.log", *threads, "--batching", batching)
        memory["after_warmup_mb"] = round(rss_mb(servers["on"].proc.pid), 1)
        pids = (echo.proc.pid, *(server.proc.pid for server in servers.values()))
        for s in SCENARIOS:
            target = servers[s.batching].target
            if chases_echo(s):
                rounds, limit = echo_bound(spec, s, target, echo.target, slicing, pids)
            else:
                rounds, limit = compute_bound(spec, s, target, graphs, compute, same_threads, slicing, pids)
            results.append(summarise(s, rounds, limit))
            r = results[-1]
            print(f"  {s.label}: {r['requests_per_s']} req/s, {r['ratio_to_limit']} "
                  f"({range_of(r['ratio_to_limit_spread'])}) of its limit", flush=True)  # fmt: skip
        memory["after_load_mb"] = round(rss_mb(servers["on"].proc.pid), 1)
    finally:
        for process in (echo, *servers.values()):
            process.stop()

    on = next(r for r in results if r["rows_per_request"] == 1 and r["concurrency"] == 64 and r["batching"] == "on")
    off = next(r for r in results if r["batching"] == "off")
    report = {
        "cold_start_to_serving_s": round(servers["on"].cold_start_s, 3),
        "resident_memory": memory,
        # The two medians' quotient: each is a ratio to the echo measured in turns with it, so the
        # machine's drift between the two scenarios cancels.
        "batching_gain_sample1_c64": round(on["ratio_to_limit"] / off["ratio_to_limit"], 2),
        "compute_limits_rows_per_s": {f"{g}@{b}/{t}t": round(v, 1) for (g, b, t), v in compute.items()},
        "scenarios": results,
    }
    print()
    print(table(results))
    print(f"\nratio: median over the quiet rounds of interleaved slices (up to {slicing.slices}), min-max: their range; "
          f"used: rounds used/measured (a round is disturbed where other processes took over {slicing.quiet_cores} of a core; "
          f"! = too few quiet ones, all used); cold start to SERVING "
          f"{report['cold_start_to_serving_s']} s; resident memory {memory} MB; batching on/off at Sample(1) c=64: "
          f"{report['batching_gain_sample1_c64']}x", flush=True)  # fmt: skip
    return report


def echo_bound(
    spec: ModelSpec, s: Scenario, service: str, echo: str, slicing: Slicing, pids: tuple[int, ...]
) -> tuple[Rounds[str], dict[str, Any]]:
    """The echo and the service loaded in turns with the same calls."""
    rounds = asyncio.run(grpc_slices(spec, s, {"limit": echo, "service": service}, slicing, pids))
    return rounds, {"kind": limit_kind(s, spec.family), "unit": "requests/s", "value": round(mean_value(rounds.parts["limit"]), 1)}


def compute_bound(
    spec: ModelSpec, s: Scenario, service: str, graphs: dict[tuple[str, int], Graph],
    compute: dict[tuple[str, int, int], float], same_threads: int, slicing: Slicing, pids: tuple[int, ...],
) -> tuple[Rounds[str], dict[str, Any]]:  # fmt: skip
    """The graphs in-process at each candidate thread count and the service loaded, in turns. A
    round's limit is its best count's figure; `same` the figure at the server's own count."""
    counts = candidates(s, compute, same_threads, spec.family)
    probes = {t: probe(spec, s, graphs, t) for t in counts}
    measured = asyncio.run(compute_bound_slices(spec, s, service, probes, slicing, pids))
    parts = measured.parts
    best = max(counts, key=lambda t: mean_value(parts[t]))
    out = {
        "limit": [max(r, key=lambda p: p.value) for r in zip(*(parts[t] for t in counts))],
        "same": parts[same_threads], "service": parts["service"],
    }  # fmt: skip
    limit = {
        "kind": limit_kind(s, spec.family), "unit": "rows/s", "value": round(mean_value(out["limit"]), 1),
        "threads": best, "candidate_threads": counts,
        "same_threads": same_threads, "same_threads_value": round(mean_value(out["same"]), 1),
    }  # fmt: skip
    return Rounds(out, measured.measured, measured.disturbed), limit


async def compute_bound_slices(
    spec: ModelSpec, s: Scenario, service: str, probes: dict[int, Probe], slicing: Slicing, pids: tuple[int, ...]
) -> Rounds[int | str]:
    method, request = make_request(spec, s)
    async with caller(service, method, request) as to_service:
        measures: dict[int | str, Measure] = {t: probe_measure(p) for t, p in probes.items()}
        measures["service"] = load_measure(to_service, s.concurrency, s.rows)
        return await interleave(measures, slicing, pids)


if __name__ == "__main__":
    commands.run(main, "python -m bench")
