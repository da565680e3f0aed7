"""The protocol-neutral data plane every front end calls (vae.v1 and the Open Inference Protocol over
gRPC, and both over HTTP): admission, pinning a model version while a call runs, accounting, the
checks on inputs, and the operations themselves on numpy arrays. Front ends only translate their
wire formats into these calls and map the typed errors of `service.errors` onto their own codes.

A call takes the engine serving at its start and keeps it to the end, so a model swapped in
meanwhile never answers half a call.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import math
import time
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any

import numpy as np

from service.engine import Engine, new_seed
from service.errors import BadRequest, DeadlineExceeded, Internal, TooManyCalls, Unavailable, code_of
from service.metrics import Metrics
from service.models import Models
from service.registry import Status

log = logging.getLogger(__name__)
# Prior latents lie within a few units of 0 (temperature 100 keeps them within hundreds); far past
# this, a decoder's activations overflow float32 and its images turn to NaN.
MAX_ABS_LATENT = 1e4
MAX_SEED = (1 << 64) - 1
INTERPOLATIONS = ("linear", "spherical")


class Call:
    """One inference call's accounting, as `async with plane.call(...) as engine`: admits it (or
    refuses: draining, the concurrent-call cap, a request the front end could not parse), pins the
    engine of the model and version asked for, and counts and times it under its `rpc` label. Errors
    propagate, typed, to the front end. A class, not an @asynccontextmanager generator: it runs on
    every call, and a generator costs more."""

    __slots__ = ("plane", "rpc", "model", "version", "deadline", "engine", "started", "refusal")

    def __init__(
        self, plane: DataPlane, rpc: str, model: str, version: int, deadline: float | None, refusal: Exception | None
    ) -> None:  # fmt: skip
        self.plane, self.rpc, self.model, self.version, self.deadline = plane, rpc, model, version, deadline
        self.engine: Engine | None = None
        self.refusal = refusal
        if plane.draining:
            self.refusal = Unavailable("the server is shutting down")
        elif plane.in_flight >= plane.max_calls:
            plane.metrics.rejections.labels(reason="concurrent_calls", model="").inc()
            self.refusal = TooManyCalls(f"{plane.in_flight} calls already running (--max-concurrent-calls); retry later")

    async def __aenter__(self) -> Engine:
        self.started = time.perf_counter()
        self.plane.in_flight += 1
        if self.refusal is None:
            try:
                self.engine = self.plane.models.resolve(self.model, self.version)
                self.engine.active_calls += 1
                return self.engine
            except Exception as err:  # NOT_FOUND or UNAVAILABLE, accounted below
                self.refusal = err
        await self.__aexit__(type(self.refusal), self.refusal, None)
        raise self.refusal  # type: ignore[misc]

    async def __aexit__(self, kind: type[BaseException] | None, err: BaseException | None, tb: Any) -> bool:
        engine = self.engine
        if engine is not None:
            engine.active_calls -= 1
        self.plane.in_flight -= 1
        # Never a name or version a client made up: those would flood the metrics with series.
        model, version = (engine.spec.name, str(engine.spec.version)) if engine is not None else ("", "")
        self.plane.metrics.answered(self.rpc, outcome(err, self.deadline, self.rpc), model, version, time.perf_counter() - self.started)
        return False


class UncappedCall:
    """A call that is not inference (health, metadata, model control): counted and timed, but not
    held to --max-concurrent-calls (loading a model must work on a busy server). `while_draining`
    lets health and readiness answer during a drain, which is when probes most need them."""

    __slots__ = ("plane", "rpc", "started", "while_draining")

    def __init__(self, plane: DataPlane, rpc: str, while_draining: bool) -> None:
        self.plane, self.rpc, self.while_draining = plane, rpc, while_draining

    async def __aenter__(self) -> None:
        self.started = time.perf_counter()
        if self.plane.draining and not self.while_draining:
            self.plane.metrics.answered(self.rpc, "UNAVAILABLE", "", "", time.perf_counter() - self.started)
            raise Unavailable("the server is shutting down")

    async def __aexit__(self, kind: type[BaseException] | None, err: BaseException | None, tb: Any) -> bool:
        self.plane.metrics.answered(self.rpc, outcome(err, None, self.rpc), "", "", time.perf_counter() - self.started)
        return False


def outcome(err: BaseException | None, deadline: float | None, rpc: str) -> str:
    """The status code a call ended with, for the metrics; logs server faults."""
    if err is None:
        return "OK"
    if isinstance(err, (asyncio.CancelledError, GeneratorExit)):  # the client went away, or its deadline passed
        expired = deadline is not None and asyncio.get_running_loop().time() >= deadline
        return "DEADLINE_EXCEEDED" if expired else "CANCELLED"
    code = code_of(err)
    if code == "INTERNAL":
        log.error("%s failed: %s", rpc, err, exc_info=not isinstance(err, Internal))
    return code


class DataPlane:
    """What is served and the state every front end shares: the models, the metrics, the calls in
    flight and whether the server is draining."""

    def __init__(self, models: Models, metrics: Metrics, max_calls: int = 256) -> None:
        """`max_calls` caps inference calls in progress over every front end; health, metadata and
        model control are not counted, so a probe still answers while the cap refuses calls."""
        self.models = models
        self.metrics = metrics
        self.max_calls = max_calls
        self.draining = False
        self.in_flight = 0

    def call(
        self, rpc: str, model: str, version: int, deadline: float | None = None, refusal: Exception | None = None
    ) -> Call:  # fmt: skip
        """An inference call on `model` (empty: the default) at `version` (0: the newest served);
        `refusal` is a request the front end could not read, refused with the call accounted."""
        return Call(self, rpc, model, version, deadline, refusal)

    def uncapped(self, rpc: str, while_draining: bool = False) -> UncappedCall:
        """A call that is not inference, so not held to the cap: health, metadata, model control."""
        return UncappedCall(self, rpc, while_draining)

    @property
    def ready(self) -> bool:
        return not self.draining and bool(self.models.routes)

    def statuses(self) -> list[Status]:
        return self.models.statuses()

    async def load(self, name: str, version: int = 0) -> list[Status]:
        return await self.models.load(check_model_name(name), check_version(version))

    async def unload(self, name: str, version: int = 0) -> list[Status]:
        return await self.models.unload(check_model_name(name), check_version(version))

    def listing(self, statuses: list[Status] | None = None) -> Listing:
        """The repository's models and versions with their states (`statuses`, as model control
        returns them, or now), and the default model: ListModels' answer on every front end."""
        return Listing(self.statuses() if statuses is None else statuses, self.models.default or "")


