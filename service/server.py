"""The transport: grpc.aio handlers that validate, call the engine, and map errors to status codes.

Health and reflection share the port. SIGTERM/SIGINT: health goes NOT_SERVING, new calls get
UNAVAILABLE, calls in flight finish within the grace period, and the process exits 0.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import signal
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import grpc
import numpy as np
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from service.api.vae.v1 import vae_pb2 as pb
from service.api.vae.v1 import vae_pb2_grpc
from service.batcher import BatchFailed, Closed, DeadlineExpired, QueueFull
from service.config import ServerConfig
from service.engine import Engine, Limits, new_seed
from service.metrics import Metrics
from service.repository import load_spec
from service.runtime import RuntimeOptions, load_runtime
from service.security import TokenAuth, load_tokens, server_credentials
from service.tensors import BadRequest, check_format, from_array, images_message, images_to_array, to_array

log = logging.getLogger(__name__)
SERVICE = pb.DESCRIPTOR.services_by_name["VaeService"].full_name

ERRORS: dict[type[Exception], grpc.StatusCode] = {
    BadRequest: grpc.StatusCode.INVALID_ARGUMENT,
    QueueFull: grpc.StatusCode.RESOURCE_EXHAUSTED,
    DeadlineExpired: grpc.StatusCode.DEADLINE_EXCEEDED,
    Closed: grpc.StatusCode.UNAVAILABLE,
    BatchFailed: grpc.StatusCode.INTERNAL,
}


def _status(err: Exception) -> grpc.StatusCode:
    return next((code for kind, code in ERRORS.items() if isinstance(err, kind)), grpc.StatusCode.INTERNAL)


def _deadline(context: grpc.aio.ServicerContext) -> float | None:
    remaining = context.time_remaining()
    return None if remaining is None else asyncio.get_running_loop().time() + remaining


def _cancelled_code(context: grpc.aio.ServicerContext) -> grpc.StatusCode:
    remaining = context.time_remaining()
    return grpc.StatusCode.DEADLINE_EXCEEDED if remaining is not None and remaining <= 0 else grpc.StatusCode.CANCELLED


def rpc(handler: Callable[..., Awaitable[Any]]) -> Callable[..., Awaitable[Any]]:
    """Count, time and map the errors of a unary handler."""
    name = handler.__name__

    @functools.wraps(handler)
    async def wrapped(self: VaeServicer, request: Any, context: grpc.aio.ServicerContext) -> Any:
        started = time.perf_counter()
        code = grpc.StatusCode.OK
        self.in_flight += 1
        try:
            if self.draining:
                raise Closed("the server is shutting down")
            return await handler(self, request, context)
        except asyncio.CancelledError:  # the client went away or its deadline passed
            code = _cancelled_code(context)
            raise
        except Exception as err:  # noqa: BLE001 - every error becomes a status code
            code = _status(err)
            if code == grpc.StatusCode.INTERNAL:
                log.exception("%s failed", name)
            await context.abort(code, str(err))
        finally:
            self.in_flight -= 1
            self.metrics.requests.labels(rpc=name, code=code.name).inc()
            self.metrics.latency.labels(rpc=name).observe(time.perf_counter() - started)

    return wrapped


class VaeServicer(vae_pb2_grpc.VaeServiceServicer):
    def __init__(self, engine: Engine, metrics: Metrics) -> None:
        self.engine = engine
        self.spec = engine.spec
        self.limits = engine.limits
        self.metrics = metrics
        self.draining = False
        self.in_flight = 0

    # -- request checks -------------------------------------------------------------------------
    def _count(self, n: int, field: str, limit: int) -> int:
        if n < 1 or n > limit:
            raise BadRequest(f"{field}: {n}; must be between 1 and {limit}")
        return n

    def _images(self, t: pb.Tensor, field: str = "images") -> np.ndarray:
        return images_to_array(t, field, self.spec.image_shape, self.limits.max_request_rows)

    def _latents(self, t: pb.Tensor, field: str, max_rows: int) -> np.ndarray:
        return to_array(t, field, (self.spec.latent_dim,), max_rows)

    def _format(self, fmt: int) -> int:
        return check_format(fmt, self.spec.image_shape[0])

    def _temperature(self, request: pb.SampleRequest) -> float:
        t = request.temperature if request.HasField("temperature") else 1.0
        if not np.isfinite(t) or t < 0 or t > 100:
            raise BadRequest(f"temperature: {t}; must be a finite number in [0, 100]")
        return float(t)

    # -- handlers ---------------------------------------------------------------------------------
    @rpc
    async def GetModelInfo(self, request: pb.GetModelInfoRequest, context: grpc.aio.ServicerContext) -> pb.ModelInfo:
        s, lim = self.spec, self.limits
        return pb.ModelInfo(
            name=s.name, version=s.version, latent_dim=s.latent_dim, image_shape=list(s.image_shape),
            likelihood=s.likelihood, execution_provider=self.engine.runtime.provider,
            max_batch_rows=lim.max_batch_rows, max_batch_delay_ms=lim.max_batch_delay_ms,
            max_request_rows=lim.max_request_rows, max_queue_rows=lim.max_queue_rows, dataset=s.dataset,
            metrics=s.metrics,
        )  # fmt: skip

    @rpc
    async def Sample(self, request: pb.SampleRequest, context: grpc.aio.ServicerContext) -> pb.SampleResponse:
        n = self._count(request.num_samples, "num_samples", self.limits.max_request_rows)
        fmt, temperature = self._format(request.format), self._temperature(request)
        seed = new_seed(request.seed if request.HasField("seed") else None)
        images = await self.engine.sample(n, seed, temperature, _deadline(context))
        return pb.SampleResponse(images=images_message(images, fmt), seed=seed)

    async def SampleStream(
        self, request: pb.SampleRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[pb.SampleResponse]:
        """Sample in chunks: the concatenated chunks equal Sample's images for the same seed."""
        started, code = time.perf_counter(), grpc.StatusCode.OK
        self.in_flight += 1
        try:
            if self.draining:
                raise Closed("the server is shutting down")
            n = self._count(request.num_samples, "num_samples", self.limits.max_queue_rows)
            fmt, temperature = self._format(request.format), self._temperature(request)
            chunk = request.chunk_rows or self.limits.max_batch_rows
            self._count(chunk, "chunk_rows", self.limits.max_request_rows)
            seed = new_seed(request.seed if request.HasField("seed") else None)
            z = self.engine.latents(n, seed, temperature)
            for offset in range(0, n, chunk):
                images = await self.engine.decode(z[offset : offset + chunk], _deadline(context))
                yield pb.SampleResponse(images=images_message(images, fmt), seed=seed, offset=offset)
        except asyncio.CancelledError:
            code = _cancelled_code(context)
            raise
        except Exception as err:  # noqa: BLE001
            code = _status(err)
            if code == grpc.StatusCode.INTERNAL:
                log.exception("SampleStream failed")
            await context.abort(code, str(err))
        finally:
            self.in_flight -= 1
            self.metrics.requests.labels(rpc="SampleStream", code=code.name).inc()
            self.metrics.latency.labels(rpc="SampleStream").observe(time.perf_counter() - started)

    @rpc
    async def Encode(self, request: pb.EncodeRequest, context: grpc.aio.ServicerContext) -> pb.EncodeResponse:
        x = self._images(request.images)
        mu, logvar = await self.engine.encode(x, _deadline(context))
        sigma = np.exp(0.5 * logvar)
        response = pb.EncodeResponse(mu=from_array(mu), sigma=from_array(sigma))
        if request.sample:
            seed = new_seed(request.seed if request.HasField("seed") else None)
            eps = self.engine.noise(seed, mu.shape)
            response.z.CopyFrom(from_array(mu + eps * sigma))
            response.seed = seed
        return response

    @rpc
    async def Decode(self, request: pb.DecodeRequest, context: grpc.aio.ServicerContext) -> pb.ImagesResponse:
        z = self._latents(request.latents, "latents", self.limits.max_request_rows)
        fmt = self._format(request.format)
        return pb.ImagesResponse(images=images_message(await self.engine.decode(z, _deadline(context)), fmt))

    @rpc
    async def Reconstruct(self, request: pb.ReconstructRequest, context: grpc.aio.ServicerContext) -> pb.ImagesResponse:
        x, fmt = self._images(request.images), self._format(request.format)
        return pb.ImagesResponse(images=images_message(await self.engine.reconstruct(x, _deadline(context)), fmt))

    async def _end_point(self, request: pb.InterpolateRequest, side: str, deadline: float | None) -> np.ndarray:
        which = request.WhichOneof(side)
        if which is None:
            raise BadRequest(f"{side}: give {side}_image or {side}_latent")
        t: pb.Tensor = getattr(request, which)
        if which.endswith("latent"):
            if len(t.shape) == 1:
                t = pb.Tensor(shape=[1, *t.shape], dtype=t.dtype, data=t.data)
            return self._latents(t, which, 1)[0]
        if len(t.shape) == 3:
            t = pb.Tensor(shape=[1, *t.shape], dtype=t.dtype, data=t.data)
        x = images_to_array(t, which, self.spec.image_shape, 1)
        mu, _ = await self.engine.encode(x, deadline)
        return mu[0]

    @rpc
    async def Interpolate(self, request: pb.InterpolateRequest, context: grpc.aio.ServicerContext) -> pb.InterpolateResponse:
        steps = request.steps
        if steps < 2 or steps > self.limits.max_interpolation_steps:
            raise BadRequest(f"steps: {steps}; must be between 2 and {self.limits.max_interpolation_steps}")
        if request.method not in pb.InterpolationMethod.values():
            raise BadRequest(f"method: unknown interpolation method {request.method}")
        fmt = self._format(request.format)
        deadline = _deadline(context)
        start = await self._end_point(request, "start", deadline)
        end = await self._end_point(request, "end", deadline)
        spherical = request.method == pb.INTERPOLATION_METHOD_SPHERICAL
        path, images = await self.engine.interpolate(start, end, steps, spherical, deadline)
        return pb.InterpolateResponse(images=images_message(images, fmt), latents=from_array(path))

    @rpc
    async def Score(self, request: pb.ScoreRequest, context: grpc.aio.ServicerContext) -> pb.ScoreResponse:
        x = self._images(request.images)
        k = self._count(request.importance_samples or 64, "importance_samples", self.limits.max_importance_samples)
        if len(x) * k > self.limits.max_queue_rows:
            raise BadRequest(
                f"images x importance_samples = {len(x) * k} decoder rows; at most {self.limits.max_queue_rows} "
                "per request: send fewer images or a smaller k"
            )
        seed = new_seed(request.seed if request.HasField("seed") else None)
        s = await self.engine.score(x, k, seed, _deadline(context))
        scores = [
            pb.ImageScore(elbo=e, reconstruction=r, kl=kl, log_likelihood=ll)
            for e, r, kl, ll in zip(s["elbo"], s["reconstruction"], s["kl"], s["log_likelihood"])
        ]
        return pb.ScoreResponse(scores=scores, importance_samples=k, seed=seed)


