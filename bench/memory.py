"""Resident memory of the server: idle after warm-up, the peak of one Score(16 images, k), of four such
calls at once, and, with --storm, the issue's storm: Sample(256) from 4 callers, Encode(64) from 8
and an HTTP fuzz for --storm seconds, first without and then with four Score(16, k) callers beside
them, with the rows/s of each, every call's outcome and the peak (VmRSS and VmHWM from /proc, Linux).
The first phase is the baseline of what Score may take from the others: the same run without Score.
Each phase also says where the server's time went: the cores it used, and per graph its batches,
their rows and their time in ONNX Runtime (from its metrics).

    python -m bench.memory --model-repo models [--k 256] [--storm 60] [--cgroup 1G] [--json runs/memory.json]

--cgroup runs the server in a memory cgroup of that size, as a container's limit would (root only),
and reports the processes the kernel killed for memory. The peak is reset before each measurement,
so each is that of its own calls (not of the warm-up).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import platform
import random
import subprocess
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import numpy as np
from prometheus_client.parser import text_string_to_metric_families

from bench.cgroup import MemoryCgroup
from bench.interleave import TICKS, cpu_ticks
from bench.load import LoadResult, run_load
from bench.processes import ServiceProcess, free_port, one_model, rss_mb
from bench.scenarios import Scenario, caller, make_request
from service import commands
from service.client import VaeClient
from service.commands import Parser, UserError, writable_folder
from service.memory import parse_size, peak_from_now
from service.repository import ModelSpec

IMAGES = 16
STEADY = (Scenario("Sample", 256, 4), Scenario("Encode", 64, 8))  # the calls whose rows/s the storm must keep


def build_parser() -> Parser:
    parser = Parser(prog="python -m bench.memory", description=commands.summary(__doc__))
    parser.add_argument("--model-repo", type=Path, required=True)
    parser.add_argument("--k", type=int, default=256, help="importance samples per image (default 256)")
    parser.add_argument("--threads", type=int, default=0, help="the server's --intra-op-threads")
    parser.add_argument("--storm", type=float, default=0, help="seconds of each storm phase (default 0: no storm)")
    parser.add_argument("--cgroup", help="run the server in a memory cgroup of this size (e.g. 1G; root only)")
    parser.add_argument("--json", type=Path, help="write the figures here")
    return parser


async def fuzz(url: str, name: str, until: float, codes: dict[str, int]) -> None:
    """Malformed HTTP calls on the model's routes until `until` (event-loop time)."""
    rng = random.Random(0)
    bodies = [
        b"{",
        b'{"num_samples": -1}',
        b'{"images": {"shape": [99999, 3], "b64": "AA=="}}',
        b'{"latents": "x"}',
        b"[" * 1000,
    ]
    loop = asyncio.get_running_loop()
    async with httpx.AsyncClient(base_url=url, timeout=120) as web:
        while loop.time() < until:
            route = rng.choice(["sample", "encode", "decode", "score", "reconstruct"])
            body = rng.choice(bodies) if rng.random() < 0.8 else os.urandom(rng.randrange(1, 4096))
            r = await web.post(f"/v1/models/{name}/{route}", content=body, headers={"content-type": "application/json"})
            codes[str(r.status_code)] = codes.get(str(r.status_code), 0) + 1


def accounts(server: ServiceProcess) -> dict[str, Any]:
    """The server's CPU seconds so far, and per graph its batches, rows and compute seconds."""
    graphs: dict[str, dict[str, float]] = {}
    text = httpx.get(f"http://127.0.0.1:{server.metrics_port}/metrics", timeout=30).text
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            key = {"vae_batch_rows_count": "batches", "vae_batch_rows_sum": "rows", "vae_compute_seconds_sum": "compute_s"}.get(s.name)
            if key:
                graph = graphs.setdefault(s.labels["graph"], {})
                graph[key] = graph.get(key, 0.0) + s.value
    return {"cpu_s": cpu_ticks((server.proc.pid,))[1] / TICKS, "graphs": graphs}


def spent(before: dict[str, Any], after: dict[str, Any], seconds: float) -> dict[str, Any]:
    """What a phase took of the server: cores used, and per graph batches, rows per batch and the
    share of the phase spent computing."""
    graphs = {}
    for graph, now in after["graphs"].items():
        was = before["graphs"].get(graph, {})
        batches = now.get("batches", 0) - was.get("batches", 0)
        if batches:
            rows = now.get("rows", 0) - was.get("rows", 0)
            compute = now.get("compute_s", 0) - was.get("compute_s", 0)
            graphs[graph] = {"batches": int(batches), "rows_per_batch": round(rows / batches, 1),
                             "compute_share": round(compute / seconds, 3)}  # fmt: skip
    return {"cores": round((after["cpu_s"] - before["cpu_s"]) / seconds, 2), "graphs": graphs}