@dataclass(frozen=True)
class Listing:
    statuses: list[Status]
    default_model: str


def deadline_in(seconds: float | None) -> float | None:
    """An event-loop deadline `seconds` from now (None: no deadline), as the batchers take it."""
    return None if seconds is None else asyncio.get_running_loop().time() + seconds


@asynccontextmanager
async def within(deadline: float | None) -> AsyncIterator[None]:
    """Answer DEADLINE_EXCEEDED at `deadline`, wherever the call is: for front ends whose transport
    does not end a call at its deadline (HTTP; a gRPC client cancels its own). Cancelling the wait
    takes the call's rows out of the batch queues, as a caller going away does."""
    if deadline is None:
        yield
        return
    try:
        async with asyncio.timeout_at(deadline):
            yield
    except TimeoutError:
        raise DeadlineExceeded("the call's timeout passed before it was answered") from None


# The checks on inputs. `field` is the input's name as the caller's protocol spells it, so the
# message names what the caller sent.


def check_model_name(name: str) -> str:
    if not name:
        raise BadRequest("model_name: required (the model listing shows what the repository holds)")
    return name


def check_version(version: int) -> int:
    if version < 0:
        raise BadRequest(f"model_version: {version}; must be 0 (the policy's versions) or a version")
    return version


def count(n: int, field: str, limit: int) -> int:
    if n < 1 or n > limit:
        raise BadRequest(f"{field}: {n}; must be between 1 and {limit}")
    return n


