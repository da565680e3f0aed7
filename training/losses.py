"""The negative ELBO and its parts, per example, in nats; and the importance-weighted bound.

Every function returns one value per example (summed over that example's dimensions); callers
average over the batch. Keeping per-example values is what the IWAE bound and the service's
Score RPC need.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator

import torch

from service.likelihood import LOG_2PI


def kl_per_dim(mu: torch.Tensor, logvar: torch.Tensor) -> torch.Tensor:
    """KL(N(mu, sigma^2) || N(0, 1)) for each latent dimension, closed form: [N, D]."""
    return -0.5 * (1 + logvar - mu.pow(2) - logvar.exp())


def gaussian_kl_per_dim(mu: torch.Tensor, logvar: torch.Tensor, p_mu: torch.Tensor, p_logvar: torch.Tensor) -> torch.Tensor:
    """KL(N(mu, sigma^2) || N(p_mu, p_sigma^2)) for each latent dimension, closed form: [N, D] (a
    conditional model's prior p(z|y))."""
    return 0.5 * (p_logvar - logvar + (logvar.exp() + (mu - p_mu).pow(2)) / p_logvar.exp() - 1)


def kl_divergence(mu: torch.Tensor, logvar: torch.Tensor) -> torch.Tensor:
    """-0.5 * sum(1 + log sigma^2 - mu^2 - sigma^2) per example: [N]."""
    return kl_per_dim(mu, logvar).sum(dim=-1)


def monte_carlo_kl(z: torch.Tensor, mu: torch.Tensor, logvar: torch.Tensor, log_prior: torch.Tensor) -> torch.Tensor:
    """log q(z|x) - log p(z) at the reparameterized z: a one-sample, unbiased estimate of KL(q || p)
    per example [N], for a prior with no closed-form KL (the flow). `log_prior` is log p(z) [N]."""
    return gaussian_log_prob(z, mu, logvar) - log_prior


def gaussian_log_prob(z: torch.Tensor, mu: torch.Tensor, logvar: torch.Tensor) -> torch.Tensor:
    """log N(z; mu, diag(exp(logvar))) summed over the last dimension."""
    return -0.5 * (LOG_2PI + logvar + (z - mu).pow(2) / logvar.exp()).sum(dim=-1)


# Samples per image drawn at once by the IWAE bound: bounds memory; the draw order depends on it.
IWAE_CHUNK = 100


def standard_normal_log_prob(z: torch.Tensor) -> torch.Tensor:
    return -0.5 * (LOG_2PI + z.pow(2)).sum(dim=-1)


def iwae_bound(
    log_weights: Callable[[torch.Tensor], torch.Tensor], n: int, d: int, k: int, chunk: int = IWAE_CHUNK,
    generator: torch.Generator | None = None, device: torch.device | None = None,
) -> torch.Tensor:  # fmt: skip
    """log p(x) >= log (1/k) sum_i p(x, z_i) / q(z_i|x), z_i ~ q(z|x) (Burda et al.), for n images: [n].

    `log_weights(eps)` gives log p(x, z) - log q(z|x) [n, m] for the standard normal noise eps
    [n, m, d] that draws each image's m latents (a model's `log_weights`). Samples are drawn in
    chunks of `chunk` per image to bound memory; the log-weights are combined with one logsumexp.
    """
    log_w = [log_weights(eps) for eps in _iwae_noise(n, d, k, chunk, generator, device)]
    return torch.logsumexp(torch.cat(log_w, dim=1), dim=1) - math.log(k)


def _iwae_noise(
    n: int, d: int, k: int, chunk: int, generator: torch.Generator | None, device: torch.device | None
) -> Iterator[torch.Tensor]:
    """The k standard normal draws per image of `iwae_bound`, [n, m, d] for m <= chunk, in its order."""
    for start in range(0, k, chunk):
        yield torch.randn(n, min(chunk, k - start), d, generator=generator, device=device)


def skip_iwae_noise(
    n: int, d: int, k: int, chunk: int = IWAE_CHUNK, generator: torch.Generator | None = None,
    device: torch.device | None = None,
) -> None:  # fmt: skip
    """Advance `generator` exactly as `iwae_bound` does for n images (the draws dropped): how a rank
    of a distributed evaluation passes over the images other ranks score and still gives its own
    images the noise one process would."""
    for _ in _iwae_noise(n, d, k, chunk, generator, device):
        pass
