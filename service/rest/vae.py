"""vae.v1 as plain HTTP: routes a person can call with curl or a browser, over the same data plane
as vae.v1 gRPC, so a seed gives the same images and the same PNG bytes (`rpc` label `http.<RPC>`).

  GET  /v1/models                                the listing
  GET  /v1/models/NAME                           model info
  GET  /v1/models/NAME/sample.png?n=64&seed=1    one PNG grid of samples
  POST /v1/models/NAME/reconstruct.png           uploaded image file(s) (multipart, field `image`) -> PNG
  POST /v1/models/NAME/{sample,encode,decode,reconstruct,interpolate,score}   JSON in, JSON out
  POST /v1/models/NAME/{load,unload}             model control (admin token)

Every route takes `?version=N` (default: the newest served), and the inference routes
`?timeout=SECONDS`: past it the call is answered 504 wherever it is, and its rows leave the batch
queues (a gRPC deadline does the same). Tensors in JSON are
`{"shape": [...], "dtype": "float32"|"uint8", "data": [...]}` (data flat or nested) or carry
`"b64"` (the raw little-endian bytes in base64) instead of `data`; images come back in the
`format` asked for: float32 (default), uint8, or png (base64 files).
"""

from __future__ import annotations

import base64
import binascii
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Annotated, Any, Literal

import numpy as np
from fastapi import APIRouter, File, Query, UploadFile
from pydantic import BaseModel, Field
from starlette.responses import Response

from service import dataplane
from service.dataplane import DataPlane, EndPoint, deadline_in, within
from service.engine import Engine
from service.errors import BadRequest
from service.imaging import check_png, grid_png, png_bytes, to_uint8
from service.rest.responses import json_response
from service.tensors import from_bytes, from_values

PREFIX = "http."
DTYPES = {"float32": np.dtype("<f4"), "uint8": np.dtype("u1")}
Version = Annotated[int, Query(ge=0, description="the model version (0: the newest served)")]
Timeout = Annotated[
    float | None, Query(gt=0, allow_inf_nan=False, description="seconds the call may take; past them it is answered 504")
]


class Tensor(BaseModel):
    shape: list[int]
    dtype: Literal["float32", "uint8"] = "float32"
    data: list[Any] | None = Field(None, description="the values, flat or nested, row-major")
    b64: str | None = Field(None, description="or: the raw little-endian bytes, base64")


ImageFormat = Literal["float32", "uint8", "png"]
Encoding = Literal["list", "base64"]


class Answer(BaseModel):
    format: ImageFormat = "float32"
    encoding: Encoding = Field("list", description="tensors in the answer as lists of numbers, or base64 raw bytes")



def number_list(value: str | None, field: str) -> list[float]:
    """A comma-separated query value as numbers ([] when absent); BadRequest names a bad one."""
    if not value:
        return []
    try:
        return [float(v) for v in value.split(",")]
    except ValueError:
        raise BadRequest(f"{field}: {value!r}; must be numbers separated by commas") from None

class SampleRequest(Answer):
    num_samples: int = 1
    seed: int | None = None
    temperature: float | None = None
    temperatures: list[float] = Field([], description="one per latent group (ModelInfo's latent_groups), instead of temperature")


class ImagesRequest(Answer):
    images: Tensor | None = None
    image_files: list[str] = Field([], description="encoded image files (PNG, JPEG, ...), base64")


class EncodeRequest(ImagesRequest):
    sample: bool = False
    seed: int | None = None


class DecodeRequest(Answer):
    latents: Tensor


class EndPointIn(BaseModel):
    image: Tensor | None = None
    latent: Tensor | None = None
    file: str | None = Field(None, description="an encoded image file, base64")


class InterpolateRequest(Answer):
    start: EndPointIn
    end: EndPointIn
    steps: int = 8
    method: Literal["linear", "spherical"] = "linear"


class ScoreRequest(ImagesRequest):
    importance_samples: int = 64
    seed: int | None = None


def array(t: Tensor, field: str, allow_uint8: bool = True) -> np.ndarray:
    """The tensor's values (`data`, or `b64` raw bytes) as an array of its shape and dtype; latents
    are float32 only, as over gRPC."""
    if t.dtype == "uint8" and not allow_uint8:
        raise BadRequest(f"{field}: dtype must be float32, got uint8")
    dtype = DTYPES[t.dtype]
    if t.b64 is not None:
        return from_bytes(unbase64(t.b64, field), dtype, t.shape, field)
    if t.data is None:
        raise BadRequest(f"{field}: give 'data' or 'b64'")
    return from_values(t.data, dtype, t.shape, field)


