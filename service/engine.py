"""One served model version's operations: what each call computes, on numpy arrays, through its
graphs' batchers. Inputs arrive checked: `service.dataplane` checks them and is the only caller.

Everything random is drawn here from a per-request generator seeded by the request, before any
batching, so a seeded answer is the same whatever other requests share its batch.

The prior p(z) is N(0, I), or for a flow model p(z) = f_# N(0, I) with f and f^-1 as two more
graphs (prior_sample: eps -> z, prior_density: z -> eps, log p(z)), each behind its own batcher.
Sample and Interpolate reach the prior through `prior_z` (the identity under N(0, I): no graph,
no batcher hop), Score and a spherical Interpolate through `prior_density` (a flow's only; under
N(0, I) Score keeps its closed forms), so a standard-prior model is computed exactly as before
the flow existed.
"""

from __future__ import annotations

import asyncio
import collections
import hashlib
import itertools
import math
import secrets
import threading
from collections.abc import Awaitable, Callable
from concurrent.futures import Executor
from dataclasses import dataclass

import numpy as np

from service.batcher import BACKGROUND_SHARE, INLINE_SECONDS, Batcher
from service.costs import F32, Costs
from service.imaging import ImageError, load_image
from service.metrics import Metrics
from service.manifest import ModelSpec, RepositoryError, with_classes
from service.memory import Hold, MemoryBudget
from service.runtime import CPU, Runtime
from service.scoring import IN_FLIGHT, ScoreSums, chunk_rows, gaussian_log_ratio
from service.errors import BadRequest
from service.warmup import BATCH_SHARE

# An image file sent to the server may hold at most this many pixels (Pillow's own limit is 89M): a
# small compressed file can claim a huge image, and decoding one takes several copies of it in memory.
MAX_FILE_PIXELS = 40_000_000
SESSION_BYTES = 32 << 20  # what onnxruntime holds per version beyond its graphs' weights, at most


@dataclass(frozen=True)
class BatchSettings:
    """What configures one model's batchers: the flags, overridden per model by its serving.json."""

    max_batch_rows: int = 256
    max_batch_delay_ms: float = 2.0
    max_queue_rows: int = 32768
    background_share: float = BACKGROUND_SHARE  # of a batch's time, Score's and Classify's draws' beside interactive calls
    batching: bool = True  # off: every request is computed alone (for comparison)
    adaptive_delay: bool = True  # skip the batch delay while requests come alone
    warmup_batch_sizes: tuple[int, ...] = ()  # (): 1, 2 and max_batch_rows


@dataclass(frozen=True)
class RequestLimits:
    """What one request may ask for, the same for every model."""

    max_request_rows: int = 1024  # images or latents in one request
    max_importance_samples: int = 5000
    max_interpolation_steps: int = 1024


def new_seed(seed: int | None) -> int:
    """The request's seed, or a new one of 53 bits: JSON readers that hold numbers as doubles
    (JavaScript) read it exactly, so a browser can send it back and get the same images."""
    return secrets.randbits(53) if seed is None else int(seed)


_generators = threading.local()


# The stream of a Sample's classes drawn from p(y): apart from every image's noise stream (`noise_stream`).
CLASS_STREAM = 1 << 100


def noise_stream(seed: int, stream: int = 0) -> np.random.Generator:
    """The generator of a seed's noise: PCG64 with its 128-bit state and increment taken from
    BLAKE2b of the seed, for draws in order (Score's chunks). `stream` (< 2^128, the hash's salt)
    gives further independent streams of the same seed; stream 0 is the seed's own."""
    generator = np.random.Generator(np.random.PCG64(0))
    _seed_state(generator, seed, stream)
    return generator


def normal(seed: int, shape: tuple[int, ...], dtype: type = np.float32) -> np.ndarray:
    """Standard normal noise, a function of the seed alone (`noise_stream`'s first draws). Setting the
    state of a per-thread generator is cheaper than a new one, and this runs on the event loop for
    every Sample."""
    generator = getattr(_generators, "generator", None)
    if generator is None:
        generator = _generators.generator = np.random.Generator(np.random.PCG64(0))
    _seed_state(generator, seed)
    return generator.standard_normal(shape, dtype=dtype)


