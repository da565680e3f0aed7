"""vae.v1 over gRPC: a thin front end that reads protobuf requests into data-plane calls and writes
their answers back; admission, checks and accounting are the data plane's (`service.dataplane`)."""

from __future__ import annotations

import functools
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any, TypeVar

import grpc

from service import dataplane
from service.api.vae.v1 import vae_pb2 as pb
from service.dataplane import DataPlane, EndPoint
from service.engine import Engine
from service.errors import BadRequest
from service.grpc_calls import abort, deadline_of, refusal, uncapped
from service.registry import LOADING, READY, UNAVAILABLE, UNLOADING
from service.tensors import check_format, fill_images, from_array, to_array

SERVICE = pb.DESCRIPTOR.services_by_name["VaeService"].full_name
ADMIN_METHODS = frozenset(f"/{SERVICE}/{name}" for name in ("LoadModel", "UnloadModel"))  # need an admin token
R = TypeVar("R")
STATES = {
    READY: pb.MODEL_STATE_READY, LOADING: pb.MODEL_STATE_LOADING, UNLOADING: pb.MODEL_STATE_UNLOADING,
    UNAVAILABLE: pb.MODEL_STATE_UNAVAILABLE,
}  # fmt: skip
METHODS = {pb.INTERPOLATION_METHOD_UNSPECIFIED: "linear", pb.INTERPOLATION_METHOD_LINEAR: "linear",
           pb.INTERPOLATION_METHOD_SPHERICAL: "spherical"}  # fmt: skip


def _listing(listing: dataplane.Listing) -> pb.ListModelsResponse:
    models = [pb.ModelStatus(name=s.name, version=s.version, state=STATES[s.state], reason=s.reason) for s in listing.statuses]
    return pb.ListModelsResponse(models=models, default_model=listing.default_model)


def _seed(request: Any) -> int | None:
    return request.seed if request.HasField("seed") else None


def _format(engine: Engine, fmt: int) -> int:
    return check_format(fmt, engine.spec.image_shape[0])


def _with_images(response: R, images: Any, fmt: int) -> R:
    """`response` with `images` filled into its `images` field where it lies (no copy of the bytes)."""
    fill_images(response.images, images, fmt)  # type: ignore[attr-defined]
    return response


def _images(request: Any) -> Any:
    """A request's image tensor, if it sent one."""
    return to_array(request.images, "images", allow_uint8=True) if request.HasField("images") else None


def rpc(handler: Callable[..., Awaitable[Any]]) -> Callable[..., Awaitable[Any]]:
    """A unary inference handler, given the engine the data plane pinned; its response names the
    model and version that answered, and its typed errors become status codes."""
    name = handler.__name__

    @functools.wraps(handler)
    async def wrapped(self: VaeServicer, request: Any, context: grpc.aio.ServicerContext) -> Any:
        bad = refusal(request)
        deadline = deadline_of(context)
        try:
            model, version = ("", 0) if bad else (request.model_name, request.model_version)
            async with self.plane.call(name, model, version, deadline, bad) as engine:
                response = await handler(self, engine, request, deadline)
                if not isinstance(response, pb.ModelInfo):  # which names its model in its own fields
                    response.model_name, response.model_version = engine.spec.name, engine.spec.version
                return response
        except Exception as err:  # noqa: BLE001 - typed errors become their status code, others INTERNAL
            await abort(context, err)

    return wrapped