def seed(value: int | None, field: str = "seed") -> int:
    """The request's seed, or a new one; the same seed gives the same bytes on every front end."""
    if value is not None and not 0 <= value <= MAX_SEED:
        raise BadRequest(f"{field}: {value}; must be between 0 and 2^64 - 1")
    return new_seed(value)


def temperature(value: float | None, field: str = "temperature") -> float:
    t = 1.0 if value is None else float(value)
    if not math.isfinite(t) or t < 0 or t > 100:
        raise BadRequest(f"{field}: {t}; must be a finite number in [0, 100]")
    return t


def temperatures(
    engine: Engine, one: float | None, per_group: Sequence[float] = (), names: tuple[str, str] = ("temperature", "temperatures")
) -> float | np.ndarray:  # fmt: skip
    """The scale of the prior noise: one temperature for every latent (default 1.0), or one per
    latent group (`ModelSpec.latent_groups`, coarse to fine) as each latent value's, [D] float32."""
    if not len(per_group):
        return temperature(one, names[0])
    if one is not None:
        raise BadRequest(f"{names[0]} and {names[1]}: give one temperature or one per latent group, not both")
    groups = engine.spec.latent_groups
    if len(per_group) != len(groups):
        raise BadRequest(f"{names[1]}: {len(per_group)} values; this model has {len(groups)} latent groups (ModelInfo.latent_groups)")
    values = [temperature(v, f"{names[1]}[{i}]") for i, v in enumerate(per_group)]
    return np.repeat(np.asarray(values, np.float32), [math.prod(g) for g in groups])


def rows(x: np.ndarray, field: str, tail: tuple[int, ...], max_rows: int) -> np.ndarray:
    """`x` if it is [N, *tail] with N in 1..max_rows and, when floating point, finite."""
    if x.ndim != len(tail) + 1 or x.shape[1:] != tail:
        shown = list(x.shape) if x.ndim <= 8 else f"{x.ndim} dimensions"
        raise BadRequest(f"{field}: shape {shown}; must be [{', '.join(map(str, ('N', *tail)))}]")
    if not 1 <= len(x) <= max_rows:
        raise BadRequest(f"{field}: {len(x)} rows; must be between 1 and {max_rows}")
    if x.dtype.kind == "f" and not np.isfinite(x).all():
        raise BadRequest(f"{field}: contains NaN or infinity")
    return x


def images(engine: Engine, x: np.ndarray, field: str = "images", max_rows: int | None = None) -> np.ndarray:
    """The model's images [N, C, H, W] as float32 in [0, 1], from float32 in [0, 1] or uint8."""
    rows(x, field, engine.spec.image_shape, max_rows or engine.limits.max_request_rows)
    if x.dtype == np.uint8:
        return x.astype(np.float32) / np.float32(255.0)
    if x.min() < 0.0 or x.max() > 1.0:
        raise BadRequest(f"{field}: float32 pixel values must lie in [0, 1], got [{x.min():.3g}, {x.max():.3g}]")
    return x.astype(np.float32, copy=False)


def latents(engine: Engine, z: np.ndarray, field: str = "latents", max_rows: int | None = None) -> np.ndarray:
    """Latents [N, D] that a decoder can take: finite and within MAX_ABS_LATENT."""
    rows(z, field, (engine.spec.latent_dim,), max_rows or engine.limits.max_request_rows)
    largest = float(np.abs(z).max())
    if largest > MAX_ABS_LATENT:
        raise BadRequest(f"{field}: a latent of magnitude {largest:.3g}; latents must lie within [-{MAX_ABS_LATENT:g}, {MAX_ABS_LATENT:g}]")
    return z.astype(np.float32, copy=False)


