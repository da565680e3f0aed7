"""A hierarchical VAE's operations (`training.hvae`). Its latent is its groups' standardized noise u,
N(0, I) under the prior, and its encoder and decoder graphs have the flat signatures (x -> the
posterior-mean u and its log-variance; u -> the likelihood's parameters), so Sample, Decode,
Reconstruct and Interpolate run as a flat model's. A draw from q(z|x) is not u = mu + eps sigma
(each group depends on the ones above it): Encode's draw and Score's draws run the posterior graph,
on an image and its noise in one row, which gives the likelihood's parameters, log p(z) - log q(z|x)
and the draw as u.
"""

from __future__ import annotations

import numpy as np

from service.engine import Draws, Engine, normal
from service.scoring import ScoreSums


class HierarchicalEngine(Engine):
    async def posterior_sample(
        self, x: np.ndarray, mu: np.ndarray, sigma: np.ndarray, seed: int, deadline: float | None = None,
        y: np.ndarray | None = None,
    ) -> np.ndarray:  # fmt: skip
        """One draw from q(z|x) per image, as u, for the seed's noise: the posterior graph's."""
        eps = normal(seed, mu.shape)
        _, _, u = await self.family["posterior"].submit(self._rows(x, eps, y), deadline)
        return u

    async def _score_draws(
        self, x: np.ndarray, k: int, deadline: float | None, y: np.ndarray | None = None, per_image: int = 1
    ) -> tuple[ScoreSums, Draws]:  # fmt: skip
        """Each chunk of draws through the posterior graph: no closed-form KL (the draws' mean of
        log q - log p is the KL's estimate), and no encoder call of its own."""
        sums = ScoreSums(x.astype(np.float64), k, self.spec.distribution, per_image=per_image)

        async def draws(start: int, item: np.ndarray, eps: np.ndarray) -> tuple[int, np.ndarray, np.ndarray]:
            reduce = sums.reducer(item, keep=1, split=self.runtime.family["posterior"].in_halves)
            rows = self._rows(x[item // per_image], eps, None if y is None else y[item])
            log_px, log_ratio = await self.family["posterior"].submit(rows, deadline, background=True, reduce=reduce)
            return start, log_px, log_ratio.astype(np.float64)

        return sums, draws

    @staticmethod
    def _rows(x: np.ndarray, eps: np.ndarray, y: np.ndarray | None) -> np.ndarray:
        """The posterior graph's input: each image flattened, then its noise, float32 [N, C*H*W + D]
        (a conditional model's: then its class weights [N, K])."""
        parts = [x.reshape(len(x), -1), eps, *([] if y is None else [y])]
        return np.concatenate(parts, axis=1, dtype=np.float32)
