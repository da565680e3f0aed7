"""The likelihoods against first principles: the discretized logistic mixture against bin
probabilities taken straight from the logistic CDF, normalised over all 8-bit values, and the
server's numpy (service.likelihood) against training's torch (training.losses) in float64."""

import itertools
import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from scipy.special import expit

from service.likelihood import bits_per_dim, decoder_channels, log_px_z, mean_function, mixture_components
from training.losses import discretized_mix_logistic_nll, mixture_mean, reconstruction_nll

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


def torch_log_p(params: np.ndarray, x: np.ndarray) -> np.ndarray:
    return -discretized_mix_logistic_nll(torch.from_numpy(params), torch.from_numpy(x)).numpy()


@pytest.mark.parametrize("k, c", [(1, 1), (4, 3), (5, 2)])
def test_torch_matches_bin_probabilities_from_the_logistic_cdf(k: int, c: int):
    params, x = random_case(np.random.default_rng(k * 10 + c), n=3, k=k, c=c)
    np.testing.assert_allclose(torch_log_p(params, x), direct_log_p(params, x), rtol=0, atol=1e-6)


def test_off_grid_images_count_as_their_nearest_8_bit_value():
    params, _ = random_case(np.random.default_rng(1), n=2, k=2, c=1, size=4)
    x = np.random.default_rng(2).integers(0, 17, size=(2, 1, 4, 4)) / 16.0  # sklearn digits' grid
    on_grid = np.round(x * 255) / 255
    assert np.array_equal(torch_log_p(params, x), torch_log_p(params, on_grid))
    assert np.array_equal(log_px_z("logistic-mixture", x, params), log_px_z("logistic-mixture", on_grid, params))


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
    by_numpy = np.exp(log_px_z("logistic-mixture", x, params)).sum()  # params broadcast over the values
    assert by_torch == pytest.approx(1.0, abs=1e-9)
    assert by_numpy == pytest.approx(1.0, abs=1e-9)


def test_numpy_and_torch_agree_and_stay_finite_at_extremes():
    params, x = extreme_case(np.random.default_rng(3))
    by_numpy = log_px_z("logistic-mixture", x, params)
    by_torch = torch_log_p(params, x)
    assert np.isfinite(by_numpy).all() and np.isfinite(by_torch).all()
    np.testing.assert_allclose(by_numpy, by_torch, rtol=1e-12, atol=1e-9)
    # the server's float32 decoder output is widened before any arithmetic
    as_float32 = params.astype(np.float32)
    widened = as_float32.astype(np.float64)
    assert np.array_equal(log_px_z("logistic-mixture", x, as_float32), log_px_z("logistic-mixture", x, widened))


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_torch_gradients_are_finite_at_extremes(dtype: torch.dtype):
    params, x = extreme_case(np.random.default_rng(4))
    p = torch.tensor(params, dtype=dtype, requires_grad=True)
    nll = discretized_mix_logistic_nll(p, torch.tensor(x, dtype=dtype))
    nll.sum().backward()
    assert torch.isfinite(nll).all() and torch.isfinite(p.grad).all()


def test_numpy_broadcasts_images_over_posterior_samples_as_score_does():
    """Score passes x [n, 1, C, H, W] against params [n, s, P, H, W]: each sample's value is the
    same as torch's on the matching (image, sample) pair."""
    n, s, k, c = 2, 3, 2, 3
    params, x = random_case(np.random.default_rng(5), n=n * s, k=k, c=c)
    x = x[:n]
    stacked = params.reshape(n, s, *params.shape[1:])
    by_numpy = log_px_z("logistic-mixture", x[:, None], stacked)
    by_torch = torch_log_p(params, np.repeat(x, s, axis=0)).reshape(n, s)
    assert by_numpy.shape == (n, s)
    np.testing.assert_allclose(by_numpy, by_torch, rtol=1e-12, atol=1e-9)


