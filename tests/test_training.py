"""Real (short) training runs on the bundled digits: the loss falls, seeds repeat, checkpoints round-trip."""

import json
import os
import stat
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from training import checkpoint
from training.config import ModelConfig, TrainConfig
from training.evaluate import evaluate, prepare_eval_images
from training.features import feature_distance, load_feature_net, train_feature_net
from training.figures import FIGURES
from training.losses import kl_per_dim
from training.model import VAE
from training.train import Trainer, kl_weight, objective, run


def small_config(**overrides) -> TrainConfig:
    model = ModelConfig(latent_dim=8, widths=(16, 32), hidden=64)
    settings = dict(epochs=4, batch_size=32, iwae_k=20, eval_images=50, free_bits=0.0) | overrides
    return TrainConfig(model=model, **settings)


def test_training_lowers_the_loss(digits, tmp_path):
    history = Trainer(small_config(epochs=6), tmp_path, digits).fit()
    first, last = history[0], history[-1]
    assert last["train"]["neg_elbo"] < first["train"]["neg_elbo"] - 3
    assert last["val"]["neg_elbo"] < first["val"]["neg_elbo"]
    assert (tmp_path / "best.pt").exists() and (tmp_path / "last.pt").exists()


def test_same_seed_same_run_other_seed_other_run(digits, tmp_path):
    runs = [Trainer(small_config(epochs=2, seed=s), tmp_path / str(i), digits) for i, s in enumerate((7, 7, 8))]
    histories = [[(h["train"], h["val"]) for h in t.fit()] for t in runs]
    assert histories[0] == histories[1]
    assert histories[0] != histories[2]
    for a, b in zip(runs[0].model.state_dict().values(), runs[1].model.state_dict().values()):
        assert torch.equal(a, b)


def test_resume_continues_exactly(digits, tmp_path):
    # A run stopped after 2 of 4 epochs, then resumed (constant lr: cosine depends on the epoch count).
    straight = Trainer(small_config(epochs=4, lr_schedule="constant"), tmp_path / "straight", digits)
    straight.fit()
    first = Trainer(small_config(epochs=2, lr_schedule="constant"), tmp_path / "resumed", digits)
    first.fit()
    resumed = Trainer(small_config(epochs=4, lr_schedule="constant"), tmp_path / "resumed", digits)
    resumed.resume()
    resumed.fit()
    assert [h["val"] for h in resumed.history] == [h["val"] for h in straight.history]
    for a, b in zip(straight.model.state_dict().values(), resumed.model.state_dict().values()):
        assert torch.equal(a, b)


@pytest.mark.filterwarnings("ignore:for .*copying from a non-meta parameter:UserWarning")  # meta weights hold no data
def test_resume_onto_another_device_restores_every_generator(digits, tmp_path):
    # No GPU here, so the "meta" device stands in for CUDA: a trainer whose model lives off the CPU.
    # Reading the checkpoint onto that device put the generators' states there too, and
    # torch.set_rng_state (like torch.cuda.set_rng_state) takes only a CPU ByteTensor: it raised.
    Trainer(small_config(epochs=1), tmp_path, digits).fit()
    saved = torch.load(tmp_path / "last.pt", weights_only=True)
    elsewhere = Trainer(small_config(epochs=2, device="meta"), tmp_path, digits)
    assert elsewhere.device.type == "meta" and not torch.equal(torch.get_rng_state(), saved["torch_rng"])
    elsewhere.resume()
    assert torch.equal(torch.get_rng_state(), saved["torch_rng"])
    assert torch.equal(elsewhere.data_gen.get_state(), saved["data_rng"])
    assert elsewhere.start_epoch == 1 and elsewhere.history == saved["history"]
    assert elsewhere.best_val == saved["best_val"]
    # The weights and the optimizer's moments went to the model's device, as they would to a GPU.
    assert all(p.device.type == "meta" for p in elsewhere.model.parameters())
    moments = [v for s in elsewhere.optimizer.state.values() for k, v in s.items() if k != "step"]
    assert len(moments) == 2 * len(list(elsewhere.model.parameters()))
    assert all(t.device.type == "meta" for t in moments)
    steps = {float(s["step"]) for s in elsewhere.optimizer.state.values()}
    assert steps == {float(s["step"]) for s in saved["optimizer"]["state"].values()} and len(steps) == 1
    # What checkpoint.load hands out is all on the CPU, whatever device reads it.
    state = checkpoint.load(tmp_path / "last.pt")
    tensors = [state["torch_rng"], state["data_rng"], *state["model"].values()]
    tensors += [t for s in state["optimizer"]["state"].values() for t in s.values()]
    assert all(t.device.type == "cpu" for t in tensors)


