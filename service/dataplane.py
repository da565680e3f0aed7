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

from service.costs import F32
from service.engine import Engine, new_seed, one_hot
from service.errors import BadRequest, DeadlineExceeded, FailedPrecondition, Internal, TooManyCalls, Unavailable, code_of
from service.metrics import Metrics
from service.models import Models
from service.registry import Status

log = logging.getLogger(__name__)
# Prior latents lie within a few units of 0 (temperature 100 keeps them within hundreds); far past
# this, a decoder's activations overflow float32 and its images turn to NaN.
MAX_ABS_LATENT = 1e4
MAX_SEED = (1 << 64) - 1
INTERPOLATIONS = ("linear", "spherical")
# Importance samples of the Classify that picks a conditional model's class where a call gives none
# (Encode, Reconstruct, Interpolate, Edit), under a fixed seed so that the pick is the same every time.
IMPLIED_K = 16


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


def class_index(engine: Engine, value: str | bytes | int, field: str) -> int:
    """A class by name (ModelInfo.classes), or else by its index, as the index; BadRequest naming
    the classes for anything else."""
    names = engine.spec.classes
    if isinstance(value, bytes):
        value = value.decode("utf-8", "replace")
    if isinstance(value, str) and value in names:
        return names.index(value)
    if isinstance(value, str) and value.isascii() and value.isdigit():
        value = int(value)
    if isinstance(value, int) and not isinstance(value, bool) and 0 <= value < len(names):
        return value
    shown = value if not isinstance(value, str) or len(value) <= 64 else value[:64] + "..."
    raise BadRequest(f"{field}: {shown!r} is no class of model {engine.spec.name}; its classes are "
                     f"{', '.join(names)} (or their indices 0 to {len(names) - 1})")  # fmt: skip


def class_list(engine: Engine, values: Sequence[str | bytes | int], n: int, field: str, conditional: bool = True) -> np.ndarray | None:
    """Class indices [n] from none (None: the operation's default), one (every row's) or n values
    (one per row). Only a conditional model takes a class, except where `conditional` is False (an
    edit of any model with classes)."""
    if not len(values):
        return None
    if not engine.spec.classes or (conditional and not engine.classes):
        has = "has no classes" if not engine.spec.classes else "is not conditional: it takes no class (Edit moves its images between classes)"
        raise BadRequest(f"{field}: model {engine.spec.name} {has}")
    if len(values) not in (1, n):
        raise BadRequest(f"{field}: {len(values)} classes for {n} rows; give one for every row, or one per row")
    labels = np.array([class_index(engine, v, f"{field}[{i}]" if len(values) > 1 else field) for i, v in enumerate(values)])
    return np.repeat(labels, n) if len(labels) == 1 else labels


def class_names(engine: Engine, labels: np.ndarray | None) -> list[str]:
    return [] if labels is None else [engine.spec.classes[i] for i in labels.tolist()]


def sample_classes(engine: Engine, classes: Sequence[str | bytes | int], n: int, seed_value: int, field: str) -> np.ndarray | None:
    """A conditional model's classes of n samples: those asked for, else drawn from p(y) with the seed."""
    labels = class_list(engine, classes, n, field)
    return engine.draw_classes(n, seed_value) if labels is None and engine.classes else labels


def prior_class(engine: Engine, n: int) -> np.ndarray:
    """A conditional model's most probable class under p(y), n times: the class of latents given none."""
    return np.full(n, int(np.argmax(engine.log_prior)))


async def implied_classes(engine: Engine, x: np.ndarray, deadline: float | None) -> np.ndarray:
    """The classes of images a call gives none for: Classify's most probable class (IMPLIED_K
    importance samples, seed 0, every image on the seed's first stream, so an image's class is the
    same wherever it lies in a request) for a conditional model; for an unconditional one with class means,
    the class whose mean latent lies nearest the image's."""
    if not engine.classes:
        return await engine.nearest_class(x, deadline)
    figures = await engine.class_scores(x, IMPLIED_K, 0, deadline, by_position=False)
    return bayes(engine, figures["log_likelihood"])[1]


