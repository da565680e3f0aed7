"""The serving process: gRPC server, health, reflection, metrics, and the model's life cycle.

Start: load and warm the model, then SERVING. Model updates: a newer version in the repository
(watched, or on SIGHUP) is loaded beside the running one, warmed and checked, then swapped in;
calls in flight finish on the version they started on, and a broken version is refused with a log
line and a metric while the old one keeps serving. Shutdown (SIGTERM/SIGINT): NOT_SERVING, new
calls get UNAVAILABLE, calls in flight finish within the grace period, exit 0.
"""

from __future__ import annotations

import asyncio
import logging
import signal
import time
from typing import Any

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection
from grpc_reflection.v1alpha import reflection_pb2 as reflection_pb

from service.config import ConfigError, ServerConfig, check_message_size
from service.engine import Engine, Limits, load_engine
from service.handlers import SERVICE, VaeServicer, add_to_server
from service.metrics import Metrics
from service.repository import RepositoryError, latest_version, load_spec, version_state
from service.runtime import ModelLoadError, RuntimeOptions
from service.security import TokenAuth, load_tokens, server_credentials

log = logging.getLogger(__name__)
REFLECTION_V1 = "grpc.reflection.v1.ServerReflection"


def limits_from(config: ServerConfig) -> Limits:
    return Limits(
        max_batch_rows=config.max_batch_rows,
        max_batch_delay_ms=config.max_batch_delay_ms,
        max_queue_rows=config.max_queue_rows,
        max_request_rows=config.max_request_rows,
        max_importance_samples=config.max_importance_samples,
        max_interpolation_steps=config.max_interpolation_steps,
        batching=config.batching == "on",
        adaptive_delay=config.batch_delay == "adaptive",
    )


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
        self.options = RuntimeOptions(
            config.device, config.intra_op_threads, config.inter_op_threads, cpu_arena=config.cpu_arena == "on",
            fp16_decoder=config.decoder_precision == "fp16",
        )  # fmt: skip
        self.limits = limits_from(config)
        self.tokens = load_tokens(config.auth_token_file)
        if config.auth_token_file and not self.tokens:
            raise ConfigError(f"{config.auth_token_file} holds no token: refusing to start without authentication")
        spec = load_spec(config.model_repo, config.model_name, config.model_version)
        check_message_size(config, spec.image_shape, spec.latent_dim)  # at start, refuses the process
        engine = load_engine(spec, self.options, self.limits, self.metrics)
        self.servicer = VaeServicer(engine, self.metrics, config.max_concurrent_calls)
        self.health = health.aio.HealthServicer()
        self.grpc: grpc.aio.Server | None = None
        self.probes: grpc.aio.Server | None = None  # the plaintext health-only port, if asked for
        self.port = 0
        self.health_port = 0
        self.metrics_port = 0
        self._metrics_http: Any = None
        self._retiring: set[asyncio.Task] = set()
        self._reload_lock = asyncio.Lock()
        self._refused: tuple[object, ...] | None = None  # version_state() of the version last refused
        self._watcher: asyncio.Task | None = None
        self._stopping: asyncio.Task | None = None
        self._stopped = asyncio.Event()

    @property
    def engine(self) -> Engine:
        return self.servicer.engine

    async def start(self) -> None:
        c = self.config
        limit = c.max_message_bytes
        tokens = self.tokens
        denied = self.metrics.rejections.labels(reason="unauthenticated").inc
        self.grpc = grpc.aio.server(
            interceptors=[TokenAuth(tokens, denied)] if tokens else [],
            options=[("grpc.max_receive_message_length", limit), ("grpc.max_send_message_length", limit)],
        )
        add_to_server(self.servicer, self.grpc)
        health_pb2_grpc.add_HealthServicer_to_server(self.health, self.grpc)
        enable_reflection(self.grpc, (SERVICE, health.SERVICE_NAME))
        for name in ("", SERVICE):
            await self.health.set(name, health_pb2.HealthCheckResponse.NOT_SERVING)
        address = f"{c.host}:{c.port}"
        if c.tls_cert and c.tls_key:
            self.port = self.grpc.add_secure_port(address, server_credentials(c.tls_cert, c.tls_key, c.tls_client_ca))
        else:
            self.port = self.grpc.add_insecure_port(address)
        log.info(
            "transport: %s; auth: %s",
            "mutual TLS" if c.tls_client_ca else "TLS" if c.tls_cert else "plaintext",
            f"bearer tokens ({len(tokens)})" if tokens else "off",
        )  # fmt: skip
        if tokens and not c.tls_cert:
            log.warning(
                "bearer tokens on a plaintext port travel in clear: anyone on the network path can read and "
                "replay them; give --tls-cert and --tls-key"
            )
        if c.health_port is not None:
            self.probes = grpc.aio.server()
            health_pb2_grpc.add_HealthServicer_to_server(self.health, self.probes)
            self.health_port = self.probes.add_insecure_port(f"{c.host}:{c.health_port}")
            await self.probes.start()
            log.info("health alone, in plaintext, on port %d", self.health_port)
        self._metrics_http, _ = self.metrics.serve(c.metrics_port, c.metrics_addr)
        self.metrics_port = self._metrics_http.server_port
        self._announce(self.engine)
        self.engine.start()
        await self.grpc.start()
        for name in ("", SERVICE):
            await self.health.set(name, health_pb2.HealthCheckResponse.SERVING)
        if c.watch_seconds > 0 and c.model_version is None:
            self._watcher = asyncio.ensure_future(self._watch(c.watch_seconds))
        log.info(
            "serving %s v%d on port %d (metrics on %d, %s)",
            self.engine.spec.name, self.engine.spec.version, self.port, self.metrics_port, self.engine.runtime.provider,
        )  # fmt: skip

    def _announce(self, engine: Engine) -> None:
        self.metrics.set_model(engine.spec.name, engine.spec.version, engine.runtime.provider)

    async def reload(self) -> bool:
        """Load the newest version beside the running one and swap it in; False if refused or unchanged."""
        async with self._reload_lock:
            c, current = self.config, self.engine
            loop = asyncio.get_running_loop()
            started = time.perf_counter()
            name = current.spec.name
            candidate = latest_version(c.model_repo, name) if c.model_version is None else c.model_version
            # Taken before loading: a file that changes while the load runs is seen as a change.
            seen = None
            if candidate is not None:
                seen = await loop.run_in_executor(None, version_state, c.model_repo, name, candidate)
            try:
                spec = await loop.run_in_executor(None, load_spec, c.model_repo, current.spec.name, c.model_version)
                if (spec.version, spec.folder) == (current.spec.version, current.spec.folder):
                    return False
                check_message_size(c, spec.image_shape, spec.latent_dim)  # refuses this version
                engine = await loop.run_in_executor(None, load_engine, spec, self.options, self.limits, self.metrics)
            except (RepositoryError, ModelLoadError, ConfigError) as err:
                self.metrics.reloads.labels(result="refused").inc()
                self._refused = seen
                log.error("model update refused, still serving v%d: %s", current.spec.version, err)
                return False
            if self._stopping is not None:  # shutting down meanwhile: never start what drain won't close
                await engine.close()
                return False
            engine.start()
            self.servicer.engine = engine  # new calls go to the new version from here on
            self._announce(engine)
            self.metrics.reloads.labels(result="swapped").inc()
            log.info(
                "model updated: %s v%d -> v%d (loaded and warmed in %.2fs)",
                spec.name, current.spec.version, spec.version, time.perf_counter() - started,
            )  # fmt: skip
            task = asyncio.ensure_future(self._retire(current))
            self._retiring.add(task)
            task.add_done_callback(self._retiring.discard)
            return True

    async def reload_logged(self) -> None:
        """reload() for a signal handler: nobody awaits it, so its failures must reach the log."""
        try:
            await self.reload()
        except Exception:  # noqa: BLE001
            log.exception("model update failed; still serving v%d", self.engine.spec.version)

    async def _retire(self, engine: Engine) -> None:
        """Close a replaced engine once the calls that started on it have finished."""
        while engine.active_calls:
            await asyncio.sleep(0.05)
        await engine.close()
        log.info("retired v%d", engine.spec.version)

    def _update_waiting(self) -> bool:
        """A version newer than the one serving, unless it is the one refused and unchanged since."""
        repo, name = self.config.model_repo, self.engine.spec.name
        newest = latest_version(repo, name)
        if newest is None or newest == self.engine.spec.version:
            return False
        return self._refused is None or self._refused[0] != newest or version_state(repo, name, newest) != self._refused

    async def _watch(self, every: float) -> None:
        while True:
            await asyncio.sleep(every)
            if await asyncio.get_running_loop().run_in_executor(None, self._update_waiting):
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
        log.info("shutting down: draining %d calls in flight (grace %.1fs)", self.servicer.in_flight, grace)
        if self._watcher:
            self._watcher.cancel()
        await self.health.enter_graceful_shutdown()
        self.servicer.draining = True
        loop = asyncio.get_running_loop()
        end = loop.time() + grace
        while self.servicer.in_flight and loop.time() < end:
            await asyncio.sleep(0.02)
        if self.servicer.in_flight:
            log.warning("%d calls still running after the grace period: cancelling them", self.servicer.in_flight)
        if self.grpc:
            await self.grpc.stop(max(0.0, min(1.0, end - loop.time())))
        if self.probes:
            await self.probes.stop(0)
        await asyncio.gather(*self._retiring, return_exceptions=True)
        await self.engine.close()
        if self._metrics_http:
            self._metrics_http.shutdown()
            self._metrics_http.server_close()
        self._stopped.set()
        log.info("stopped")

    async def wait(self) -> None:
        await self._stopped.wait()


async def serve(config: ServerConfig) -> None:
    server = Server(config)
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, lambda: asyncio.ensure_future(server.stop()))
    loop.add_signal_handler(signal.SIGHUP, lambda: asyncio.ensure_future(server.reload_logged()))
    await server.start()
    await server.wait()
