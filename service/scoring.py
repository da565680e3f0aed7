"""Score's figures, streamed: the n x k posterior draws of a request are decoded a chunk of rows at a
time and folded into running sums per image, so no request's whole decoder output is ever held; a
large k costs time, not memory.

Rows run image-major (image i's draws j = 0..k-1, then image i + 1's), and a chunk is a contiguous
range of them. The noise comes from one generator drawn in that order, so a chunked request draws
exactly the noise `normal(seed, (n, k, D))` would, and any chunking gives the same figures up to
float rounding.

Per image, in nats, with log w_j = log p(x|z_j) + log p(z_j) - log q(z_j|x):
  reconstruction = -mean_j log p(x|z_j)
  KL             = the closed form under N(0, I); mean_j (log q - log p) under a flow
  ELBO           = -(reconstruction + KL)
  log-likelihood = logsumexp_j log w_j - log k (the IWAE bound), as a running max and sum of exps.
"""

from __future__ import annotations

import math

import numpy as np

from service.likelihood import LOG_2PI, Likelihood

SCORE_CHUNK_VALUES = 1 << 20  # float64 values per slice of the likelihood's arithmetic (8 MiB)
CHUNK_BYTES = 16 << 20  # decoder outputs (float32) per chunk of rows submitted at once
IN_FLIGHT = 2  # chunks queued at once: the next decodes while one is summed


def chunk_rows(values_per_row: int, total: int) -> int:
    """Rows per chunk: CHUNK_BYTES of decoder outputs, at least one row, at most the request."""
    return max(1, min(total, CHUNK_BYTES // (4 * max(1, values_per_row))))


class ScoreSums:
    """The running per-image sums of one Score request."""

    def __init__(self, x: np.ndarray, mu: np.ndarray, logvar: np.ndarray, k: int, likelihood: Likelihood,
                 flow: bool) -> None:  # fmt: skip
        n = len(x)
        self.x, self.mu, self.logvar, self.k = x, mu, logvar, k
        self.likelihood, self.flow = likelihood, flow
        self.log_px = np.zeros(n)  # sum over draws of log p(x|z)
        self.log_q_minus_p = np.zeros(n)  # sum over draws of log q(z|x) - log p(z), a flow's KL
        self.w_max = np.full(n, -np.inf)  # logsumexp of log w, as max + log(sum(exp(log w - max)))
        self.w_sum = np.zeros(n)

    def add(self, start: int, params: np.ndarray, eps: np.ndarray, z: np.ndarray, log_pz: np.ndarray | None) -> None:
        """Fold in rows start.. of the request: the decoder's `params` [r, P, H, W], the draws' noise
        `eps` and latents `z` [r, D] (float64), and under a flow log p(z) [r]."""
        image = (start + np.arange(len(params))) // self.k
        log_px = self._log_px(image, params)
        log_qz = -0.5 * (LOG_2PI + self.logvar[image] + eps**2).sum(-1)
        if log_pz is None:
            log_pz = -0.5 * (LOG_2PI + z**2).sum(-1)
        log_w = log_px + log_pz - log_qz
        # Rows are image-major, so each image's rows in the chunk are one run: sums per run.
        starts = np.r_[0, np.flatnonzero(np.diff(image)) + 1]
        ids = image[starts]
        self.log_px[ids] += np.add.reduceat(log_px, starts)
        if self.flow:
            self.log_q_minus_p[ids] += np.add.reduceat(log_qz - log_pz, starts)
        top = np.maximum(self.w_max[ids], np.maximum.reduceat(log_w, starts))
        exps = np.exp(log_w - np.repeat(top, np.diff(np.r_[starts, len(log_w)])))
        self.w_sum[ids] = self.w_sum[ids] * np.exp(self.w_max[ids] - top) + np.add.reduceat(exps, starts)
        self.w_max[ids] = top

    def _log_px(self, image: np.ndarray, params: np.ndarray) -> np.ndarray:
        """log p(x|z) per row in float64, a slice of rows at a time, so the temporaries stay near
        SCORE_CHUNK_VALUES whatever the chunk."""
        step = max(1, SCORE_CHUNK_VALUES // max(1, math.prod(params.shape[1:])))
        return np.concatenate([
            self.likelihood.log_prob(self.x[image[j : j + step]], params[j : j + step])
            for j in range(0, len(params), step)
        ])  # fmt: skip

    def figures(self) -> dict[str, np.ndarray]:
        reconstruction = -self.log_px / self.k
        if self.flow:
            kl = self.log_q_minus_p / self.k
        else:
            kl = -0.5 * (1 + self.logvar - self.mu**2 - np.exp(self.logvar)).sum(-1)
        return {
            "elbo": -(reconstruction + kl),
            "reconstruction": reconstruction,
            "kl": kl,
            "log_likelihood": self.w_max + np.log(self.w_sum) - math.log(self.k),
        }
