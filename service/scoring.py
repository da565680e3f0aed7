"""Score's figures, streamed: the n x k posterior draws of a request are decoded a chunk of rows at a
time and folded into running sums per image, so no request's whole decoder output is ever held; a
large k costs time, not memory.

Rows run image-major (image i's draws j = 0..k-1, then image i + 1's), and a chunk is a contiguous
range of them. The noise comes from one generator drawn in that order, so a chunked request draws
exactly the noise `normal(seed, (n, k, D))` would, and any chunking gives the same figures up to
float rounding.

Per image, in nats, with log w_j = log p(x|z_j) + log p(z_j) - log q(z_j|x):
  reconstruction = -mean_j log p(x|z_j)
  KL             = the closed form for a flat VAE under N(0, I); else mean_j (log q - log p)
  ELBO           = -(reconstruction + KL)
  log-likelihood = logsumexp_j log w_j - log k (the IWAE bound), as a running max and sum of exps.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import numpy as np

from service.batcher import Reduce
from service.likelihood import LOG_2PI, Likelihood

SCORE_CHUNK_VALUES = 1 << 20  # float64 values per slice of the likelihood's arithmetic (8 MiB)
CHUNK_BYTES = 16 << 20  # decoder outputs (float32) per chunk of rows submitted at once
IN_FLIGHT = 2  # chunks queued at once: the next decodes while one is summed


# Runs fn(start, stop) over rows 0..n, perhaps in two halves at once (`Graph.in_halves`).
Split = Callable[[Callable[[int, int], list[np.ndarray]], int], list[np.ndarray]]


def chunk_rows(values_per_row: int, total: int, queue_rows: int) -> int:
    """Rows per chunk: CHUNK_BYTES of decoder outputs, at least one row, at most the request, and at
    most a quarter of the graph's queue bound (`queue_rows`), so the chunks in flight always fit
    the queue beside other calls' rows."""
    return max(1, min(total, queue_rows // 4, CHUNK_BYTES // (4 * max(1, values_per_row))))


class ScoreSums:
    """The running per-image sums of one Score request."""

    def __init__(
        self, x: np.ndarray, k: int, likelihood: Likelihood, kl: np.ndarray | None = None, per_image: int = 1
    ) -> None:  # fmt: skip
        """Sums per item, `per_image` items of each image of `x` (float64; a conditional model's
        Classify scores each image under every class), `kl` their closed-form KL where the model
        has one (a flat VAE under N(0, I)); without it the KL is the draws' mean of
        log q(z|x) - log p(z)."""
        n = len(x) * per_image
        self.x, self.k, self.likelihood, self.kl, self.per_image = x, k, likelihood, kl, per_image
        self.log_px = np.zeros(n)  # sum over draws of log p(x|z)
        self.log_q_minus_p = np.zeros(n)  # sum over draws of log q(z|x) - log p(z)
        self.w_max = np.full(n, -np.inf)  # logsumexp of log w, as max + log(sum(exp(log w - max)))
        self.w_sum = np.zeros(n)

    def add(self, start: int, log_px: np.ndarray, log_ratio: np.ndarray) -> None:
        """Fold in rows start.. of the request: each draw's log p(x|z) (`log_px`) and
        log p(z) - log q(z|x) [r] (float64)."""
        image = (start + np.arange(len(log_px))) // self.k
        log_w = log_px + log_ratio
        # Rows are image-major, so each image's rows in the chunk are one run: sums per run.
        starts = np.r_[0, np.flatnonzero(np.diff(image)) + 1]
        ids = image[starts]
        self.log_px[ids] += np.add.reduceat(log_px, starts)
        self.log_q_minus_p[ids] -= np.add.reduceat(log_ratio, starts)
        top = np.maximum(self.w_max[ids], np.maximum.reduceat(log_w, starts))
        exps = np.exp(log_w - np.repeat(top, np.diff(np.r_[starts, len(log_w)])))
        self.w_sum[ids] = self.w_sum[ids] * np.exp(self.w_max[ids] - top) + np.add.reduceat(exps, starts)
        self.w_max[ids] = top

    def reducer(self, item: np.ndarray, keep: int = 0, split: Split | None = None) -> Reduce:
        """What a chunk of draws keeps of its graph's outputs (`Batcher.submit`'s reduce): log p(x|z)
        per row [r] float64 in place of the likelihood's parameters (the first output), and the
        `keep` outputs after them, for a chunk whose rows are of these items. It runs on the
        inference worker with the batch, so Score's arithmetic is shared with the other calls as
        its rows are; `split` (the graph's `in_halves`) runs it in two halves at once where the
        graph's batches do."""

        def reduce(first: int, outputs: list[np.ndarray]) -> list[np.ndarray]:
            params, *rest = outputs
            rows = item[first : first + len(params)]
            # Two halves at once take half a slice each: the arithmetic's memory is one slice's either way.
            values = SCORE_CHUNK_VALUES // (2 if split is not None else 1)
            part = lambda start, stop: [self.log_px_of(rows[start:stop], params[start:stop], values)]  # noqa: E731
            (log_px,) = split(part, len(params)) if split is not None else part(0, len(params))
            return [log_px, *rest[:keep]]

        return reduce

    def log_px_of(self, item: np.ndarray, params: np.ndarray, values: int = SCORE_CHUNK_VALUES) -> np.ndarray:
        """log p(x|z) per row in float64 for the decoder's `params` [r, P, H, W] of these items, a
        slice of rows at a time, so the temporaries stay near `values` whatever the chunk."""
        step = max(1, values // max(1, math.prod(params.shape[1:])))
        image = item // self.per_image
        return np.concatenate([
            self.likelihood.log_prob(self.x[image[j : j + step]], params[j : j + step])
            for j in range(0, len(params), step)
        ])  # fmt: skip

    def figures(self) -> dict[str, np.ndarray]:
        reconstruction = -self.log_px / self.k
        kl = self.log_q_minus_p / self.k if self.kl is None else self.kl
        return {
            "elbo": -(reconstruction + kl),
            "reconstruction": reconstruction,
            "kl": kl,
            "log_likelihood": self.w_max + np.log(self.w_sum) - math.log(self.k),
        }


def gaussian_log_ratio(eps: np.ndarray, z: np.ndarray, logvar: np.ndarray, log_pz: np.ndarray | None) -> np.ndarray:
    """log p(z) - log q(z|x) for z = mu + eps sigma drawn from a diagonal Gaussian q of log-variance
    `logvar` (rows as eps's), with log p(z) given (a flow's) or N(0, I)'s."""
    log_qz = -0.5 * (LOG_2PI + logvar + eps**2).sum(-1)
    if log_pz is None:
        log_pz = -0.5 * (LOG_2PI + z**2).sum(-1)
    return log_pz - log_qz
