"""The flow prior: an invertible map with the right log-density, and a VAE that trains and scores with it."""

import math

import pytest
import torch

from training import checkpoint
from training.config import ModelConfig, TrainConfig
from training.evaluate import elbo_terms, evaluate, iwae_nll, prepare_eval_images
from training.flow import FlowPrior
from training.losses import kl_divergence, monte_carlo_kl, standard_normal_log_prob
from training.model import VAE
from training.train import Trainer, objective


def random_flow(dim: int = 6, layers: int = 4, hidden: int = 16, seed: int = 0) -> FlowPrior:
    """A flow far from the identity: its zero-initialised last layers get random weights."""
    torch.manual_seed(seed)
    flow = FlowPrior(dim, layers, hidden).double()
    with torch.no_grad():
        for layer in flow.layers:
            layer.net[-1].weight.normal_(0, 0.5)
            layer.net[-1].bias.normal_(0, 0.5)
    return flow


def test_flow_is_invertible():
    flow = random_flow()
    eps = torch.randn(256, 6, dtype=torch.float64) * 2
    z = flow(eps)
    assert (z - eps).abs().max() > 0.1  # not the identity
    back, _ = flow.inverse(z)
    assert torch.allclose(back, eps, atol=1e-4, rtol=0)
    again, _ = flow.inverse(flow(back))
    assert torch.allclose(flow(flow.inverse(z)[0]), z, atol=1e-4, rtol=0) and torch.allclose(again, eps, atol=1e-4)
    # In float32, as the model trains and exports it, too.
    flow32 = random_flow().float()
    eps32 = torch.randn(256, 6)
    assert torch.allclose(flow32.inverse(flow32(eps32))[0], eps32, atol=1e-4, rtol=0)


def test_flow_log_density_is_the_change_of_variables():
    # log p(z) = log N(f^-1(z); 0, I) + log |det J_{f^-1}(z)|, the Jacobian by brute force (autograd).
    flow = random_flow()
    z = torch.randn(8, 6, dtype=torch.float64) * 1.5
    _, log_prob = flow.inverse(z)
    for i in range(len(z)):
        jac = torch.autograd.functional.jacobian(lambda v: flow.inverse(v.unsqueeze(0))[0].squeeze(0), z[i])
        sign, logabsdet = torch.linalg.slogdet(jac)
        assert sign != 0
        eps = flow.inverse(z[i : i + 1])[0]
        expected = standard_normal_log_prob(eps).squeeze(0) + logabsdet
        assert log_prob[i].item() == pytest.approx(expected.item(), abs=1e-8)
    assert torch.allclose(flow.log_prob(z.view(2, 4, 6)), log_prob.view(2, 4))


def test_flow_log_scales_are_bounded():
    flow = random_flow()
    with torch.no_grad():
        for layer in flow.layers:
            layer.net[-1].bias.fill_(1e6)  # whatever the network says...
    z = torch.randn(4, 6, dtype=torch.float64)
    _, log_prob = flow.inverse(z)
    # ...each layer moves half of the dimensions by at most exp(+-bound).
    bound = sum(layer.scale_bound * (1 - layer.mask).sum().item() for layer in flow.layers)
    base = standard_normal_log_prob(flow.inverse(z)[0])
    assert torch.isfinite(log_prob).all() and ((log_prob - base).abs() <= bound + 1e-9).all()


def test_untrained_flow_is_the_standard_normal():
    flow = FlowPrior(5, 3, 8)
    z = torch.randn(10, 5)
    assert torch.equal(flow(z), z)
    eps, log_prob = flow.inverse(z)
    assert torch.equal(eps, z) and torch.allclose(log_prob, standard_normal_log_prob(z))


@pytest.mark.filterwarnings("ignore:.*LeafSpec.*:FutureWarning")  # torch's own exporter internals
def test_flow_exports_to_onnx_both_ways(tmp_path):
    # Plain ops and no data-dependent control flow: forward and inverse each export as they are.
    ort = pytest.importorskip("onnxruntime")
    pytest.importorskip("onnxscript")
    flow = random_flow().float().eval()

    class Inverse(torch.nn.Module):
        def __init__(self, flow):
            super().__init__()
            self.flow = flow

        def forward(self, z):
            return self.flow.inverse(z)

    batch = torch.export.Dim("N", min=1, max=1024)
    x = torch.randn(7, 6)
    for module, name in ((flow, "forward"), (Inverse(flow).eval(), "inverse")):
        path = tmp_path / f"{name}.onnx"
        torch.onnx.export(module, (x,), str(path), dynamic_shapes=({0: batch},), dynamo=True, opset_version=18)
        session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        for n in (1, 33):
            inp = torch.randn(n, 6)
            got = session.run(None, {session.get_inputs()[0].name: inp.numpy()})
            want = module(inp)
            want = want if isinstance(want, tuple) else (want,)
            for g, w in zip(got, want):
                assert torch.allclose(torch.from_numpy(g), w.detach(), atol=1e-4)


