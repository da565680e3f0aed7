"""p(x|z) for the server: one class per distribution (`Bernoulli`, `Gaussian`, `LogisticMixture`),
each with its log-probability in numpy float64 (what Score computes), the image it shows (what
Sample and Reconstruct return) and what its bits/dim mean. `likelihood()` makes the one a model
names.

This module never imports torch (the server has none); `training.likelihoods` holds the torch class
of each distribution for training, and tests/test_likelihood.py holds each pair equal (within 1e-9
in float64), so a new likelihood is one class here and one there.

"logistic-mixture" is the discretized mixture of logistics for 8-bit images (PixelCNN++; NVAE's
`DiscMixLogistic`, VDVAE's `discretized_mix_logistic_loss`). The decoder's P = K (1 + 2C) output
channels per pixel are laid out as

    [0, K)                          mixture logits, shared by the pixel's C channels
    [K + k C + c]                   mean of component k for channel c, in [-1, 1] image space
    [K + K C + k C + c]             log-scale of component k for channel c (clamped below at -7)

Each component is a joint distribution over the pixel's channels with the channels independent
within it; unlike PixelCNN++ there are no channel-coupling coefficients (the mixture alone carries
the correlation between channels), so the layout and the math stay the same for any C.
"""

from __future__ import annotations

import math
from typing import Any, ClassVar

import numpy as np

LOG_2PI = math.log(2 * math.pi)
LOG_SCALE_MIN = -7.0  # as PixelCNN++ and NVAE: below it a bin's mass is already ~1 or ~0
BIN_HALF_WIDTH = 1.0 / 255  # half of one 8-bit step once [0, 1] is mapped to [-1, 1]
# Below this d = 2/255 e^(-log_s), log(1 - e^(-d)) is taken as its series log d - d/2 (error under
# d^2/24 = 4e-12): exact where it matters, and finite for any log-scale, where expm1 would underflow
# to log(0) (log-scales past ~100 in float32, which a diverging step can produce).
SMALL_BIN = 1e-5


def mixture_components(params_channels: int, channels: int) -> int:
    """K from the decoder's channel count P = K (1 + 2C): the layout is fixed, so P says K."""
    per_component = 1 + 2 * channels
    if params_channels < per_component or params_channels % per_component:
        raise ValueError(
            f"a logistic mixture over {channels} channel(s) needs a multiple of {per_component} "
            f"parameter channels (K logits, K*C means, K*C log-scales); got {params_channels}"
        )
    return params_channels // per_component


def split_mixture(params: Any, channels: int) -> tuple[Any, Any, Any]:
    """Views of params [..., P, H, W] (a numpy array, or a torch tensor for training): logits
    [..., K, H, W], means and raw log-scales [..., K, C, H, W] (views when params is contiguous)."""
    *lead, p, h, w = params.shape
    k = mixture_components(p, channels)
    kc = k * channels
    means = params[..., k : k + kc, :, :].reshape(*lead, k, channels, h, w)
    log_scales = params[..., k + kc :, :, :].reshape(*lead, k, channels, h, w)
    return params[..., :k, :, :], means, log_scales


def to_bins(x: np.ndarray) -> np.ndarray:
    """Images in [0, 1] as 8-bit levels 0..255 (float64): data not on the grid, such as k/16,
    counts as its nearest 8-bit value, so every image has a bin and a probability."""
    return np.clip(np.rint(np.asarray(x, dtype=np.float64) * 255.0), 0.0, 255.0)


def _minus_softplus_(t: np.ndarray) -> np.ndarray:
    """-log(1 + e^t) = log sigmoid(-t), in place: exact in both tails, never log(0)."""
    np.logaddexp(0.0, t, out=t)
    return np.negative(t, out=t)