def unbase64(text: str, field: str) -> bytes:
    try:
        return base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError) as err:
        raise BadRequest(f"{field}: not valid base64: {err}") from None


def tensor(a: np.ndarray, encoding: str) -> dict[str, Any]:
    dtype = "uint8" if a.dtype == np.uint8 else "float32"
    a = np.ascontiguousarray(a, DTYPES[dtype])
    if encoding == "base64":
        return {"shape": list(a.shape), "dtype": dtype, "b64": base64.b64encode(a.tobytes()).decode()}
    return {"shape": list(a.shape), "dtype": dtype, "data": a.ravel().tolist()}


def check_answer(engine: Engine, body: Answer) -> None:
    """Before any compute: the answer's format must suit the model."""
    if body.format == "png":
        check_png(engine.spec.image_shape[0])


def images_out(engine: Engine, images: np.ndarray, body: Answer) -> dict[str, Any]:
    if body.format == "png":
        return {"format": "png", "png": [base64.b64encode(png_bytes(im)).decode() for im in images]}
    return {"format": body.format, **tensor(to_uint8(images) if body.format == "uint8" else images, body.encoding)}


def _images_in(body: ImagesRequest) -> tuple[np.ndarray | None, list[bytes]]:
    files = [unbase64(f, f"image_files[{i}]") for i, f in enumerate(body.image_files)]
    return (None if body.images is None else array(body.images, "images")), files


def _answered(engine: Engine, body: dict[str, Any]) -> Response:
    return json_response({"model_name": engine.spec.name, "model_version": engine.spec.version, **body})