async def request_images(engine: Engine, x: np.ndarray | None, files: Sequence[bytes], field: str = "images",
                         files_field: str = "image_files") -> np.ndarray:  # fmt: skip
    """A request's images: a tensor, or encoded files decoded with the model's preprocessing."""
    if files:
        if x is not None:
            raise BadRequest(f"give {field} or {files_field}, not both")
        count(len(files), files_field, engine.limits.max_request_rows)
        return await engine.images_from_files(list(files), files_field)
    if x is None:
        raise BadRequest(f"{field}: missing")
    return images(engine, x, field)


# The operations, each on a pinned engine with its inputs checked.


async def sample(
    engine: Engine, n: int, seed_value: int | None, temperature_value: float | None, deadline: float | None,
    names: tuple[str, str, str, str] = ("num_samples", "seed", "temperature", "temperatures"), per_group: Sequence[float] = (),
) -> tuple[np.ndarray, int]:  # fmt: skip
    """`n` images from the prior and the seed that drew them, at one temperature or one per latent
    group (`per_group`); `names` are the inputs' names on the wire."""
    n = count(n, names[0], engine.limits.max_request_rows)
    t, s = temperatures(engine, temperature_value, per_group, names[2:]), seed(seed_value, names[1])
    async with engine.admit("sample", engine.costs.sample(n), f"Sample of {n} images", deadline):
        return await engine.sample(n, s, t, deadline), s


@dataclass(frozen=True)
class SampleStream:
    """Sample's images in chunks: the seed that drew them, and (offset, images) per chunk."""

    seed: int
    chunks: AsyncIterator[tuple[int, np.ndarray]]


def sample_stream(
    engine: Engine, n: int, seed_value: int | None, temperature_value: float | None, chunk_rows: int,
    deadline: float | None, per_group: Sequence[float] = (),
) -> SampleStream:  # fmt: skip
    """`n` images from the prior in chunks of `chunk_rows` (0: a batch, within the request limit):
    concatenated, Sample's images for the same seed. `n` may reach the queue's bound, since only
    one chunk is queued at a time."""
    n = count(n, "num_samples", engine.batch.max_queue_rows)
    t, s = temperatures(engine, temperature_value, per_group), seed(seed_value)
    limit = engine.limits.max_request_rows
    chunk = count(chunk_rows or min(engine.batch.max_batch_rows, limit), "chunk_rows", limit)
    cost = n * engine.costs.latent + engine.costs.sample(chunk)

    async def chunks() -> AsyncIterator[tuple[int, np.ndarray]]:
        async with engine.admit("sample", cost, f"SampleStream of {n} images in chunks of {chunk}", deadline):
            eps = engine.latents(n, s, t)
            for offset in range(0, n, chunk):
                yield offset, await engine.generate(eps[offset : offset + chunk], deadline)

    return SampleStream(s, chunks())


async def decode(engine: Engine, z: np.ndarray, deadline: float | None, field: str = "latents") -> np.ndarray:
    """Images [N, C, H, W] in [0, 1] of latents [N, D]."""
    z = latents(engine, z, field)
    async with engine.admit("decode", engine.costs.decode(len(z)), f"Decode of {len(z)} latents", deadline):
        return await engine.decode(z, deadline)


async def reconstruct(
    engine: Engine, x: np.ndarray | None, files: Sequence[bytes], deadline: float | None, files_field: str = "image_files"
) -> np.ndarray:  # fmt: skip
    """Decoded images of the images' (or files') encodings, their posterior means."""
    n = request_rows(engine, x, files)
    async with engine.admit("reconstruct", engine.costs.reconstruct(n), f"Reconstruct of {n} images", deadline):
        return await engine.reconstruct(await request_images(engine, x, files, files_field=files_field), deadline)


