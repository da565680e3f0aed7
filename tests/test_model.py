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
    params, mu, logvar = model(x)
    assert params.shape == x.shape
    assert mu.shape == logvar.shape == (3, 5)
    assert model.decode(torch.zeros(2, 5)).shape == (2, *shape)


def test_sample_is_an_image_in_unit_range_and_seeded():
    model = VAE(ModelConfig(image_shape=(1, 8, 8), latent_dim=4, hidden=16))
    a = model.sample(6, generator=torch.Generator().manual_seed(3))
    b = model.sample(6, generator=torch.Generator().manual_seed(3))
    assert a.shape == (6, 1, 8, 8) and torch.equal(a, b)
    assert 0.0 <= a.min() and a.max() <= 1.0


def test_gaussian_mean_is_unbounded_identity():
    model = VAE(ModelConfig(image_shape=(1, 8, 8), latent_dim=4, likelihood="gaussian"))
    params = torch.randn(2, 1, 8, 8) * 3
    assert torch.equal(model.mean_image(params), params)


def test_bad_config_is_refused():
    with pytest.raises(ValueError, match="likelihood"):
        ModelConfig(likelihood="poisson")
    with pytest.raises(ValueError, match="image_shape"):
        ModelConfig(image_shape=(28, 28))
