"""The hierarchical VAE (training.hvae): its latent, its KL and importance weights against their
definitions, seeded batch-independent samples, and real training runs on digits (8x8): in one
process, resumed, and data-parallel under torchrun."""

import json
import math
import shutil
import subprocess
import sys

import pytest
import torch
from PIL import Image

from tests.test_distributed import FLAGS as FLAT_FLAGS
from tests.test_distributed import TOL, distance, torchrun, weights
from service.commands import UserError
from training import checkpoint
from training.config import ModelConfig, TrainConfig
from training.families import build
from training.figures import group_resampling
from training.evaluate import evaluate, prepare_eval_images
from training.hvae import HVAE, TopPrior, _log_normal, group_sizes
from training.train import Trainer, fit_top_prior, objective, run

# 8x8 digits: groups at 2x2 (two of them) and 4x4, 4 latent channels each: 4 * (4 + 4 + 16) = 96 dims.
HVAE_MODEL = dict(kind="hvae", groups="4:2,2:1", z_channels=4, width=16)


def small_hvae(shape=(1, 8, 8), **overrides) -> HVAE:
    torch.manual_seed(0)
    return build(ModelConfig(image_shape=shape, **(HVAE_MODEL | overrides)))


def hvae_config(**overrides) -> TrainConfig:
    model = ModelConfig(**HVAE_MODEL)
    settings = dict(epochs=3, batch_size=32, iwae_k=10, eval_images=40, lr=3e-3, lr_schedule="constant") | overrides
    return TrainConfig(model=model, **settings)


def test_groups_go_coarse_to_fine_at_the_sizes_asked():
    cfg = ModelConfig(image_shape=(3, 28, 20), **(HVAE_MODEL | {"groups": "2:1,8:2,4:1"}))
    assert group_sizes(cfg) == [(4, 3), (4, 3), (7, 5), (14, 10)]
    model = build(cfg)
    assert model.noise_size == 4 * (12 + 12 + 35 + 140) and model.group_dims == [48, 48, 140, 560]
    with pytest.raises(ValueError, match="factor:count"):
        ModelConfig(**(HVAE_MODEL | {"groups": "8x2"}))
    with pytest.raises(ValueError, match="each factor once"):
        ModelConfig(**(HVAE_MODEL | {"groups": "4:1,4:2"}))


def test_decoding_the_encoded_latent_reconstructs_at_the_posterior_means():
    """u = encode(x) read back through the prior's means and scales retraces the posterior-mean
    path: decode(u) is the model's reconstruction, for a trained-looking (non-zero) network."""
    model = small_hvae(shape=(3, 12, 12), likelihood="logistic-mixture", mixtures=2)
    for p in model.parameters():
        p.data.add_(torch.randn_like(p) * 0.05)  # away from the zero-initialised start, where p = N(0, I)
    x = torch.rand(5, 3, 12, 12)
    with torch.no_grad():
        u, logvar = model.encode(x)
        along_means, _ = model._top_down(5, model._bottom_up(x), None, "mean")
        assert u.shape == logvar.shape == (5, model.noise_size) and u.abs().max() > 0.01
        torch.testing.assert_close(model.decode(u), along_means, rtol=1e-4, atol=1e-4)


def test_group_resampling_walks_from_a_prior_sample_to_the_reconstruction():
    """Column L of groups.png decodes the image's encoding for the first L groups and the same prior
    noise for the rest: column 0 is a sample, the last the reconstruction."""
    model = small_hvae(shape=(3, 12, 12), likelihood="logistic-mixture", mixtures=2)
    for p in model.parameters():
        p.data.add_(torch.randn_like(p) * 0.05)
    x = torch.rand(3, 3, 12, 12)
    with torch.no_grad():
        kept = group_resampling(model, x, generator=torch.Generator().manual_seed(7))
        u, _ = model.encode(x)
        noise = torch.randn(u.shape, generator=torch.Generator().manual_seed(7))
        first = model.group_dims[0]
        assert kept.shape == (3, len(model.group_dims) + 1, 3, 12, 12)
        for column, z in ((0, noise), (1, torch.cat([u[:, :first], noise[:, first:]], dim=1)), (-1, u)):
            torch.testing.assert_close(kept[:, column], model.mean_image(model.decode(z)))
        assert (kept[:, 0] - kept[:, -1]).abs().max() > 1e-3  # the noise and the encoding differ