def test_checkpoint_is_on_disk_before_its_rename(tmp_path, monkeypatch):
    events = []
    fsync, replace = os.fsync, os.replace

    def recording_fsync(fd):
        events.append("fsync dir" if stat.S_ISDIR(os.fstat(fd).st_mode) else "fsync file")
        fsync(fd)

    def recording_replace(src, dst):
        events.append(f"rename {Path(src).name} -> {Path(dst).name}")
        replace(src, dst)

    monkeypatch.setattr(os, "fsync", recording_fsync)
    monkeypatch.setattr(os, "replace", recording_replace)
    cfg = small_config()
    model = VAE(cfg.model)
    checkpoint.save(tmp_path / "last.pt", model, cfg, epoch=3)
    assert events == ["fsync file", "rename last.tmp -> last.pt", "fsync dir"]
    assert checkpoint.load(tmp_path / "last.pt")["epoch"] == 3 and not (tmp_path / "last.tmp").exists()


def test_checkpoint_round_trip(digits, tmp_path):
    trainer = Trainer(small_config(epochs=1), tmp_path, digits)
    trainer.fit()
    model, cfg, state = checkpoint.load_model(tmp_path / "last.pt")
    assert cfg == trainer.cfg and state["epoch"] == 1
    x = digits.test.images[:5]
    trainer.model.eval()
    assert torch.equal(model.encode(x)[0], trainer.model.encode(x)[0])
    assert torch.equal(model.decode(torch.ones(2, 8)), trainer.model.decode(torch.ones(2, 8)))


def test_checkpoint_refuses_pickled_objects(tmp_path):
    class Evil:
        def __reduce__(self):
            return (print, ("unpickled!",))

    torch.save({"format": 1, "payload": Evil()}, tmp_path / "evil.pt")
    with pytest.raises(Exception, match="weights_only"):
        checkpoint.load(tmp_path / "evil.pt")


def test_kl_warmup_ramps_to_beta():
    cfg = TrainConfig(beta=2.0, warmup_epochs=4)
    assert [kl_weight(cfg, p) for p in (0, 1, 4, 9)] == [0.0, 0.5, 2.0, 2.0]


def digits_model(digits) -> VAE:
    torch.manual_seed(0)
    return VAE(ModelConfig(image_shape=digits.image_shape, latent_dim=8, widths=(16, 32), hidden=64))


def objective_with(model, x, cfg, feature_net=None):
    """The loss for one batch, with the same reparameterization noise whatever the config."""
    torch.manual_seed(1)
    return objective(model, x, cfg, cfg.beta, feature_net)


