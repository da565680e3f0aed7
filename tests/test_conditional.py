"""Class-conditional models (`--conditional`): real short runs on the bundled digits, judged by a
digits classifier trained here; the marginal likelihood, Bayes' rule, class balance and the
one-line errors."""

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from training import checkpoint
from training.config import ModelConfig, TrainConfig
from training.data import Dataset, Split
from training.evaluate import evaluate, iwae_nll, prepare_eval_images
from training.families import build
from training.features import train_feature_net
from training.train import Trainer, run

ROOT = Path(__file__).resolve().parent.parent


def conditional_config(**overrides) -> TrainConfig:
    model = ModelConfig(latent_dim=8, widths=(16, 32), hidden=64)
    settings = dict(epochs=6, batch_size=32, lr=2e-3, iwae_k=10, eval_images=100, free_bits=0.0, conditional=True,
                    quality_samples=1000) | overrides  # fmt: skip
    return TrainConfig(model=model, **settings)


@pytest.fixture(scope="module")
def classifier_path(tmp_path_factory):
    out = tmp_path_factory.mktemp("digits-classifier")
    train_feature_net("digits", out, epochs=8)
    return out / "features.pt"


@pytest.fixture(scope="module")
def conditional_run(tmp_path_factory, digits, classifier_path):
    out = tmp_path_factory.mktemp("conditional")
    metrics = run(conditional_config(classifier=str(classifier_path)), out, data=digits)
    return out, metrics


def test_a_conditional_model_generates_the_class_asked_for(conditional_run):
    _, metrics = conditional_run
    by_class = metrics["test"]["quality"]["by_class"]
    # Chance is 0.1: a model that ignored the class would be labelled as it about one time in ten.
    assert by_class["mean_share"] > 0.5, by_class
    assert len(by_class["classes"]) == 10 and all(row["samples"] >= 100 for row in by_class["classes"])
    assert "samples_by_class.png" in metrics["figures"]


def test_bayes_rule_classifies_from_the_model_s_own_likelihoods(conditional_run):
    _, metrics = conditional_run
    figures = metrics["test"]["conditional"]
    assert figures["bayes_accuracy"] > 0.3, figures  # chance: 0.1
    assert sum(row["images"] for row in figures["per_class"]) == metrics["test"]["images"]
    # log p(x) >= log p(x|y) + log p(y): the marginal NLL is below the true class's by at most log 10 nats
    assert metrics["test"]["nll"] <= figures["nll_given_class"] + np.log(10) + 1e-6


def test_the_checkpoint_keeps_the_class_prior_and_each_class_s_mean_latent(conditional_run, digits):
    out, _ = conditional_run
    state = checkpoint.load(out / "best.pt")
    assert state["classes"] == digits.classes
    counts = torch.bincount(digits.train.labels, minlength=10).double()
    assert torch.allclose(state["model"]["cond.log_prior"].double(), (counts / counts.sum()).log(), atol=1e-6)
    means = state["class_means"]
    assert means.shape == (10, 8)
    model, _, _ = checkpoint.load_model(out / "best.pt")
    x = prepare_eval_images(digits.train.unit(), model.likelihood, seed=1)
    zeros = digits.train.labels == 0
    with torch.no_grad():
        mu, _ = model.encode(x[zeros], digits.train.labels[zeros])
    assert torch.allclose(means[0], mu.mean(dim=0), atol=1e-4)