def router(plane: DataPlane) -> APIRouter:
    api = APIRouter(prefix="/v1", tags=["vae.v1"])

    @asynccontextmanager
    async def call(
        rpc: str, name: str, version: int, timeout: float | None
    ) -> AsyncIterator[tuple[Engine, float | None]]:
        """An inference call and its deadline, answered 504 when the deadline passes."""
        deadline = deadline_in(timeout)
        async with plane.call(PREFIX + rpc, name, version, deadline) as engine, within(deadline):
            yield engine, deadline

    def listing() -> Response:
        answer = plane.listing()
        models = [{"name": s.name, "version": s.version, "state": s.state, "reason": s.reason} for s in answer.statuses]
        return json_response({"models": models, "default_model": answer.default_model})

    @api.get("/models", name=PREFIX + "ListModels", summary="The models and versions the repository holds, and their states")
    async def list_models() -> Response:
        async with plane.uncapped(PREFIX + "ListModels"):
            return listing()

    @api.post("/models/{name}/load", name=PREFIX + "LoadModel", summary="Load a model, or one version (admin token)")
    async def load(name: str, version: Version = 0) -> Response:
        async with plane.uncapped(PREFIX + "LoadModel"):
            await plane.load(name, version)
            return listing()

    @api.post("/models/{name}/unload", name=PREFIX + "UnloadModel", summary="Unload a model, or one version (admin token)")
    async def unload(name: str, version: Version = 0) -> Response:
        async with plane.uncapped(PREFIX + "UnloadModel"):
            await plane.unload(name, version)
            return listing()

    @api.get("/models/{name}", name=PREFIX + "GetModelInfo", summary="What a client needs to know to call a model")
    async def model_info(name: str, version: Version = 0) -> Response:
        async with plane.call(PREFIX + "GetModelInfo", name, version) as engine:
            return json_response(dataplane.model_info(engine))

    @api.get("/models/{name}/sample.png", name=PREFIX + "Sample", summary="One PNG grid of samples from the prior", response_class=Response,
             responses={200: {"content": {"image/png": {}}}})  # fmt: skip
    async def sample_png(
        name: str, version: Version = 0, n: Annotated[int, Query(description="how many samples")] = 16,
        seed: int | None = None, temperature: float | None = None,
        temperatures: Annotated[str | None, Query(description="one per latent group, comma-separated, instead of temperature")] = None,
        columns: Annotated[int | None, Query(ge=1, le=1024, description="images per row (default: a square)")] = None,
        timeout: Timeout = None,
    ) -> Response:  # fmt: skip
        async with call("Sample", name, version, timeout) as (engine, deadline):
            check_png(engine.spec.image_shape[0])
            per_group = number_list(temperatures, "temperatures")
            images, _ = await dataplane.sample(
                engine, n, seed, temperature, deadline, names=("n", "seed", "temperature", "temperatures"), per_group=per_group
            )  # fmt: skip
            return Response(grid_png(images, columns), media_type="image/png")

    @api.post("/models/{name}/sample", name=PREFIX + "Sample", summary="Samples from the prior")
    async def sample(name: str, body: SampleRequest, version: Version = 0, timeout: Timeout = None) -> Response:
        async with call("Sample", name, version, timeout) as (engine, deadline):
            check_answer(engine, body)
            images, seed = await dataplane.sample(
                engine, body.num_samples, body.seed, body.temperature, deadline, per_group=body.temperatures
            )  # fmt: skip
            return _answered(engine, {"seed": seed, "images": images_out(engine, images, body)})

    @api.post("/models/{name}/encode", name=PREFIX + "Encode", summary="q(z|x): mu and sigma per image, optionally z drawn with a seed")
    async def encode(name: str, body: EncodeRequest, version: Version = 0, timeout: Timeout = None) -> Response:
        async with call("Encode", name, version, timeout) as (engine, deadline):
            e = await dataplane.encode(engine, *_images_in(body), body.sample, body.seed, deadline)
            answer = {"mu": tensor(e.mu, body.encoding), "sigma": tensor(e.sigma, body.encoding)}
            if e.z is not None:
                answer |= {"z": tensor(e.z, body.encoding), "seed": e.seed}
            return _answered(engine, answer)

    @api.post("/models/{name}/decode", name=PREFIX + "Decode", summary="Images of latents")
    async def decode(name: str, body: DecodeRequest, version: Version = 0, timeout: Timeout = None) -> Response:
        async with call("Decode", name, version, timeout) as (engine, deadline):
            check_answer(engine, body)
            images = await dataplane.decode(engine, array(body.latents, "latents", allow_uint8=False), deadline)
            return _answered(engine, {"images": images_out(engine, images, body)})

    @api.post("/models/{name}/reconstruct", name=PREFIX + "Reconstruct", summary="Decoded images of the images' encodings")
    async def reconstruct(name: str, body: ImagesRequest, version: Version = 0, timeout: Timeout = None) -> Response:
        async with call("Reconstruct", name, version, timeout) as (engine, deadline):
            check_answer(engine, body)
            images = await dataplane.reconstruct(engine, *_images_in(body), deadline)
            return _answered(engine, {"images": images_out(engine, images, body)})

    @api.post("/models/{name}/reconstruct.png", name=PREFIX + "Reconstruct", summary="Uploaded image files' reconstructions as one PNG",
              response_class=Response, responses={200: {"content": {"image/png": {}}}})  # fmt: skip
    async def reconstruct_png(
        name: str, image: Annotated[list[UploadFile], File(description="one or more image files")], version: Version = 0,
        columns: Annotated[int | None, Query(ge=1, le=1024)] = None, timeout: Timeout = None,
    ) -> Response:  # fmt: skip
        async with call("Reconstruct", name, version, timeout) as (engine, deadline):
            check_png(engine.spec.image_shape[0])
            files = [await f.read() for f in image]
            images = await dataplane.reconstruct(engine, None, files, deadline, files_field="image")
            return Response(png_bytes(images[0]) if len(images) == 1 else grid_png(images, columns), media_type="image/png")

    @api.post("/models/{name}/interpolate", name=PREFIX + "Interpolate", summary="Images along the latent path between two end points")
    async def interpolate(name: str, body: InterpolateRequest, version: Version = 0, timeout: Timeout = None) -> Response:
        async with call("Interpolate", name, version, timeout) as (engine, deadline):
            check_answer(engine, body)
            ends = [_end_point(getattr(body, side), side) for side in ("start", "end")]
            path, images = await dataplane.interpolate(engine, *ends, body.steps, body.method, deadline)
            return _answered(engine, {"latents": tensor(path, body.encoding), "images": images_out(engine, images, body)})

    @api.post("/models/{name}/score", name=PREFIX + "Score", summary="Per image: ELBO, its terms and the importance-weighted log-likelihood")
    async def score(name: str, body: ScoreRequest, version: Version = 0, timeout: Timeout = None) -> Response:
        async with call("Score", name, version, timeout) as (engine, deadline):
            x, files = _images_in(body)
            s = await dataplane.score(engine, x, files, body.importance_samples, body.seed, deadline)
            return _answered(engine, {"scores": s.rows(), "importance_samples": s.importance_samples, "seed": s.seed})

    return api


def _end_point(end: EndPointIn, side: str) -> EndPoint:
    given = [k for k in ("image", "latent", "file") if getattr(end, k) is not None]
    if len(given) != 1:
        raise BadRequest(f"{side}: give one of image, latent or file")
    if end.file is not None:
        return EndPoint(f"{side}.file", file=unbase64(end.file, f"{side}.file"))
    which = given[0]
    a = array(getattr(end, which), f"{side}.{which}", allow_uint8=which == "image")
    return EndPoint(f"{side}.{which}", **{which: a})