def test_beta_and_free_bits_each_change_the_objective(digits, tmp_path):
    # Each setting alone, everything else equal, at one batch where its effect is known exactly...
    model, x = digits_model(digits), digits.train.images[:64]
    plain, stats = objective_with(model, x, small_config())
    recon, kl = stats["recon"], stats["kl"]
    assert plain.item() == pytest.approx(recon + kl, rel=1e-6)
    assert objective_with(model, x, small_config(beta=4.0))[0].item() == pytest.approx(recon + 4 * kl, rel=1e-6)
    with torch.no_grad():
        per_dim = kl_per_dim(*model.encode(x)).mean(dim=0)  # the encoder is deterministic: the same KL
    low, high = per_dim.min().item() / 2, per_dim.max().item() + 1.0
    assert objective_with(model, x, small_config(free_bits=low))[0].item() == pytest.approx(plain.item(), rel=1e-6)
    loss, floored = objective_with(model, x, small_config(free_bits=high))
    assert floored["loss"] == pytest.approx(recon + 8 * high, rel=1e-6) and floored["loss"] > plain.item() + 1.0
    # Every dimension under its floor: the KL gives no gradient, only the reconstruction does.
    recon_only = objective_with(model, x, small_config(beta=0.0))[0]
    floored_grads = torch.autograd.grad(loss, list(model.parameters()))
    for got, want in zip(floored_grads, torch.autograd.grad(recon_only, list(model.parameters()))):
        torch.testing.assert_close(got, want)
    # ...and in training: a run that changes only one of them is not the plain run.
    runs = {}
    for name, overrides in {"plain": {}, "beta": {"beta": 4.0}, "free_bits": {"free_bits": 0.5}}.items():
        trainer = Trainer(small_config(epochs=1, **overrides), tmp_path / name, digits)
        runs[name] = (trainer.fit()[0]["train"]["loss"], trainer.model.state_dict())
    for name in ("beta", "free_bits"):
        assert runs[name][0] != runs["plain"][0], f"{name} alone did not change the training loss"
        assert not all(torch.equal(a, b) for a, b in zip(runs[name][1].values(), runs["plain"][1].values()))


def test_feature_map_reconstruction(digits, tmp_path):
    result = train_feature_net("digits", tmp_path / "feat", epochs=2)
    assert result["test_accuracy"] > 0.5  # a real classifier, not noise
    net = load_feature_net(tmp_path / "feat" / "features.pt")
    x = digits.test.images[:4]
    assert feature_distance(net, x, x).abs().max().item() == 0.0
    assert (feature_distance(net, x, torch.rand_like(x)) > 0).all()

    # The feature term alone changes the objective, by exactly its weight times the feature distance:
    # the same model, batch and noise, with and without it.
    features = str(tmp_path / "feat" / "features.pt")
    model, x = digits_model(digits), digits.train.images[:64]
    pixel, _ = objective_with(model, x, small_config())
    torch.manual_seed(1)
    with torch.no_grad():
        distance = feature_distance(net, x, model.likelihood.mean(model(x)[0])).mean().item()
    assert distance > 1.0
    for weight in (1.0, 2.5):
        cfg = small_config(reconstruction="both", feature_weight=weight, feature_checkpoint=features)
        both, _ = objective_with(model, x, cfg, net)
        assert both.item() == pytest.approx(pixel.item() + weight * distance, rel=1e-5)

    # In training: weight 0 gives the pixel-only run exactly (the control: nothing else differs),
    # weight 1 trains another model, and its loss carries the feature term on top of the -ELBO.
    runs = {}
    variants = {"pixel": {}, "weight 0": {"feature_weight": 0.0}, "weight 1": {"feature_weight": 1.0}}
    for name, overrides in variants.items():
        if overrides:
            overrides |= {"reconstruction": "both", "feature_checkpoint": features}
        runs[name] = Trainer(small_config(epochs=2, **overrides), tmp_path / name, digits)
    before = [p.detach().clone() for p in runs["weight 1"].feature_net.parameters()]
    histories = {name: trainer.fit() for name, trainer in runs.items()}
    weights = {name: list(trainer.model.state_dict().values()) for name, trainer in runs.items()}
    losses = {name: [(h["train"], h["val"]) for h in history] for name, history in histories.items()}
    assert losses["weight 0"] == losses["pixel"] and losses["weight 1"] != losses["pixel"]
    assert all(torch.equal(a, b) for a, b in zip(weights["weight 0"], weights["pixel"]))
    assert not all(torch.equal(a, b) for a, b in zip(weights["weight 1"], weights["pixel"]))
    extra = {name: h[0]["train"]["loss"] - h[0]["train"]["neg_elbo"] for name, h in histories.items()}
    assert extra["weight 1"] > 1.0  # the feature term's share of the logged loss
    assert abs(extra["pixel"]) < 1e-3 and abs(extra["weight 0"]) < 1e-3, extra
    history = histories["weight 1"]
    assert history[-1]["train"]["loss"] < history[0]["train"]["loss"]
    assert all(torch.equal(a, b) for a, b in zip(before, runs["weight 1"].feature_net.parameters()))  # frozen


