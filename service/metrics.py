"""Prometheus metrics, in base units, on their own HTTP port (docs/serving.md, "Metrics").

One registry per server (not the process-global one), so tests can run several servers in one
process and each scrape shows only its own server.
"""

from __future__ import annotations

import threading
from typing import Any
from wsgiref.simple_server import WSGIRequestHandler

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, ProcessCollector, make_wsgi_app
from prometheus_client.exposition import ThreadingWSGIServer

from service.listen import Endpoint

LATENCY_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
BYTE_BUCKETS = tuple(float(1 << shift) for shift in range(16, 34, 2))  # 64 KiB .. 4 GiB, by fours
ROW_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096)


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        # The process's resident and virtual memory, CPU seconds and open files (process_*), Linux only:
        # what a memory limit is set against.
        ProcessCollector(registry=r)
        self.requests = Counter(
            "vae_requests", "RPCs answered, by method, status code, model and version ('' before one is chosen)",
            ["rpc", "code", "model", "version"], registry=r,
        )  # fmt: skip
        self.latency = Histogram(
            "vae_request_duration_seconds", "Time from receiving an RPC to answering it", ["rpc", "model", "version"],
            buckets=LATENCY_BUCKETS, registry=r,
        )  # fmt: skip
        per_graph = ["model", "version", "graph"]
        self.queue_wait = Histogram(
            "vae_queue_wait_seconds", "Time a request waited in a graph's batch queue", per_graph,
            buckets=LATENCY_BUCKETS, registry=r,
        )  # fmt: skip
        self.compute = Histogram(
            "vae_compute_seconds", "Time one batch spent in ONNX Runtime", per_graph, buckets=LATENCY_BUCKETS, registry=r
        )
        self.batch_rows = Histogram(
            "vae_batch_rows", "Rows in each batch sent to a graph", per_graph, buckets=ROW_BUCKETS, registry=r
        )
        self.queue_rows = Gauge("vae_queue_rows", "Rows waiting in a graph's batch queue", per_graph, registry=r)
        self.rejections = Counter(
            "vae_rejections", "Requests refused before compute, by reason and model ('' before one is chosen)",
            ["reason", "model"], registry=r,
        )  # fmt: skip
        self.reloads = Counter(
            "vae_model_reloads", "Model versions loaded, by result (swapped: replaced an older one, loaded, refused)",
            ["result", "model"], registry=r,
        )  # fmt: skip
        self.model_info = Gauge(
            "vae_model_info", "A version being served (value 1)", ["name", "version", "provider"], registry=r
        )
        self.model_state = Gauge(
            "vae_model_state", "1 for each model version's current state (READY, LOADING, UNLOADING, UNAVAILABLE)",
            ["model", "version", "state"], registry=r,
        )  # fmt: skip
        self.memory_budget = Gauge(
            "vae_memory_budget_bytes", "Bytes that loaded versions and requests may hold (--memory-budget; 0: off)",
            registry=r,
        )  # fmt: skip
        self.memory_held = Gauge(
            "vae_memory_held_bytes", "Bytes of the memory budget held, by loaded versions or by requests running",
            ["holder"], registry=r,
        )  # fmt: skip
        self.memory_waiting = Gauge(
            "vae_memory_waiting_bytes", "Bytes that requests waiting for the memory budget ask for", registry=r
        )
        self.request_cost = Histogram(
            "vae_request_cost_bytes", "The memory one request holds while it runs (its batches' working memory "
            "is its model's), by operation", ["operation"],
            buckets=BYTE_BUCKETS, registry=r,
        )  # fmt: skip
        self._answered: dict[tuple[str, str, str, str], tuple[Any, Any]] = {}
        self._states: dict[tuple[str, str], str] = {}
        self._info_labels: dict[tuple[str, str], tuple[str, str, str]] = {}

    def answered(self, rpc: str, code: str, model: str, version: str, seconds: float) -> None:
        """Count and time one RPC. Runs on every call, so the label children are looked up once."""
        key = (rpc, code, model, version)
        children = self._answered.get(key)
        if children is None:
            children = self._answered[key] = (
                self.requests.labels(rpc=rpc, code=code, model=model, version=version),
                self.latency.labels(rpc=rpc, model=model, version=version),
            )
        children[0].inc()
        children[1].observe(seconds)

    def set_state(self, model: str, version: int, state: str | None, provider: str = "") -> None:
        """A version's state: one series at 1 for it (none once it leaves the repository), and its
        info series while it is READY."""
        key = (model, str(version))
        old = self._states.pop(key, None)
        if old is not None:
            self.model_state.remove(model, key[1], old)
            if old == "READY":
                self.model_info.remove(*self._info_labels.pop(key))
        if state is None:
            return
        self._states[key] = state
        self.model_state.labels(model=model, version=key[1], state=state).set(1)
        if state == "READY":
            self._info_labels[key] = (model, key[1], provider)
            self.model_info.labels(name=model, version=key[1], provider=provider).set(1)

    def forget_graph(self, model: str, version: int, graph: str) -> None:
        """Drop an unloaded version's queue gauge, which would otherwise read a closed queue."""
        try:
            self.queue_rows.remove(model, str(version), graph)
        except KeyError:
            pass

    def serve(self, where: Endpoint) -> MetricsServer:
        """Start the /metrics HTTP endpoint in a daemon thread, as prometheus-client's
        start_http_server does, but bound by `service.listen`'s rule (its own binds a wildcard
        to IPv4 alone, or to IPv6 alone where the host says so)."""
        server = MetricsServer(where, make_wsgi_app(self.registry))
        threading.Thread(target=server.serve_forever, name="metrics", daemon=True).start()
        return server


class _Quiet(WSGIRequestHandler):
    def log_message(self, format: str, *args: Any) -> None:
        """Scrapes are not logged, as prometheus-client's own server does not."""


class MetricsServer(ThreadingWSGIServer):
    """prometheus-client's threaded WSGI server, bound to an `Endpoint`."""

    def __init__(self, where: Endpoint, app: Any) -> None:
        self.where = where
        self.address_family = where.family
        super().__init__(where.address, _Quiet)
        self.set_app(app)

    def server_bind(self) -> None:
        self.where.prepare(self.socket)
        super().server_bind()