@pytest.mark.parametrize("kind", ["vae", "hvae"])
def test_the_marginal_nll_is_the_mixture_of_the_per_class_bounds(kind, digits):
    cfg = ModelConfig(latent_dim=8, widths=(16, 32), hidden=64, kind=kind, groups="4:1,2:1", width=16, classes=10,
                      image_shape=digits.image_shape)  # fmt: skip
    torch.manual_seed(0)
    model = build(cfg).eval()
    for p in model.parameters():  # away from the zero start, so that every class gives other likelihoods
        torch.nn.init.normal_(p, std=0.1)
    model.cond.set_prior(torch.arange(1, 11))
    x = prepare_eval_images(digits.test.images[:12], model.likelihood)
    y = digits.test.labels[:12]
    result = evaluate(model, x, k=5, y=y, classes=digits.classes)
    per_class = torch.stack([-iwae_nll(model, x, 5, y=torch.full((12,), c)) for c in range(10)], dim=1)
    joint = per_class + model.cond.log_prior
    assert result["nll"] == pytest.approx(-torch.logsumexp(joint, dim=1).mean().item(), rel=1e-6)
    given = -per_class[torch.arange(12), y].mean().item()
    assert result["conditional"]["nll_given_class"] == pytest.approx(given, rel=1e-6)
    assert result["conditional"]["bayes_accuracy"] == pytest.approx((joint.argmax(1) == y).double().mean().item())
    assert per_class.std(dim=1).min() > 0  # the class changes the likelihood


@pytest.mark.parametrize("kind", ["vae", "hvae"])
def test_class_weights_are_labels_and_mix_embeddings(kind):
    cfg = ModelConfig(latent_dim=8, widths=(16,), hidden=32, kind=kind, groups="4:1,2:1", width=16, classes=3,
                      image_shape=(1, 8, 8))  # fmt: skip
    torch.manual_seed(0)
    model = build(cfg).eval()
    for p in model.parameters():
        torch.nn.init.normal_(p, std=0.1)
    u = torch.randn(4, model.noise_size)
    labels = torch.tensor([0, 1, 2, 1])
    one_hot = torch.nn.functional.one_hot(labels, 3).float()
    with torch.no_grad():
        assert torch.allclose(model.decode(u, labels), model.decode(u, one_hot), atol=1e-6)
        half = (one_hot + torch.nn.functional.one_hot(torch.tensor([2, 2, 0, 0]), 3).float()) / 2
        assert torch.allclose(model.cond(half), (model.cond(labels) + model.cond(torch.tensor([2, 2, 0, 0]))) / 2)
        assert not torch.allclose(model.decode(u, labels), model.decode(u, torch.tensor([1, 0, 0, 2])))


def unbalanced(digits, keep_of_one: int) -> Dataset:
    """Digits 0 and 1 alone, with only `keep_of_one` images of the 1s."""
    labels = digits.train.labels
    rows = torch.cat([torch.nonzero(labels == 0).squeeze(1), torch.nonzero(labels == 1).squeeze(1)[:keep_of_one]])
    split = Split(digits.train.images[rows], labels[rows])
    return Dataset("digits", split, split, split, digits.preprocessing, classes=["0", "1"])


@pytest.mark.parametrize("balance, share", [(0.0, None), (0.5, None), (1.0, 0.5)])
def test_class_balance_gives_small_classes_their_share_of_an_epoch(balance, share, digits, tmp_path):
    data = unbalanced(digits, keep_of_one=20)
    n0, n1 = int((data.train.labels == 0).sum()), 20
    trainer = Trainer(conditional_config(class_balance=balance), tmp_path, data)
    draws = torch.cat([trainer._order() for _ in range(20)])
    ones = (data.train.labels[draws] == 1).double().mean().item()
    if balance == 0:
        assert sorted(trainer._order().tolist()) == list(range(len(data.train)))  # a permutation, as without classes
    expected = n1 ** (1 - balance) / (n0 ** (1 - balance) + n1 ** (1 - balance)) if share is None else share
    assert ones == pytest.approx(expected, abs=0.03)  # 20 epochs of ~200 draws: sd about 0.01


