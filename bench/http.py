"""The HTTP port's scenarios (`python -m bench --part http`): Sample over the Open Inference
Protocol's REST API (binary tensors, as tritonclient.http sends them) and over vae.v1's plain JSON
route (tensors as base64), each against its limit in interleaved slices:

  Sample(1) at 1 and 64 callers   against a bare uvicorn echo replaying the service's own reply
                                  (bench/http_echo.py): the transport's limit
  Sample(256) at 4 callers        against the same server's gRPC path (vae.v1 Sample), in rows/s

and every one beside the same server's gRPC Sample of the same size, measured in the same rounds.

The load generator is aiohttp, one connection per caller, on the same machine as the servers.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import urllib.request
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp

from bench.interleave import Rounds, Slicing, combined, interleave, load_measure, mean_value, range_of, ratios
from bench.load import CallFailed
from bench.processes import Process, ServiceProcess, free_port
from bench.scenarios import caller
from service.api.vae.v1 import vae_pb2 as pb
from service.repository import ModelSpec


@dataclass(frozen=True)
class HttpScenario:
    protocol: str  # "oip" (REST, binary tensors) or "vae" (vae.v1's JSON route)
    rows: int
    concurrency: int

    @property
    def label(self) -> str:
        return f"{'OIP REST' if self.protocol == 'oip' else 'vae.v1 HTTP'} Sample({self.rows})@{self.concurrency}"

    @property
    def chases_echo(self) -> bool:
        """Sample(1) chases the transport (the echo); larger calls the same server's gRPC path."""
        return self.rows == 1


HTTP_SCENARIOS = [HttpScenario(p, rows, c) for p in ("oip", "vae") for rows, c in ((1, 1), (1, 64), (256, 4))]


def http_request(spec: ModelSpec, s: HttpScenario) -> tuple[str, bytes, dict[str, str]]:
    """(path, body, headers) of a seeded Sample of `s.rows` images."""
    if s.protocol == "vae":
        body = json.dumps({"num_samples": s.rows, "seed": 1, "encoding": "base64"}).encode()
        return f"/v1/models/{spec.name}/sample", body, {"content-type": "application/json"}
    scalars = [{"name": name, "datatype": "INT64", "shape": [1], "parameters": {"binary_data_size": 8}} for name in ("num_samples", "seed")]
    head = json.dumps({"inputs": scalars, "parameters": {"binary_data_output": True}}).encode()
    tail = s.rows.to_bytes(8, "little") + (1).to_bytes(8, "little")
    return f"/v2/models/{spec.name}_sample/infer", head + tail, {"inference-header-content-length": str(len(head))}


class HttpEchoProcess(Process):
    def __init__(self, replies: Path, log: Path) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        super().__init__(["-m", "bench.http_echo", "--port", str(self.port), "--replies", str(replies)], log)
        self.wait_for_line("http echo on port", "http echo")


def record_replies(url: str, requests: list[tuple[str, bytes, dict[str, str]]], folder: Path) -> Path:
    """The service's reply to each request, saved for the echo to replay byte for byte."""
    index = {}
    for i, (path, body, headers) in enumerate(requests):
        with urllib.request.urlopen(urllib.request.Request(url + path, body, headers), timeout=60) as r:
            (folder / f"reply-{i}.bin").write_bytes(r.read())
            kept = [[k, v] for k, v in r.headers.items() if k.lower() in ("content-type", "inference-header-content-length")]
        index[path] = {"body": f"reply-{i}.bin", "headers": kept}
    (folder / "replies.json").write_text(json.dumps(index))
    return folder / "replies.json"


@contextlib.asynccontextmanager
async def http_caller(url: str, body: bytes, headers: dict[str, str], concurrency: int) -> AsyncIterator[Callable[[], Awaitable[Any]]]:
    """One POST of `body` to `url`, over at most `concurrency` kept-alive connections."""
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=concurrency)) as session:

        async def call() -> None:
            async with session.post(url, data=body, headers=headers) as r:
                await r.read()
                if r.status != 200:
                    raise CallFailed(f"HTTP_{r.status}")

        yield call