def bayes(engine: Engine, log_px_y: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Bayes' rule on per-class log-likelihoods [N, K]: log p(x, y) [N, K] and the most probable class [N]."""
    joint = log_px_y + engine.log_prior
    return joint, np.argmax(joint, axis=-1)


def with_implied(engine: Engine, cost: int, n: int, given: np.ndarray | None) -> int:
    """A call's `cost` for n images, or more where picking their classes first (none given,
    `implied_classes`) takes more: the pick runs before the call's own work, on the images it holds."""
    if given is not None or not engine.classes:
        return cost
    return max(cost, engine.costs.classify(n, engine.classes, IMPLIED_K))


async def classes_for(engine: Engine, x: np.ndarray, given: np.ndarray | None, deadline: float | None) -> np.ndarray | None:
    """The classes images are taken under by a conditional model: those given, else implied;
    None for an unconditional model."""
    if not engine.classes:
        return None
    return given if given is not None else await implied_classes(engine, x, deadline)


def weights(engine: Engine, labels: np.ndarray | None) -> np.ndarray | None:
    return None if labels is None else one_hot(labels, engine.classes)


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
    names: tuple[str, ...] = ("num_samples", "seed", "temperature", "temperatures", "classes"), per_group: Sequence[float] = (),
    classes: Sequence[str | bytes | int] = (),
) -> tuple[np.ndarray, int, list[str]]:  # fmt: skip
    """`n` images from the prior, the seed that drew them and a conditional model's class of each
    (those asked for, else drawn from p(y) with the seed), at one temperature or one per latent
    group (`per_group`); `names` are the inputs' names on the wire."""
    n = count(n, names[0], engine.limits.max_request_rows)
    t, s = temperatures(engine, temperature_value, per_group, names[2:4]), seed(seed_value, names[1])
    labels = sample_classes(engine, classes, n, s, names[4])
    async with engine.admit("sample", engine.costs.sample(n), f"Sample of {n} images", deadline):
        return await engine.sample(n, s, t, deadline, weights(engine, labels)), s, class_names(engine, labels)


@dataclass(frozen=True)
class SampleStream:
    """Sample's images in chunks: the seed that drew them, and (offset, images) per chunk."""

    seed: int
    chunks: AsyncIterator[tuple[int, np.ndarray]]
    classes: list[str]  # a conditional model's class of each image, in order


def sample_stream(
    engine: Engine, n: int, seed_value: int | None, temperature_value: float | None, chunk_rows: int,
    deadline: float | None, per_group: Sequence[float] = (), classes: Sequence[str | bytes | int] = (),
) -> SampleStream:  # fmt: skip
    """`n` images from the prior in chunks of `chunk_rows` (0: a batch, within the request limit):
    concatenated, Sample's images for the same seed. `n` may reach the queue's bound, since only
    one chunk is queued at a time."""
    n = count(n, "num_samples", engine.batch.max_queue_rows)
    t, s = temperatures(engine, temperature_value, per_group), seed(seed_value)
    limit = engine.limits.max_request_rows
    chunk = count(chunk_rows or min(engine.batch.max_batch_rows, limit), "chunk_rows", limit)
    cost = n * (engine.costs.latent + F32 * engine.classes) + engine.costs.sample(chunk)  # the noise and class weights
    labels = sample_classes(engine, classes, n, s, "classes")
    y = weights(engine, labels)

    async def chunks() -> AsyncIterator[tuple[int, np.ndarray]]:
        async with engine.admit("sample", cost, f"SampleStream of {n} images in chunks of {chunk}", deadline):
            eps = engine.latents(n, s, t)
            for offset in range(0, n, chunk):
                part = None if y is None else y[offset : offset + chunk]
                yield offset, await engine.generate(eps[offset : offset + chunk], deadline, part)

    return SampleStream(s, chunks(), class_names(engine, labels))