def test_a_conditional_run_resumes_exactly(digits, tmp_path):
    data = unbalanced(digits, keep_of_one=40)
    cfg = dict(lr_schedule="constant", class_balance=0.5)
    straight = Trainer(conditional_config(epochs=4, **cfg), tmp_path / "straight", data)
    straight.fit()
    Trainer(conditional_config(epochs=2, **cfg), tmp_path / "resumed", data).fit()
    resumed = Trainer(conditional_config(epochs=4, **cfg), tmp_path / "resumed", data)
    resumed.resume()
    resumed.fit()
    assert [h["val"] for h in resumed.history] == [h["val"] for h in straight.history]
    for a, b in zip(straight.model.state_dict().values(), resumed.model.state_dict().values()):
        assert torch.equal(a, b)


def test_a_hierarchical_conditional_run_ends_with_its_figures(digits, tmp_path):
    model = ModelConfig(kind="hvae", groups="4:1,2:1", width=16, z_channels=4)
    cfg = TrainConfig(model=model, epochs=1, batch_size=64, iwae_k=4, eval_images=20, free_bits=0.0, conditional=True)
    metrics = run(cfg, tmp_path, data=digits)
    assert "samples_by_class.png" in metrics["figures"] and 0 <= metrics["test"]["conditional"]["bayes_accuracy"] <= 1
    latent = sum(g["dims"] for g in metrics["test"]["groups"])
    assert checkpoint.load(tmp_path / "best.pt")["class_means"].shape == (10, latent)


def training(*flags: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "training", *flags], cwd=ROOT, capture_output=True, text=True, timeout=300)


def test_conditional_on_a_folder_without_classes_is_one_line(tmp_path):
    folder = tmp_path / "flat"
    folder.mkdir()
    rng = np.random.default_rng(0)
    for i in range(20):
        Image.fromarray(rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)).save(folder / f"{i}.png")
    done = training("--dataset", "folder", "--data-dir", str(folder), "--image-size", "8", "--conditional",
                    "--cache-dir", str(tmp_path / "cache"), "--out", str(tmp_path / "run"))  # fmt: skip
    assert done.returncode == 2
    assert done.stderr.strip().splitlines() == [
        f"python -m training: error: --conditional needs classes, and {folder} has none: put its images in one sub-folder per class"
    ]


@pytest.mark.parametrize("flags", [["--prior", "flow"], ["--model", "ae"], ["--class-balance", "2"]])
def test_conditional_flags_that_cannot_go_together_are_refused_before_any_work(flags, tmp_path):
    done = training("--dataset", "digits", "--conditional", *flags, "--out", str(tmp_path / "run"))
    assert done.returncode == 2
    assert "--conditional" in done.stderr or "--class-balance" in done.stderr
    assert not (tmp_path / "run").exists()


def test_export_refuses_a_conditional_checkpoint_in_one_line(conditional_run, tmp_path):
    out, _ = conditional_run
    done = subprocess.run([sys.executable, "-m", "export", "--checkpoint", str(out / "best.pt"), "--out", str(tmp_path),
                           "--name", "cond"], cwd=ROOT, capture_output=True, text=True, timeout=300)  # fmt: skip
    assert done.returncode == 2
    assert len(done.stderr.strip().splitlines()) == 1 and "conditional model" in done.stderr
    assert not list(tmp_path.iterdir())


def test_two_ranks_train_a_conditional_model_as_one_process_does(tmp_path):
    """Under torchrun each rank keeps its rows of the global batch's labels, drawn by the balanced
    sampler every rank runs alike: two ranks end where one process does (tests/test_distributed.py)."""
    from tests.test_distributed import FLAGS, TOL, distance, torchrun, weights
    from training.__main__ import parse_args

    flags = [*FLAGS, "--conditional", "--epochs", "1"]
    cfg, _, _ = parse_args([*flags, "--out", str(tmp_path / "one")])
    Trainer(cfg, tmp_path / "one").fit()
    done = torchrun(2, [*flags, "--out", str(tmp_path / "two")])
    assert done.returncode == 0, done.stdout + done.stderr
    synced = distance(weights(tmp_path / "two" / "last.pt"), weights(tmp_path / "one" / "last.pt"))
    assert synced < TOL, f"two ranks end {synced:.2e} from one process"
