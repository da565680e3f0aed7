"""The ELBO's math against values worked out by hand and against torch.distributions."""

import math

import pytest
import torch
from torch.distributions import Normal, kl_divergence as torch_kl

from service.likelihood import likelihood
from training.likelihoods import of
from training.losses import iwae_bound, kl_divergence, kl_per_dim
from training.model import VAE


def test_kl_matches_hand_computed_values():
    mu = torch.tensor([[1.0, 0.0]])
    logvar = torch.tensor([[0.0, math.log(4.0)]])
    # dim 1: -0.5 (1 + 0 - 1 - 1) = 0.5 ; dim 2: -0.5 (1 + log 4 - 0 - 4) = 1.5 - log 2
    expected = 0.5 + 1.5 - math.log(2.0)
    assert kl_divergence(mu, logvar).item() == pytest.approx(expected, abs=1e-6)
    assert torch.allclose(kl_per_dim(mu, logvar), torch.tensor([[0.5, 1.5 - math.log(2.0)]]))


def test_kl_zero_at_the_prior_and_matches_torch_distributions():
    assert kl_divergence(torch.zeros(3, 5), torch.zeros(3, 5)).abs().max().item() == 0.0
    torch.manual_seed(0)
    mu, logvar = torch.randn(4, 6), torch.randn(4, 6)
    reference = torch_kl(Normal(mu, (0.5 * logvar).exp()), Normal(0.0, 1.0)).sum(-1)
    assert torch.allclose(kl_divergence(mu, logvar), reference, atol=1e-5)


def test_reparameterize_is_mu_plus_eps_sigma_and_carries_gradients():
    mu = torch.tensor([1.0], requires_grad=True)
    logvar = torch.tensor([math.log(4.0)], requires_grad=True)
    z = VAE.reparameterize(mu, logvar, eps=torch.tensor([0.5]))
    assert z.item() == pytest.approx(1.0 + 0.5 * 2.0)
    z.backward()
    assert mu.grad.item() == pytest.approx(1.0)
    assert logvar.grad.item() == pytest.approx(0.5 * 0.5 * 2.0)  # dz/dlogvar = eps * sigma / 2


def test_reparameterize_draws_from_q():
    torch.manual_seed(0)
    z = VAE.reparameterize(torch.full((200_000,), 2.0), torch.full((200_000,), math.log(9.0)))
    assert z.mean().item() == pytest.approx(2.0, abs=0.03)
    assert z.std().item() == pytest.approx(3.0, abs=0.03)


def test_bernoulli_reconstruction_is_summed_bce():
    logits = torch.tensor([[0.0, 2.0, -1.0]])
    x = torch.tensor([[1.0, 0.0, 1.0]])
    p = torch.sigmoid(logits)
    expected = -(x * p.log() + (1 - x) * (1 - p).log()).sum()
    assert -of(likelihood("bernoulli", 1)).log_prob(x.view(1, 1, 1, 3), logits.view(1, 1, 1, 3)).item() == pytest.approx(expected.item(), abs=1e-5)


def test_gaussian_reconstruction_is_the_normal_log_density():
    mean, x = torch.tensor([[0.2, 0.5]]), torch.tensor([[0.1, 0.9]])
    expected = -Normal(mean, 0.1).log_prob(x).sum()
    gaussian = of(likelihood("gaussian", 1, gaussian_std=0.1))
    assert -gaussian.log_prob(x.view(1, 1, 1, 2), mean.view(1, 1, 1, 2)).item() == pytest.approx(expected.item(), abs=1e-4)


def linear_gaussian_weights(x, mu, logvar):
    """log p(x|z) + log p(z) - log q(z|x) for noise eps [n, m, 1], z = mu + eps sigma: p(x|z) = N(x; z, 1)
    and p(z) = N(0, 1) in one dimension, so p(x) = N(0, 2) and p(z|x) = N(x/2, 1/2)."""
    sigma = torch.exp(0.5 * logvar).unsqueeze(1)

    def weights(eps):
        z = mu.unsqueeze(1) + eps * sigma
        log_joint = Normal(z, 1.0).log_prob(x.unsqueeze(1)) + Normal(0.0, 1.0).log_prob(z)
        return (log_joint - Normal(mu.unsqueeze(1), sigma).log_prob(z)).sum(-1)

    return weights


def test_iwae_is_exact_with_the_true_posterior():
    x = torch.tensor([[0.3], [-1.2], [2.0]])
    mu, logvar = x / 2, torch.full_like(x, math.log(0.5))
    exact = Normal(0.0, math.sqrt(2.0)).log_prob(x).squeeze(1)
    bound = iwae_bound(linear_gaussian_weights(x, mu, logvar), 3, 1, k=5, generator=torch.Generator().manual_seed(0))
    assert torch.allclose(bound, exact, atol=1e-5)


def test_iwae_tightens_with_k_towards_log_px():
    x = torch.tensor([[1.5]])
    mu, logvar = torch.tensor([[0.0]]), torch.tensor([[0.0]])  # a poor q: N(0, 1) instead of N(0.75, 0.5)
    exact = Normal(0.0, math.sqrt(2.0)).log_prob(x).item()
    gen = torch.Generator().manual_seed(0)
    weights = linear_gaussian_weights(x, mu, logvar)
    k1 = torch.stack([iwae_bound(weights, 1, 1, 1, generator=gen) for _ in range(2000)]).mean()
    k1000 = iwae_bound(weights, 1, 1, 5000, generator=gen).item()
    assert k1.item() < exact - 0.2  # the ELBO's gap: KL(q || p(z|x)) is about 0.34 nats here
    assert abs(k1000 - exact) < 0.02
