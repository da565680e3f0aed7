"""What one request of each operation holds in bytes while it runs, before it runs: its arrays
(inputs, its rows of a batch's outputs, the answer being encoded) from the model's shapes, and the
per-request arithmetic measured at warm-up (`measure`). What a batch of each graph takes is the
version's to hold (`Costs.batches`): onnxruntime's arena keeps it between batches, and queued rows
take none. Score streams its draws (`service.scoring`), so its cost does not grow with k.
`service.memory` admits a request by this cost.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import TypeVar

from service import memory

F32 = 4
T = TypeVar("T")


@dataclass(frozen=True)
class Work:
    """The peak bytes one run takes on `rows` rows, above what the process held before it:
    fixed + per_row x rows (outputs included)."""

    fixed: int = 0
    per_row: int = 0

    def at(self, rows: int) -> int:
        return self.fixed + self.per_row * rows

    @staticmethod
    def fit(runs: list[tuple[int, int | None]], floor_per_row: int) -> Work:
        """The line through measured (rows, bytes) runs, the smallest and the largest; where peaks
        cannot be measured, or the runs say less than the outputs alone take, `floor_per_row` (the
        outputs' bytes) per row from twice that: one copy made by the graph, one handed back."""
        known = sorted((rows, peak) for rows, peak in runs if peak is not None)
        fallback = Work(0, 2 * floor_per_row)
        if len(known) < 2 or known[-1][0] == known[0][0]:
            return fallback
        (r0, p0), (r1, p1) = known[0], known[-1]
        per_row = max(floor_per_row, (p1 - p0) // (r1 - r0))
        return Work(max(0, p0 - per_row * r0), per_row)


def measure(run: Callable[[], T]) -> tuple[T, int | None]:
    """`run()` and the process's peak resident memory during it above what it held before; None
    where peaks cannot be measured. Measured in the loading thread while the server may serve other
    models: their memory moves the figure too, so warm-up runs go where the most memory is at stake."""
    if not memory.peak_from_now():
        return run(), None
    before = memory.resident()
    result = run()
    return result, max(0, memory.peak() - before)


@dataclass(frozen=True)
class Costs:
    """One model version's bytes: what a batch of its graphs takes, and what a request of each
    operation holds while it runs (its arrays, not its batches' working memory, which the version
    holds: onnxruntime's arena keeps it between batches, and queued rows take none)."""

    image: int  # one image, float32
    latent: int
    params: int  # one row of the decoder's output
    batch_rows: int
    encoder: Work
    decoder: Work  # the decoder graph and, where cheap, its images (one batch's run)
    mean: Work | None  # images from parameters outside the batch (the logistic mixture's mean), per request
    prior: Work | None  # a flow's graphs
    posterior: Work | None  # a hierarchical model's posterior graph (Score's draws and Encode's)
    score_rows: int  # Score's chunk of draws, and how many chunks are in flight at once
    score_in_flight: int
    likelihood: Work  # Score's arithmetic on a slice of a chunk, of at most likelihood_rows rows
    likelihood_rows: int

    def batches(self, rows: int | None = None) -> int:
        """One batch of `rows` (default: the batch limit) of each graph computing at once, and a
        decoder batch's outputs still being read by its requests while the next computes."""
        rows = self.batch_rows if rows is None else rows
        prior = self.prior.at(rows) if self.prior else 0
        posterior = self.posterior.at(rows) if self.posterior else 0
        return self.encoder.at(rows) + self.decoder.at(rows) + prior + posterior + rows * (self.params + self.image)

    def _batch(self, n: int) -> int:
        """A request's rows of the decoder batch it is in, copied out of the graph (parameters and
        images) and kept until it has read them, and a logistic mixture's mean of them, taken per
        request with its temporaries."""
        rows = min(n, self.batch_rows)
        return rows * (self.params + self.image) + (self.mean.at(rows) if self.mean else 0)

    def decode(self, n: int) -> int:
        """n latents in; n images out, and again as the answer's bytes; a batch of them at a time."""
        return n * (self.latent + 2 * self.image) + self._batch(n)

    def decoder_graph(self, n: int) -> int:
        """n latents in, the decoder's outputs as exported (the batches' parts, then joined): its
        parameters and, at most, their images."""
        out = self.params + self.image
        return n * (self.latent + 2 * out) + min(n, self.batch_rows) * out

    def sample(self, n: int) -> int:
        return self.decode(n)

    def received(self, n: int) -> int:
        """n images sent in a request: the message's bytes as gRPC receives them and as the parsed
        message holds them, the array, and its float32 copy."""
        return 4 * n * self.image

    def encode(self, n: int, draw: bool = False) -> int:
        """n images in, mu, sigma and, with `draw`, a draw out (a hierarchical model's draw: its
        images and noise in, the posterior graph's outputs)."""
        drawn = n * (2 * self.image + self.params + 2 * self.latent) if draw and self.posterior else 0
        return self.received(n) + 6 * n * self.latent + drawn

    def reconstruct(self, n: int) -> int:
        """n images in; the encoder, then the decoder."""
        return self.received(n) + self.decode(n)

    def interpolate(self, steps: int) -> int:
        return self.decode(steps)

    def score(self, n: int, k: int) -> int:
        """n images in, and as float64 in the running sums; the chunks of the n x k draws in flight,
        and one more just answered: their noise and latents (float64) and log p(x|z); its rows of
        the batch being reduced to log p(x|z) on the worker (the decoder's outputs, at most a
        batch of them, taken a slice at a time by the likelihood's arithmetic, or two half slices
        at once where batches split). A larger k only makes it take longer."""
        chunk = max(1, min(self.score_rows, n * k))
        chunks = min(self.score_in_flight, -(-n * k // chunk)) + 1
        drawn = self.image if self.posterior else 0  # a hierarchical model's draws carry their images
        reduced = min(self.score_in_flight * chunk, self.batch_rows)
        return (
            self.received(n)
            + 2 * n * self.image
            + chunks * chunk * (5 * self.latent + drawn)
            + reduced * self.params
            + self.likelihood.at(min(reduced, self.likelihood_rows))
        )

    def classify(self, n: int, classes: int, k: int) -> int:
        """n images scored under each of `classes` classes (a conditional model's Classify, and its
        Score without a class): Score's cost for the n x classes items, but the images received and
        held once, and the items packed for the encoder a batch at a time."""
        items = n * classes
        once = self.received(n) + 2 * n * self.image + min(items, self.batch_rows) * self.image
        return self.score(items, k) - self.received(items) - 2 * items * self.image + once

    def batch_limit(self, share: float) -> int:
        """The most rows a batch may hold for `batches()` to stay within `share` bytes (at least one)."""
        if not math.isfinite(share):
            return self.batch_rows
        return max(1, int((share - self.batches(0)) // max(1, self.batches(1) - self.batches(0))))
