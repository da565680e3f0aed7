"""vae.v1 as plain HTTP: routes a person can call with curl or a browser, over the same data plane
as vae.v1 gRPC, so a seed gives the same images and the same PNG bytes (`rpc` label `http.<RPC>`).

  GET  /v1/models                                the listing
  GET  /v1/models/NAME                           model info
  GET  /v1/models/NAME/sample.png?n=64&seed=1    one PNG grid of samples (a conditional model's: &class=NAME)
  POST /v1/models/NAME/reconstruct.png           uploaded image file(s) (multipart, field `image`) -> PNG
  POST /v1/models/NAME/edit.png?target=NAME      uploaded image file(s) moved towards a class -> PNG
  POST /v1/models/NAME/{sample,encode,decode,reconstruct,interpolate,score,classify,edit}   JSON in, JSON out
  POST /v1/models/NAME/{load,unload}             model control (admin token)

Every route takes `?version=N` (default: the newest served), and the inference routes
`?timeout=SECONDS`: past it the call is answered 504 wherever it is, and its rows leave the batch
queues (a gRPC deadline does the same). Tensors in JSON are
`{"shape": [...], "dtype": "float32"|"uint8", "data": [...]}` (data flat or nested) or carry
`"b64"` (the raw little-endian bytes in base64) instead of `data`; images come back in the
`format` asked for: float32 (default), uint8, or png (base64 files). A class is a name or an
index (`classes` in JSON bodies, `class` in query strings), as over gRPC (proto/vae/v1/vae.proto);
the PNG routes give the classes they used in the `Vae-Class-Indices` header (indices into the
model info's `classes`, comma-separated: a name per image of a large grid would outgrow what proxies
take in a header).
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

ClassRef = str | int
Classes = Field([], description="a conditional model's classes (names or indices): one for every row, or one per row")
ClassQuery = Annotated[list[str], Query(alias="class", description="a conditional model's class (name or index); repeat it for one per image")]


class SampleRequest(Answer):
    num_samples: int = 1
    seed: int | None = None
    temperature: float | None = None
    temperatures: list[float] = Field([], description="one per latent group (ModelInfo's latent_groups), instead of temperature")
    classes: list[ClassRef] = Classes


class ImagesRequest(Answer):
    images: Tensor | None = None
    image_files: list[str] = Field([], description="encoded image files (PNG, JPEG, ...), base64")
    classes: list[ClassRef] = Classes


class EncodeRequest(ImagesRequest):
    sample: bool = False
    seed: int | None = None


class DecodeRequest(Answer):
    latents: Tensor
    classes: list[ClassRef] = Classes


class ClassifyRequest(BaseModel):
    images: Tensor | None = None
    image_files: list[str] = Field([], description="encoded image files (PNG, JPEG, ...), base64")
    importance_samples: int = 64
    seed: int | None = None


class EditRequest(Answer):
    images: Tensor | None = None
    image_files: list[str] = Field([], description="encoded image files (PNG, JPEG, ...), base64")
    source_classes: list[ClassRef] = Field([], description="each image's class (none: the model's own guess)")
    target_class: ClassRef = ""
    strength: float | None = Field(None, description="in [0, 1]; default 1")


class EndPointIn(BaseModel):
    image: Tensor | None = None
    latent: Tensor | None = None
    file: str | None = Field(None, description="an encoded image file, base64")


class InterpolateRequest(Answer):
    start: EndPointIn
    end: EndPointIn
    steps: int = 8
    method: Literal["linear", "spherical"] = "linear"
    classes: list[ClassRef] = Field([], description="a conditional model's classes of the two ends: one for both, or start's and end's")


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


def with_classes(classes: list[str] | tuple[str, ...]) -> dict[str, list[str]]:
    """A JSON answer's `classes`: a conditional model's, and no key for any other model."""
    return {"classes": list(classes)} if classes else {}


def classes_header(engine: Engine, classes: list[str] | tuple[str, ...]) -> dict[str, str]:
    """A PNG answer's classes as a header, their indices comma-separated; none for an unconditional model."""
    return {"Vae-Class-Indices": ",".join(str(engine.spec.classes.index(c)) for c in classes)} if classes else {}