class Server:
    """The whole serving process: model, engine, gRPC server, health, reflection and metrics."""

    def __init__(self, config: ServerConfig) -> None:
        self.config = config
        self.metrics = Metrics()
        self.spec = load_spec(config.model_repo, config.model_name, config.model_version)
        options = RuntimeOptions(
            config.device, config.intra_op_threads, config.inter_op_threads, cpu_arena=config.cpu_arena == "on"
        )
        self.runtime = load_runtime(self.spec, options)
        self.limits = Limits(
            max_batch_rows=config.max_batch_rows,
            max_batch_delay_ms=config.max_batch_delay_ms,
            max_queue_rows=config.max_queue_rows,
            max_request_rows=config.max_request_rows,
            max_importance_samples=config.max_importance_samples,
            max_interpolation_steps=config.max_interpolation_steps,
            batching=config.batching == "on",
            adaptive_delay=config.batch_delay == "adaptive",
        )
        self.engine = Engine(self.spec, self.runtime, self.metrics, self.limits)
        self.health = health.aio.HealthServicer()
        self.servicer = VaeServicer(self.engine, self.metrics)
        self.grpc: grpc.aio.Server | None = None
        self.port = 0
        self.metrics_port = 0
        self._metrics_http: Any = None
        self._stopping: asyncio.Task | None = None
        self._stopped = asyncio.Event()

    async def start(self) -> None:
        c = self.config
        limit = c.max_message_bytes
        tokens = load_tokens(c.auth_token_file)
        denied = self.metrics.rejections.labels(reason="unauthenticated").inc
        self.grpc = grpc.aio.server(
            interceptors=[TokenAuth(tokens, denied)] if tokens else [],
            options=[("grpc.max_receive_message_length", limit), ("grpc.max_send_message_length", limit)],
        )
        vae_pb2_grpc.add_VaeServiceServicer_to_server(self.servicer, self.grpc)
        health_pb2_grpc.add_HealthServicer_to_server(self.health, self.grpc)
        reflection.enable_server_reflection((SERVICE, health.SERVICE_NAME, reflection.SERVICE_NAME), self.grpc)
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
        self._metrics_http, _ = self.metrics.serve(c.metrics_port, c.metrics_addr)
        self.metrics_port = self._metrics_http.server_port
        self.metrics.set_model(self.spec.name, self.spec.version, self.runtime.provider)
        await self.grpc.start()
        started = time.perf_counter()
        await asyncio.get_running_loop().run_in_executor(None, self.engine.warm_up)
        self.engine.start()
        for name in ("", SERVICE):
            await self.health.set(name, health_pb2.HealthCheckResponse.SERVING)
        log.info(
            "serving %s v%d on port %d (metrics on %d, %s), warm-up %.2fs",
            self.spec.name, self.spec.version, self.port, self.metrics_port, self.runtime.provider,
            time.perf_counter() - started,
        )  # fmt: skip

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
    await server.start()
    await server.wait()