def request_rows(engine: Engine, x: np.ndarray | None, files: Sequence[bytes]) -> int:
    """The images a request holds, to cost it before any file is decoded; past the request limit,
    the limit (the checks that come next refuse it with their own message)."""
    n = len(files) if files else (len(x) if x is not None and x.ndim else 0)
    return min(n, engine.limits.max_request_rows)


async def encoder_graph(engine: Engine, x: np.ndarray, field: str, deadline: float | None) -> tuple[np.ndarray, np.ndarray]:
    """The encoder graph as exported, on any float32 [N, C, H, W] the caller sends: mu and logvar."""
    rows(x, field, engine.spec.image_shape, engine.limits.max_request_rows)
    async with engine.admit("encode", engine.costs.encode(len(x)), f"the encoder on {len(x)} images", deadline):
        return await engine.encode(x.astype(np.float32, copy=False), deadline)


async def decoder_graph(engine: Engine, z: np.ndarray, field: str, deadline: float | None) -> list[np.ndarray]:
    """The decoder graph as exported: the likelihood's parameters of latents [N, D], and their
    images where the graph gives them."""
    z = latents(engine, z, field)
    async with engine.admit("decode", engine.costs.decoder_graph(len(z)), f"the decoder on {len(z)} latents", deadline):
        return await engine.decoder_outputs(z, deadline)


async def family_graph(engine: Engine, role: str, x: np.ndarray, field: str, deadline: float | None) -> list[np.ndarray]:
    """A graph of the model's family as exported (a hierarchical model's posterior: rows of an
    image flattened and its noise, [N, C*H*W + D]), on whatever rows the caller sends."""
    c, h, w = engine.spec.image_shape
    rows(x, field, (c * h * w + engine.spec.latent_dim,), engine.limits.max_request_rows)
    cost = len(x) * (3 * engine.costs.image + engine.costs.params + 4 * engine.costs.latent)
    async with engine.admit("encode", cost, f"the {role} graph on {len(x)} rows", deadline):
        return await engine.family[role].submit(x.astype(np.float32, copy=False), deadline)


@dataclass(frozen=True)
class Encoded:
    mu: np.ndarray
    sigma: np.ndarray
    z: np.ndarray | None = None  # one draw from q(z|x), when asked for
    seed: int = 0


async def encode(
    engine: Engine, x: np.ndarray | None, files: Sequence[bytes], draw: bool, seed_value: int | None,
    deadline: float | None,
) -> Encoded:  # fmt: skip
    """mu and sigma (not the log-variance) per image (or file); with `draw`, z from q(z|x) under a seed."""
    n = request_rows(engine, x, files)
    s = seed(seed_value) if draw else 0
    async with engine.admit("encode", engine.costs.encode(n, draw), f"Encode of {n} images", deadline):
        images = await request_images(engine, x, files)
        mu, logvar = await engine.encode(images, deadline)
        sigma = np.exp(0.5 * logvar)
        if not draw:
            return Encoded(mu, sigma)
        return Encoded(mu, sigma, await engine.posterior_sample(images, mu, sigma, s, deadline), s)


@dataclass(frozen=True)
class EndPoint:
    """One end of an interpolation: an image [C, H, W] or [1, C, H, W], a latent [D] or [1, D], or an
    encoded image file; `field` names it on the wire."""

    field: str
    image: np.ndarray | None = None
    latent: np.ndarray | None = None
    file: bytes | None = None


async def _end_latent(engine: Engine, end: EndPoint, deadline: float | None) -> np.ndarray:
    if end.file is not None:
        x = await engine.images_from_files([end.file], end.field)
    elif end.latent is not None:
        z = end.latent[None] if end.latent.ndim == 1 else end.latent
        return latents(engine, z, end.field, max_rows=1)[0]
    elif end.image is not None:
        x = images(engine, end.image[None] if end.image.ndim == 3 else end.image, end.field, max_rows=1)
    else:
        raise BadRequest(f"{end.field}: give an image, a latent or an image file")
    mu, _ = await engine.encode(x, deadline)
    return mu[0]