def _images_in(body: ImagesRequest | ClassifyRequest | EditRequest) -> tuple[np.ndarray | None, list[bytes]]:
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
        timeout: Timeout = None, classes: ClassQuery = [],  # noqa: B006 - FastAPI copies query defaults
    ) -> Response:  # fmt: skip
        async with call("Sample", name, version, timeout) as (engine, deadline):
            check_png(engine.spec.image_shape[0])
            per_group = number_list(temperatures, "temperatures")
            images, _, drawn = await dataplane.sample(
                engine, n, seed, temperature, deadline, names=("n", "seed", "temperature", "temperatures", "class"),
                per_group=per_group, classes=classes,
            )  # fmt: skip
            return Response(grid_png(images, columns), media_type="image/png", headers=classes_header(engine, drawn))

    @api.post("/models/{name}/sample", name=PREFIX + "Sample", summary="Samples from the prior")
    async def sample(name: str, body: SampleRequest, version: Version = 0, timeout: Timeout = None) -> Response:
        async with call("Sample", name, version, timeout) as (engine, deadline):
            check_answer(engine, body)
            images, seed, classes = await dataplane.sample(
                engine, body.num_samples, body.seed, body.temperature, deadline, per_group=body.temperatures, classes=body.classes
            )  # fmt: skip
            return _answered(engine, {"seed": seed, "images": images_out(engine, images, body), **with_classes(classes)})

    @api.post("/models/{name}/encode", name=PREFIX + "Encode", summary="q(z|x): mu and sigma per image, optionally z drawn with a seed")
    async def encode(name: str, body: EncodeRequest, version: Version = 0, timeout: Timeout = None) -> Response:
        async with call("Encode", name, version, timeout) as (engine, deadline):
            e = await dataplane.encode(engine, *_images_in(body), body.sample, body.seed, deadline, body.classes)
            answer = {"mu": tensor(e.mu, body.encoding), "sigma": tensor(e.sigma, body.encoding), **with_classes(e.classes)}
            if e.z is not None:
                answer |= {"z": tensor(e.z, body.encoding), "seed": e.seed}
            return _answered(engine, answer)

    @api.post("/models/{name}/decode", name=PREFIX + "Decode", summary="Images of latents")
    async def decode(name: str, body: DecodeRequest, version: Version = 0, timeout: Timeout = None) -> Response:
        async with call("Decode", name, version, timeout) as (engine, deadline):
            check_answer(engine, body)
            latents = array(body.latents, "latents", allow_uint8=False)
            images, classes = await dataplane.decode(engine, latents, deadline, classes=body.classes)
            return _answered(engine, {"images": images_out(engine, images, body), **with_classes(classes)})

    @api.post("/models/{name}/reconstruct", name=PREFIX + "Reconstruct", summary="Decoded images of the images' encodings")
    async def reconstruct(name: str, body: ImagesRequest, version: Version = 0, timeout: Timeout = None) -> Response:
        async with call("Reconstruct", name, version, timeout) as (engine, deadline):
            check_answer(engine, body)
            images, classes = await dataplane.reconstruct(engine, *_images_in(body), deadline, classes=body.classes)
            return _answered(engine, {"images": images_out(engine, images, body), **with_classes(classes)})

    @api.post("/models/{name}/reconstruct.png", name=PREFIX + "Reconstruct", summary="Uploaded image files' reconstructions as one PNG",
              response_class=Response, responses={200: {"content": {"image/png": {}}}})  # fmt: skip
    async def reconstruct_png(
        name: str, image: Annotated[list[UploadFile], File(description="one or more image files")], version: Version = 0,
        columns: Annotated[int | None, Query(ge=1, le=1024)] = None, timeout: Timeout = None,
        classes: ClassQuery = [],  # noqa: B006
    ) -> Response:  # fmt: skip
        async with call("Reconstruct", name, version, timeout) as (engine, deadline):
            check_png(engine.spec.image_shape[0])
            files = [await f.read() for f in image]
            images, used = await dataplane.reconstruct(engine, None, files, deadline, files_field="image", classes=classes)
            return png_answer(engine, images, columns, used)

    @api.post("/models/{name}/edit.png", name=PREFIX + "Edit", summary="Uploaded image files moved towards a class, as one PNG",
              response_class=Response, responses={200: {"content": {"image/png": {}}}})  # fmt: skip
    async def edit_png(
        name: str, image: Annotated[list[UploadFile], File(description="one or more image files")],
        target: Annotated[str, Query(description="the class to move towards (name or index)")] = "",
        source: Annotated[list[str], Query(description="each image's class (default: the model's own guess)")] = [],  # noqa: B006
        strength: Annotated[float | None, Query(description="in [0, 1]; default 1")] = None, version: Version = 0,
        columns: Annotated[int | None, Query(ge=1, le=1024)] = None, timeout: Timeout = None,
    ) -> Response:  # fmt: skip
        async with call("Edit", name, version, timeout) as (engine, deadline):
            check_png(engine.spec.image_shape[0])
            files = [await f.read() for f in image]
            e = await dataplane.edit(engine, None, files, source, target, strength, deadline, ("source", "target", "strength", "image"))
            return png_answer(engine, e.images, columns, e.sources)

    @api.post("/models/{name}/interpolate", name=PREFIX + "Interpolate", summary="Images along the latent path between two end points")
    async def interpolate(name: str, body: InterpolateRequest, version: Version = 0, timeout: Timeout = None) -> Response:
        async with call("Interpolate", name, version, timeout) as (engine, deadline):
            check_answer(engine, body)
            ends = [_end_point(getattr(body, side), side) for side in ("start", "end")]
            path, images, classes = await dataplane.interpolate(engine, *ends, body.steps, body.method, deadline, body.classes)
            answer = {"latents": tensor(path, body.encoding), "images": images_out(engine, images, body), **with_classes(classes)}
            return _answered(engine, answer)

    @api.post("/models/{name}/score", name=PREFIX + "Score", summary="Per image: ELBO, its terms and the importance-weighted log-likelihood")
    async def score(name: str, body: ScoreRequest, version: Version = 0, timeout: Timeout = None) -> Response:
        async with call("Score", name, version, timeout) as (engine, deadline):
            x, files = _images_in(body)
            s = await dataplane.score(engine, x, files, body.importance_samples, body.seed, deadline, body.classes)
            return _answered(engine, {"scores": s.rows(), "importance_samples": s.importance_samples, "seed": s.seed})

    @api.post("/models/{name}/classify", name=PREFIX + "Classify", summary="A conditional model's p(y|x) per image, by Bayes' rule")
    async def classify(name: str, body: ClassifyRequest, version: Version = 0, timeout: Timeout = None) -> Response:
        async with call("Classify", name, version, timeout) as (engine, deadline):
            x, files = _images_in(body)
            c = await dataplane.classify(engine, x, files, body.importance_samples, body.seed, deadline)
            answer = {"results": c.rows(), "classes": list(engine.spec.classes), "importance_samples": c.importance_samples, "seed": c.seed}
            return _answered(engine, answer)

    @api.post("/models/{name}/edit", name=PREFIX + "Edit", summary="Images moved from their class towards another")
    async def edit(name: str, body: EditRequest, version: Version = 0, timeout: Timeout = None) -> Response:
        async with call("Edit", name, version, timeout) as (engine, deadline):
            check_answer(engine, body)
            x, files = _images_in(body)
            e = await dataplane.edit(engine, x, files, body.source_classes, body.target_class, body.strength, deadline)
            answer = {"images": images_out(engine, e.images, body), "source_classes": list(e.sources), "target_class": e.target,
                      "strength": e.strength}  # fmt: skip
            return _answered(engine, answer)

    return api


def png_answer(engine: Engine, images: np.ndarray, columns: int | None, classes: list[str] | tuple[str, ...]) -> Response:
    """One image's PNG, or a grid of several, naming the classes used."""
    data = png_bytes(images[0]) if len(images) == 1 else grid_png(images, columns)
    return Response(data, media_type="image/png", headers=classes_header(engine, classes))


def _end_point(end: EndPointIn, side: str) -> EndPoint:
    given = [k for k in ("image", "latent", "file") if getattr(end, k) is not None]
    if len(given) != 1:
        raise BadRequest(f"{side}: give one of image, latent or file")
    if end.file is not None:
        return EndPoint(f"{side}.file", file=unbase64(end.file, f"{side}.file"))
    which = given[0]
    a = array(getattr(end, which), f"{side}.{which}", allow_uint8=which == "image")
    return EndPoint(f"{side}.{which}", **{which: a})
