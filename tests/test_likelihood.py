"""The likelihoods against first principles: the discretized logistic mixture against bin
probabilities taken straight from the logistic CDF, normalised over all 8-bit values; and each
distribution's pair, the server's numpy class (service.likelihood) and training's torch class
(training.likelihoods), held equal in float64."""

import itertools
import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from scipy.special import expit

from service import likelihood as numpy_likelihood
from service.likelihood import likelihood, mixture_components
from training import likelihoods as torch_likelihoods

MIXTURE = "logistic-mixture"

H = 1.0 / 255  # half an 8-bit step in [-1, 1]


def random_case(rng: np.random.Generator, n: int, k: int, c: int, size: int = 3) -> tuple[np.ndarray, np.ndarray]:
    """params [n, K(1 + 2C), size, size] with moderate values, and x on the 8-bit grid with both
    end values present."""
    logits = rng.normal(size=(n, k, size, size))
    means = rng.uniform(-1, 1, size=(n, k * c, size, size))
    log_scales = rng.uniform(-2.0, 0.5, size=(n, k * c, size, size))
    levels = rng.integers(0, 256, size=(n, c, size, size))
    levels.flat[0], levels.flat[1] = 0, 255
    return np.concatenate([logits, means, log_scales], axis=1), levels / 255.0


def extreme_case(
    rng: np.random.Generator, n: int = 4, k: int = 3, c: int = 3, size: int = 4
) -> tuple[np.ndarray, np.ndarray]:
    """Random params with log-scales of -20 and +10 and means of +-50 mixed in, x with 0s and 255s."""
    params, x = random_case(rng, n, k, c, size)
    means = params[:, k : k + k * c]
    log_scales = params[:, k + k * c :]
    pick = rng.random(means.shape)
    means[pick < 0.15] = 50.0
    means[pick > 0.85] = -50.0
    pick = rng.random(log_scales.shape)
    log_scales[pick < 0.2] = -20.0
    log_scales[pick > 0.8] = 10.0
    pick = rng.random(x.shape)
    x[pick < 0.2] = 0.0
    x[pick > 0.8] = 1.0
    return params, x


def direct_log_p(params: np.ndarray, x: np.ndarray) -> np.ndarray:
    """log p(x|z) per example straight from the definition: each bin's probability as a difference
    of logistic CDFs at its edges (the end bins open), the mixture summed in probability space."""
    n, c = x.shape[:2]
    k = params.shape[1] // (1 + 2 * c)
    weights = np.exp(params[:, :k]) / np.exp(params[:, :k]).sum(1, keepdims=True)
    means = params[:, k : k + k * c].reshape(n, k, c, *x.shape[2:])
    scales = np.exp(np.maximum(params[:, k + k * c :], -7.0)).reshape(means.shape)
    centred = (np.round(x * 255) / 255 * 2 - 1)[:, None]
    upper = np.where(centred >= 1.0, np.inf, centred + H)
    lower = np.where(centred <= -1.0, -np.inf, centred - H)
    bins = expit((upper - means) / scales) - expit((lower - means) / scales)
    return np.log((weights * bins.prod(axis=2)).sum(axis=1)).sum(axis=(1, 2))


def mixture(params: np.ndarray, c: int) -> numpy_likelihood.Likelihood:
    """The numpy mixture whose decoder gives `params` for images of c channels."""
    return likelihood(MIXTURE, c, mixture_components(params.shape[-3], c))


def log_px_z(params: np.ndarray, x: np.ndarray) -> np.ndarray:
    return mixture(params, x.shape[-3]).log_prob(x, params)


def torch_log_p(params: np.ndarray, x: np.ndarray) -> np.ndarray:
    twin = torch_likelihoods.of(mixture(params, x.shape[1]))
    return twin.log_prob(torch.from_numpy(x), torch.from_numpy(params)).numpy()