def _seed_state(generator: np.random.Generator, seed: int, stream: int = 0) -> None:
    digest = hashlib.blake2b(seed.to_bytes(8, "little"), digest_size=32, salt=stream.to_bytes(16, "little")).digest()
    generator.bit_generator.state = {
        "bit_generator": "PCG64",
        "state": {"state": int.from_bytes(digest[:16], "little"), "inc": int.from_bytes(digest[16:], "little") | 1},
        "has_uint32": 0,
        "uinteger": 0,
    }


def slerp(a: np.ndarray, b: np.ndarray, t: np.ndarray) -> np.ndarray:
    """Spherical interpolation between vectors a and b [D] at fractions t [S]: [S, D]."""
    cos = float(np.dot(a, b) / (np.linalg.norm(a) * np.linalg.norm(b) + 1e-12))
    omega = math.acos(min(1.0, max(-1.0, cos)))
    if abs(math.sin(omega)) < 1e-6:  # (anti)parallel: no unique great circle, so a straight line
        return lerp(a, b, t)
    t = t[:, None]
    return (np.sin((1 - t) * omega) * a + np.sin(t * omega) * b) / math.sin(omega)


def lerp(a: np.ndarray, b: np.ndarray, t: np.ndarray) -> np.ndarray:
    t = t[:, None]
    return (1 - t) * a + t * b


def one_hot(labels: np.ndarray, classes: int) -> np.ndarray:
    """Class weights [N, K] float32 of class indices [N]."""
    return np.eye(classes, dtype=np.float32)[labels]


