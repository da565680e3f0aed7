"""Real (short) training runs on the bundled digits: the loss falls, seeds repeat, checkpoints round-trip."""

import json
import subprocess
import sys

import pytest
import torch

from training import checkpoint
from training.config import ModelConfig, TrainConfig
from training.evaluate import evaluate, prepare_eval_images
from training.features import feature_distance, load_feature_net, train_feature_net
from training.figures import FIGURES
from training.train import Trainer, kl_weight, run


def small_config(**overrides) -> TrainConfig:
    model = ModelConfig(latent_dim=8, widths=(16, 32), hidden=64)
    settings = dict(epochs=4, batch_size=32, iwae_k=20, eval_images=50) | overrides
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


def test_free_bits_and_beta_change_the_objective(digits, tmp_path):
    plain = Trainer(small_config(epochs=1), tmp_path / "a", digits).fit()[0]["train"]["loss"]
    heavy = Trainer(small_config(epochs=1, beta=4.0, free_bits=0.5), tmp_path / "b", digits).fit()[0]["train"]["loss"]
    assert heavy != plain


def test_feature_map_reconstruction(digits, tmp_path):
    result = train_feature_net("digits", tmp_path / "feat", epochs=2)
    assert result["test_accuracy"] > 0.5  # a real classifier, not noise
    net = load_feature_net(tmp_path / "feat" / "features.pt")
    x = digits.test.images[:4]
    assert feature_distance(net, x, x).abs().max().item() == 0.0
    assert (feature_distance(net, x, torch.rand_like(x)) > 0).all()

    cfg = small_config(epochs=3, reconstruction="both", feature_checkpoint=str(tmp_path / "feat" / "features.pt"))
    trainer = Trainer(cfg, tmp_path / "vae", digits)
    before = [p.detach().clone() for p in trainer.feature_net.parameters()]
    history = trainer.fit()
    assert history[-1]["train"]["loss"] < history[0]["train"]["loss"]
    assert all(torch.equal(a, b) for a, b in zip(before, trainer.feature_net.parameters()))  # frozen


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
    x = prepare_eval_images(digits.test.images[:20], "bernoulli")
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
