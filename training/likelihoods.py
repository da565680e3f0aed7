"""p(x|z) in torch for training: one class per distribution, the twin of a `service.likelihood` class
(its `spec`), which holds what does not depend on the array library: the name, the decoder's
channels, what bits/dim mean. tests/test_likelihood.py holds each pair equal.

Each class gives the log-probability (the reconstruction term is its negative), the mean E[x|z],
the image the service shows, and the data as the distribution scores it (the Bernoulli's
binarized pixels).
"""

from __future__ import annotations

import math
from typing import ClassVar

import torch
import torch.nn.functional as F

from service import likelihood as numpy_likelihood
from service.likelihood import BIN_HALF_WIDTH, LOG_2PI, LOG_SCALE_MIN, SMALL_BIN, split_mixture
from training.config import ModelConfig
from training.data import binarize, fixed_binarization


class Likelihood:
    """p(x|z) from the decoder's parameters [N, P, H, W], for images x [N, C, H, W] in [0, 1]."""

    name: ClassVar[str]

    def __init__(self, spec: numpy_likelihood.Likelihood) -> None:
        self.spec = spec

    def log_prob(self, x: torch.Tensor, params: torch.Tensor) -> torch.Tensor:
        """log p(x|z) per example [N], in nats, summed over C, H, W."""
        raise NotImplementedError

    def mean(self, params: torch.Tensor) -> torch.Tensor:
        """E[x|z], unclipped: a feature loss on a clipped mean would lose the gradient of every
        pixel outside [0, 1]."""
        return params

    def image(self, params: torch.Tensor) -> torch.Tensor:
        """The mean as an image in [0, 1], exactly as the service shows it (`spec.image`)."""
        return self.mean(params).clamp(0.0, 1.0)

    def training_data(self, x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        """A training batch as this distribution scores it."""
        return x

    def scored_data(self, x: torch.Tensor, seed: int = 0) -> torch.Tensor:
        """Images as evaluation scores them, the same for every run."""
        return x


class Bernoulli(Likelihood):
    """Binary pixels from logits; grey levels are binarized (dynamically in training, once with a
    fixed seed for evaluation)."""

    name = numpy_likelihood.Bernoulli.name

    def log_prob(self, x: torch.Tensor, params: torch.Tensor) -> torch.Tensor:
        return -F.binary_cross_entropy_with_logits(params, x, reduction="none").flatten(1).sum(dim=1)

    def mean(self, params: torch.Tensor) -> torch.Tensor:
        return torch.sigmoid(params)

    def image(self, params: torch.Tensor) -> torch.Tensor:
        return torch.sigmoid(params)

    def training_data(self, x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        return binarize(x, generator)

    def scored_data(self, x: torch.Tensor, seed: int = 0) -> torch.Tensor:
        return fixed_binarization(x, seed)


class Gaussian(Likelihood):
    """A Gaussian of fixed standard deviation (`spec.gaussian_std`) around the decoder's mean."""

    name = numpy_likelihood.Gaussian.name

    def log_prob(self, x: torch.Tensor, params: torch.Tensor) -> torch.Tensor:
        var = self.spec.gaussian_std**2
        return -0.5 * ((x - params).pow(2) / var + math.log(var) + LOG_2PI).flatten(1).sum(dim=1)


class LogisticMixture(Likelihood):
    """The discretized mixture of K logistics of 8-bit values (PixelCNN++; NVAE's `DiscMixLogistic`),
    in `service.likelihood`'s layout."""

    name = numpy_likelihood.LogisticMixture.name

    def log_prob(self, x: torch.Tensor, params: torch.Tensor) -> torch.Tensor:
        """The mixture weights are shared by a pixel's channels and each component has its channels
        independent (no PixelCNN++ channel coupling). x is rounded to the 8-bit grid and mapped to
        [-1, 1]; its bin [x - 1/255, x + 1/255] has probability sigmoid(a) - sigmoid(b), or all the
        mass below (value 0) or above (value 255). The interior is computed as
        log sigmoid(a) + log sigmoid(-b) + log(1 - e^(b - a)), an exact identity that neither
        cancels in the tails nor needs PixelCNN++'s density fallback, so values and gradients stay
        finite."""
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
        return torch.logsumexp(log_p, dim=1).flatten(1).sum(dim=1)

    def mean(self, params: torch.Tensor) -> torch.Tensor:
        """sum_k softmax(logits)_k mu_kc, mapped to [0, 1] and clipped: [N, C, H, W]."""
        logits, means, _ = split_mixture(params, self.spec.channels)
        mean = (F.softmax(logits, dim=1).unsqueeze(2) * means).sum(dim=1)
        return ((mean + 1) / 2).clamp(0.0, 1.0)


def log_bin_width(log_scales: torch.Tensor) -> torch.Tensor:
    """log(1 - e^(-d)), d = 2/255 e^(-log_s), as `service.likelihood.log_bin_width`: the series
    log d - d/2 where d < SMALL_BIN, so neither the value nor its gradient is log(0) or 0/0 for a
    huge log-scale (torch.where differentiates both branches, hence the clamped d in the other)."""
    log_d = math.log(2.0 * BIN_HALF_WIDTH) - log_scales
    d = torch.exp(log_d)
    exact = torch.log(-torch.expm1(-d.clamp(min=SMALL_BIN)))
    return torch.where(d < SMALL_BIN, log_d - d / 2, exact)


LIKELIHOODS: dict[str, type[Likelihood]] = {cls.name: cls for cls in (Bernoulli, Gaussian, LogisticMixture)}


def of(spec: numpy_likelihood.Likelihood) -> Likelihood:
    """The torch twin of a service likelihood."""
    return LIKELIHOODS[spec.name](spec)


def for_model(cfg: ModelConfig) -> Likelihood:
    """The likelihood a model's config names (its mixtures only for a mixture)."""
    mixtures = cfg.mixtures if numpy_likelihood.LIKELIHOODS[cfg.likelihood].components else 0
    return of(numpy_likelihood.likelihood(cfg.likelihood, cfg.image_shape[0], mixtures, cfg.gaussian_std))