async def interpolate(
    engine: Engine, start: EndPoint, end: EndPoint, steps: int, method: str, deadline: float | None
) -> tuple[np.ndarray, np.ndarray]:
    """The latents along the path between two end points, end points included, and their images."""
    most = engine.limits.max_interpolation_steps
    if not 2 <= steps <= most:
        raise BadRequest(f"steps: {steps}; must be between 2 and {most}")
    if method not in INTERPOLATIONS:
        raise BadRequest(f"method: {method!r}; must be linear or spherical")
    async with engine.admit("interpolate", engine.costs.interpolate(steps), f"Interpolate of {steps} steps", deadline):
        a = await _end_latent(engine, start, deadline)
        b = await _end_latent(engine, end, deadline)
        return await engine.interpolate(a, b, steps, method == "spherical", deadline)


@dataclass(frozen=True)
class Scores:
    """Per image, in nats: ELBO, its reconstruction and KL terms, the importance-weighted
    log-likelihood; and that likelihood as bits per dimension."""

    elbo: np.ndarray
    reconstruction: np.ndarray
    kl: np.ndarray
    log_likelihood: np.ndarray
    bits_per_dim: np.ndarray
    importance_samples: int
    seed: int

    def rows(self) -> list[dict[str, float]]:
        """One dict per image, its five figures by the names every front end answers with."""
        figures = (self.elbo, self.reconstruction, self.kl, self.log_likelihood, self.bits_per_dim)
        names = ("elbo", "reconstruction", "kl", "log_likelihood", "bits_per_dim")
        return [dict(zip(names, values)) for values in zip(*(a.tolist() for a in figures))]


async def score(
    engine: Engine, x: np.ndarray | None, files: Sequence[bytes], k: int, seed_value: int | None, deadline: float | None
) -> Scores:  # fmt: skip
    k = count(k, "importance_samples", engine.limits.max_importance_samples)
    n = request_rows(engine, x, files)
    async with engine.admit("score", engine.costs.score(n, k), f"Score of {n} images", deadline):
        x = await request_images(engine, x, files)
        s = seed(seed_value)
        terms = await engine.score(x, k, s, deadline)
    bits = engine.spec.distribution.bits_per_dim(-terms["log_likelihood"], math.prod(engine.spec.image_shape))
    return Scores(terms["elbo"], terms["reconstruction"], terms["kl"], terms["log_likelihood"], bits, k, s)


def latent_layout(groups: tuple[tuple[int, ...], ...]) -> list[dict[str, Any]]:
    """Each latent group's shape and where its values start in the latent."""
    offsets = itertools.accumulate((math.prod(g) for g in groups), initial=0)
    return [{"shape": list(g), "offset": offset} for g, offset in zip(groups, offsets)]


def model_info(engine: Engine) -> dict[str, Any]:
    """What a client needs to know to call a model, as vae.v1's ModelInfo fields."""
    s, batch = engine.spec, engine.batch
    return {
        "name": s.name, "version": s.version, "latent_dim": s.latent_dim, "image_shape": list(s.image_shape),
        "likelihood": s.likelihood, "execution_provider": engine.runtime.provider,
        "max_batch_rows": batch.max_batch_rows, "max_batch_delay_ms": batch.max_batch_delay_ms,
        "max_request_rows": engine.limits.max_request_rows, "max_queue_rows": batch.max_queue_rows,
        "dataset": s.dataset, "metrics": dict(s.metrics), "mixtures": s.mixtures, "classes": list(s.classes),
        "family": s.family, "latent_groups": latent_layout(s.latent_groups),
        "preprocessing": None if s.preprocessing is None else s.preprocessing.to_json(),
    }  # fmt: skip