async def decode(
    engine: Engine, z: np.ndarray, deadline: float | None, field: str = "latents", classes: Sequence[str | bytes | int] = ()
) -> tuple[np.ndarray, list[str]]:  # fmt: skip
    """Images [N, C, H, W] in [0, 1] of latents [N, D], and a conditional model's class of each:
    those given, else the most probable under p(y)."""
    z = latents(engine, z, field)
    labels = class_list(engine, classes, len(z), "classes")
    if labels is None and engine.classes:
        labels = prior_class(engine, len(z))
    async with engine.admit("decode", engine.costs.decode(len(z)), f"Decode of {len(z)} latents", deadline):
        return await engine.decode(z, deadline, weights(engine, labels)), class_names(engine, labels)


async def reconstruct(
    engine: Engine, x: np.ndarray | None, files: Sequence[bytes], deadline: float | None, files_field: str = "image_files",
    classes: Sequence[str | bytes | int] = (),
) -> tuple[np.ndarray, list[str]]:  # fmt: skip
    """Decoded images of the images' (or files') encodings, their posterior means; a conditional
    model's under the classes given, else Classify's (`implied_classes`), which it returns."""
    n = request_rows(engine, x, files)
    given = class_list(engine, classes, n, "classes")
    cost = with_implied(engine, engine.costs.reconstruct(n), n, given)
    async with engine.admit("reconstruct", cost, f"Reconstruct of {n} images", deadline):
        images = await request_images(engine, x, files, files_field=files_field)
        labels = await classes_for(engine, images, given, deadline)
        return await engine.reconstruct(images, deadline, weights(engine, labels)), class_names(engine, labels)


def request_rows(engine: Engine, x: np.ndarray | None, files: Sequence[bytes]) -> int:
    """The images a request holds, to cost it before any file is decoded; past the request limit,
    the limit (the checks that come next refuse it with their own message)."""
    n = len(files) if files else (len(x) if x is not None and x.ndim else 0)
    return min(n, engine.limits.max_request_rows)


def graph_input(engine: Engine, role: str) -> tuple[int, ...]:
    """The shape of a row of a graph's input as exported: the encoder's image [C, H, W], the
    decoder's latent [D], the posterior's image and noise [C*H*W + D]; a conditional model's
    flattened, then its K class weights."""
    c, h, w = engine.spec.image_shape
    k, d = engine.classes, engine.spec.latent_dim
    if role == "encoder":
        return (c * h * w + k,) if k else (c, h, w)
    return (d + k,) if role == "decoder" else (c * h * w + d + k,)


async def encoder_graph(engine: Engine, x: np.ndarray, field: str, deadline: float | None) -> tuple[np.ndarray, np.ndarray]:
    """The encoder graph as exported, on any float32 rows the caller sends ([N, C, H, W]; a
    conditional model's [N, C*H*W + K]): mu and logvar."""
    rows(x, field, graph_input(engine, "encoder"), engine.limits.max_request_rows)
    async with engine.admit("encode", engine.costs.encode(len(x)), f"the encoder on {len(x)} images", deadline):
        return await engine.encode(x.astype(np.float32, copy=False), deadline)


async def decoder_graph(engine: Engine, z: np.ndarray, field: str, deadline: float | None) -> list[np.ndarray]:
    """The decoder graph as exported: the likelihood's parameters of latents [N, D], and their
    images where the graph gives them."""
    if engine.classes:  # z_y: class weights after the latent, checked as the latents are
        rows(z, field, graph_input(engine, "decoder"), engine.limits.max_request_rows)
        latents(engine, z[:, : engine.spec.latent_dim], field)
    else:
        z = latents(engine, z, field)
    async with engine.admit("decode", engine.costs.decoder_graph(len(z)), f"the decoder on {len(z)} latents", deadline):
        return await engine.decoder_outputs(z, deadline)


