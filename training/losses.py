"""The negative ELBO and its parts, per example, in nats; and the importance-weighted bound.

Every function returns one value per example (summed over that example's dimensions); callers
average over the batch. Keeping per-example values is what the IWAE bound and the service's
Score RPC need.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
import torch.nn.functional as F

LOG_2PI = math.log(2 * math.pi)


def kl_per_dim(mu: torch.Tensor, logvar: torch.Tensor) -> torch.Tensor:
    """KL(N(mu, sigma^2) || N(0, 1)) for each latent dimension, closed form: [N, D]."""
    return -0.5 * (1 + logvar - mu.pow(2) - logvar.exp())


def kl_divergence(mu: torch.Tensor, logvar: torch.Tensor) -> torch.Tensor:
    """-0.5 * sum(1 + log sigma^2 - mu^2 - sigma^2) per example: [N]."""
    return kl_per_dim(mu, logvar).sum(dim=-1)


def free_bits_kl(mu: torch.Tensor, logvar: torch.Tensor, free_bits: float) -> torch.Tensor:
    """KL with each dimension's batch-average held at least `free_bits` nats (Kingma et al., 2016).

    Dimensions already above the floor are penalised as usual; those below get no gradient pushing
    them further into collapse. Returns the batch mean, a scalar.
    """
    per_dim = kl_per_dim(mu, logvar).mean(dim=0)
    return torch.clamp(per_dim, min=free_bits).sum()


def monte_carlo_kl(z: torch.Tensor, mu: torch.Tensor, logvar: torch.Tensor, log_prior: torch.Tensor) -> torch.Tensor:
    """log q(z|x) - log p(z) at the reparameterized z: a one-sample, unbiased estimate of KL(q || p)
    per example [N], for a prior with no closed-form KL (the flow). `log_prior` is log p(z) [N]."""
    return gaussian_log_prob(z, mu, logvar) - log_prior


def free_bits_total(kl: torch.Tensor, free_bits: float, latent_dim: int) -> torch.Tensor:
    """Free bits for a KL that does not split by dimension: the batch mean of the per-example KL [N],
    held at least `free_bits * latent_dim` nats (the same total floor as `free_bits_kl`, as one group).
    Returns a scalar. Below the floor the KL term gets no gradient at all."""
    return torch.clamp(kl.mean(), min=free_bits * latent_dim)


def reconstruction_nll(params: torch.Tensor, x: torch.Tensor, likelihood: str, gaussian_std: float = 0.1) -> torch.Tensor:
    """-log p(x|z) per example: Bernoulli from logits (BCE), or Gaussian with fixed std (scaled MSE)."""
    if likelihood == "bernoulli":
        nll = F.binary_cross_entropy_with_logits(params, x, reduction="none")
    else:
        var = gaussian_std**2
        nll = 0.5 * ((x - params).pow(2) / var + math.log(var) + LOG_2PI)
    return nll.flatten(1).sum(dim=1)


def gaussian_log_prob(z: torch.Tensor, mu: torch.Tensor, logvar: torch.Tensor) -> torch.Tensor:
    """log N(z; mu, diag(exp(logvar))) summed over the last dimension."""
    return -0.5 * (LOG_2PI + logvar + (z - mu).pow(2) / logvar.exp()).sum(dim=-1)


def standard_normal_log_prob(z: torch.Tensor) -> torch.Tensor:
    return -0.5 * (LOG_2PI + z.pow(2)).sum(dim=-1)


def iwae_bound(
    decode_nll: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    x: torch.Tensor,
    mu: torch.Tensor,
    logvar: torch.Tensor,
    k: int,
    chunk: int = 100,
    generator: torch.Generator | None = None,
    prior_log_prob: Callable[[torch.Tensor], torch.Tensor] = standard_normal_log_prob,
) -> torch.Tensor:
    """log p(x) >= log (1/k) sum_i p(x|z_i) p(z_i) / q(z_i|x), z_i ~ q(z|x) (Burda et al.): [N].

    `decode_nll(z, x)` gives -log p(x|z) for z [M, D] and x [M, ...]; `prior_log_prob(z)` gives
    log p(z) over the last dimension (N(0, I) unless a learned prior is passed). Samples are drawn in
    chunks of `chunk` per image to bound memory; the log-weights are combined with one logsumexp.
    """
    n, d = mu.shape
    log_w = []
    for start in range(0, k, chunk):
        m = min(chunk, k - start)
        eps = torch.randn(n, m, d, generator=generator, device=mu.device)
        z = mu.unsqueeze(1) + eps * torch.exp(0.5 * logvar).unsqueeze(1)
        xs = x.unsqueeze(1).expand(n, m, *x.shape[1:]).reshape(n * m, *x.shape[1:])
        log_px_z = -decode_nll(z.reshape(n * m, d), xs).view(n, m)
        log_w.append(log_px_z + prior_log_prob(z) - gaussian_log_prob(z, mu.unsqueeze(1), logvar.unsqueeze(1)))
    return torch.logsumexp(torch.cat(log_w, dim=1), dim=1) - math.log(k)
