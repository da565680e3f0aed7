"""The serving process: the gRPC and HTTP ports, health, reflection, metrics, and the models' life cycle.

Start: load and warm every model of the repository (or those --models names), then SERVING.
Changes in the repository (watched, or on SIGHUP) are applied by `service.models`: new versions
swapped in with no failed call, new models loaded, removed ones drained and unloaded, broken
versions refused while the old ones keep serving. Shutdown (SIGTERM/SIGINT): NOT_SERVING, new
calls get UNAVAILABLE (HTTP 503) on both ports, calls in flight finish within the grace period, exit 0.
"""

from __future__ import annotations

import asyncio
import dataclasses
import gc
import logging
import signal
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection
from grpc_reflection.v1alpha import reflection_pb2 as reflection_pb

from service.config import ConfigError, ServerConfig, message_limits
from service.engine import BatchSettings, RequestLimits
from service.api.inference import grpc_service_pb2 as oip
from service.api.vae.v1 import vae_pb2
from service.dataplane import DataPlane
from service.grpc_calls import add_to_server
from service.listen import Endpoint, binding, endpoint, grpc_address
from service.manifest import ModelSpec
from service.memory import MemoryBudget, budget_from, resident
from service.metrics import Metrics
from service.models import Models
from service.registry import READY
from service.oip_grpc import ADMIN_METHODS as OIP_ADMIN_METHODS
from service.oip_grpc import SERVICE as OIP_SERVICE
from service.oip_grpc import InferenceServicer
from service.repository import RepositoryError, VersionPolicy
from service.rest.app import HttpSettings, build_app
from service.rest.server import HttpServer
from service.runtime import RuntimeOptions, available_cores
from service.security import Authorizer, TokenAuth, load_tokens, server_credentials
from service.vae_grpc import ADMIN_METHODS, SERVICE, VaeServicer

log = logging.getLogger(__name__)
REFLECTION_V1 = "grpc.reflection.v1.ServerReflection"


def batch_settings(config: ServerConfig) -> BatchSettings:
    return BatchSettings(
        max_batch_rows=config.max_batch_rows,
        max_batch_delay_ms=config.max_batch_delay_ms,
        max_queue_rows=config.max_queue_rows,
        background_share=config.background_share,
        batching=config.batching == "on",
        adaptive_delay=config.batch_delay == "adaptive",
    )


def request_limits(config: ServerConfig) -> RequestLimits:
    return RequestLimits(
        max_request_rows=config.max_request_rows,
        max_importance_samples=config.max_importance_samples,
        max_interpolation_steps=config.max_interpolation_steps,
    )


def model_limits(config: ServerConfig, spec: ModelSpec) -> RequestLimits:
    """One version's request limits: the flags', with fewer rows per request or interpolation
    steps where its answers would not fit in one message (ModelInfo.max_request_rows says so, and
    the log); ConfigError where it cannot be served at all (`message_limits`)."""
    rows, steps = message_limits(config, spec.image_shape, spec.latent_dim)
    if (rows, steps) != (config.max_request_rows, config.max_interpolation_steps):
        log.warning("%s v%d: at most %d rows per request and %d interpolation steps (its answers for --max-request-rows %d "
                    "and --max-interpolation-steps %d would not fit --max-message-bytes %d)", spec.name, spec.version, rows,
                    steps, config.max_request_rows, config.max_interpolation_steps, config.max_message_bytes)  # fmt: skip
    return dataclasses.replace(request_limits(config), max_request_rows=rows, max_interpolation_steps=steps)


def enable_reflection(server: grpc.aio.Server, service_names: tuple[str, ...]) -> None:
    """Server reflection as grpc.reflection.v1alpha (what grpcio-reflection ships) and as v1, which
    newer clients ask for first. The two protocols' messages are the same field for field, so
    v1alpha's servicer and message classes read and write v1's bytes."""
    names = (*service_names, reflection.SERVICE_NAME, REFLECTION_V1)
    servicer = reflection.aio.ReflectionServicer(names)
    method = grpc.stream_stream_rpc_method_handler(
        servicer.ServerReflectionInfo,
        request_deserializer=reflection_pb.ServerReflectionRequest.FromString,
        response_serializer=reflection_pb.ServerReflectionResponse.SerializeToString,
    )
    server.add_generic_rpc_handlers(
        tuple(grpc.method_handlers_generic_handler(name, {"ServerReflectionInfo": method}) for name in names[-2:])
    )