async def storm(
    spec: ModelSpec, server: ServiceProcess, http_url: str, k: int, seconds: float, score: bool
) -> dict[str, Any]:
    """The steady calls and the fuzz for `seconds` (and with `score`, Score(16, k) from 4 callers
    beside them): rows/s and outcomes of each, and the server's peak over the phase."""
    scenarios = [*STEADY, *([Scenario("Score", IMAGES, 4, k=k)] if score else [])]
    peak_from_now(server.proc.pid)
    before, started = accounts(server), time.perf_counter()
    http_codes: dict[str, int] = {}
    async with contextlib.AsyncExitStack() as stack:
        calls = [await stack.enter_async_context(caller(server.target, *make_request(spec, s))) for s in scenarios]
        loop = asyncio.get_running_loop()
        fuzzing = [fuzz(http_url, spec.name, loop.time() + seconds + 2, http_codes) for _ in range(2)]
        results: list[LoadResult] = (await asyncio.gather(
            *(run_load(call, s.concurrency, seconds, 2.0) for call, s in zip(calls, scenarios)), *fuzzing
        ))[: len(scenarios)]  # fmt: skip
    phase = {
        s.label: {"rows_per_s": r.in_window * s.rows / seconds, "codes": dict(r.codes)}
        for s, r in zip(scenarios, results)
    }
    used = spent(before, accounts(server), time.perf_counter() - started)
    return {"calls": phase, "http_codes": http_codes, "peak_mb": rss_mb(server.proc.pid, "VmHWM"), "server": used}


def main(argv: list[str] | None = None) -> None:
    parser = build_parser()
    args = parser.parse_args(argv)
    spec = one_model(parser, args.model_repo)
    if args.json:
        writable_folder(args.json.parent, "--json")
    group = None
    if args.cgroup:
        try:
            group = MemoryCgroup(parse_size(args.cgroup), prefix="vae-bench")
        except (OSError, ValueError) as err:
            raise UserError(
                f"--cgroup {args.cgroup}: cannot make a memory cgroup of that size ({err}); it needs root"
            ) from None
    log = Path(tempfile.mkdtemp(prefix="bench-memory-")) / "server.log"
    http_port = free_port()
    server = ServiceProcess(args.model_repo, log, "--intra-op-threads", str(args.threads), own=("--http-port", str(http_port)),
                            preexec=group.enter if group else None)  # fmt: skip
    pid = server.proc.pid
    images = np.random.default_rng(0).uniform(0, 1, (IMAGES, *spec.image_shape)).astype(np.float32)
    report: dict[str, Any] = {}
    try:
        with VaeClient(server.target, timeout=600) as client:
            client.sample(4, seed=0)  # every path once, as a served model would have been called
            report["idle_mb"] = rss_mb(pid)
            for name, callers in (("one_score", 1), ("four_scores", 4)):
                peak_from_now(pid)
                started = time.perf_counter()
                with ThreadPoolExecutor(callers) as pool:
                    list(pool.map(lambda s: client.score(images, k=args.k, seed=s), range(callers)))
                report[name] = {"peak_mb": rss_mb(pid, "VmHWM"), "seconds": time.perf_counter() - started}
        if args.storm:
            http_url = f"http://127.0.0.1:{http_port}"
            report["without_score"] = asyncio.run(storm(spec, server, http_url, args.k, args.storm, score=False))
            report["storm"] = asyncio.run(storm(spec, server, http_url, args.k, args.storm, score=True))
            report["alive_after"] = server.proc.poll() is None
            with VaeClient(server.target, timeout=60) as client:
                report["answers_after"] = len(client.sample(4, seed=9)) == 4
    finally:
        if group is not None:
            report["oom_kills"] = group.oom_kills()
        server.stop()
        if group is not None:
            group.remove()
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
    report = {
        "model": {"name": spec.name, "version": spec.version, "image_shape": list(spec.image_shape),
                  "likelihood": spec.likelihood, "decoder_channels": spec.decoder_channels},
        "machine": {"cores": os.cpu_count(), "python": platform.python_version()}, "commit": commit,
        "k": args.k, "cgroup": args.cgroup, **report,
    }  # fmt: skip
    one, four = report["one_score"], report["four_scores"]
    print(f"{spec.name} v{spec.version} {list(spec.image_shape)}: idle {report['idle_mb']:.0f} MiB; Score({IMAGES}, k={args.k}) "
          f"peak {one['peak_mb']:.0f} MiB in {one['seconds']:.2f}s; four at once peak {four['peak_mb']:.0f} MiB in "
          f"{four['seconds']:.2f}s")  # fmt: skip
    for phase in ("without_score", "storm"):
        if phase in report:
            rates = ", ".join(
                f"{label} {c['rows_per_s']:.0f} rows/s {c['codes']}" for label, c in report[phase]["calls"].items()
            )
            print(f"{phase}: {rates}; HTTP {report[phase]['http_codes']}; peak {report[phase]['peak_mb']:.0f} MiB")
            print(f"  server: {report[phase]['server']}")
    if "oom_kills" in report:
        print(f"cgroup {args.cgroup}: {report['oom_kills']} processes killed for memory")
    if args.json:
        args.json.write_text(json.dumps(report, indent=2) + "\n")


if __name__ == "__main__":
    commands.run(main, "python -m bench.memory")