class Engine:
    """One served model: its spec, its graphs behind batchers, and the operations of the API."""

    def __init__(
        self, spec: ModelSpec, runtime: Runtime, metrics: Metrics, batch: BatchSettings, limits: RequestLimits,
        costs: Costs, memory: MemoryBudget, footprint: int = 0, executor: Executor | None = None,
    ) -> None:  # fmt: skip
        """`batch` as warm-up capped it; `costs` what each operation holds, admitted by `memory`, of
        which the loaded version holds `footprint` (sessions and batches)."""
        self.spec = spec
        self.runtime = runtime
        self.batch = batch
        self.limits = limits
        self.costs = costs
        self.memory = memory
        self.footprint = footprint
        self.active_calls = 0  # calls running on this engine; a retired engine closes when it reaches 0
        # A conditional model's classes K (its graphs' rows end with K class weights; 0: unconditional),
        # log p(y), and, for any model trained with classes, each class's mean latent (for edits).
        self.classes = len(spec.classes) if spec.conditional else 0
        self.log_prior = np.asarray(spec.class_log_prior, np.float64)
        self.class_means = np.load(spec.folder / spec.class_means_file) if spec.class_means_file else None
        if self.class_means is not None and self.class_means.shape != (len(spec.classes), spec.latent_dim):
            raise RepositoryError(f"{spec.folder / spec.class_means_file}: shape {list(self.class_means.shape)}; "
                                  f"one mean latent per class, [{len(spec.classes)}, {spec.latent_dim}]")  # fmt: skip
        # The decoder's output as an image in [0, 1]: sigmoid of logits, the clipped Gaussian mean, or the
        # clipped mean of a logistic mixture; a fixed function of z, so batching never changes it.
        self.mean_image = spec.distribution.image
        self._batch_image = self.mean_image if runtime.images_per_batch(spec.distribution) else None
        common = dict(
            metrics=metrics, labels={"model": spec.name, "version": str(spec.version)}, executor=executor,
            max_rows=batch.max_batch_rows, max_delay=batch.max_batch_delay_ms / 1000,
            max_queue_rows=batch.max_queue_rows, merge=batch.batching, adaptive_delay=batch.adaptive_delay,
            background_share=batch.background_share,
            inline_seconds=INLINE_SECONDS if runtime.provider == CPU else 0.0,
        )  # fmt: skip
        self.encoder = Batcher("encoder", runtime.encoder.run, **common)  # type: ignore[arg-type]
        self.decoder = Batcher("decoder", self._decode_batch, **common)  # type: ignore[arg-type]
        # A flow's prior_sample and prior_density, by role: each its own batcher, graph label its role.
        self.priors = {
            role: Batcher(role, graph.run, **common) for role, graph in runtime.priors.items()  # type: ignore[arg-type]
        }
        # The graphs of the model's family beyond these (a hierarchical model's posterior), by role.
        self.family = {
            role: Batcher(role, graph.run, **common) for role, graph in runtime.family.items()  # type: ignore[arg-type]
        }

    def admit(self, operation: str, cost: int, what: str, deadline: float | None) -> Hold:
        """`async with engine.admit(...)`: hold the request's bytes of the server's memory budget
        while it runs (`service.memory`); its batches' working memory is the version's."""
        return self.memory.hold(cost, operation, what, deadline, self.spec.name)

    @property
    def batchers(self) -> list[Batcher]:
        return [self.encoder, self.decoder, *self.priors.values(), *self.family.values()]

    def start(self) -> None:
        for batcher in self.batchers:
            batcher.start()

    async def close(self) -> None:
        for batcher in self.batchers:
            await batcher.close()

    def _decode_batch(self, z: np.ndarray) -> list[np.ndarray]:
        """The decoder graph on one batch, on the inference thread: its parameters and their images,
        from the graph where it gives them, else computed here where cheap (once per batch rather
        than once per request on the event loop)."""
        return self.runtime.decode(z, self._batch_image)

    async def decoder_outputs(self, z: np.ndarray, deadline: float | None = None) -> list[np.ndarray]:
        """The decoder graph's outputs as exported: the likelihood's parameters, and their images
        where the graph gives them."""
        outputs = await self.decoder.submit(z, deadline)
        return outputs[: len(self.runtime.decoder.output_names)]

    async def decode(self, z: np.ndarray, deadline: float | None = None, y: np.ndarray | None = None) -> np.ndarray:
        """Images of latents [N, D] (a conditional model's: under class weights y [N, K]). More
        latents than a batch go a batch at a time, each queued once
        the one before it is images, so a request never holds more than one batch's decoder outputs
        beside its images (a logistic mixture's are 12 times its images' size), and is refused
        (a full queue) at most once."""
        z = with_classes(z, y)
        rows = self.batch.max_batch_rows
        if len(z) <= rows:
            return await self._images(z, deadline)
        images = np.empty((len(z), *self.spec.image_shape), np.float32)
        for start in range(0, len(z), rows):
            part = await self._images(z[start : start + rows], deadline)
            images[start : start + len(part)] = part
        return images

    async def _images(self, z: np.ndarray, deadline: float | None) -> np.ndarray:
        params, *images = await self.decoder.submit(z, deadline)
        if images:
            return images[0]
        return await asyncio.to_thread(self.mean_image, params)

    def prepare_files(self, files: list[bytes], field: str) -> np.ndarray:
        """Encoded image files of any format and size as the model's images [N, C, H, W] float32 in
        [0, 1], prepared exactly as training prepared its folder (model.json's preprocessing).
        BadRequest names the file that is no readable image, or too large to decode here."""
        prep = self.spec.preprocessing
        if prep is None:
            raise BadRequest(f"{field}: this model's images ({self.spec.image_shape}) cannot come from image files; send a tensor")
        pixels = np.empty((len(files), prep.channels, *prep.size), np.uint8)
        for i, data in enumerate(files):
            try:
                pixels[i] = load_image(data, prep, max_pixels=MAX_FILE_PIXELS)
            except ImageError as err:
                raise BadRequest(f"{field}[{i}]: {err}" if len(files) > 1 or field == "image_files" else f"{field}: {err}") from None
        return pixels.astype(np.float32) / np.float32(255.0)

    async def images_from_files(self, files: list[bytes], field: str) -> np.ndarray:
        """`prepare_files` on a worker thread: a large JPEG takes milliseconds the event loop must not spend."""
        return await asyncio.to_thread(self.prepare_files, files, field)

    async def encode(
        self, x: np.ndarray, deadline: float | None = None, y: np.ndarray | None = None
    ) -> tuple[np.ndarray, np.ndarray]:
        """mu and log-variance per image (a conditional model's: given class weights y [N, K], in u,
        its latent standardized under the class's prior)."""
        mu, logvar = await self.encoder.submit(with_classes(x, y), deadline)
        return mu, logvar

    async def posterior_sample(
        self, x: np.ndarray, mu: np.ndarray, sigma: np.ndarray, seed: int, deadline: float | None = None,
        y: np.ndarray | None = None,
    ) -> np.ndarray:  # fmt: skip
        """One draw from q(z|x) per image x (encoded as mu, sigma), a function of the seed: here
        z = mu + eps * sigma, eps ~ N(0, I)."""
        return mu + normal(seed, mu.shape) * sigma

    def latents(self, n: int, seed: int, temperature: float | np.ndarray) -> np.ndarray:
        """Base noise eps ~ N(0, T^2), [n, D]: a function of the seed alone, T one temperature or
        one per latent value [D]. Under N(0, I) these are the latents to decode; under a flow,
        `prior_z` maps them to the latents."""
        return normal(seed, (n, self.spec.latent_dim)) * np.asarray(temperature, np.float32)

    async def prior_z(self, eps: np.ndarray, deadline: float | None = None) -> np.ndarray:
        """The latents for base noise eps [n, D]: eps itself under N(0, I) (no graph, no batcher hop),
        z = f(eps) from the prior_sample graph under a flow."""
        if not self.priors:
            return eps
        (z,) = await self.priors["prior_sample"].submit(eps, deadline)
        return z

    async def prior_density(
        self, z: np.ndarray, deadline: float | None = None, background: bool = False
    ) -> tuple[np.ndarray, np.ndarray]:
        """eps = f^-1(z) [n, D] and log p(z) [n] (float64, nats) from a flow's prior_density graph.
        A flow model's only: under N(0, I), eps is z and Score uses the closed forms."""
        eps, log_prob = await self.priors["prior_density"].submit(z, deadline, background)
        return eps, log_prob.astype(np.float64)

    async def generate(self, eps: np.ndarray, deadline: float | None = None, y: np.ndarray | None = None) -> np.ndarray:
        """Images for base noise eps: decode(f(eps)), f the identity under N(0, I)."""
        return await self.decode(await self.prior_z(eps, deadline), deadline, y)

    async def sample(
        self, n: int, seed: int, temperature: float | np.ndarray, deadline: float | None = None, y: np.ndarray | None = None
    ) -> np.ndarray:  # fmt: skip
        eps = self.latents(n, seed, temperature)
        if not self.priors:  # under N(0, I) the noise is the latents: one hop fewer on every small call
            return await self.decode(eps, deadline, y)
        return await self.generate(eps, deadline, y)

    def draw_classes(self, n: int, seed: int) -> np.ndarray:
        """n classes [n] drawn from p(y) (the training set's frequencies), a function of the seed
        alone, from a stream apart from the images' noise: a Sample asked for no class."""
        return noise_stream(seed, CLASS_STREAM).choice(self.classes, size=n, p=np.exp(self.log_prior) / np.exp(self.log_prior).sum())

    async def reconstruct(self, x: np.ndarray, deadline: float | None = None, y: np.ndarray | None = None) -> np.ndarray:
        mu, _ = await self.encode(x, deadline, y)
        return await self.decode(mu, deadline, y)

    async def interpolate(
        self, start: np.ndarray, end: np.ndarray, steps: int, spherical: bool, deadline: float | None = None,
        ends_y: tuple[np.ndarray, np.ndarray] | None = None,
    ) -> tuple[np.ndarray, np.ndarray]:  # fmt: skip
        """Latents along the path (end points included) and their images; a conditional model's
        class weights go along a straight line from the start's class to the end's (`ends_y`).

        A spherical path keeps to the shell where a Gaussian's mass lies; under a flow that Gaussian
        is the base N(0, I), so the great circle runs between the end points' eps and is mapped
        into z through f. A linear path is a straight line in z under either prior."""
        t = np.linspace(0.0, 1.0, steps, dtype=np.float32)
        if spherical and self.priors:
            path = await self._flow_great_circle(start, end, t, deadline)
        else:
            path = (slerp if spherical else lerp)(start, end, t).astype(np.float32)
        path[0], path[-1] = start, end  # exact end points, whatever rounding (or f(f^-1(z))) did
        y = None if ends_y is None else lerp(*ends_y, t).astype(np.float32)
        return path, await self.decode(path, deadline, y)

    async def edit(
        self, x: np.ndarray, source: np.ndarray, target: int, strength: float, deadline: float | None = None
    ) -> np.ndarray:
        """Images x [N] moved from their classes `source` [N] towards class `target` by `strength`
        in [0, 1]. A conditional model keeps each image's latent (its posterior mean under its class)
        and moves the class weights from the source's to the target's; an unconditional one moves
        the latent by strength x (target's mean latent - source's)."""
        target_y = one_hot(np.full(len(x), target), len(self.spec.classes))
        if self.classes:
            source_y = one_hot(source, self.classes)
            u, _ = await self.encode(x, deadline, source_y)
            return await self.decode(u, deadline, ((1 - strength) * source_y + strength * target_y).astype(np.float32))
        assert self.class_means is not None
        mu, _ = await self.encode(x, deadline)
        shift = strength * (self.class_means[target] - self.class_means[source])
        return await self.decode((mu + shift).astype(np.float32), deadline)

    async def nearest_class(self, x: np.ndarray, deadline: float | None = None) -> np.ndarray:
        """For an unconditional model with class means: each image's class [N] as the one whose
        mean latent lies nearest its posterior mean (it has no p(x|y) to classify by)."""
        assert self.class_means is not None
        mu, _ = await self.encode(x, deadline)
        return ((mu[:, None, :] - self.class_means[None]) ** 2).sum(-1).argmin(-1)

    async def _flow_great_circle(
        self, start: np.ndarray, end: np.ndarray, t: np.ndarray, deadline: float | None
    ) -> np.ndarray:
        """f(slerp(f^-1(start), f^-1(end), t)): [S, D] float32, a copy the caller may write."""
        ends, _ = await self.prior_density(np.stack([start, end]).astype(np.float32), deadline)
        base = slerp(ends[0], ends[1], t).astype(np.float32)
        return np.array(await self.prior_z(base, deadline), dtype=np.float32)

    async def score(
        self, x: np.ndarray, k: int, seed: int, deadline: float | None = None, y: np.ndarray | None = None
    ) -> dict[str, np.ndarray]:  # fmt: skip
        """Per image, in nats: ELBO (averaged over the k samples), its terms, and the IWAE bound
        (`service.scoring`); a conditional model's given class weights y [N, K]. The n x k draws
        (image-major, their noise drawn in that order from the seed) are decoded a chunk of rows at
        a time, IN_FLIGHT chunks queued at once; each chunk's log p(x|z) is taken on the inference
        worker with its batch (`ScoreSums.reducer`), so the request never holds its decoder outputs
        and its arithmetic is shared fairly with the other calls, and the chunks fold into running
        sums. How a chunk's draws are decoded is the family's (`_score_draws`)."""
        stream = noise_stream(seed)
        return await self._score(x, k, y, 1, lambda start, rows: stream.standard_normal((rows, self.spec.latent_dim)), deadline)

    async def class_scores(
        self, x: np.ndarray, k: int, seed: int, deadline: float | None = None, by_position: bool = True
    ) -> dict[str, np.ndarray]:  # fmt: skip
        """Score's figures of each image under every class of a conditional model, [N, K] each: the
        per-class IWAE bounds log p(x|y) that Bayes' rule classifies by. An image's K classes are
        scored on the same k noise draws (its own stream of the seed, `noise_stream(seed, i)`), so
        the classes are compared on equal terms, and a one-image Classify draws what a one-image
        Score does. Without `by_position` every image draws stream 0: its figures then depend on
        the image alone, not on where it lies in the request (an implied class)."""
        n, classes, d = len(x), self.classes, self.spec.latent_dim
        stream: list[np.random.Generator] = []

        def noise(start: int, rows: int) -> np.ndarray:
            """Rows start.. of the (image, class, draw)-major rows, asked for in order: each
            (image, class) item's k draws are the first k of its image's stream."""
            parts, row, stop = [], start, start + rows
            while row < stop:
                item, draw = divmod(row, k)
                if draw == 0:  # a new item: its image's stream from its start
                    stream[:] = [noise_stream(seed, item // classes if by_position else 0)]
                take = min(k - draw, stop - row)
                parts.append(stream[0].standard_normal((take, d)))
                row += take
            return np.concatenate(parts)

        y = np.tile(np.eye(classes, dtype=np.float32), (n, 1))
        figures = await self._score(x, k, y, classes, noise, deadline)
        return {name: values.reshape(n, classes) for name, values in figures.items()}

    async def _score(
        self, x: np.ndarray, k: int, y: np.ndarray | None, per_image: int, noise: Callable[[int, int], np.ndarray],
        deadline: float | None,
    ) -> dict[str, np.ndarray]:  # fmt: skip
        """Score's figures for the items of images x, `per_image` items each (item i is image
        i // per_image, under class weights y[i] where given), k draws per item, their noise rows
        drawn in order by `noise(start, rows)`."""
        total = len(x) * per_image * k
        sums, draws = await self._score_draws(x, k, deadline, y, per_image)
        step = chunk_rows(self.spec.decoder_channels * math.prod(self.spec.image_shape[1:]), total, self.batch.max_queue_rows)

        def launch(start: int) -> asyncio.Future:
            """Draw the chunk's noise (here, in row order: the stream's order) and queue its decoding."""
            item = (start + np.arange(min(step, total - start))) // k
            return asyncio.ensure_future(draws(start, item, noise(start, len(item))))

        starts = iter(range(0, total, step))
        pending = collections.deque([launch(next(starts))])  # alone at first: a full queue refuses the call once
        try:
            while pending:
                chunk = await pending.popleft()
                pending.extend(launch(start) for start in itertools.islice(starts, IN_FLIGHT - len(pending)))
                sums.add(*chunk)
        finally:
            for future in pending:  # an error or a cancelled call: its queued chunks leave the batchers
                future.cancel()
        return sums.figures()

    async def _encode_items(
        self, x: np.ndarray, y: np.ndarray, per_image: int, deadline: float | None
    ) -> tuple[np.ndarray, np.ndarray]:  # fmt: skip
        """mu and log-variance of the items of images x (`per_image` each, under class weights y),
        a batch of items at a time, as background work: a Classify's K items per image never queue
        ahead of interactive calls at once, nor copy its images K times at once."""
        rows, parts = self.batch.max_batch_rows, []
        for start in range(0, len(y), rows):
            items = np.arange(start, min(start + rows, len(y)))
            packed = await asyncio.to_thread(with_classes, x[items // per_image], y[items])
            parts.append(await self.encoder.submit(packed, deadline, background=True))
        return np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts])

    async def _score_draws(
        self, x: np.ndarray, k: int, deadline: float | None, y: np.ndarray | None = None, per_image: int = 1
    ) -> tuple[ScoreSums, Draws]:  # fmt: skip
        """Score's sums for the items of x (`_score`), and the function that decodes a chunk of
        their draws: start, the rows' items and their noise eps -> (start, log p(x|z),
        log p(z) - log q(z|x)). A flat VAE encodes each item once and draws z = mu + eps sigma;
        under N(0, I) (a conditional model's u included) its KL is the closed form, under a flow
        log p(z) comes from the prior_density graph, computed beside the decoder (two batchers)."""
        mu, logvar = await (self.encode(x, deadline, y) if per_image == 1 else self._encode_items(x, y, per_image, deadline))
        mu, logvar = mu.astype(np.float64), logvar.astype(np.float64)
        kl = None if self.priors else -0.5 * (1 + logvar - mu**2 - np.exp(logvar)).sum(-1)
        sigma = np.exp(0.5 * logvar)
        sums = ScoreSums(x.astype(np.float64), k, self.spec.distribution, kl, per_image)

        async def draws(start: int, item: np.ndarray, eps: np.ndarray) -> tuple[int, np.ndarray, np.ndarray]:
            z = mu[item] + eps * sigma[item]
            # bulk work: the batches serve interactive calls first (`BatchPolicy`)
            rows = with_classes(z.astype(np.float32), None if y is None else y[item])
            reduce = sums.reducer(item, split=self.runtime.decoder.in_halves)
            decoded = self.decoder.submit(rows, deadline, background=True, reduce=reduce)
            if not self.priors:
                (log_px,), log_pz = await decoded, None
            else:
                (log_px,), (_, log_pz) = await asyncio.gather(decoded, self.prior_density(rows, deadline, background=True))
            return start, log_px, gaussian_log_ratio(eps, z, logvar[item], log_pz)

        return sums, draws


Draws = Callable[[int, np.ndarray, np.ndarray], Awaitable[tuple[int, np.ndarray, np.ndarray]]]


def graph_bytes(spec: ModelSpec) -> int:
    """The bytes of a version's graph files: what its sessions hold at least."""
    return sum(spec.graph(role).stat().st_size for role in ("encoder", "decoder", *spec.prior_graphs, *spec.family_graphs))


def load_estimate(spec: ModelSpec, batch: BatchSettings, budget: float) -> int:
    """What loading a version may take before it is measured: its sessions (twice the graph files,
    and onnxruntime's own), and its warm-up's largest batch, which warm-up keeps within a share of
    the budget."""
    c, h, w = spec.image_shape
    largest_batch = 3 * batch.max_batch_rows * F32 * (spec.decoder_channels + c) * h * w  # outputs, twice that working
    return 2 * graph_bytes(spec) + SESSION_BYTES + int(min(largest_batch, BATCH_SHARE * budget))
