"""The compute limit: the served graphs run in-process by ONNX Runtime, with nothing around them."""

from __future__ import annotations

import time

import numpy as np

from service.repository import ModelSpec
from service.runtime import Graph, RuntimeOptions, choose_providers

import onnxruntime as ort


def graph_rows_per_s(spec: ModelSpec, role: str, batch: int, options: RuntimeOptions, seconds: float) -> float:
    """Rows per second of one graph at one batch size, sessions made exactly as the server makes them."""
    graph = Graph(str(spec.graph(role)), options, choose_providers(options, ort.get_available_providers()))
    rng = np.random.default_rng(0)
    if role == "encoder":
        x = rng.random((batch, *spec.image_shape), dtype=np.float32)
    else:
        x = rng.standard_normal((batch, spec.latent_dim), dtype=np.float32)
    for _ in range(3):
        graph.run(x)
    runs, started = 0, time.perf_counter()
    while (elapsed := time.perf_counter() - started) < seconds:
        graph.run(x)
        runs += 1
    return runs * batch / elapsed
