"""The negative ELBO and its parts, per example, in nats; and the importance-weighted bound.

Every function returns one value per example (summed over that example's dimensions); callers
average over the batch. Keeping per-example values is what the IWAE bound and the service's
Score RPC need.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator

import torch
import torch.nn.functional as F

# The layout and constants are the server's (`service.likelihood`): one definition of the parameterisation;
# its split_mixture slices and reshapes torch tensors as it does numpy arrays.
from service.likelihood import BIN_HALF_WIDTH, LOG_SCALE_MIN, SMALL_BIN, check_likelihood, split_mixture

LOG_2PI = math.log(2 * math.pi)


def kl_per_dim(mu: torch.Tensor, logvar: torch.Tensor) -> torch.Tensor:
    """KL(N(mu, sigma^2) || N(0, 1)) for each latent dimension, closed form: [N, D]."""
    return -0.5 * (1 + logvar - mu.pow(2) - logvar.exp())


def kl_divergence(mu: torch.Tensor, logvar: torch.Tensor) -> torch.Tensor:
    """-0.5 * sum(1 + log sigma^2 - mu^2 - sigma^2) per example: [N]."""
    return kl_per_dim(mu, logvar).sum(dim=-1)


def monte_carlo_kl(z: torch.Tensor, mu: torch.Tensor, logvar: torch.Tensor, log_prior: torch.Tensor) -> torch.Tensor:
    """log q(z|x) - log p(z) at the reparameterized z: a one-sample, unbiased estimate of KL(q || p)
    per example [N], for a prior with no closed-form KL (the flow). `log_prior` is log p(z) [N]."""
    return gaussian_log_prob(z, mu, logvar) - log_prior


def reconstruction_nll(params: torch.Tensor, x: torch.Tensor, likelihood: str, gaussian_std: float = 0.1) -> torch.Tensor:
    """-log p(x|z) per example: Bernoulli from logits (BCE), Gaussian with fixed std (scaled MSE),
    or the discretized logistic mixture of 8-bit values."""
    check_likelihood(likelihood)
    if likelihood == "logistic-mixture":
        return discretized_mix_logistic_nll(params, x)
    if likelihood == "bernoulli":
        nll = F.binary_cross_entropy_with_logits(params, x, reduction="none")
    else:
        var = gaussian_std**2
        nll = 0.5 * ((x - params).pow(2) / var + math.log(var) + LOG_2PI)
    return nll.flatten(1).sum(dim=1)


def discretized_mix_logistic_nll(params: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """-log p(x|z) per example [N] in nats under a mixture of K logistics discretized to 8 bits
    (PixelCNN++; NVAE's `DiscMixLogistic`): x [N, C, H, W] in [0, 1], params [N, K(1 + 2C), H, W].

    The mixture weights are shared by a pixel's channels and each component has its channels
    independent (no PixelCNN++ channel coupling). x is rounded to the 8-bit grid and mapped to
    [-1, 1]; its bin [x - 1/255, x + 1/255] has probability sigmoid(a) - sigmoid(b), or all the mass
    below (value 0) or above (value 255). The interior is computed as
    log sigmoid(a) + log sigmoid(-b) + log(1 - e^(b - a)), an exact identity that neither cancels
    in the tails nor needs PixelCNN++'s density fallback, so values and gradients stay finite.
    """
    logits, means, log_scales = split_mixture(params, x.shape[1])
    level = torch.round(x.to(params.dtype) * 255).clamp(0, 255).unsqueeze(1)  # [N, 1, C, H, W]
    centred = level / 255 * 2 - 1
    inv_scale = torch.exp(-log_scales.clamp(min=LOG_SCALE_MIN))
    a = (centred - means + BIN_HALF_WIDTH) * inv_scale
    b = (centred - means - BIN_HALF_WIDTH) * inv_scale
    log_below_upper = -F.softplus(-a)  # log sigmoid(a): the mass below the bin's upper edge
    log_above_lower = -F.softplus(b)  # log sigmoid(-b): the mass above its lower edge
    log_width = log_bin_width(log_scales.clamp(min=LOG_SCALE_MIN))  # log(1 - e^(b - a))
    interior = log_below_upper + log_above_lower + log_width
    log_p = torch.where(level == 0, log_below_upper, torch.where(level == 255, log_above_lower, interior))
    log_p = log_p.sum(dim=2) + F.log_softmax(logits, dim=1)  # [N, K, H, W]
    return -torch.logsumexp(log_p, dim=1).flatten(1).sum(dim=1)


def log_bin_width(log_scales: torch.Tensor) -> torch.Tensor:
    """log(1 - e^(-d)), d = 2/255 e^(-log_s), as `service.likelihood.log_bin_width`: the series
    log d - d/2 where d < SMALL_BIN, so neither the value nor its gradient is log(0) or 0/0 for a
    huge log-scale (torch.where differentiates both branches, hence the clamped d in the other)."""
    log_d = math.log(2.0 * BIN_HALF_WIDTH) - log_scales
    d = torch.exp(log_d)
    exact = torch.log(-torch.expm1(-d.clamp(min=SMALL_BIN)))
    return torch.where(d < SMALL_BIN, log_d - d / 2, exact)


def mixture_mean(params: torch.Tensor, channels: int) -> torch.Tensor:
    """E[x|z] of the logistic mixture, sum_k softmax(logits)_k mu_kc, mapped to [0, 1] and clipped:
    [N, C, H, W]. A fixed function of the parameters, as the service shows it (its
    `service.likelihood.mixture_mean`), so a seeded sample does not depend on its batch."""
    logits, means, _ = split_mixture(params, channels)
    mean = (F.softmax(logits, dim=1).unsqueeze(2) * means).sum(dim=1)
    return ((mean + 1) / 2).clamp(0.0, 1.0)


def gaussian_log_prob(z: torch.Tensor, mu: torch.Tensor, logvar: torch.Tensor) -> torch.Tensor:
    """log N(z; mu, diag(exp(logvar))) summed over the last dimension."""
    return -0.5 * (LOG_2PI + logvar + (z - mu).pow(2) / logvar.exp()).sum(dim=-1)


# Samples per image drawn at once by the IWAE bound: bounds memory; the draw order depends on it.
IWAE_CHUNK = 100


def standard_normal_log_prob(z: torch.Tensor) -> torch.Tensor:
    return -0.5 * (LOG_2PI + z.pow(2)).sum(dim=-1)


def iwae_bound(
    decode_nll: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    x: torch.Tensor,
    mu: torch.Tensor,
    logvar: torch.Tensor,
    k: int,
    chunk: int = IWAE_CHUNK,
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
    for eps in _iwae_noise(n, d, k, chunk, generator, mu.device):
        m = eps.shape[1]
        z = mu.unsqueeze(1) + eps * torch.exp(0.5 * logvar).unsqueeze(1)
        xs = x.unsqueeze(1).expand(n, m, *x.shape[1:]).reshape(n * m, *x.shape[1:])
        log_px_z = -decode_nll(z.reshape(n * m, d), xs).view(n, m)
        log_w.append(log_px_z + prior_log_prob(z) - gaussian_log_prob(z, mu.unsqueeze(1), logvar.unsqueeze(1)))
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
