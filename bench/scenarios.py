"""The calls a benchmark makes: which RPC, how many rows per request, how many callers at once."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import grpc
import numpy as np

from bench.interleave import Rounds, Slicing, interleave, load_measure
from service.api.vae.v1 import vae_pb2 as pb
from service.api.vae.v1 import vae_pb2_grpc
from service.repository import ModelSpec
from service.tensors import from_array


@dataclass(frozen=True)
class Scenario:
    rpc: str
    rows: int
    concurrency: int
    batching: str = "on"
    k: int = 0  # Score's importance samples

    @property
    def label(self) -> str:
        off = "" if self.batching == "on" else " batching off"
        return f"{self.rpc}({self.rows}{f', k={self.k}' if self.k else ''})@{self.concurrency}{off}"


def make_request(spec: ModelSpec, s: Scenario) -> tuple[str, Any]:
    """The scenario's RPC name and its request, the same bytes on every call."""
    rng = np.random.default_rng(0)
    images = from_array((rng.random((s.rows, *spec.image_shape)) < 0.3).astype(np.float32))
    if s.rpc == "Sample":
        return "Sample", pb.SampleRequest(num_samples=s.rows, seed=1)
    if s.rpc == "Encode":
        return "Encode", pb.EncodeRequest(images=images)
    if s.rpc == "Decode":
        return "Decode", pb.DecodeRequest(latents=from_array(rng.standard_normal((s.rows, spec.latent_dim), dtype=np.float32)))
    return "Score", pb.ScoreRequest(images=images, importance_samples=s.k, seed=1)


@contextlib.asynccontextmanager
async def caller(target: str, method: str, request: Any) -> AsyncIterator[Callable[[], Awaitable[Any]]]:
    """One call of `method` with `request` on `target`, over a channel kept open while in the block."""
    async with grpc.aio.insecure_channel(target, options=[("grpc.max_receive_message_length", 64 << 20)]) as channel:
        call = getattr(vae_pb2_grpc.VaeServiceStub(channel), method)
        yield lambda: call(request)


async def grpc_slices(spec: ModelSpec, s: Scenario, targets: dict[str, str], slicing: Slicing, pids: tuple[int, ...]) -> Rounds[str]:
    """The scenario's calls on each of `targets` (name -> address), loaded in turns (`interleave`)."""
    method, request = make_request(spec, s)
    async with contextlib.AsyncExitStack() as stack:
        measures = {
            name: load_measure(await stack.enter_async_context(caller(target, method, request)), s.concurrency)
            for name, target in targets.items()
        }
        return await interleave(measures, slicing, pids)