def _log_logistic_mixture(x: np.ndarray, params: np.ndarray) -> np.ndarray:
    """log p(x|z) summed over C, H, W for x [..., C, H, W] in [0, 1] and params [..., P, H, W].

    Per subpixel the probability of x's bin [x - 1/255, x + 1/255] under a logistic is
    sigmoid(a) - sigmoid(b), with the end bins taking all the mass beyond them. It is computed as
    log sigmoid(a) + log sigmoid(-b) + log(1 - e^(b - a)), an identity (b - a < 0) that neither
    cancels when both sigmoids are near 1 or 0 nor needs PixelCNN++'s density fallback. Three
    temporaries of [..., K, C, H, W] are the peak memory; everything else works in place.
    """
    channels = x.shape[-3]
    level = to_bins(x)[..., None, :, :, :]  # [..., 1, C, H, W]: broadcasts over K
    centred = level / 255.0 * 2.0 - 1.0
    logits, means, log_scales = split_mixture(params, channels)
    inv_scale = np.maximum(log_scales, LOG_SCALE_MIN, dtype=np.float64)
    np.negative(inv_scale, out=inv_scale)
    np.exp(inv_scale, out=inv_scale)
    log_p = np.subtract(centred, means, dtype=np.float64)  # b, then log sigmoid(-b), then log P
    upper = log_p + BIN_HALF_WIDTH  # a, then log sigmoid(a), then the end bins' log P
    log_p -= BIN_HALF_WIDTH
    upper *= inv_scale
    log_p *= inv_scale
    width = log_bin_width(np.maximum(log_scales, LOG_SCALE_MIN, dtype=np.float64))  # log(1 - e^(b - a))
    _minus_softplus_(np.negative(upper, out=upper))
    _minus_softplus_(log_p)
    np.copyto(upper, log_p, where=level == 255.0)  # value 255: all the mass above x - 1/255
    log_p += upper
    log_p += width
    np.copyto(log_p, upper, where=(level == 0.0) | (level == 255.0))  # value 0: all the mass below
    per_component = log_p.sum(axis=-3)  # [..., K, H, W]: channels independent within a component
    per_component += _log_softmax(np.asarray(logits, dtype=np.float64), axis=-3)
    return logsumexp(per_component, axis=-3).sum(axis=(-2, -1))


def log_bin_width(log_scales: np.ndarray) -> np.ndarray:
    """log(1 - e^(-d)), d = (a - b) = 2/255 e^(-log_s) the bin's width in units of the scale (log_s
    already clamped): expm1 where d is not tiny, the series log d - d/2 from log d itself where it is
    (SMALL_BIN), so no log-scale gives log(0)."""
    log_d = math.log(2.0 * BIN_HALF_WIDTH) - log_scales
    d = np.exp(log_d)
    exact = np.log(-np.expm1(-np.maximum(d, SMALL_BIN)))
    return np.where(d < SMALL_BIN, log_d - d / 2.0, exact)


def logsumexp(a: np.ndarray, axis: int) -> np.ndarray:
    m = a.max(axis=axis, keepdims=True)
    return (m + np.log(np.exp(a - m).sum(axis=axis, keepdims=True))).squeeze(axis)


def _log_softmax(a: np.ndarray, axis: int) -> np.ndarray:
    return a - np.expand_dims(logsumexp(a, axis), axis)


def sigmoid(x: np.ndarray) -> np.ndarray:
    """float32 logistic via tanh (no overflow for large |x|), in place on one temporary."""
    y = np.tanh(np.multiply(x, 0.5, dtype=np.float32))
    y += 1.0
    y *= 0.5
    return y


def mixture_mean(params: np.ndarray, channels: int) -> np.ndarray:
    """The mixture's mean, sum_k softmax(logits)_k mu_kc, mapped from [-1, 1] to [0, 1] and clipped:
    [..., C, H, W] float32. A fixed function of the parameters, summed over k in order, element by
    element, so a seeded Sample shows the same image in any batch. float32 and one pass per
    component: the server computes it for every Sample, at every batch size."""
    logits, means, _ = split_mixture(np.asarray(params, dtype=np.float32), channels)
    weights = logits - logits.max(axis=-3, keepdims=True)
    np.exp(weights, out=weights)
    weights /= weights.sum(axis=-3, keepdims=True)
    mean = np.zeros(means.shape[:-4] + means.shape[-3:], dtype=np.float32)
    for k in range(means.shape[-4]):
        mean += weights[..., k : k + 1, :, :] * means[..., k, :, :, :]
    mean += 1.0
    mean *= 0.5
    return np.clip(mean, 0.0, 1.0, out=mean)