def test_the_closed_form_kl_is_the_mean_of_the_sampled_log_ratio():
    """Per group, KL(q || p) in closed form against E_q[log q - log p] by Monte Carlo, through the
    same top-down passes (so also conditional on the groups above)."""
    model = small_hvae()
    for p in model.parameters():
        p.data.add_(torch.randn_like(p) * 0.05)
    x = torch.rand(1, 1, 8, 8).expand(4000, 1, 8, 8)
    with torch.no_grad():
        _, steps = model._top_down(len(x), model._bottom_up(x), torch.randn(len(x), model.noise_size), "posterior")
    for step in steps:
        closed, sampled = step.kl().mean().item(), -step.log_ratio().mean().item()
        assert sampled == pytest.approx(closed, rel=0.05, abs=0.05)


def test_a_top_prior_is_the_learned_one_until_fitted_and_then_its_gaussian():
    """--top-prior: before its fit, every output equals the model's without it; after, the bound's
    log p(z) - log q(z|x) is the fitted Gaussian's density of the top groups' u (the change of
    variables from z) and the learned priors' below them, decode(encode(x)) still reconstructs, and
    the KL the loss sees estimates the same expectation."""
    plain, top = small_hvae(), small_hvae(top_prior=2)
    for p in plain.parameters():
        p.data.add_(torch.randn_like(p) * 0.05)
    top.load_state_dict(plain.state_dict(), strict=False)
    x, eps = (torch.rand(5, 1, 8, 8) > 0.5).float(), torch.randn(5, plain.noise_size)
    with torch.no_grad():
        for ours, theirs in zip(top.posterior_draw(x, eps), plain.posterior_draw(x, eps)):
            assert torch.equal(ours, theirs)
        torch.testing.assert_close(top.encode(x), plain.encode(x))
        assert torch.equal(top(x, eps).kl, plain(x, eps).kl)

        d = top.top_dims
        assert d == 32 and len(top.state_dict()) == len(plain.state_dict()) + 4
        mu, logvar = torch.randn(50, d) * 2 + 1, torch.randn(50, d) * 0.1 - 1
        top.set_top_prior(prior := TopPrior.fit(mu, logvar))
        cov = torch.cov(mu.T.double(), correction=0) + torch.diag(logvar.double().exp().mean(0))
        torch.testing.assert_close(prior.scale.double() @ prior.scale.double().T, cov)
        torch.testing.assert_close(prior.inverse @ prior.scale, torch.eye(d), atol=1e-5, rtol=0)
        wide = TopPrior.fit(mu, logvar, spread=1.3)  # --top-prior-scale: the same Gaussian, its deviations wider
        torch.testing.assert_close(wide.scale, 1.3 * prior.scale)
        torch.testing.assert_close(wide.log_diag, prior.log_diag + math.log(1.3))
        torch.testing.assert_close(wide.inverse @ wide.scale, torch.eye(d), atol=1e-5, rtol=0)

        _, log_ratio, v = top.posterior_draw(x, eps)
        _, steps = top._top_down(5, top._bottom_up(x), eps, "posterior")
        u = torch.cat([((s.z - s.p_mu) * torch.exp(-s.p_log_sigma)).flatten(1) for s in steps], dim=1)
        gaussian = torch.distributions.MultivariateNormal(prior.mean, scale_tril=prior.scale)
        log_p = gaussian.log_prob(u[:, :d]) - sum(s.p_log_sigma.flatten(1).sum(1) for s in steps[:2])
        log_p = log_p + _log_normal(steps[2].z, steps[2].p_mu, steps[2].p_log_sigma).flatten(1).sum(1)
        log_q = sum(_log_normal(s.z, s.q_mu, s.q_log_sigma).flatten(1).sum(1) for s in steps)
        torch.testing.assert_close(log_ratio, log_p - log_q, rtol=1e-5, atol=1e-3)
        torch.testing.assert_close(v[:, :d], (u[:, :d] - prior.mean) @ prior.inverse.T)
        torch.testing.assert_close(v[:, d:], u[:, d:])

        along_means, _ = top._top_down(5, top._bottom_up(x), None, "mean")
        torch.testing.assert_close(top.decode(top.encode(x)[0]), along_means, rtol=1e-4, atol=1e-4)
        assert (top.decode(v) - plain.decode(v)).abs().max() > 1e-3  # the same latent, another prior

        many, noise = x[:1].expand(4000, -1, -1, -1), torch.randn(4000, top.noise_size)
        kl, sampled = top(many, noise).kl.sum(1).mean().item(), -top.posterior_draw(many, noise)[1].mean().item()
        assert kl == pytest.approx(sampled, rel=0.05)