def test_feature_reconstruction_needs_a_feature_network():
    with pytest.raises(ValueError, match="feature-checkpoint"):
        TrainConfig(reconstruction="features")


def test_run_writes_metrics_and_figures(digits, tmp_path):
    metrics = run(small_config(epochs=2), tmp_path, data=digits)
    saved = json.loads((tmp_path / "metrics.json").read_text())
    assert saved["test"] == metrics["test"]
    for key in ("elbo", "kl", "reconstruction", "nll"):
        assert isinstance(saved["test"][key], float)
    # The IWAE bound is at least as tight as the ELBO (up to Monte Carlo noise).
    assert saved["test"]["nll"] <= -saved["test"]["elbo"] + 0.5
    for name in FIGURES:
        assert (tmp_path / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_evaluation_is_repeatable(digits, tmp_path):
    Trainer(small_config(epochs=1), tmp_path, digits).fit()
    model, cfg, _ = checkpoint.load_model(tmp_path / "best.pt")
    x = prepare_eval_images(digits.test.images[:20], model.likelihood)
    a, b = evaluate(model, x, k=10), evaluate(model, x, k=10)
    assert a["nll"] == b["nll"] and a["elbo"] == b["elbo"]


def test_cli_end_to_end(tmp_path):
    out = tmp_path / "run"
    cmd = [sys.executable, "-m", "training", "--dataset", "digits", "--epochs", "3", "--out", str(out), "--iwae-k", "20"]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert "NLL (IWAE k=20)" in done.stdout
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["config"]["dataset"] == "digits" and len(metrics["history"]) == 3
    assert {"elbo", "kl", "reconstruction", "nll"} <= set(metrics["test"])
    assert all((out / name).exists() for name in FIGURES) and (out / "best.pt").exists()

    evaluated = subprocess.run(
        [sys.executable, "-m", "training.evaluate", "--checkpoint", str(out / "best.pt"), "--k", "5", "--images", "30"],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert evaluated.returncode == 0, evaluated.stderr
    assert json.loads(evaluated.stdout)["images"] == 30


def test_cli_rejects_bad_flags(tmp_path):
    done = subprocess.run(
        [sys.executable, "-m", "training", "--out", str(tmp_path), "--reconstruction", "features"],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert done.returncode == 2 and "feature-checkpoint" in done.stderr


def test_standard_prior_objective_is_the_closed_form_elbo(digits):
    # The standard prior's loss is what it always was: reconstruction + closed-form KL at the same noise,
    # and its checkpoint holds the encoder and decoder alone.
    from training.losses import kl_divergence

    model, x = digits_model(digits), digits.train.images[:64]
    cfg = small_config()
    assert cfg.model.prior == "standard" and cfg.model.kind == "vae"
    loss, stats = objective_with(model, x, cfg)
    torch.manual_seed(1)
    mu, logvar = model.encode(x)
    params = model.decode(mu + torch.randn_like(mu) * torch.exp(0.5 * logvar))
    recon = -model.likelihood.log_prob(x, params).mean()
    kl = kl_divergence(mu, logvar).mean()
    assert stats["kl"] == kl.item() and stats["recon"] == recon.item()
    assert loss.item() == pytest.approx((recon + kl).item(), rel=1e-7)
    assert {k.split(".")[0] for k in model.state_dict()} == {"encoder", "decoder"}
    # Sampling draws z ~ N(0, T^2 I) and decodes it, as before.
    z = torch.randn(3, 8, generator=torch.Generator().manual_seed(5)) * 0.5
    expected = model.mean_image(model.decode(z))
    assert torch.equal(model.sample(3, 0.5, torch.Generator().manual_seed(5)), expected)


def test_autoencoder_trains_and_is_evaluated(digits, tmp_path):
    import math

    from training.evaluate import iwae_nll

    model_cfg = ModelConfig(latent_dim=8, widths=(16, 32), hidden=64, kind="ae")
    cfg = TrainConfig(model=model_cfg, epochs=3, batch_size=32, iwae_k=20, eval_images=50)
    metrics = run(cfg, tmp_path, data=digits)
    history = metrics["history"]
    assert history[-1]["train"]["recon"] < history[0]["train"]["recon"]
    assert "kl" not in history[0]["train"] and history[0]["train"]["loss"] == history[0]["train"]["recon"]
    test = metrics["test"]
    assert test["nll"] is None and test["elbo"] is None and "no density" in test["note"]
    assert math.isfinite(test["reconstruction"])
    for name in (*FIGURES, "samples_fitted.png"):
        assert (tmp_path / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    model, saved_cfg, _ = checkpoint.load_model(tmp_path / "best.pt")
    assert saved_cfg.model.kind == "ae" and model.encoder.head.out_features == 8  # a code, no variance
    # Deterministic: the code is mu, the same on every call, and reconstruction uses it.
    x = digits.test.images[:10]
    assert torch.equal(model(x)[0], model(x)[0]) and model(x)[2] is None
    # The fitted Gaussian is the mean and covariance of the training codes.
    codes = model.encode(prepare_eval_images(digits.train.images, model.likelihood, seed=1))[0]
    assert torch.allclose(model.code_mean, codes.mean(0), atol=1e-5)
    cov = model.code_scale_tril @ model.code_scale_tril.T
    assert torch.allclose(cov, torch.cov(codes.T), rtol=1e-2, atol=1e-3)
    fitted = model.sample_z(20_000, source="fitted", generator=torch.Generator().manual_seed(0))
    assert torch.allclose(fitted.mean(0), codes.mean(0), atol=0.1 * codes.std(0).max().item())
    prior = model.sample_z(5, generator=torch.Generator().manual_seed(0))
    assert torch.equal(prior, torch.randn(5, 8, generator=torch.Generator().manual_seed(0)))
    assert evaluate(model, prepare_eval_images(x, model.likelihood), k=5)["nll"] is None
    with pytest.raises(ValueError, match="no density"):
        iwae_nll(model, x, 5)


def test_cli_model_and_prior_flags(tmp_path):
    from training.__main__ import parse_args

    cfg, _, _ = parse_args(["--out", str(tmp_path), "--prior", "flow", "--flow-layers", "3", "--flow-hidden", "32"])
    assert (cfg.model.prior, cfg.model.flow_layers, cfg.model.flow_hidden, cfg.model.kind) == ("flow", 3, 32, "vae")
    cfg, _, _ = parse_args(["--out", str(tmp_path), "--model", "ae"])
    assert cfg.model.kind == "ae" and cfg.model.prior == "standard"
    default, _, _ = parse_args(["--out", str(tmp_path)])
    assert default.model.prior == "standard" and default.model.kind == "vae" and default.classifier is None
    done = subprocess.run(
        [sys.executable, "-m", "training", "--out", str(tmp_path), "--model", "ae", "--prior", "flow"],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert done.returncode == 2 and "autoencoder" in done.stderr


def test_default_flags_keep_latent_units_active_under_a_flow_prior(digits, tmp_path):
    """The issue's command, `--dataset digits --prior flow --epochs 20` with no tuning flags, ended
    with 0 active units before free bits defaulted to 0.1 (docs/training.md)."""
    cfg = TrainConfig(model=ModelConfig(prior="flow"), epochs=20, iwae_k=10, eval_images=100)
    assert cfg.free_bits > 0
    metrics = run(cfg, tmp_path, data=digits)
    assert metrics["test"]["active_units"] >= 8 and metrics["test"]["kl"] > 0.5
    assert "warnings" not in metrics


def test_a_collapsed_run_says_so_with_the_flags_that_help(digits, tmp_path, caplog):
    # A KL weighted 100 times and no free bits: the posterior has nothing to gain from z.
    with caplog.at_level("WARNING"):
        metrics = run(small_config(epochs=2, beta=100.0), tmp_path, data=digits)
    assert metrics["test"]["active_units"] == 0
    (warning,) = json.loads((tmp_path / "metrics.json").read_text())["warnings"]
    assert "posterior collapse: 0 active latent units" in warning and "--free-bits" in warning and "--beta" in warning
    assert warning in caplog.text


def test_evaluation_reports_bits_per_dim_and_psnr(digits, tmp_path):
    metrics = run(small_config(epochs=1), tmp_path, data=digits)["test"]
    dims = 64  # 1 x 8 x 8
    assert metrics["nll_bits_per_dim"] == pytest.approx(metrics["nll"] / (dims * 0.6931471805599453))
    assert "binarized" in metrics["bits_per_dim_note"]
    assert 0 < metrics["psnr_db"] < 60


def test_default_widths_bring_the_image_to_about_four_pixels():
    for shape, widths in {(1, 8, 8): (32,), (1, 28, 28): (32, 64, 128), (3, 32, 32): (32, 64, 128),
                          (3, 64, 64): (32, 64, 128, 256), (3, 128, 128): (32, 64, 128, 256, 256)}.items():  # fmt: skip
        assert ModelConfig(image_shape=shape).stage_widths == widths
    assert ModelConfig(image_shape=(3, 64, 64), widths=(16, 32)).stage_widths == (16, 32)
    encoder = VAE(ModelConfig(image_shape=(3, 64, 64), latent_dim=4, hidden=8)).encoder
    assert encoder.features(torch.zeros(1, 3, 64, 64)).shape[-1] == 256 * 4 * 4


def test_hflip_mirrors_a_seeded_random_half_of_the_batch():
    from training.train import mirror_half

    x = torch.rand(200, 3, 4, 5)
    out = mirror_half(x, torch.Generator().manual_seed(0))
    flipped = torch.tensor([torch.equal(o, xi.flip(-1)) for o, xi in zip(out, x)])
    kept = torch.tensor([torch.equal(o, xi) for o, xi in zip(out, x)])
    assert bool((flipped ^ kept).all()) and 60 < int(flipped.sum()) < 140
    assert torch.equal(out, mirror_half(x, torch.Generator().manual_seed(0)))


def test_tensorboard_gets_each_epochs_curves_and_pictures_and_a_resumed_run_continues_them(digits, tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    def board(run):
        events = EventAccumulator(str(run), size_guidance={"images": 0, "scalars": 0})
        events.Reload()
        return events

    Trainer(small_config(epochs=2, lr_schedule="constant"), tmp_path / "run", digits).fit()
    resumed = Trainer(small_config(epochs=3, lr_schedule="constant"), tmp_path / "run", digits)
    resumed.resume()
    resumed.fit()
    events = board(tmp_path / "run")
    tags = events.Tags()
    assert {"train/neg_elbo", "val/neg_elbo", "val/kl", "val/elbo_bits_per_dim", "optimisation/learning_rate",
            "optimisation/gradient_norm", "optimisation/skipped_steps", "optimisation/images_per_second"} <= set(tags["scalars"])  # fmt: skip
    assert {"samples", "reconstructions"} <= set(tags["images"])
    val = [(e.step, e.value) for e in events.Scalars("val/neg_elbo")]
    assert [s for s, _ in val] == [1, 2, 3]  # one point per epoch, the resumed ones after the first run's
    assert [v for _, v in val] == pytest.approx([h["val"]["neg_elbo"] for h in resumed.history])
    assert all(e.value > 0 for e in events.Scalars("optimisation/gradient_norm"))
    assert [e.step for e in events.Images("samples")] == [1, 2, 3]
    Trainer(small_config(epochs=1, tensorboard=False), tmp_path / "quiet", digits).fit()
    assert not list((tmp_path / "quiet").glob("events.out.tfevents.*"))
