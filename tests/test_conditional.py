"""Class-conditional models (`--conditional`): real short runs on the bundled digits, judged by a
digits classifier trained here; the marginal likelihood, Bayes' rule, class balance and the
one-line errors."""

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
import torch
from PIL import Image

from service.manifest import RepositoryError, read_manifest, sha256

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


def test_edits_move_test_images_to_the_class_asked_for(conditional_run):
    """At strength 1 an edit keeps the image's latent and takes the target's class: the classifier
    labels most edits as the target (chance: 1/9, the target is never the source), and most stay
    nearer their own image than another image of the target class is."""
    out, metrics = conditional_run
    edits = metrics["test"]["quality"]["edits"]
    assert edits["images"] == metrics["test"]["quality"]["test_images"] and edits["strength"] == 1.0  # each test image, up to 1,000
    assert edits["share_labelled_target"] > 0.5 and edits["share_nearer_source"] > 0.5, edits
    assert "edits.png" in metrics["figures"] and (out / "edits.png").exists()


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


def test_the_latent_of_a_conditional_vae_is_standardized_under_its_class_s_prior(digits):
    """encode gives u = (mu - p_mu) / p_sigma and decode maps u back to z = p_mu + p_sigma u: so
    decode(encode(x)) decodes the posterior mean z = mu, and logvar is the posterior's over the prior's."""
    cfg = ModelConfig(latent_dim=8, widths=(16, 32), hidden=64, classes=10, image_shape=digits.image_shape)
    torch.manual_seed(0)
    model = build(cfg).eval()
    for p in model.parameters():
        torch.nn.init.normal_(p, std=0.2)
    x, y = digits.test.unit()[:6], digits.test.labels[:6]
    with torch.no_grad():
        e = model.cond(y)
        mu, logvar = model.encoder(x, e)
        p_mu, p_logvar = model.class_prior(e).chunk(2, dim=1)
        u, u_logvar = model.encode(x, y)
        assert torch.allclose(u * torch.exp(0.5 * p_logvar) + p_mu, mu, atol=1e-5)
        assert torch.allclose(u_logvar, logvar - p_logvar, atol=1e-5)
        assert torch.allclose(model.decode(u, y), model.decoder(mu, e), atol=1e-5)
        assert p_logvar.abs().max() > 0.1  # the class's prior is not N(0, I) here, so the test can tell


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
    assert "groups.png" in metrics["figures"]  # its groups given the images' classes
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


@pytest.mark.parametrize("flags", [["--prior", "flow"], ["--model", "ae"], ["--class-balance", "2"], ["--class-dim", "0"]])
def test_conditional_flags_that_cannot_go_together_are_refused_before_any_work(flags, tmp_path):
    done = training("--dataset", "digits", "--conditional", *flags, "--out", str(tmp_path / "run"))
    assert done.returncode == 2
    assert len(done.stderr.strip().splitlines()) == 1
    assert any(flag in done.stderr for flag in ("--conditional", "--class-balance", "--class-dim"))
    assert not (tmp_path / "run").exists()


def export(checkpoint_path: Path, models: Path, name: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "export", "--checkpoint", str(checkpoint_path), "--out", str(models),
                           "--name", name], cwd=ROOT, capture_output=True, text=True, timeout=600)  # fmt: skip


def test_a_conditional_model_exports_graphs_that_take_the_class(conditional_run, tmp_path):
    out, _ = conditional_run
    done = export(out / "best.pt", tmp_path, "cond")
    assert done.returncode == 0, done.stderr
    folder = tmp_path / "cond" / "1"
    info = json.loads((folder / "model.json").read_text())
    state = checkpoint.load(out / "best.pt")
    assert info["conditional"] is True and info["classes"] == state["classes"]
    assert np.allclose(info["class_log_prior"], state["model"]["cond.log_prior"].numpy())
    assert info["graphs"]["encoder"]["inputs"] == {"x_y": [-1, 64 + 10]}  # an 8x8 image flattened, then 10 class weights
    assert info["graphs"]["decoder"]["inputs"] == {"z_y": [-1, 8 + 10]}
    assert max(info["parity_max_abs_diff"].values()) < 1e-4
    assert 'name: "z_y"' in (folder / "decoder.config.pbtxt").read_text()
    means = np.load(folder / info["class_means"]["file"])
    assert np.array_equal(means, state["class_means"].numpy()) and info["class_means"]["sha256"] == sha256(folder / "class_means.npy")
    # The graphs as a Triton user feeds them: the class decides the image, and a mix lies between.
    model, _, _ = checkpoint.load_model(out / "best.pt")
    session = ort.InferenceSession(str(folder / "decoder.onnx"), providers=["CPUExecutionProvider"])
    u = np.random.default_rng(0).standard_normal((3, 8)).astype(np.float32)
    y = np.eye(10, dtype=np.float32)[[3, 7, 3]]
    y[2] = 0.5 * y[0] + 0.5 * y[1]
    params, _ = session.run(None, {"z_y": np.concatenate([u, y], axis=1)})
    with torch.no_grad():
        expected = model.decode(torch.from_numpy(u), torch.from_numpy(y)).numpy()
    assert np.abs(params - expected).max() < 1e-4
    # The server reads what it needs to pack each row's class (tests/test_conditional_serving.py serves it).
    spec = read_manifest(folder)
    assert spec.conditional and spec.classes == tuple(state["classes"]) and spec.class_means_file == "class_means.npy"
    assert np.allclose(spec.class_log_prior, info["class_log_prior"])
    # A torn class_means.npy is refused like a torn graph.
    (folder / "class_means.npy").write_bytes((folder / "class_means.npy").read_bytes()[:-4])
    with pytest.raises(RepositoryError, match="class_means.npy: sha256 does not match"):
        read_manifest(folder)


def test_a_hierarchical_conditional_model_exports_its_posterior_with_the_class(digits, tmp_path):
    model = ModelConfig(kind="hvae", groups="4:1,2:1", width=16, z_channels=4)
    cfg = TrainConfig(model=model, epochs=1, batch_size=64, iwae_k=2, eval_images=10, free_bits=0.0, conditional=True)
    run(cfg, tmp_path / "run", data=digits)
    done = export(tmp_path / "run" / "best.pt", tmp_path / "models", "hcond")
    assert done.returncode == 0, done.stderr
    info = json.loads((tmp_path / "models" / "hcond" / "1" / "model.json").read_text())
    latent = info["latent_dim"]
    assert info["graphs"]["posterior"]["inputs"] == {"x_eps_y": [-1, 64 + latent + 10]}
    assert info["class_means"]["shape"] == [10, latent]
    assert set(info["parity_max_abs_diff"]) >= {"posterior.log_ratio", "encoder.mu", "decoder.image"}


def test_an_unconditional_model_with_classes_exports_its_class_means(digits, tmp_path):
    cfg = TrainConfig(model=ModelConfig(latent_dim=8, widths=(16, 32), hidden=64), epochs=1, iwae_k=2, eval_images=10)
    run(cfg, tmp_path / "run", data=digits)
    done = export(tmp_path / "run" / "best.pt", tmp_path / "models", "plain")
    assert done.returncode == 0, done.stderr
    folder = tmp_path / "models" / "plain" / "1"
    info = json.loads((folder / "model.json").read_text())
    assert "conditional" not in info and info["graphs"]["decoder"]["inputs"] == {"z": [-1, 8]}
    assert np.array_equal(np.load(folder / "class_means.npy"), checkpoint.load(tmp_path / "run" / "best.pt")["class_means"].numpy())
    assert read_manifest(folder).classes == tuple(digits.classes)  # served as before


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
