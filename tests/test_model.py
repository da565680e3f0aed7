"""The architecture follows the image shape: any (C, H, W) round-trips to the same shape."""


import pytest
import torch

from training.config import ModelConfig
from training.model import VAE


@pytest.mark.parametrize(
    "shape,widths,blocks",
    [((1, 8, 8), (32, 64), 0), ((1, 28, 28), (32, 64), 1), ((3, 32, 32), (16, 32, 64), 0), ((1, 7, 9), (8,), 1)],
)
def test_shapes_follow_the_image(shape, widths, blocks):
    model = VAE(ModelConfig(image_shape=shape, latent_dim=5, widths=widths, blocks=blocks, hidden=32))
    x = torch.rand(3, *shape)
    params, mu, kl = model(x)
    assert params.shape == x.shape
    assert mu.shape == kl.shape == (3, 5)
    assert model.decode(torch.zeros(2, 5)).shape == (2, *shape)


def test_sample_is_an_image_in_unit_range_and_seeded():
    model = VAE(ModelConfig(image_shape=(1, 8, 8), latent_dim=4, hidden=16))
    a = model.sample(6, generator=torch.Generator().manual_seed(3))
    b = model.sample(6, generator=torch.Generator().manual_seed(3))
    assert a.shape == (6, 1, 8, 8) and torch.equal(a, b)
    assert 0.0 <= a.min() and a.max() <= 1.0


def service_mean_image(model: VAE, params: torch.Tensor) -> torch.Tensor:
    """What the service shows for these decoder outputs (the model's `service.likelihood` class's
    image, which `Engine.mean_image` is), on numpy."""
    return torch.from_numpy(model.likelihood.spec.image(params.numpy()))


def test_gaussian_mean_image_is_clipped_as_the_service_clips_it():
    model = VAE(ModelConfig(image_shape=(1, 8, 8), latent_dim=4, likelihood="gaussian"))
    params = torch.randn(2, 1, 8, 8) * 3
    assert torch.equal(model.likelihood.mean(params), params)  # the likelihood's mean is unbounded
    image = model.mean_image(params)
    assert torch.equal(image, params.clamp(0, 1)) and ((params < 0) | (params > 1)).any()
    assert torch.equal(image, service_mean_image(model, params))
    drawn = model.sample(64, temperature=5.0)
    assert 0.0 <= drawn.min() and drawn.max() <= 1.0


def test_bernoulli_mean_image_matches_the_service():
    model = VAE(ModelConfig(image_shape=(1, 8, 8), latent_dim=4))
    logits = torch.randn(2, 1, 8, 8) * 5
    torch.testing.assert_close(model.mean_image(logits), service_mean_image(model, logits), rtol=0, atol=1e-6)


def test_logistic_mixture_model_outputs_its_parameters_and_shows_the_services_image():
    cfg = ModelConfig(image_shape=(3, 16, 16), latent_dim=4, hidden=16, likelihood="logistic-mixture", mixtures=4)
    model = VAE(cfg)
    with torch.no_grad():
        params = model.decode(torch.randn(2, 4))
    assert params.shape == (2, 4 * (1 + 2 * 3), 16, 16)
    image = model.mean_image(params * 20)  # far outside [-1, 1]: the mean is clipped
    assert image.shape == (2, 3, 16, 16) and 0.0 <= image.min() and image.max() <= 1.0
    torch.testing.assert_close(image, service_mean_image(model, params * 20), rtol=0, atol=1e-6)


def test_bad_config_is_refused():
    with pytest.raises(ValueError, match="likelihood"):
        ModelConfig(likelihood="poisson")
    with pytest.raises(ValueError, match="image_shape"):
        ModelConfig(image_shape=(28, 28))