def flow_config(**overrides) -> TrainConfig:
    model = ModelConfig(latent_dim=8, widths=(16, 32), hidden=64, prior="flow", flow_layers=2, flow_hidden=16)
    settings = dict(epochs=3, batch_size=32, iwae_k=20, eval_images=50, free_bits=0.0) | overrides
    return TrainConfig(model=model, **settings)


def test_monte_carlo_kl_is_unbiased_for_the_closed_form():
    # At the untrained flow (the identity) the prior is N(0, I): the MC estimate averages to the closed form.
    torch.manual_seed(0)
    mu, logvar = torch.randn(3, 4), torch.randn(3, 4) * 0.5
    z = VAE.reparameterize(mu.expand(200_000, 3, 4), logvar.expand(200_000, 3, 4))
    flow = FlowPrior(4, 2, 8)
    estimate = monte_carlo_kl(z, mu, logvar, flow.log_prob(z)).mean(dim=0)
    assert torch.allclose(estimate, kl_divergence(mu, logvar), atol=0.03)


def test_flow_objective_and_free_bits(digits):
    torch.manual_seed(0)
    cfg = flow_config()
    model = VAE(ModelConfig(**{**cfg.model.__dict__, "image_shape": digits.image_shape}))
    x = digits.train.images[:64]
    torch.manual_seed(1)
    loss, stats = objective(model, x, cfg, 1.0, None)
    assert math.isfinite(stats["kl"]) and loss.item() == pytest.approx(stats["recon"] + stats["kl"], rel=1e-6)
    loss.backward()
    assert any(p.grad.abs().sum() > 0 for p in model.flow.parameters())  # the prior trains jointly
    # Free bits under the flow: one floor of free_bits * latent_dim nats on the batch-mean KL estimate.
    torch.manual_seed(1)
    floored, floored_stats = objective(model, x, flow_config(free_bits=stats["kl"] / 8 + 1.0), 1.0, None)
    assert floored_stats["loss"] == pytest.approx(stats["recon"] + stats["kl"] + 8.0, rel=1e-5)
    assert floored.item() == pytest.approx(stats["recon"], rel=1e-6)  # under the floor the KL adds no gradient
    torch.manual_seed(1)
    low, _ = objective(model, x, flow_config(free_bits=1e-3), 1.0, None)
    assert low.item() == pytest.approx(loss.item(), rel=1e-6)


def test_flow_prior_vae_trains_scores_and_round_trips(digits, tmp_path):
    trainer = Trainer(flow_config(), tmp_path, digits)
    history = trainer.fit()
    assert all(math.isfinite(h["train"]["kl"]) and math.isfinite(h["val"]["kl"]) for h in history)
    assert history[-1]["train"]["neg_elbo"] < history[0]["train"]["neg_elbo"]
    # The flow moved away from the identity: it is a learned prior, not N(0, I).
    z = torch.randn(16, 8)
    assert (trainer.model.flow(z) - z).abs().max() > 1e-3

    model, cfg, state = checkpoint.load_model(tmp_path / "best.pt")
    assert cfg.model.prior == "flow" and any(k.startswith("flow.") for k in state["model"])
    trainer.model.eval()
    assert torch.equal(model.prior_log_prob(z), trainer.model.prior_log_prob(z))

    x = prepare_eval_images(digits.test.images[:30], model.likelihood)
    result = evaluate(model, x, k=20)
    assert all(math.isfinite(result[key]) for key in ("elbo", "kl", "nll"))
    assert result["nll"] <= -result["elbo"] + 1.0  # the IWAE bound is at least as tight (up to MC noise)
    # The NLL uses the flow's density: with N(0, I) in its place, the figure changes.
    standard = VAE(ModelConfig(**{**cfg.model.__dict__, "prior": "standard"}))
    standard.load_state_dict({k: v for k, v in model.state_dict().items() if not k.startswith("flow.")})
    with_flow, without = iwae_nll(model, x, 20).mean().item(), iwae_nll(standard.eval(), x, 20).mean().item()
    assert with_flow != pytest.approx(without, abs=1e-3)
    torch.manual_seed(0)
    kl = elbo_terms(model, x)["kl"]
    torch.manual_seed(0)
    mu, logvar = model.encode(x)
    zq = model.reparameterize(mu, logvar)
    assert torch.allclose(kl, monte_carlo_kl(zq, mu, logvar, model.flow.log_prob(zq)), atol=1e-5)

    # Sampling decodes f(eps), eps ~ N(0, T^2 I).
    gen = torch.Generator().manual_seed(3)
    eps = torch.randn(5, 8, generator=torch.Generator().manual_seed(3)) * 0.7
    expected = model.mean_image(model.decode(model.flow(eps)))
    assert torch.allclose(model.sample(5, 0.7, gen), expected)


def test_flow_needs_a_vae_and_two_latents():
    with pytest.raises(ValueError, match="autoencoder"):
        ModelConfig(kind="ae", prior="flow")
    with pytest.raises(ValueError, match="latent_dim >= 2"):
        ModelConfig(latent_dim=1, prior="flow")