def mixture_nll(params: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    return -torch_likelihoods.of(mixture(params, x.shape[1])).log_prob(x, params)


def pair(name: str, c: int, std: float = 0.2, k: int = 3) -> tuple[numpy_likelihood.Likelihood, torch_likelihoods.Likelihood]:
    spec = likelihood(name, c, k if numpy_likelihood.LIKELIHOODS[name].components else 0, std)
    return spec, torch_likelihoods.of(spec)


@pytest.mark.parametrize("k, c", [(1, 1), (4, 3), (5, 2)])
def test_torch_matches_bin_probabilities_from_the_logistic_cdf(k: int, c: int):
    params, x = random_case(np.random.default_rng(k * 10 + c), n=3, k=k, c=c)
    np.testing.assert_allclose(torch_log_p(params, x), direct_log_p(params, x), rtol=0, atol=1e-6)


def test_off_grid_images_count_as_their_nearest_8_bit_value():
    params, _ = random_case(np.random.default_rng(1), n=2, k=2, c=1, size=4)
    x = np.random.default_rng(2).integers(0, 17, size=(2, 1, 4, 4)) / 16.0  # sklearn digits' grid
    on_grid = np.round(x * 255) / 255
    assert np.array_equal(torch_log_p(params, x), torch_log_p(params, on_grid))
    assert np.array_equal(log_px_z(params, x), log_px_z(params, on_grid))


def all_values(channels: int) -> np.ndarray:
    """Every 8-bit value of one pixel with `channels` channels: [256^C, C, 1, 1] in [0, 1]."""
    grid = np.array(list(itertools.product(range(256), repeat=channels)), dtype=np.float64)
    return (grid / 255.0)[:, :, None, None]


@pytest.mark.parametrize("k, c", [(3, 1), (2, 2)])
def test_the_probabilities_of_all_8_bit_values_sum_to_one(k: int, c: int):
    rng = np.random.default_rng(c)
    params = np.concatenate(
        [rng.normal(size=k), rng.uniform(-1.2, 1.2, size=k * c), rng.uniform(-5.0, 0.0, size=k * c)]
    )[None, :, None, None]
    x = all_values(c)
    by_torch = np.exp(torch_log_p(np.broadcast_to(params, (len(x), *params.shape[1:])).copy(), x)).sum()
    by_numpy = np.exp(likelihood(MIXTURE, c, k).log_prob(x, params)).sum()  # params broadcast over the values
    assert by_torch == pytest.approx(1.0, abs=1e-9)
    assert by_numpy == pytest.approx(1.0, abs=1e-9)


def test_numpy_and_torch_agree_and_stay_finite_at_extremes():
    params, x = extreme_case(np.random.default_rng(3))
    by_numpy = log_px_z(params, x)
    by_torch = torch_log_p(params, x)
    assert np.isfinite(by_numpy).all() and np.isfinite(by_torch).all()
    np.testing.assert_allclose(by_numpy, by_torch, rtol=1e-12, atol=1e-9)
    # the server's float32 decoder output is widened before any arithmetic
    as_float32 = params.astype(np.float32)
    widened = as_float32.astype(np.float64)
    assert np.array_equal(log_px_z(as_float32, x), log_px_z(widened, x))


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_torch_gradients_are_finite_at_extremes(dtype: torch.dtype):
    params, x = extreme_case(np.random.default_rng(4))
    p = torch.tensor(params, dtype=dtype, requires_grad=True)
    nll = mixture_nll(p, torch.tensor(x, dtype=dtype))
    nll.sum().backward()
    assert torch.isfinite(nll).all() and torch.isfinite(p.grad).all()


def test_numpy_broadcasts_images_over_posterior_samples_as_score_does():
    """Score passes x [n, 1, C, H, W] against params [n, s, P, H, W]: each sample's value is the
    same as torch's on the matching (image, sample) pair."""
    n, s, k, c = 2, 3, 2, 3
    params, x = random_case(np.random.default_rng(5), n=n * s, k=k, c=c)
    x = x[:n]
    stacked = params.reshape(n, s, *params.shape[1:])
    by_numpy = likelihood(MIXTURE, c, k).log_prob(x[:, None], stacked)
    by_torch = torch_log_p(params, np.repeat(x, s, axis=0)).reshape(n, s)
    assert by_numpy.shape == (n, s)
    np.testing.assert_allclose(by_numpy, by_torch, rtol=1e-12, atol=1e-9)


def test_mixture_mean_image_is_in_range_and_the_same_in_numpy_and_torch():
    k, c = 3, 3
    params, _ = extreme_case(np.random.default_rng(6), n=5, k=k, c=c)
    spec, twin = pair(MIXTURE, c, k=k)
    image = spec.image(params.astype(np.float32))
    reference = twin.image(torch.from_numpy(params)).numpy()
    assert image.shape == (5, c, 4, 4) and image.dtype == np.float32
    assert image.min() >= 0.0 and image.max() <= 1.0
    np.testing.assert_allclose(image, reference, rtol=0, atol=1e-6)
    # one component with mean m in [-1, 1] shows (m + 1) / 2
    single = np.array([0.0, 0.5, -0.3])[None, :, None, None]
    assert likelihood(MIXTURE, 1, 1).image(single)[0, 0, 0, 0] == pytest.approx(0.75)


def test_bernoulli_and_gaussian_mean_images():
    params = np.array([-50.0, 0.0, 0.25, 2.0], dtype=np.float32).reshape(1, 1, 2, 2)
    expected = torch.sigmoid(torch.from_numpy(params)).numpy()
    np.testing.assert_allclose(likelihood("bernoulli", 1).image(params), expected, atol=1e-7)
    np.testing.assert_array_equal(likelihood("gaussian", 1).image(params), np.clip(params, 0, 1))


def test_every_likelihood_has_its_torch_twin():
    assert set(torch_likelihoods.LIKELIHOODS) == set(numpy_likelihood.LIKELIHOODS)


@pytest.mark.parametrize("name", list(numpy_likelihood.LIKELIHOODS))
def test_each_pair_agrees_on_log_probability_and_image(name: str):
    """The server's numpy class and training's torch class of one distribution: the same
    log-probability in float64, the same image, the same decoder channels; and the numpy one
    broadcasts images over posterior draws as Score passes them."""
    c, k = 3, 3
    spec, twin = pair(name, c, k=k)
    rng = np.random.default_rng(7)
    if spec.components:
        params, x = extreme_case(rng, n=4, k=k, c=c, size=5)
    else:
        params, x = rng.normal(size=(4, c, 5, 5)) * 3, rng.random((4, c, 5, 5))
    assert params.shape[1] == spec.param_channels
    expected = twin.log_prob(torch.from_numpy(x), torch.from_numpy(params)).numpy()
    np.testing.assert_allclose(spec.log_prob(x, params), expected, rtol=1e-12, atol=1e-9)
    np.testing.assert_allclose(spec.image(params.astype(np.float32)), twin.image(torch.from_numpy(params)).numpy(), rtol=0, atol=1e-6)
    stacked = spec.log_prob(x[:2, None], params.reshape(2, 2, *params.shape[1:]))
    np.testing.assert_allclose(stacked, spec.log_prob(np.repeat(x[:2], 2, axis=0), params).reshape(2, 2))


def test_bits_per_dim_by_hand():
    dims = 784
    assert likelihood(MIXTURE, 1, 5).bits_per_dim(dims * math.log(2), dims) == pytest.approx(1.0)
    assert likelihood("bernoulli", 1).bits_per_dim(3 * dims * math.log(2), dims) == pytest.approx(3.0)
    # a Gaussian density of 1 on [0, 1] puts 1/255 on each 8-bit bin: log2(255) bits
    assert likelihood("gaussian", 1).bits_per_dim(0.0, dims) == pytest.approx(math.log2(255))
    np.testing.assert_allclose(likelihood(MIXTURE, 1, 5).bits_per_dim(np.array([0.0, 2 * math.log(2)]), 2), [0.0, 1.0])


def test_components_are_inferred_from_the_channel_count():
    assert likelihood(MIXTURE, 3, 10).param_channels == 70
    assert likelihood("bernoulli", 3).param_channels == 3 and likelihood("gaussian", 1).param_channels == 1
    assert mixture_components(70, 3) == 10 and mixture_components(3, 1) == 1
    with pytest.raises(ValueError, match="multiple of 7"):
        mixture_components(71, 3)
    with pytest.raises(ValueError, match="multiple of 3"):
        torch_likelihoods.of(likelihood(MIXTURE, 1, 1)).log_prob(torch.zeros(1, 1, 2, 2), torch.zeros(1, 4, 2, 2))
    with pytest.raises(ValueError):
        likelihood(MIXTURE, 1, 1).log_prob(np.zeros((1, 1, 2, 2)), np.zeros((1, 4, 2, 2)))
    with pytest.raises(ValueError, match="needs K >= 1"):
        likelihood(MIXTURE, 3, 0)
    with pytest.raises(ValueError, match="the others none"):
        likelihood("bernoulli", 3, 5)
    with pytest.raises(ValueError, match="unknown likelihood"):
        likelihood("poisson", 1)


def test_the_server_module_never_imports_torch():
    code = "import sys, service.likelihood; sys.exit('torch' in sys.modules)"
    root = Path(__file__).resolve().parents[1]
    assert subprocess.run([sys.executable, "-c", code], cwd=root, check=False).returncode == 0


def test_huge_log_scales_give_finite_values_and_gradients_in_both_implementations():
    """A diverging training step once produced log-scales of 120: expm1 of the bin width underflowed,
    log(0) in the unselected branch of the end bins made every gradient NaN. The series form holds."""
    torch.manual_seed(0)
    k, c = 2, 3
    params = torch.randn(2, k * (1 + 2 * c), 3, 3, dtype=torch.float32)
    params[:, k + k * c :] = torch.tensor([150.0, 1e3, 8.0, -3.0, 40.0, 99.0]).view(1, -1, 1, 1)
    params.requires_grad_(True)
    x = torch.tensor([0.0, 1.0, 0.5]).view(1, 3, 1, 1).expand(2, 3, 3, 3).contiguous()
    nll = mixture_nll(params, x)
    nll.sum().backward()
    assert torch.isfinite(nll).all() and torch.isfinite(params.grad).all()
    service = -log_px_z(params.detach().double().numpy(), x.double().numpy())
    np.testing.assert_allclose(service, nll.detach().double().numpy(), rtol=1e-5)