class Likelihood:
    """p(x|z) for images of `channels` channels, from the decoder's parameters [..., P, H, W]."""

    name: ClassVar[str]
    output: ClassVar[str]  # what the decoder graph calls its output
    # Whether its nll is already -log P of the values scored (8-bit levels, or binarized pixels), so
    # bits/dim is nll / (dims ln 2); a density on [0, 1] first gets the 8-bit bins' width.
    discrete: ClassVar[bool] = True
    # Whether the server takes a batch's images with its decoding, on the inference thread: cheap
    # images are; a mixture's (a softmax and a sum over K) only for the requests that show images.
    image_per_batch: ClassVar[bool] = True
    bits_note: ClassVar[str]  # what its bits/dim mean, for reports
    components: ClassVar[bool] = False  # whether it is a mixture, of `mixtures` components

    def __init__(self, channels: int, mixtures: int = 0, gaussian_std: float = 0.1) -> None:
        if (mixtures > 0) != self.components:
            raise ValueError(f"mixtures {mixtures} for a {self.name} model: a logistic mixture needs K >= 1, the others none")
        self.channels, self.mixtures, self.gaussian_std = channels, mixtures, gaussian_std

    @property
    def param_channels(self) -> int:
        """Channels of the decoder's output per pixel."""
        return self.channels

    def log_prob(self, x: np.ndarray, params: np.ndarray) -> np.ndarray:
        """log p(x|z) in nats, float64, summed over the last three dims (C, H, W): x [..., C, H, W]
        in [0, 1] and params [..., P, H, W] broadcast over the leading dims (Score's streamed sums
        pass each draw's image beside its parameters, a slice of rows at a time)."""
        raise NotImplementedError

    def image(self, params: np.ndarray) -> np.ndarray:
        """What Sample and Reconstruct show: float32 [..., C, H, W] in [0, 1], a fixed function of
        the parameters, so a seeded image does not depend on its batch."""
        raise NotImplementedError

    def bits_per_dim(self, nll_nats: float | np.ndarray, dims: int) -> float | np.ndarray:
        """-log2 P(x) per dimension, the unit the image-modelling literature compares."""
        if not self.discrete:  # the 8-bit bin around x has width 1/255: P is about p(x) / 255 per dimension
            nll_nats = nll_nats + dims * math.log(255.0)
        return nll_nats / (dims * math.log(2.0))


class Bernoulli(Likelihood):
    """Independent Bernoulli pixels from logits: for binarized images (MNIST's)."""

    name, output = "bernoulli", "logits"
    bits_note = "of the binarized test images, not of their 8-bit grey levels"

    def log_prob(self, x: np.ndarray, params: np.ndarray) -> np.ndarray:
        log_p = np.multiply(np.asarray(x, dtype=np.float64), params, dtype=np.float64)
        log_p -= np.logaddexp(0.0, params, dtype=np.float64)
        return log_p.sum(axis=(-3, -2, -1))

    def image(self, params: np.ndarray) -> np.ndarray:
        return sigmoid(params)


class Gaussian(Likelihood):
    """A Gaussian of fixed standard deviation around the decoder's mean: a density on [0, 1]."""

    name, output, discrete = "gaussian", "mean", False
    bits_note = "a density on [0, 1] turned into 8-bit bins of width 1/255 (nll + dims ln 255)"

    def log_prob(self, x: np.ndarray, params: np.ndarray) -> np.ndarray:
        var = self.gaussian_std**2
        log_p = np.subtract(np.asarray(x, dtype=np.float64), params, dtype=np.float64)
        log_p **= 2
        log_p /= var
        log_p += math.log(var) + LOG_2PI
        log_p *= -0.5
        return log_p.sum(axis=(-3, -2, -1))

    def image(self, params: np.ndarray) -> np.ndarray:
        return np.clip(params, 0.0, 1.0).astype(np.float32, copy=False)


class LogisticMixture(Likelihood):
    """The discretized mixture of K logistics of 8-bit images (the layout in this module's docstring)."""

    name, output, image_per_batch, components = "logistic-mixture", "params", False, True
    bits_note = "exact: a discrete likelihood of the 8-bit pixels"

    @property
    def param_channels(self) -> int:
        return self.mixtures * (1 + 2 * self.channels)

    def log_prob(self, x: np.ndarray, params: np.ndarray) -> np.ndarray:
        return _log_logistic_mixture(np.asarray(x, dtype=np.float64), params)

    def image(self, params: np.ndarray) -> np.ndarray:
        return mixture_mean(params, self.channels)


LIKELIHOODS: dict[str, type[Likelihood]] = {cls.name: cls for cls in (Bernoulli, Gaussian, LogisticMixture)}


def likelihood(name: str, channels: int, mixtures: int = 0, gaussian_std: float = 0.1) -> Likelihood:
    """The likelihood a model names, for its images' channels (ValueError for an unknown name, or
    components a distribution does not have)."""
    if name not in LIKELIHOODS:
        raise ValueError(f"unknown likelihood {name!r}: expected one of {', '.join(LIKELIHOODS)}")
    return LIKELIHOODS[name](channels, mixtures, gaussian_std)