async def family_graph(engine: Engine, role: str, x: np.ndarray, field: str, deadline: float | None) -> list[np.ndarray]:
    """A graph of the model's family as exported (a hierarchical model's posterior: rows of an
    image flattened and its noise, [N, C*H*W + D], then a conditional model's class weights), on
    whatever rows the caller sends."""
    rows(x, field, graph_input(engine, role), engine.limits.max_request_rows)
    cost = len(x) * (3 * engine.costs.image + engine.costs.params + 4 * engine.costs.latent)
    async with engine.admit("encode", cost, f"the {role} graph on {len(x)} rows", deadline):
        return await engine.family[role].submit(x.astype(np.float32, copy=False), deadline)


@dataclass(frozen=True)
class Encoded:
    mu: np.ndarray
    sigma: np.ndarray
    z: np.ndarray | None = None  # one draw from q(z|x), when asked for
    seed: int = 0
    classes: tuple[str, ...] = ()  # a conditional model's class of each image, which the latents are given


async def encode(
    engine: Engine, x: np.ndarray | None, files: Sequence[bytes], draw: bool, seed_value: int | None,
    deadline: float | None, classes: Sequence[str | bytes | int] = (),
) -> Encoded:  # fmt: skip
    """mu and sigma (not the log-variance) per image (or file); with `draw`, z from q(z|x) under a
    seed; a conditional model's given the classes asked for, else Classify's."""
    n = request_rows(engine, x, files)
    s = seed(seed_value) if draw else 0
    given = class_list(engine, classes, n, "classes")
    async with engine.admit("encode", with_implied(engine, engine.costs.encode(n, draw), n, given), f"Encode of {n} images", deadline):
        images = await request_images(engine, x, files)
        labels = await classes_for(engine, images, given, deadline)
        y, names = weights(engine, labels), tuple(class_names(engine, labels))
        mu, logvar = await engine.encode(images, deadline, y)
        sigma = np.exp(0.5 * logvar)
        if not draw:
            return Encoded(mu, sigma, classes=names)
        return Encoded(mu, sigma, await engine.posterior_sample(images, mu, sigma, s, deadline, y), s, names)


@dataclass(frozen=True)
class EndPoint:
    """One end of an interpolation: an image [C, H, W] or [1, C, H, W], a latent [D] or [1, D], or an
    encoded image file; `field` names it on the wire."""

    field: str
    image: np.ndarray | None = None
    latent: np.ndarray | None = None
    file: bytes | None = None


async def _end_latent(engine: Engine, end: EndPoint, label: int | None, deadline: float | None) -> tuple[np.ndarray, int | None]:
    """An end point's latent and, for a conditional model, its class: the one given; else an image's
    Classify gives it, and a latent's is left to the other end (None)."""
    if end.file is not None:
        x = await engine.images_from_files([end.file], end.field)
    elif end.latent is not None:
        z = end.latent[None] if end.latent.ndim == 1 else end.latent
        return latents(engine, z, end.field, max_rows=1)[0], label
    elif end.image is not None:
        x = images(engine, end.image[None] if end.image.ndim == 3 else end.image, end.field, max_rows=1)
    else:
        raise BadRequest(f"{end.field}: give an image, a latent or an image file")
    given = None if label is None else np.array([label])
    labels = await classes_for(engine, x, given, deadline)
    mu, _ = await engine.encode(x, deadline, weights(engine, labels))
    return mu[0], None if labels is None else int(labels[0])