def test_a_run_fits_its_top_prior_and_is_evaluated_with_it(digits, tmp_path):
    cfg = hvae_config(epochs=2, iwae_k=5, eval_images=20)
    cfg.model.top_prior = 2
    metrics = run(cfg, tmp_path, digits)
    model, _, _ = checkpoint.load_model(tmp_path / "best.pt")
    fitted = TopPrior(*(t.clone() for t in model.top_gaussian))
    assert fitted.mean.abs().max() > 1e-3 and (fitted.scale - torch.eye(model.top_dims)).abs().max() > 1e-3
    x = prepare_eval_images(digits.test.unit(), model.likelihood, 20)
    assert evaluate(model, x, 5)["nll"] == pytest.approx(metrics["test"]["nll"], rel=1e-6)
    refit = fit_top_prior(model, digits)  # from the learned priors again, not from the stored fit
    assert all(torch.allclose(a, b, atol=1e-5) for a, b in zip(refit, fitted))
    assert evaluate(model, x, 5)["nll"] != pytest.approx(metrics["test"]["nll"], rel=1e-6)  # identity: another density


def test_a_trained_model_is_refitted_as_a_run_with_the_flag_fits_it(digits, tmp_path):
    """python -m training.top_prior on a run trained without --top-prior gives the model that a run
    with it ends on (training does not depend on the flag); 0 gives the learned priors back."""
    from training.top_prior import main

    metrics = run(hvae_config(epochs=2, iwae_k=5, eval_images=20), tmp_path / "plain", digits)
    main(["--checkpoint", str(tmp_path / "plain" / "best.pt"), "--groups", "2", "--scale", "1.2", "--out", str(tmp_path / "top.pt")])
    model, cfg, state = checkpoint.load_model(tmp_path / "top.pt")
    plain, _, _ = checkpoint.load_model(tmp_path / "plain" / "best.pt")
    assert cfg.model.top_prior == 2 and cfg.model.top_prior_scale == 1.2 and state["epoch"] == metrics["best_epoch"]
    assert all(torch.equal(v, plain.state_dict()[k]) for k, v in model.state_dict().items() if not k.startswith("top_"))
    fitted = TopPrior(*(t.clone() for t in model.top_gaussian))
    assert all(torch.allclose(a, b, atol=1e-5) for a, b in zip(fit_top_prior(model, digits), fitted))
    assert fitted.mean.abs().max() > 1e-3
    main(["--checkpoint", str(tmp_path / "top.pt"), "--groups", "0", "--out", str(tmp_path / "back.pt")])
    back, _, _ = checkpoint.load_model(tmp_path / "back.pt")
    assert back.state_dict().keys() == plain.state_dict().keys()
    x = prepare_eval_images(digits.test.unit(), plain.likelihood, 20)
    assert evaluate(back, x, 5)["nll"] == evaluate(plain, x, 5)["nll"] == metrics["test"]["nll"]


def test_the_refit_command_refuses_a_model_it_cannot_fit_in_one_line(tmp_path):
    flat = build(ModelConfig(latent_dim=4, widths=(8,), hidden=16))
    checkpoint.save(tmp_path / "flat.pt", flat, TrainConfig(model=flat.cfg))
    hier = small_hvae()
    checkpoint.save(tmp_path / "hier.pt", hier, TrainConfig(model=hier.cfg))
    for path, groups, message in ((tmp_path / "flat.pt", "1", "not this vae"), (tmp_path / "hier.pt", "4", "from 0 to the 3")):
        done = subprocess.run(
            [sys.executable, "-m", "training.top_prior", "--checkpoint", str(path), "--groups", groups, "--out", str(tmp_path / "o.pt")],
            capture_output=True, text=True, timeout=120,
        )  # fmt: skip
        assert done.returncode == 2 and message in done.stderr and len(done.stderr.strip().splitlines()) == 1, done.stderr
    assert not (tmp_path / "o.pt").exists()


@pytest.mark.parametrize(
    "flags, message",
    [(["--top-prior", "4"], "from 0 to the 3 of --groups"), (["--top-prior", "1", "--conditional"], "not per class"),
     (["--model", "vae", "--top-prior", "1"], "--model hvae"), (["--top-prior", "2", "--top-prior-scale", "0"], "above 0")],
)  # fmt: skip
def test_a_top_prior_it_cannot_fit_is_refused_in_one_line(flags, message, tmp_path, capsys):
    from training.__main__ import parse_args

    base = ["--dataset", "digits", "--model", "hvae", "--groups", "4:2,2:1", "--out", str(tmp_path)]
    with pytest.raises(SystemExit):
        parse_args([*base, *flags])
    error = capsys.readouterr().err.strip().splitlines()[-1]
    assert message in error and "Traceback" not in error


