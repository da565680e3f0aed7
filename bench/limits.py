"""The compute limit: the served graphs run in-process by ONNX Runtime, with nothing around them."""

from __future__ import annotations

import time
from dataclasses import dataclass, replace

import numpy as np
import onnxruntime as ort

from service.repository import ModelSpec
from service.runtime import Graph, RuntimeOptions, choose_providers


def sessions(spec: ModelSpec, roles: set[str], counts: list[int], options: RuntimeOptions) -> dict[tuple[str, int], Graph]:
    """A session per (graph, intra-op threads), made exactly as the server makes them. Made once
    and reused by every slice: a slice then times runs, not session set-up."""
    providers = choose_providers(options, ort.get_available_providers())
    return {
        (role, t): Graph(str(spec.graph(role)), replace(options, intra_op_threads=t), providers)
        for role in sorted(roles) for t in counts
    }  # fmt: skip


def graph_input(spec: ModelSpec, role: str, batch: int) -> np.ndarray:
    rng = np.random.default_rng(0)
    if role == "encoder":
        return rng.random((batch, *spec.image_shape), dtype=np.float32)
    if role == "posterior":  # an image and its noise in one row
        pixels = rng.random((batch, int(np.prod(spec.image_shape))), dtype=np.float32)
        return np.concatenate([pixels, rng.standard_normal((batch, spec.latent_dim), dtype=np.float32)], axis=1)
    return rng.standard_normal((batch, spec.latent_dim), dtype=np.float32)


@dataclass(frozen=True)
class Probe:
    """What one request of a scenario costs the graphs alone: these runs back to back, `rows` of the
    scenario's rows per round (Score(4, k=64): the encoder at batch 4, then the decoder at 256)."""

    steps: tuple[tuple[Graph, np.ndarray], ...]
    rows: int

    def rows_per_s(self, seconds: float) -> float:
        for graph, x in self.steps:  # not timed: the first runs of a shape set up its buffers
            graph.run(x)
        rounds, started = 0, time.perf_counter()
        while (elapsed := time.perf_counter() - started) < seconds:
            for graph, x in self.steps:
                graph.run(x)
            rounds += 1
        return rounds * self.rows / elapsed