async def slices(
    spec: ModelSpec, s: HttpScenario, service: ServiceProcess, http_url: str, echo_url: str, slicing: Slicing, pids: tuple[int, ...]
) -> Rounds[str]:  # fmt: skip
    path, body, headers = http_request(spec, s)
    async with contextlib.AsyncExitStack() as stack:
        to_service = await stack.enter_async_context(http_caller(http_url + path, body, headers, s.concurrency))
        to_grpc = await stack.enter_async_context(caller(service.target, "Sample", pb.SampleRequest(num_samples=s.rows, seed=1)))
        measures = {"service": load_measure(to_service, s.concurrency, s.rows), "grpc": load_measure(to_grpc, s.concurrency, s.rows)}
        if s.chases_echo:
            to_echo = await stack.enter_async_context(http_caller(echo_url + path, body, headers, s.concurrency))
            measures["echo"] = load_measure(to_echo, s.concurrency)
        return await interleave(measures, slicing, pids)


def http_part(model_repo: Path, spec: ModelSpec, slicing: Slicing, threads: list[str], logs: Path) -> dict[str, Any]:
    port = free_port()
    service = ServiceProcess(model_repo, logs / "service-http.log", *threads, own=("--http-port", str(port)))
    http_url = f"http://127.0.0.1:{port}"
    echo = None
    results = []
    try:
        replies = record_replies(http_url, [http_request(spec, s) for s in HTTP_SCENARIOS if s.chases_echo], logs)
        echo = HttpEchoProcess(replies, logs / "http-echo.log")
        pids = (service.proc.pid, echo.proc.pid)
        for s in HTTP_SCENARIOS:
            rounds = asyncio.run(slices(spec, s, service, http_url, echo.url, slicing, pids))
            results.append(summary(s, rounds))
            r = results[-1]
            print(f"  {s.label}: {r['requests_per_s']} req/s, {r['rows_per_s']} rows/s, {r['ratio']['median']} "
                  f"({r['ratio']['min']}-{r['ratio']['max']}) of {r['limit']['kind']}, {r['ratio_to_grpc']['median']} of gRPC",
                  flush=True)  # fmt: skip
    finally:
        for process in (echo, service):
            if process is not None:
                process.stop()
    print()
    print(table(results))
    return {"http": results}


def summary(s: HttpScenario, rounds: Rounds[str]) -> dict[str, Any]:
    """Sample(1) chases the echo (the transport); Sample(256) the gRPC path. Every scenario also
    gives its ratio to the same server's gRPC Sample, measured in the same rounds."""
    parts = rounds.parts
    calls = combined(parts["service"])
    to_grpc = ratios(parts["service"], parts["grpc"]).to_json()
    limit = (
        {"kind": "a bare uvicorn echo of the same reply", "unit": "requests/s", "value": round(mean_value(parts["echo"]), 1)}
        if s.chases_echo else
        {"kind": "the same server's gRPC Sample", "unit": "rows/s", "value": round(mean_value(parts["grpc"]), 1)}
    )  # fmt: skip
    return {
        "scenario": s.label, "protocol": s.protocol, "rows_per_request": s.rows, "concurrency": s.concurrency,
        "requests_per_s": round(mean_value(parts["service"]) / s.rows, 1), "rows_per_s": round(mean_value(parts["service"]), 1),
        "p50_ms": round(calls.percentile_ms(50), 2), "p99_ms": round(calls.percentile_ms(99), 2), "errors": calls.errors,
        "limit": limit, "ratio": ratios(parts["service"], parts["echo"]).to_json() if s.chases_echo else to_grpc,
        "grpc_rows_per_s": round(mean_value(parts["grpc"]), 1), "ratio_to_grpc": to_grpc,
        "rounds": rounds.to_json(),
    }  # fmt: skip


def table(results: list[dict[str, Any]]) -> str:
    head = (f"{'scenario':<28}{'req/s':>9}{'rows/s':>10}{'p50 ms':>8}{'p99 ms':>8}{'err':>5}{'limit':>10}{'ratio':>7}  {'min-max':<11}"
            f"{'gRPC':>8}{'ratio':>7}  limit is")  # fmt: skip
    lines = [head, "-" * len(head)]
    for r in results:
        spread = range_of(r["ratio"])
        lines.append(
            f"{r['scenario']:<28}{r['requests_per_s']:>9.1f}{r['rows_per_s']:>10.0f}{r['p50_ms']:>8.2f}{r['p99_ms']:>8.2f}"
            f"{r['errors']:>5}{r['limit']['value']:>10.0f}{r['ratio']['median']:>7.2f}  {spread:<11}"
            f"{r['grpc_rows_per_s']:>8.0f}{r['ratio_to_grpc']['median']:>7.2f}  {r['limit']['kind']} ({r['limit']['unit']})"
        )
    return "\n".join(lines)