async def interpolate(
    engine: Engine, start: EndPoint, end: EndPoint, steps: int, method: str, deadline: float | None,
    classes: Sequence[str | bytes | int] = (),
) -> tuple[np.ndarray, np.ndarray, list[str]]:  # fmt: skip
    """The latents along the path between two end points, end points included, and their images;
    a conditional model's classes of the two ends (`classes`: one for both, or the start's and the
    end's; else an image's Classify, and a latent takes the other end's class, or p(y)'s most
    probable), its class weights going from one to the other along the path."""
    most = engine.limits.max_interpolation_steps
    if not 2 <= steps <= most:
        raise BadRequest(f"steps: {steps}; must be between 2 and {most}")
    if method not in INTERPOLATIONS:
        raise BadRequest(f"method: {method!r}; must be linear or spherical")
    given = class_list(engine, classes, 2, "classes")
    cost = with_implied(engine, engine.costs.interpolate(steps), 2, given)
    async with engine.admit("interpolate", cost, f"Interpolate of {steps} steps", deadline):
        a, first = await _end_latent(engine, start, None if given is None else int(given[0]), deadline)
        b, last = await _end_latent(engine, end, None if given is None else int(given[1]), deadline)
        if not engine.classes:
            path, images = await engine.interpolate(a, b, steps, method == "spherical", deadline)
            return path, images, []
        first = first if first is not None else last if last is not None else int(prior_class(engine, 1)[0])
        last = last if last is not None else first
        ends = (one_hot(np.array([first]), engine.classes)[0], one_hot(np.array([last]), engine.classes)[0])
        path, images = await engine.interpolate(a, b, steps, method == "spherical", deadline, ends)
        return path, images, class_names(engine, np.array([first, last]))


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
    # A conditional model's: the class each image's ELBO and its terms are given (the one asked for,
    # or Bayes' rule's most probable), and whether log_likelihood is the marginal over the classes.
    classes: tuple[str, ...] = ()
    marginal: bool = False

    def rows(self) -> list[dict[str, Any]]:
        """One dict per image, its figures by the names every front end answers with."""
        figures = (self.elbo, self.reconstruction, self.kl, self.log_likelihood, self.bits_per_dim)
        names = ("elbo", "reconstruction", "kl", "log_likelihood", "bits_per_dim")
        rows = [dict(zip(names, values)) for values in zip(*(a.tolist() for a in figures))]
        for row, name in zip(rows, self.classes):
            row |= {"class_name": name, "marginal": self.marginal}
        return rows


async def score(
    engine: Engine, x: np.ndarray | None, files: Sequence[bytes], k: int, seed_value: int | None, deadline: float | None,
    classes: Sequence[str | bytes | int] = (),
) -> Scores:  # fmt: skip
    """Per image, the ELBO, its terms and the IWAE bound; a conditional model's given the classes
    asked for, else the marginal log p(x) = logsumexp_y [log p(x|y) + log p(y)], the ELBO terms
    then of the most probable class (every class scored: K times the work)."""
    k = count(k, "importance_samples", engine.limits.max_importance_samples)
    n = request_rows(engine, x, files)
    given = class_list(engine, classes, n, "classes")
    marginal = engine.classes and given is None
    cost = engine.costs.classify(n, engine.classes, k) if marginal else engine.costs.score(n, k)
    async with engine.admit("score", cost, f"Score of {n} images", deadline):
        x = await request_images(engine, x, files)
        s = seed(seed_value)
        if marginal:
            figures = await engine.class_scores(x, k, s, deadline)
            joint, labels = bayes(engine, figures["log_likelihood"])
            terms = {name: values[np.arange(n), labels] for name, values in figures.items()}
            terms["log_likelihood"] = logsumexp(joint)
        else:
            labels = given
            terms = await engine.score(x, k, s, deadline, weights(engine, labels))
    bits = engine.spec.distribution.bits_per_dim(-terms["log_likelihood"], math.prod(engine.spec.image_shape))
    names = tuple(class_names(engine, labels))
    return Scores(terms["elbo"], terms["reconstruction"], terms["kl"], terms["log_likelihood"], bits, k, s, names, bool(marginal))


def logsumexp(a: np.ndarray) -> np.ndarray:
    """log sum exp along the last axis, in float64."""
    top = a.max(-1)
    return top + np.log(np.exp(a - top[..., None]).sum(-1))


def log_softmax(a: np.ndarray) -> np.ndarray:
    """log of a's softmax along its last axis, in float64."""
    return a - logsumexp(a)[..., None]