def test_importance_weights_bound_the_elbo_and_tighten_with_k():
    model = small_hvae()
    x = (torch.rand(6, 1, 8, 8) > 0.5).float()
    torch.manual_seed(3)
    with torch.no_grad():
        weights = model.log_weights(x)(torch.randn(6, 400, model.noise_size))
        elbo = weights.mean(dim=1)
        iwae = torch.logsumexp(weights, dim=1) - math.log(400)
        terms = model(x)
        single = model.likelihood.log_prob(x, terms.params) - terms.kl.sum(dim=1)
    assert (iwae >= elbo).all()
    assert elbo.mean().item() == pytest.approx(single.mean().item(), abs=3.0)  # one draw of the same expectation


def test_samples_are_seeded_and_each_latent_decodes_alike_in_any_batch():
    model = small_hvae(shape=(3, 12, 12), likelihood="logistic-mixture", mixtures=2)
    a = model.sample(7, temperature=0.8, generator=torch.Generator().manual_seed(4))
    assert torch.equal(a, model.sample(7, temperature=0.8, generator=torch.Generator().manual_seed(4)))
    assert a.shape == (7, 3, 12, 12) and 0.0 <= a.min() and a.max() <= 1.0
    u = model.sample_z(7, generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        torch.testing.assert_close(model.decode(u)[2:5], model.decode(u[2:5]), rtol=0, atol=1e-5)


def test_free_bits_floor_each_group(digits):
    """Free bits per group: floors far above every group's KL leave the reconstruction's gradient alone."""
    model = small_hvae()
    x = digits.train.images[:32]
    eps = torch.randn(32, model.noise_size)
    plain, stats = objective(model, x, hvae_config(free_bits=0.0), 1.0, None, eps)
    floored, floored_stats = objective(model, x, hvae_config(free_bits=10.0), 1.0, None, eps)
    assert floored_stats["loss"] == pytest.approx(stats["recon"] + 10.0 * model.noise_size, rel=1e-5)
    recon_only, _ = objective(model, x, hvae_config(free_bits=0.0), 0.0, None, eps)
    for got, want in zip(torch.autograd.grad(floored, list(model.parameters())),
                         torch.autograd.grad(recon_only, list(model.parameters()))):  # fmt: skip
        torch.testing.assert_close(got, want)


def test_a_hierarchical_run_trains_evaluates_and_resumes_exactly(digits, tmp_path):
    straight = Trainer(hvae_config(epochs=4), tmp_path / "straight", digits)
    history = straight.fit()
    assert history[-1]["train"]["neg_elbo"] < history[0]["train"]["neg_elbo"] - 3
    assert len(history[-1]["val"]["kl_groups"]) == 3
    first = Trainer(hvae_config(epochs=2), tmp_path / "resumed", digits)
    first.fit()
    resumed = Trainer(hvae_config(epochs=4), tmp_path / "resumed", digits)
    resumed.resume()
    resumed.fit()
    assert [h["val"] for h in resumed.history] == [h["val"] for h in straight.history]
    model, cfg, _ = checkpoint.load_model(tmp_path / "straight" / "best.pt")
    assert isinstance(model, HVAE) and cfg.model.kind == "hvae"


def test_the_command_reports_bits_and_each_groups_kl(tmp_path):
    from training.__main__ import main

    main(["--dataset", "digits", "--model", "hvae", "--groups", "4:2,2:1", "--z-channels", "4", "--width", "16",
          "--epochs", "2", "--iwae-k", "10", "--eval-images", "40", "--out", str(tmp_path)])  # fmt: skip
    test = json.loads((tmp_path / "metrics.json").read_text())["test"]
    assert test["nll"] < -test["elbo"] + 1e-6 and test["nll_bits_per_dim"] > 0
    assert [g["dims"] for g in test["groups"]] == [16, 16, 64]
    assert all(g["kl"] >= 0 and g["collapsed"] == (g["active_units"] == 0) for g in test["groups"])
    assert (tmp_path / "samples.png").exists() and (tmp_path / "interpolation_slerp.png").exists()
    # groups.png: 8 rows of the image and the 3 groups' 4 columns, 8x8 cells scaled by 3 with a pixel between
    assert Image.open(tmp_path / "groups.png").size == (3 * (5 * 9 + 1), 3 * (8 * 9 + 1))


def test_a_collapsed_group_is_named():
    from training.train import group_warnings

    groups = [{"group": "group 0 (4x2x2)", "dims": 16, "kl": 0.0, "active_units": 0, "collapsed": True},
              {"group": "group 1 (4x4x4)", "dims": 64, "kl": 3.1, "active_units": 9, "collapsed": False}]  # fmt: skip
    (warning,) = group_warnings({"groups": groups})
    assert "group 0 (4x2x2)" in warning and "0 of 16 units" in warning


HVAE_FLAGS = [*FLAT_FLAGS, "--model", "hvae", "--groups", "4:2,2:1", "--z-channels", "4", "--width", "16"]


def test_two_ranks_train_a_hierarchical_model_as_one_process_does(tmp_path):
    from training.__main__ import parse_args

    cfg, _, _ = parse_args([*HVAE_FLAGS, "--epochs", "1", "--out", str(tmp_path / "one")])
    Trainer(cfg, tmp_path / "one").fit()
    done = torchrun(2, [*HVAE_FLAGS, "--epochs", "1", "--out", str(tmp_path / "two")])
    assert done.returncode == 0, done.stdout + done.stderr
    synced = distance(weights(tmp_path / "two" / "last.pt"), weights(tmp_path / "one" / "last.pt"))
    assert synced < TOL, f"two ranks end {synced:.2e} from one process"


def test_the_moving_average_is_what_is_validated_kept_and_resumed(digits, tmp_path):
    trainer = Trainer(hvae_config(epochs=2), tmp_path, digits)
    trainer.fit()
    last = checkpoint.load(tmp_path / "last.pt")
    best = checkpoint.load(tmp_path / "best.pt")
    averaged = {k.removeprefix("module."): v for k, v in last["ema"].items() if k.startswith("module.")}
    assert best["epoch"] == 2 and averaged.keys() == best["model"].keys()
    assert all(torch.equal(averaged[k], best["model"][k]) for k in averaged)  # best.pt holds the average...
    assert distance(best["model"], last["model"]) > 1e-4  # ...not the last step's weights
    assert [h["skipped_steps"] for h in trainer.history] == [0, 0]


def test_exploding_steps_are_skipped_and_a_lasting_rise_is_not_skipped_for_ever(digits, tmp_path):
    """The rule on a run of norms: 1.0 for 100 steps, then one spike, then norms that grow 30-fold
    for good. The spike is skipped, the first steps of the rise too, and then the rise is typical."""
    trainer = Trainer(hvae_config(epochs=1), tmp_path, digits)
    assert [trainer._exploding(1.0) for _ in range(100)] == [False] * 100
    assert trainer._exploding(50.0)
    decisions = [trainer._exploding(30.0) for _ in range(400)]
    assert decisions[0] and not decisions[-1]
    assert sum(decisions) < 200 and not any(decisions[sum(decisions):])  # one burst, then every step taken
    flat = Trainer(TrainConfig(model=ModelConfig(latent_dim=4, widths=(8,), hidden=16), epochs=1), tmp_path / "flat", digits)
    assert not any(flat._exploding(v) for v in [1.0] * 60 + [1e6])  # off for a flat VAE by default


def test_curves_and_comparisons_take_hierarchical_runs(digits, tmp_path):
    from training.compare import write_compare
    from training.curves import axis_top, curve, run_metrics, write_curves
    from training.train import run

    metrics = run(hvae_config(epochs=2, iwae_k=5, eval_images=20), tmp_path / "hier", digits)
    minutes, bits, test = curve(metrics)
    assert len(minutes) == 2 and minutes[0] < minutes[1] and all(b > 0 for b in bits) and test == metrics["test"]["nll_bits_per_dim"]
    # A run stopped before its end has no metrics.json: its last.pt's history gives the same curve, without a test figure.
    (tmp_path / "stopped").mkdir()
    shutil.copy(tmp_path / "hier" / "last.pt", tmp_path / "stopped" / "last.pt")
    assert curve(run_metrics(tmp_path / "stopped")) == (minutes, bits, None)
    with pytest.raises(UserError, match="neither metrics.json nor last.pt"):
        run_metrics(tmp_path)
    # A diverged run's thousands of bits/dim go past the axis instead of flattening the others.
    assert axis_top([3.9, 4.0, 4.1, 2000.0]) == 8.2 and axis_top([4.0, 5.0]) == 5.1 and axis_top([math.nan]) == math.inf
    assert write_curves([tmp_path / "hier", tmp_path / "stopped"], tmp_path / "curves.png").read_bytes()[:4] == b"\x89PNG"
    assert write_compare([tmp_path / "hier"], tmp_path / "compare.png", n=4, temperatures=(1.0, 0.5)).read_bytes()[:4] == b"\x89PNG"