class Server:
    def __init__(self, config: ServerConfig) -> None:
        self.config = config
        self.metrics = Metrics()
        options = RuntimeOptions(
            config.device, config.intra_op_threads, config.inter_op_threads, cpu_arena=config.cpu_arena == "on",
            decoder_precision=config.decoder_precision, shared_threads=True, split_rows=config.split_rows,
        )  # fmt: skip
        self.tokens = load_tokens(config.auth_token_file)
        if config.auth_token_file and not self.tokens:
            raise ConfigError(f"{config.auth_token_file} holds no token: refusing to start without authentication")
        self.admin_tokens = load_tokens(config.admin_token_file, variable="VAE_ADMIN_TOKENS")
        if config.admin_token_file and not self.admin_tokens:
            raise ConfigError(f"{config.admin_token_file} holds no token: refusing to start with model control open")
        # One pool of inference workers for every graph of every model: batches of several models
        # compute side by side no more than on one model, and the event loop keeps its core.
        workers = config.inference_workers or max(1, available_cores() - 1)
        self.workers = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="infer")
        base = resident()
        total, how = budget_from(config.memory_budget, base)
        if total <= 0:
            raise ConfigError(f"--memory-budget {config.memory_budget} leaves no memory for models ({how}); give a size")
        log.info("memory budget: %s", how)
        self.memory = MemoryBudget(total, self.metrics, ceiling=base + total)
        self.models = Models(
            config.model_repo, options, batch_settings(config), request_limits(config), self.metrics, executor=self.workers,
            policy=VersionPolicy.parse(config.version_policy),
            only={name for name in config.models.split(",") if name} or None,
            default_name=config.default_model,
            check=lambda spec: model_limits(config, spec), memory=self.memory,
        )  # fmt: skip
        self.plane = DataPlane(self.models, self.metrics, config.max_concurrent_calls)
        self.health = health.aio.HealthServicer()
        self.grpc: grpc.aio.Server | None = None
        self.probes: grpc.aio.Server | None = None  # the plaintext health-only port, if asked for
        self.http: HttpServer | None = None
        self.port = 0
        self.http_port = 0
        self.health_port = 0
        self.metrics_port = 0
        self.bound: dict[str, tuple[Endpoint, int]] = {}  # each open port: where it listens, its number
        self._metrics_http: Any = None
        self._watcher: asyncio.Task | None = None
        self._stopping: asyncio.Task | None = None
        self._stopped = asyncio.Event()

    async def load_models(self) -> None:
        """Everything the repository holds, before SERVING. As Triton does by default, a version its
        policy selects that cannot be served stops the start: a deployment learns of it at once,
        rather than from clients. Once serving, a refused update leaves the older versions serving."""
        refused = await self.models.sync()
        if refused:
            raise RepositoryError("; ".join(refused))
        if not any(s.state == READY for s in self.models.statuses()):
            raise RepositoryError(f"{self.config.model_repo} holds no model to serve")
        served = ", ".join(self.models.table)
        missing = sorted((self.models.only or set()) - set(self.models.table))
        if missing:
            raise ConfigError(f"--models names {', '.join(missing)}, which {self.config.model_repo} does not hold (it has {served})")
        default = self.config.default_model
        if default is not None and default not in self.models.table:
            raise ConfigError(f"--default-model {default!r} is not among the models served ({served})")
        default = self.models.settle_default()
        log.info("default model (an empty model_name): %s", default or "none; requests must name one")

    async def start(self) -> None:
        c = self.config
        limit = c.max_message_bytes
        tokens = self.tokens

        def denied(reason: str) -> None:
            self.metrics.rejections.labels(reason=reason, model="").inc()

        auth = Authorizer(tokens, self.admin_tokens, denied) if tokens or self.admin_tokens else None
        app = build_app(self.plane, auth, HttpSettings(c.max_message_bytes, _origins(c.cors_origins))) if c.http_port else None
        # Everything made so far (the modules, the HTTP app) lives as long as the process: frozen out of
        # the garbage collector's reach, its full collections (which a busy event loop runs often) walk
        # a few thousand objects instead of tens of thousands. Models are loaded after, so a retired
        # model's objects stay collectable.
        gc.freeze()
        await self.load_models()
        self.grpc = grpc.aio.server(
            interceptors=[TokenAuth(auth, ADMIN_METHODS | OIP_ADMIN_METHODS)] if auth else [],
            options=[("grpc.max_receive_message_length", limit), ("grpc.max_send_message_length", limit)],
        )
        add_to_server(VaeServicer(self.plane), self.grpc, vae_pb2, "VaeService")
        add_to_server(InferenceServicer(self.plane), self.grpc, oip, "GRPCInferenceService")
        health_pb2_grpc.add_HealthServicer_to_server(self.health, self.grpc)
        enable_reflection(self.grpc, (SERVICE, OIP_SERVICE, health.SERVICE_NAME))
        for name in ("", SERVICE, OIP_SERVICE):
            await self.health.set(name, health_pb2.HealthCheckResponse.NOT_SERVING)
        address, grpc_at = grpc_address(c.host, c.port), endpoint(c.host, c.port)
        with binding("gRPC", grpc_at):
            if c.tls_cert and c.tls_key:
                self.port = self.grpc.add_secure_port(address, server_credentials(c.tls_cert, c.tls_key, c.tls_client_ca))
            else:
                self.port = self.grpc.add_insecure_port(address)
        self.bound["gRPC"] = (grpc_at, self.port)
        log.info(
            "transport: %s; auth: %s",
            "mutual TLS" if c.tls_client_ca else "TLS" if c.tls_cert else "plaintext",
            f"bearer tokens ({len(tokens)}, admin {len(self.admin_tokens)})" if auth else "off",
        )  # fmt: skip
        if tokens and not self.admin_tokens:
            log.info(
                "model control (LoadModel, UnloadModel, RepositoryModelLoad/Unload) is refused: tokens are on and "
                "no --admin-token-file is given"
            )
        if auth and not c.tls_cert:
            log.warning(
                "bearer tokens on a plaintext port travel in clear: anyone on the network path can read and "
                "replay them; give --tls-cert and --tls-key"
            )
        if c.health_port is not None:
            self.probes = grpc.aio.server()
            health_pb2_grpc.add_HealthServicer_to_server(self.health, self.probes)
            health_at = endpoint(c.host, c.health_port)
            with binding("health", health_at):
                self.health_port = self.probes.add_insecure_port(grpc_address(c.host, c.health_port))
            self.bound["health"] = (health_at, self.health_port)
            await self.probes.start()
            log.info("health alone, in plaintext, on port %d", self.health_port)
        metrics_at = endpoint(c.metrics_addr, c.metrics_port, "--metrics-addr")
        with binding("metrics", metrics_at):
            self._metrics_http = self.metrics.serve(metrics_at)
        self.metrics_port = self._metrics_http.server_port
        self.bound["metrics"] = (metrics_at, self.metrics_port)
        if app is not None:
            http_at = endpoint(c.host, c.http_port)
            with binding("HTTP", http_at):
                sock = http_at.bind()
            self.http = HttpServer(app, sock, c.tls_cert, c.tls_key, c.tls_client_ca)
            self.http_port = await self.http.start()
            self.bound["HTTP"] = (http_at, self.http_port)
        await self.grpc.start()
        for name in ("", SERVICE, OIP_SERVICE):
            await self.health.set(name, health_pb2.HealthCheckResponse.SERVING)
        if c.watch_seconds > 0:
            self._watcher = asyncio.ensure_future(self._watch(c.watch_seconds))
        served = ", ".join(f"{s.name} v{s.version}" for s in self.models.statuses() if s.state == READY)
        provider = self.models.engines()[0].runtime.provider
        http = f", HTTP on {self.http_port}" if self.http else ""
        log.info("serving %s on port %d (metrics on %d%s, %s)", served, self.port, self.metrics_port, http, provider)
        log.info("listening: %s", self.listening())

    def listening(self) -> str:
        """Each open port and what it binds: 'gRPC [::]:50051 (IPv4 and IPv6), metrics ...'."""
        return ", ".join(f"{what} {where.describe(port)}" for what, (where, port) in self.bound.items())

    async def reload(self) -> None:
        """Bring what is served in line with the repository (SIGHUP, the watcher)."""
        await self.models.sync()

    async def reload_logged(self) -> None:
        """reload() for a signal handler or the watcher: nobody awaits it, so its failures must reach the log."""
        try:
            await self.reload()
        except Exception:  # noqa: BLE001
            log.exception("model repository update failed; still serving what was loaded")

    async def _watch(self, every: float) -> None:
        while True:
            await asyncio.sleep(every)
            await self.reload_logged()  # the watcher must outlive any one bad update

    async def stop(self) -> None:
        """Drain: NOT_SERVING, refuse new calls, let calls in flight finish within the grace period."""
        if self._stopping is None:
            self._stopping = asyncio.ensure_future(self._drain())
        await asyncio.shield(self._stopping)

    async def _drain(self) -> None:
        """The port stays open while calls in flight finish, so probes see NOT_SERVING and new
        calls get UNAVAILABLE with a reason, rather than a refused connection."""
        grace = self.config.grace_seconds
        log.info("shutting down: draining %d calls in flight (grace %.1fs)", self.plane.in_flight, grace)
        if self._watcher:
            self._watcher.cancel()
        await self.health.enter_graceful_shutdown()
        self.plane.draining = True
        loop = asyncio.get_running_loop()
        end = loop.time() + grace
        while self.plane.in_flight and loop.time() < end:
            await asyncio.sleep(0.02)
        if self.plane.in_flight:
            log.warning("%d calls still running after the grace period: cancelling them", self.plane.in_flight)
        if self.grpc:
            await self.grpc.stop(max(0.0, min(1.0, end - loop.time())))
        if self.http:
            await self.http.stop()
        if self.probes:
            await self.probes.stop(0)
        await self.models.close()
        self.workers.shutdown(wait=False)
        if self._metrics_http:
            self._metrics_http.shutdown()
            self._metrics_http.server_close()
        self._stopped.set()
        log.info("stopped")

    async def wait(self) -> None:
        await self._stopped.wait()


def _origins(listed: str) -> tuple[str, ...]:
    return tuple(o.strip() for o in listed.split(",") if o.strip())


async def serve(config: ServerConfig) -> None:
    server = Server(config)
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, lambda: asyncio.ensure_future(server.stop()))
    loop.add_signal_handler(signal.SIGHUP, lambda: asyncio.ensure_future(server.reload_logged()))
    await server.start()
    await server.wait()