@dataclass(frozen=True)
class Classified:
    """Bayes' rule from a conditional model's own likelihoods, per image: p(y|x) [N, K], the
    per-class IWAE bounds log p(x|y) [N, K] and the marginal log p(x) [N], in nats."""

    probabilities: np.ndarray
    class_log_likelihoods: np.ndarray
    log_likelihood: np.ndarray
    classes: tuple[str, ...]  # the most probable class of each image
    importance_samples: int
    seed: int

    def rows(self) -> list[dict[str, Any]]:
        """One dict per image, by the names every front end answers with."""
        figures = zip(self.probabilities.tolist(), self.class_log_likelihoods.tolist(), self.log_likelihood.tolist(), self.classes)
        names = ("probabilities", "class_log_likelihoods", "log_likelihood", "class_name")
        return [dict(zip(names, values)) for values in figures]


async def classify(
    engine: Engine, x: np.ndarray | None, files: Sequence[bytes], k: int, seed_value: int | None, deadline: float | None
) -> Classified:  # fmt: skip
    """p(y|x) = p(x|y) p(y) / p(x) with each log p(x|y) the IWAE bound of k draws, the same draws
    for every class; FailedPrecondition for a model that is not conditional (it has no p(x|y))."""
    if not engine.classes:
        why = "it has no classes" if not engine.spec.classes else "it was trained without --conditional, so it has no p(x|y)"
        raise FailedPrecondition(f"model {engine.spec.name} cannot classify: {why}")
    k = count(k, "importance_samples", engine.limits.max_importance_samples)
    n = request_rows(engine, x, files)
    async with engine.admit("classify", engine.costs.classify(n, engine.classes, k), f"Classify of {n} images", deadline):
        x = await request_images(engine, x, files)
        s = seed(seed_value)
        per_class = (await engine.class_scores(x, k, s, deadline))["log_likelihood"]
    joint, labels = bayes(engine, per_class)
    return Classified(np.exp(log_softmax(joint)), per_class, logsumexp(joint), tuple(class_names(engine, labels)), k, s)


@dataclass(frozen=True)
class Edited:
    images: np.ndarray
    sources: tuple[str, ...]  # each image's class it was moved from
    target: str
    strength: float


async def edit(
    engine: Engine, x: np.ndarray | None, files: Sequence[bytes], sources: Sequence[str | bytes | int],
    target: str | bytes | int, strength: float | None, deadline: float | None,
    names: tuple[str, str, str, str] = ("source_classes", "target_class", "strength", "image_files"),
) -> Edited:  # fmt: skip
    """Images moved from their classes (`sources`, else Classify's, or for an unconditional model
    the nearest class mean's) towards `target` by `strength` in [0, 1] (default 1): a conditional
    model's class input moves, an unconditional model's latent moves by the class means' difference."""
    if engine.class_means is None and not engine.classes:
        why = "it has no classes" if not engine.spec.classes else "its export has no class means (class_means.npy)"
        raise FailedPrecondition(f"model {engine.spec.name} cannot edit: {why}")
    s = 1.0 if strength is None else float(strength)
    if not math.isfinite(s) or not 0.0 <= s <= 1.0:
        raise BadRequest(f"{names[2]}: {s}; must be a number in [0, 1]")
    n = request_rows(engine, x, files)
    given = class_list(engine, sources, n, names[0], conditional=False)
    if target in ("", b"", None):
        raise BadRequest(f"{names[1]}: required; the classes are {', '.join(engine.spec.classes)}")
    goal = class_index(engine, target, names[1])
    cost = with_implied(engine, engine.costs.reconstruct(n), n, given)
    async with engine.admit("edit", cost, f"Edit of {n} images", deadline):
        images = await request_images(engine, x, files, files_field=names[3])
        labels = given if given is not None else await implied_classes(engine, images, deadline)
        edited = await engine.edit(images, labels, goal, s, deadline)
    return Edited(edited, tuple(class_names(engine, labels)), engine.spec.classes[goal], s)


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
        "conditional": s.conditional, "class_prior": np.exp(engine.log_prior).tolist(),
        "editable": engine.class_means is not None or bool(engine.classes),
    }  # fmt: skip