class VaeServicer:
    def __init__(self, plane: DataPlane) -> None:
        self.plane = plane

    @uncapped()
    async def ListModels(self, request: pb.ListModelsRequest) -> pb.ListModelsResponse:
        return _listing(self.plane.listing())

    @uncapped()
    async def LoadModel(self, request: pb.LoadModelRequest) -> pb.ListModelsResponse:
        return _listing(self.plane.listing(await self.plane.load(request.model_name, request.model_version)))

    @uncapped()
    async def UnloadModel(self, request: pb.UnloadModelRequest) -> pb.ListModelsResponse:
        return _listing(self.plane.listing(await self.plane.unload(request.model_name, request.model_version)))

    @rpc
    async def GetModelInfo(self, engine: Engine, request: pb.GetModelInfoRequest, deadline: float | None) -> pb.ModelInfo:
        info = dataplane.model_info(engine)
        prep, groups = info.pop("preprocessing"), info.pop("latent_groups")
        return pb.ModelInfo(**info, preprocessing=None if prep is None else pb.Preprocessing(**prep),
                            latent_groups=[pb.LatentGroup(**g) for g in groups])  # fmt: skip

    @rpc
    async def Sample(self, engine: Engine, request: pb.SampleRequest, deadline: float | None) -> pb.SampleResponse:
        fmt = _format(engine, request.format)
        t = request.temperature if request.HasField("temperature") else None
        images, seed, classes = await dataplane.sample(
            engine, request.num_samples, _seed(request), t, deadline, per_group=request.temperatures, classes=request.classes
        )  # fmt: skip
        return _with_images(pb.SampleResponse(seed=seed, classes=classes), images, fmt)

    async def SampleStream(self, request: pb.SampleRequest, context: grpc.aio.ServicerContext) -> AsyncIterator[pb.SampleResponse]:
        """Sample in chunks: the concatenated chunks equal Sample's images for the same seed."""
        bad, deadline = refusal(request), deadline_of(context)
        try:
            model, version = ("", 0) if bad else (request.model_name, request.model_version)
            async with self.plane.call("SampleStream", model, version, deadline, bad) as engine:
                fmt = _format(engine, request.format)
                t = request.temperature if request.HasField("temperature") else None
                stream = dataplane.sample_stream(
                    engine, request.num_samples, _seed(request), t, request.chunk_rows, deadline, request.temperatures,
                    request.classes,
                )  # fmt: skip
                async for offset, images in stream.chunks:
                    classes = stream.classes[offset : offset + len(images)]
                    response = _with_images(pb.SampleResponse(seed=stream.seed, offset=offset, classes=classes), images, fmt)
                    response.model_name, response.model_version = engine.spec.name, engine.spec.version
                    yield response
        except Exception as err:  # noqa: BLE001
            await abort(context, err)

    @rpc
    async def Encode(self, engine: Engine, request: pb.EncodeRequest, deadline: float | None) -> pb.EncodeResponse:
        encoded = await dataplane.encode(
            engine, _images(request), request.image_files, request.sample, _seed(request), deadline, request.classes
        )  # fmt: skip
        response = pb.EncodeResponse(classes=encoded.classes)
        from_array(encoded.mu, into=response.mu)
        from_array(encoded.sigma, into=response.sigma)
        if encoded.z is not None:
            response.seed = encoded.seed
            from_array(encoded.z, into=response.z)
        return response

    @rpc
    async def Decode(self, engine: Engine, request: pb.DecodeRequest, deadline: float | None) -> pb.ImagesResponse:
        fmt = _format(engine, request.format)
        images, classes = await dataplane.decode(engine, to_array(request.latents, "latents"), deadline, classes=request.classes)
        return _with_images(pb.ImagesResponse(classes=classes), images, fmt)

    @rpc
    async def Reconstruct(self, engine: Engine, request: pb.ReconstructRequest, deadline: float | None) -> pb.ImagesResponse:
        fmt = _format(engine, request.format)
        images, classes = await dataplane.reconstruct(engine, _images(request), request.image_files, deadline, classes=request.classes)
        return _with_images(pb.ImagesResponse(classes=classes), images, fmt)

    @staticmethod
    def _end_point(request: pb.InterpolateRequest, side: str) -> EndPoint:
        which = request.WhichOneof(side)
        if which is None:
            raise BadRequest(f"{side}: give {side}_image, {side}_latent or {side}_file")
        if which.endswith("file"):
            return EndPoint(which, file=getattr(request, which))
        array = to_array(getattr(request, which), which, allow_uint8=which.endswith("image"))
        return EndPoint(which, latent=array) if which.endswith("latent") else EndPoint(which, image=array)

    @rpc
    async def Interpolate(self, engine: Engine, request: pb.InterpolateRequest, deadline: float | None) -> pb.InterpolateResponse:
        if request.method not in METHODS:
            raise BadRequest(f"method: unknown interpolation method {request.method}")
        fmt = _format(engine, request.format)
        start, end = self._end_point(request, "start"), self._end_point(request, "end")
        path, images, classes = await dataplane.interpolate(
            engine, start, end, request.steps, METHODS[request.method], deadline, request.classes
        )  # fmt: skip
        response = _with_images(pb.InterpolateResponse(classes=classes), images, fmt)
        from_array(path, into=response.latents)
        return response

    @rpc
    async def Score(self, engine: Engine, request: pb.ScoreRequest, deadline: float | None) -> pb.ScoreResponse:
        s = await dataplane.score(
            engine, _images(request), request.image_files, request.importance_samples or 64, _seed(request), deadline, request.classes
        )  # fmt: skip
        scores = [pb.ImageScore(**row) for row in s.rows()]
        return pb.ScoreResponse(scores=scores, importance_samples=s.importance_samples, seed=s.seed)

    @rpc
    async def Classify(self, engine: Engine, request: pb.ClassifyRequest, deadline: float | None) -> pb.ClassifyResponse:
        c = await dataplane.classify(engine, _images(request), request.image_files, request.importance_samples or 64, _seed(request), deadline)
        results = [pb.ImageClasses(**row) for row in c.rows()]
        return pb.ClassifyResponse(results=results, classes=engine.spec.classes, importance_samples=c.importance_samples, seed=c.seed)

    @rpc
    async def Edit(self, engine: Engine, request: pb.EditRequest, deadline: float | None) -> pb.EditResponse:
        fmt = _format(engine, request.format)
        strength = request.strength if request.HasField("strength") else None
        e = await dataplane.edit(
            engine, _images(request), request.image_files, request.source_classes, request.target_class, strength, deadline
        )  # fmt: skip
        response = pb.EditResponse(source_classes=e.sources, target_class=e.target, strength=e.strength)
        return _with_images(response, e.images, fmt)