def test_mixture_mean_image_is_in_range_and_the_same_in_numpy_and_torch():
    k, c = 3, 3
    params, _ = extreme_case(np.random.default_rng(6), n=5, k=k, c=c)
    image = mean_function("logistic-mixture", c)(params.astype(np.float32))
    reference = mixture_mean(torch.from_numpy(params), c).numpy()
    assert image.shape == (5, c, 4, 4) and image.dtype == np.float32
    assert image.min() >= 0.0 and image.max() <= 1.0
    np.testing.assert_allclose(image, reference, rtol=0, atol=1e-6)
    # one component with mean m in [-1, 1] shows (m + 1) / 2
    single = np.array([0.0, 0.5, -0.3])[None, :, None, None]
    assert mean_function("logistic-mixture", 1)(single)[0, 0, 0, 0] == pytest.approx(0.75)


def test_bernoulli_and_gaussian_mean_images():
    params = np.array([-50.0, 0.0, 0.25, 2.0], dtype=np.float32).reshape(1, 1, 2, 2)
    expected = torch.sigmoid(torch.from_numpy(params)).numpy()
    np.testing.assert_allclose(mean_function("bernoulli", 1)(params), expected, atol=1e-7)
    np.testing.assert_array_equal(mean_function("gaussian", 1)(params), np.clip(params, 0, 1))


@pytest.mark.parametrize("likelihood", ["bernoulli", "gaussian"])
def test_bernoulli_and_gaussian_match_training(likelihood: str):
    rng = np.random.default_rng(7)
    params = rng.normal(size=(4, 3, 5, 5))
    x = rng.random((4, 3, 5, 5))
    expected = -reconstruction_nll(torch.from_numpy(params), torch.from_numpy(x), likelihood, 0.2).numpy()
    np.testing.assert_allclose(log_px_z(likelihood, x, params, 0.2), expected, rtol=1e-12, atol=1e-9)
    stacked = log_px_z(likelihood, x[:2, None], params.reshape(2, 2, 3, 5, 5), 0.2)
    np.testing.assert_allclose(stacked, log_px_z(likelihood, np.repeat(x[:2], 2, axis=0), params, 0.2).reshape(2, 2))


def test_bits_per_dim_by_hand():
    dims = 784
    assert bits_per_dim(dims * math.log(2), dims, "logistic-mixture") == pytest.approx(1.0)
    assert bits_per_dim(3 * dims * math.log(2), dims, "bernoulli") == pytest.approx(3.0)
    # a Gaussian density of 1 on [0, 1] puts 1/255 on each 8-bit bin: log2(255) bits
    assert bits_per_dim(0.0, dims, "gaussian") == pytest.approx(math.log2(255))
    np.testing.assert_allclose(bits_per_dim(np.array([0.0, 2 * math.log(2)]), 2, "logistic-mixture"), [0.0, 1.0])


def test_components_are_inferred_from_the_channel_count():
    assert decoder_channels("logistic-mixture", 3, 10) == 70
    assert decoder_channels("bernoulli", 3, 10) == 3 and decoder_channels("gaussian", 1, 10) == 1
    assert mixture_components(70, 3) == 10 and mixture_components(3, 1) == 1
    with pytest.raises(ValueError, match="multiple of 7"):
        mixture_components(71, 3)
    with pytest.raises(ValueError, match="multiple of 3"):
        discretized_mix_logistic_nll(torch.zeros(1, 4, 2, 2), torch.zeros(1, 1, 2, 2))
    with pytest.raises(ValueError):
        log_px_z("logistic-mixture", np.zeros((1, 1, 2, 2)), np.zeros((1, 4, 2, 2)))
    with pytest.raises(ValueError):
        decoder_channels("logistic-mixture", 3, 0)
    with pytest.raises(ValueError, match="unknown likelihood"):
        log_px_z("poisson", np.zeros((1, 1, 2, 2)), np.zeros((1, 1, 2, 2)))


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
    nll = discretized_mix_logistic_nll(params, x)
    nll.sum().backward()
    assert torch.isfinite(nll).all() and torch.isfinite(params.grad).all()
    service = -log_px_z("logistic-mixture", x.double().numpy(), params.detach().double().numpy())
    np.testing.assert_allclose(service, nll.detach().double().numpy(), rtol=1e-5)
