"""The transport: grpc.aio handlers that validate, call the engine, and map errors to status codes.

Each call takes the engine serving at its start and keeps it to the end, so a model swapped in
meanwhile never answers half a call. Requests are parsed by a deserializer that cannot fail:
bytes that are no valid message become a request the handler refuses with INVALID_ARGUMENT,
rather than gRPC's own INTERNAL.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import math
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any, TypeVar

import grpc
import numpy as np
from google.protobuf.message import DecodeError

from service.api.vae.v1 import vae_pb2 as pb
from service.batcher import BatchFailed, Closed, DeadlineExpired, QueueFull
from service.engine import Engine, new_seed
from service.likelihood import bits_per_dim
from service.manifest import RepositoryError
from service.metrics import Metrics
from service.models import LOADING, READY, UNAVAILABLE, UNLOADING, LoadFailed, ModelNotFound, Models, ModelUnavailable, Status
from service.tensors import BadRequest, check_format, fill_images, from_array, images_to_array, to_array

log = logging.getLogger(__name__)
SERVICE = pb.DESCRIPTOR.services_by_name["VaeService"].full_name
ADMIN_METHODS = frozenset(f"/{SERVICE}/{name}" for name in ("LoadModel", "UnloadModel"))  # need an admin token
R = TypeVar("R")
# Prior latents lie within a few units of 0 (temperature 100 keeps them within hundreds); far past
# this, a decoder's activations overflow float32 and its images turn to NaN.
MAX_ABS_LATENT = 1e4

class TooManyCalls(RuntimeError):
    """The server already runs --max-concurrent-calls calls."""


ERRORS: dict[type[Exception], grpc.StatusCode] = {
    BadRequest: grpc.StatusCode.INVALID_ARGUMENT,
    QueueFull: grpc.StatusCode.RESOURCE_EXHAUSTED,
    TooManyCalls: grpc.StatusCode.RESOURCE_EXHAUSTED,
    DeadlineExpired: grpc.StatusCode.DEADLINE_EXCEEDED,
    Closed: grpc.StatusCode.UNAVAILABLE,
    BatchFailed: grpc.StatusCode.INTERNAL,
    ModelNotFound: grpc.StatusCode.NOT_FOUND,
    ModelUnavailable: grpc.StatusCode.UNAVAILABLE,
    LoadFailed: grpc.StatusCode.FAILED_PRECONDITION,
    RepositoryError: grpc.StatusCode.FAILED_PRECONDITION,  # model control on a repository that cannot be read
}


class Malformed:
    """What the deserializer hands over when the bytes are not a valid message."""

    def __init__(self, message: str, error: str) -> None:
        self.reason = f"request is not a valid {message}: {error}"


def _parse(message: type) -> Callable[[bytes], Any]:
    def parse(data: bytes) -> Any:
        try:
            return message.FromString(data)
        except (DecodeError, ValueError, RuntimeError) as err:
            return Malformed(message.__name__, str(err) or type(err).__name__)

    return parse


def _status(err: Exception) -> grpc.StatusCode:
    return next((code for kind, code in ERRORS.items() if isinstance(err, kind)), grpc.StatusCode.INTERNAL)


def _cancelled_code(context: grpc.aio.ServicerContext) -> grpc.StatusCode:
    remaining = context.time_remaining()
    return grpc.StatusCode.DEADLINE_EXCEEDED if remaining is not None and remaining <= 0 else grpc.StatusCode.CANCELLED


def deadline_of(context: grpc.aio.ServicerContext) -> float | None:
    remaining = context.time_remaining()
    return None if remaining is None else asyncio.get_running_loop().time() + remaining


def _seed(request: Any) -> int:
    return new_seed(request.seed if request.HasField("seed") else None)


def _count(n: int, field: str, limit: int) -> int:
    if n < 1 or n > limit:
        raise BadRequest(f"{field}: {n}; must be between 1 and {limit}")
    return n


def _images(engine: Engine, t: pb.Tensor, field: str = "images", max_rows: int | None = None) -> np.ndarray:
    return images_to_array(t, field, engine.spec.image_shape, max_rows or engine.limits.max_request_rows)


def _rows(engine: Engine, request: Any) -> int:
    """How many images a request sends (a tensor's rows or its files), checked before any is decoded."""
    if request.image_files:
        if request.HasField("images"):
            raise BadRequest("give images or image_files, not both")
        return _count(len(request.image_files), "image_files", engine.limits.max_request_rows)
    return request.images.shape[0] if request.images.shape else 0


async def _request_images(engine: Engine, request: Any) -> np.ndarray:
    """The request's images: a tensor in `images`, or encoded files in `image_files`."""
    if not request.image_files:
        return _images(engine, request.images)
    _rows(engine, request)  # not both, and no more files than a request may send
    return await engine.images_from_files(list(request.image_files), "image_files")


def check_latents(z: np.ndarray, field: str) -> np.ndarray:
    """`z`, unless a latent lies beyond MAX_ABS_LATENT (BadRequest naming `field`); both protocols' decoders."""
    largest = float(np.abs(z).max())
    if largest > MAX_ABS_LATENT:
        raise BadRequest(f"{field}: a latent of magnitude {largest:.3g}; latents must lie within [-{MAX_ABS_LATENT:g}, {MAX_ABS_LATENT:g}]")
    return z


def _latents(engine: Engine, t: pb.Tensor, field: str, max_rows: int) -> np.ndarray:
    return check_latents(to_array(t, field, (engine.spec.latent_dim,), max_rows), field)


def _format(engine: Engine, fmt: int) -> int:
    return check_format(fmt, engine.spec.image_shape[0])


def _temperature(request: pb.SampleRequest) -> float:
    t = request.temperature if request.HasField("temperature") else 1.0
    if not math.isfinite(t) or t < 0 or t > 100:
        raise BadRequest(f"temperature: {t}; must be a finite number in [0, 100]")
    return float(t)


def _with_images(response: R, images: np.ndarray, fmt: int) -> R:
    """`response` with `images` filled into its `images` field where it lies (no copy of the bytes)."""
    fill_images(response.images, images, fmt)
    return response


class Call:
    """One call's accounting, as `async with Call(...) as engine`: counts and times it, maps its
    error to a status code, and pins the engine (model version) it runs on, resolved from the
    request's model_name and model_version. A class rather than an @asynccontextmanager
    generator, because it runs on every call and a generator costs more."""

    __slots__ = ("servicer", "name", "context", "request", "route", "engine", "started", "refusal")

    def __init__(
        self, servicer: VaeServicer, name: str, request: Any, context: grpc.aio.ServicerContext,
        route: Callable[[Any], tuple[str, int]] = lambda r: (r.model_name, r.model_version),
    ) -> None:  # fmt: skip
        """`route` reads the (model name, version) a request asks for; BadRequest if it cannot."""
        self.servicer, self.name, self.context, self.request, self.route = servicer, name, context, request, route
        self.refusal: Exception | None = None
        self.engine: Engine | None = None
        if servicer.draining:
            self.refusal = Closed("the server is shutting down")
        elif servicer.in_flight >= servicer.max_calls:
            servicer.metrics.rejections.labels(reason="concurrent_calls", model="").inc()
            self.refusal = TooManyCalls(f"{servicer.in_flight} calls already running (--max-concurrent-calls); retry later")
        elif isinstance(request, Malformed):
            self.refusal = BadRequest(request.reason)

    async def __aenter__(self) -> Engine:
        self.started = time.perf_counter()
        self.servicer.in_flight += 1
        if self.refusal is None:
            try:
                self.engine = self.servicer.models.resolve(*self.route(self.request))
                self.engine.active_calls += 1
                return self.engine
            except (ModelNotFound, ModelUnavailable, BadRequest) as err:
                self.refusal = err
        await self.__aexit__(type(self.refusal), self.refusal, None)  # accounts, then aborts: raises
        raise self.refusal  # type: ignore[misc]

    async def __aexit__(self, kind: type[BaseException] | None, err: BaseException | None, tb: Any) -> bool:
        code = grpc.StatusCode.OK
        try:
            if isinstance(err, (asyncio.CancelledError, GeneratorExit)):  # the client went away or its deadline passed
                code = _cancelled_code(self.context)
            elif isinstance(err, Exception):  # every error becomes a status code
                code = _status(err)
                if code == grpc.StatusCode.INTERNAL:
                    log.error("%s failed: %s", self.name, err, exc_info=not isinstance(err, BatchFailed))
                await self.context.abort(code, str(err)[:1000])  # status details travel in a size-limited trailer
            return False
        finally:
            engine = self.engine
            if engine is not None:
                engine.active_calls -= 1
            self.servicer.in_flight -= 1
            # Never a name or version a client made up: those would flood the metrics with series.
            model, version = (engine.spec.name, str(engine.spec.version)) if engine is not None else ("", "")
            self.servicer.metrics.answered(self.name, code.name, model, version, time.perf_counter() - self.started)


def _answered_by(response: R, engine: Engine) -> R:
    if isinstance(response, pb.ModelInfo):  # names its model in its own fields
        return response
    response.model_name = engine.spec.name
    response.model_version = engine.spec.version
    return response


def rpc(handler: Callable[..., Awaitable[Any]]) -> Callable[..., Awaitable[Any]]:
    """A unary handler, given the engine, inside a `Call`; its response names the model and version."""
    name = handler.__name__

    @functools.wraps(handler)
    async def wrapped(self: VaeServicer, request: Any, context: grpc.aio.ServicerContext) -> Any:
        async with Call(self, name, request, context) as engine:
            return _answered_by(await handler(self, engine, request, context), engine)

    return wrapped


def control(handler: Callable[..., Awaitable[Any]]) -> Callable[..., Awaitable[Any]]:
    """A model-control handler: not tied to one engine and not counted against
    --max-concurrent-calls (loading a model must work on a busy server), but counted and timed."""
    name = handler.__name__

    @functools.wraps(handler)
    async def wrapped(self: Any, request: Any, context: grpc.aio.ServicerContext) -> Any:
        """`self` is a servicer with `metrics`, `draining` and `rpc_prefix` (each protocol labels its RPCs)."""
        started, code = time.perf_counter(), grpc.StatusCode.OK
        try:
            if isinstance(request, Malformed):
                raise BadRequest(request.reason)
            if self.draining:
                raise Closed("the server is shutting down")
            return await handler(self, request, context)
        except asyncio.CancelledError:  # the caller went away; the work it started goes on (shielded)
            code = _cancelled_code(context)
            raise
        except Exception as err:  # noqa: BLE001 - every error becomes a status code
            code = _status(err)
            if code == grpc.StatusCode.INTERNAL:
                log.error("%s failed: %s", name, err, exc_info=True)
            await context.abort(code, str(err)[:1000])
        finally:
            self.metrics.answered(self.rpc_prefix + name, code.name, "", "", time.perf_counter() - started)

    return wrapped


STATES = {
    READY: pb.MODEL_STATE_READY, LOADING: pb.MODEL_STATE_LOADING, UNLOADING: pb.MODEL_STATE_UNLOADING,
    UNAVAILABLE: pb.MODEL_STATE_UNAVAILABLE,
}  # fmt: skip


def _model_name(request: pb.LoadModelRequest | pb.UnloadModelRequest) -> str:
    if not request.model_name:
        raise BadRequest("model_name: required (ListModels shows what the repository holds)")
    if request.model_version < 0:
        raise BadRequest(f"model_version: {request.model_version}; must be 0 (the policy's versions) or a version")
    return request.model_name


def _preprocessing(prep: Any) -> pb.Preprocessing | None:
    if prep is None:
        return None
    shown = prep.to_json()
    return pb.Preprocessing(channels=shown["channels"], size=shown["size"], fit=shown["fit"], background=shown["background"])


class VaeServicer:
    rpc_prefix = ""  # the `rpc` label of this protocol's calls in the metrics

    def __init__(self, models: Models, metrics: Metrics, max_calls: int = 256) -> None:
        """`max_calls` caps this service's inference calls in progress; health checks and
        reflection are other services, so a probe still answers while the cap refuses calls."""
        self.models = models
        self.metrics = metrics
        self.max_calls = max_calls
        self.draining = False
        self.in_flight = 0

    def _listing(self, statuses: list[Status]) -> pb.ListModelsResponse:
        return pb.ListModelsResponse(
            models=[pb.ModelStatus(name=s.name, version=s.version, state=STATES[s.state], reason=s.reason) for s in statuses],
            default_model=self.models.default or "",
        )

    @control
    async def ListModels(self, request: pb.ListModelsRequest, context: Any) -> pb.ListModelsResponse:
        return self._listing(self.models.statuses())

    @control
    async def LoadModel(self, request: pb.LoadModelRequest, context: Any) -> pb.ListModelsResponse:
        name = _model_name(request)
        return self._listing(await self.models.load(name, request.model_version))

    @control
    async def UnloadModel(self, request: pb.UnloadModelRequest, context: Any) -> pb.ListModelsResponse:
        name = _model_name(request)
        return self._listing(await self.models.unload(name, request.model_version))

    @rpc
    async def GetModelInfo(self, engine: Engine, request: pb.GetModelInfoRequest, context: Any) -> pb.ModelInfo:
        s, batch = engine.spec, engine.batch
        return pb.ModelInfo(
            name=s.name, version=s.version, latent_dim=s.latent_dim, image_shape=list(s.image_shape),
            likelihood=s.likelihood, execution_provider=engine.runtime.provider,
            max_batch_rows=batch.max_batch_rows, max_batch_delay_ms=batch.max_batch_delay_ms,
            max_request_rows=engine.limits.max_request_rows, max_queue_rows=batch.max_queue_rows, dataset=s.dataset,
            metrics=s.metrics, mixtures=s.mixtures, classes=list(s.classes),
            preprocessing=_preprocessing(s.preprocessing),
        )  # fmt: skip

    @rpc
    async def Sample(self, engine: Engine, request: pb.SampleRequest, context: Any) -> pb.SampleResponse:
        n = _count(request.num_samples, "num_samples", engine.limits.max_request_rows)
        fmt, temperature, seed = _format(engine, request.format), _temperature(request), _seed(request)
        images = await engine.sample(n, seed, temperature, deadline_of(context))
        return _with_images(pb.SampleResponse(seed=seed), images, fmt)

    async def SampleStream(self, request: pb.SampleRequest, context: Any) -> AsyncIterator[pb.SampleResponse]:
        """Sample in chunks: the concatenated chunks equal Sample's images for the same seed."""
        async with Call(self, "SampleStream", request, context) as engine:
            n = _count(request.num_samples, "num_samples", engine.batch.max_queue_rows)
            fmt, temperature, seed = _format(engine, request.format), _temperature(request), _seed(request)
            limit = engine.limits.max_request_rows
            chunk = _count(request.chunk_rows or min(engine.batch.max_batch_rows, limit), "chunk_rows", limit)
            z = engine.latents(n, seed, temperature)
            for offset in range(0, n, chunk):
                images = await engine.generate(z[offset : offset + chunk], deadline_of(context))
                response = pb.SampleResponse(seed=seed, offset=offset)
                yield _answered_by(_with_images(response, images, fmt), engine)

    @rpc
    async def Encode(self, engine: Engine, request: pb.EncodeRequest, context: Any) -> pb.EncodeResponse:
        mu, logvar = await engine.encode(await _request_images(engine, request), deadline_of(context))
        sigma = np.exp(0.5 * logvar)
        response = pb.EncodeResponse()
        from_array(mu, into=response.mu)
        from_array(sigma, into=response.sigma)
        if request.sample:
            response.seed = _seed(request)
            from_array(engine.posterior_sample(mu, sigma, response.seed), into=response.z)
        return response

    @rpc
    async def Decode(self, engine: Engine, request: pb.DecodeRequest, context: Any) -> pb.ImagesResponse:
        z = _latents(engine, request.latents, "latents", engine.limits.max_request_rows)
        fmt = _format(engine, request.format)
        return _with_images(pb.ImagesResponse(), await engine.decode(z, deadline_of(context)), fmt)

    @rpc
    async def Reconstruct(self, engine: Engine, request: pb.ReconstructRequest, context: Any) -> pb.ImagesResponse:
        x, fmt = await _request_images(engine, request), _format(engine, request.format)
        return _with_images(pb.ImagesResponse(), await engine.reconstruct(x, deadline_of(context)), fmt)

    @staticmethod
    async def _end_point(engine: Engine, request: pb.InterpolateRequest, side: str, deadline: float | None) -> np.ndarray:
        which = request.WhichOneof(side)
        if which is None:
            raise BadRequest(f"{side}: give {side}_image, {side}_latent or {side}_file")
        if which.endswith("file"):
            x = await engine.images_from_files([getattr(request, which)], which)
            mu, _ = await engine.encode(x, deadline)
            return mu[0]
        t: pb.Tensor = getattr(request, which)
        single = 1 if which.endswith("latent") else 3  # a lone latent [D] or image [C, H, W] is one row
        if len(t.shape) == single:
            t = pb.Tensor(shape=[1, *t.shape], dtype=t.dtype, data=t.data)
        if which.endswith("latent"):
            return _latents(engine, t, which, 1)[0]
        mu, _ = await engine.encode(_images(engine, t, which, max_rows=1), deadline)
        return mu[0]

    @rpc
    async def Interpolate(self, engine: Engine, request: pb.InterpolateRequest, context: Any) -> pb.InterpolateResponse:
        steps, most = request.steps, engine.limits.max_interpolation_steps
        if not 2 <= steps <= most:
            raise BadRequest(f"steps: {steps}; must be between 2 and {most}")
        if request.method not in pb.InterpolationMethod.values():
            raise BadRequest(f"method: unknown interpolation method {request.method}")
        fmt, deadline = _format(engine, request.format), deadline_of(context)
        start = await self._end_point(engine, request, "start", deadline)
        end = await self._end_point(engine, request, "end", deadline)
        spherical = request.method == pb.INTERPOLATION_METHOD_SPHERICAL
        path, images = await engine.interpolate(start, end, steps, spherical, deadline)
        response = _with_images(pb.InterpolateResponse(), images, fmt)
        from_array(path, into=response.latents)
        return response

    @rpc
    async def Score(self, engine: Engine, request: pb.ScoreRequest, context: Any) -> pb.ScoreResponse:
        k = _count(request.importance_samples or 64, "importance_samples", engine.limits.max_importance_samples)
        rows = _rows(engine, request)
        if rows * k > engine.max_request_cost:  # before any file is decoded
            raise BadRequest(
                f"images x importance_samples = {rows * k} decoder rows; at most {engine.max_request_cost} per "
                "request (--max-request-share of the queue): send fewer images or a smaller k"
            )
        x = await _request_images(engine, request)
        seed = _seed(request)
        s = await engine.score(x, k, seed, deadline_of(context))
        bits = bits_per_dim(-s["log_likelihood"], math.prod(engine.spec.image_shape), engine.spec.likelihood)
        scores = [
            pb.ImageScore(elbo=e, reconstruction=r, kl=kl, log_likelihood=ll, bits_per_dim=b)
            for e, r, kl, ll, b in zip(s["elbo"], s["reconstruction"], s["kl"], s["log_likelihood"], bits)
        ]
        return pb.ScoreResponse(scores=scores, importance_samples=k, seed=seed)


def add_to_server(servicer: Any, server: grpc.aio.Server, module: Any = pb, service: str = "VaeService") -> None:
    """Register every RPC of `service` (in the generated `module`) with the servicer's method of
    the same name, each with a deserializer that cannot fail."""
    descriptor = module.DESCRIPTOR.services_by_name[service]
    handlers = {}
    for method in descriptor.methods:
        request, response = getattr(module, method.input_type.name), getattr(module, method.output_type.name)
        make = grpc.unary_stream_rpc_method_handler if method.server_streaming else grpc.unary_unary_rpc_method_handler
        handlers[method.name] = make(
            getattr(servicer, method.name), request_deserializer=_parse(request), response_serializer=response.SerializeToString
        )
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(descriptor.full_name, handlers),))
