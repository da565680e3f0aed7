"""Prometheus metrics, in base units, on their own HTTP port (DESIGN.md section 7).

One registry per server (not the process-global one), so tests can run several servers in one
process and each scrape shows only its own server.
"""

from __future__ import annotations

from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server

LATENCY_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
ROW_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096)


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter("vae_requests", "RPCs answered, by method and status code", ["rpc", "code"], registry=r)
        self.latency = Histogram(
            "vae_request_duration_seconds", "Time from receiving an RPC to answering it", ["rpc"],
            buckets=LATENCY_BUCKETS, registry=r,
        )  # fmt: skip
        self.queue_wait = Histogram(
            "vae_queue_wait_seconds", "Time a request waited in a graph's batch queue", ["graph"],
            buckets=LATENCY_BUCKETS, registry=r,
        )  # fmt: skip
        self.compute = Histogram(
            "vae_compute_seconds", "Time one batch spent in ONNX Runtime", ["graph"], buckets=LATENCY_BUCKETS, registry=r
        )
        self.batch_rows = Histogram(
            "vae_batch_rows", "Rows in each batch sent to a graph", ["graph"], buckets=ROW_BUCKETS, registry=r
        )
        self.queue_rows = Gauge("vae_queue_rows", "Rows waiting in a graph's batch queue", ["graph"], registry=r)
        self.rejections = Counter("vae_rejections", "Requests refused before compute, by reason", ["reason"], registry=r)
        self.reloads = Counter("vae_model_reloads", "Model updates tried, by result (swapped, refused)", ["result"], registry=r)
        self.model_info = Gauge(
            "vae_model_info", "The model being served (value 1)", ["name", "version", "provider"], registry=r
        )
        self._answered: dict[tuple[str, str], tuple[Any, Any]] = {}

    def answered(self, rpc: str, code: str, seconds: float) -> None:
        """Count and time one RPC. Runs on every call, so the label children are looked up once."""
        children = self._answered.get((rpc, code))
        if children is None:
            children = self._answered[(rpc, code)] = (
                self.requests.labels(rpc=rpc, code=code), self.latency.labels(rpc=rpc)
            )  # fmt: skip
        children[0].inc()
        children[1].observe(seconds)

    def set_model(self, name: str, version: int, provider: str) -> None:
        self.model_info.clear()
        self.model_info.labels(name=name, version=str(version), provider=provider).set(1)

    def serve(self, port: int, addr: str = "0.0.0.0") -> tuple[object, object]:
        """Start the /metrics HTTP endpoint in a daemon thread; returns (server, thread)."""
        return start_http_server(port, addr=addr, registry=self.registry)
