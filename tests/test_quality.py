"""Sample quality: the Frechet distance on the project's classifier, the class statistics, the
reconstruction accuracy, and where they show up (metrics.json, training.evaluate, training.compare)."""

import json
import math
import subprocess
import sys

import numpy as np
import pytest
import torch

from training import quality
from training.config import ModelConfig, TrainConfig
from training.families import build
from training.features import FeatureNet, load_feature_net, train_feature_net
from training.figures import group_resampling
from training.quality import (
    class_statistics,
    classify,
    frechet_distance,
    group_fidelity,
    reconstruction_accuracy,
    trace_sqrt_product,
)
from training.train import run


@pytest.fixture(scope="module")
def classifier_path(tmp_path_factory):
    out = tmp_path_factory.mktemp("classifier")
    result = train_feature_net("digits", out, epochs=8)
    assert result["test_accuracy"] > 0.8
    return out / "features.pt"


@pytest.fixture(scope="module")
def classifier(classifier_path):
    return load_feature_net(classifier_path)


def test_fd_of_a_set_with_itself_is_zero_and_grows_with_corruption(classifier, digits):
    x = digits.test.images
    h, _ = classify(classifier, x)
    assert frechet_distance(h, h) == pytest.approx(0.0, abs=1e-6)
    gen = torch.Generator().manual_seed(0)
    noise = torch.randn(x.shape, generator=gen)
    fds = [frechet_distance(classify(classifier, (x + level * noise).clamp(0, 1))[0], h) for level in (0.05, 0.2, 0.5)]
    assert 0 < fds[0] < fds[1] < fds[2], fds
    # Other real images sit far closer to the test set than heavily corrupted ones.
    real = frechet_distance(classify(classifier, digits.train.images)[0], h)
    assert real < fds[2] / 4, (real, fds)


def test_frechet_distance_formula():
    # Diagonal covariances commute: Tr((S1 S2)^(1/2)) = sum sqrt(a_i b_i), FD = |m1 - m2|^2 + sum (sqrt a - sqrt b)^2.
    a, b = np.array([1.0, 4.0, 0.25]), np.array([9.0, 1.0, 0.25])
    for method in ("scipy", "eigh"):
        assert trace_sqrt_product(np.diag(a), np.diag(b), method) == pytest.approx(np.sqrt(a * b).sum(), rel=1e-9)
    # Non-commuting, rank-deficient covariances: scipy's sqrtm and the numpy eigen-decomposition agree.
    rng = np.random.default_rng(0)
    for rank in (5, 3):
        f1, f2 = rng.normal(size=(5, rank)), rng.normal(size=(5, rank))
        s1, s2 = f1 @ f1.T, f2 @ f2.T
        assert trace_sqrt_product(s1, s2, "scipy") == pytest.approx(trace_sqrt_product(s1, s2, "eigh"), rel=1e-6)
    # On samples: FD of two Gaussians' samples approaches the closed form.
    m1, m2 = np.zeros(3), np.array([1.0, 0.0, -2.0])
    h1 = rng.normal(size=(200_000, 3)) * np.sqrt(a) + m1
    h2 = rng.normal(size=(200_000, 3)) * np.sqrt(b) + m2
    expected = ((m1 - m2) ** 2).sum() + ((np.sqrt(a) - np.sqrt(b)) ** 2).sum()
    assert frechet_distance(h1, h2) == pytest.approx(expected, rel=0.02)
    assert frechet_distance(h1, h2, "eigh") == pytest.approx(frechet_distance(h1, h2, "scipy"), rel=1e-6)


def test_class_statistics():
    even = torch.eye(10).repeat(30, 1)  # every class equally often, each with certainty
    stats = class_statistics(even)
    assert stats["class_entropy_nats"] == pytest.approx(math.log(10)) and stats["mean_top_probability"] == 1.0
    assert stats["class_histogram"] == [30] * 10 and stats["class_entropy_max_nats"] == pytest.approx(math.log(10))
    one = torch.full((50, 10), 0.05)
    one[:, 3] = 0.55  # always class 3, with probability 0.55
    stats = class_statistics(one)
    assert stats["class_entropy_nats"] == 0.0 and stats["mean_top_probability"] == pytest.approx(0.55)
    halves = torch.eye(10)[torch.tensor([0, 1] * 20)]
    assert class_statistics(halves)["class_entropy_nats"] == pytest.approx(math.log(2))


class Identity(torch.nn.Module):
    """A stand-in model whose reconstruction is its input: the control for reconstruction accuracy."""

    def __init__(self):
        super().__init__()
        self.w = torch.nn.Parameter(torch.zeros(()))

    conditional = False

    def encode(self, x, y=None):
        return x, None

    def decode(self, z, y=None):
        return z

    def mean_image(self, params):
        return params


def test_reconstruction_accuracy(classifier, digits):
    x, y = digits.test.images, digits.test.labels
    accuracy = (classify(classifier, x)[1].argmax(1) == y).double().mean().item()
    assert reconstruction_accuracy(classifier, Identity(), x, y) == pytest.approx(accuracy)
    # Wrong labels: nothing is right.
    assert reconstruction_accuracy(classifier, Identity(), x, classify(classifier, x)[1].argmax(1) + 100) == 0.0


def test_group_fidelity_classifies_each_column_of_the_group_resampling(classifier, digits):
    """Per L, the share labelled as the image's class when the first L groups are the image's: the
    last column is the reconstruction, so its share is the reconstruction accuracy."""
    torch.manual_seed(0)
    model = build(ModelConfig(image_shape=(1, 8, 8), kind="hvae", groups="4:2,2:1", z_channels=4, width=16)).eval()
    for p in model.parameters():
        p.data.add_(torch.randn_like(p) * 0.1)  # away from the zero-initialised start, where every column is alike
    x, y = digits.test.images[:150], digits.test.labels[:150]
    shares = group_fidelity(model, classifier, x, y, seed=3, batch_size=50)
    gen = torch.Generator().manual_seed(3)
    with torch.no_grad():
        columns = torch.cat([group_resampling(model, xb, None, gen) for xb in x.split(50)]).transpose(0, 1)
    want = [(classify(classifier, c)[1].argmax(1) == y).double().mean().item() for c in columns]
    assert len(shares) == len(model.group_dims) + 1 and shares == pytest.approx(want)
    assert shares[-1] == pytest.approx(reconstruction_accuracy(classifier, model, x, y))


def small(**overrides) -> TrainConfig:
    model = overrides.pop("model", {})
    cfg = ModelConfig(latent_dim=8, widths=(16, 32), hidden=64, **model)
    return TrainConfig(model=cfg, **({"epochs": 2, "batch_size": 32, "iwae_k": 10, "eval_images": 50} | overrides))


@pytest.fixture(scope="module")
def runs(tmp_path_factory, classifier_path, digits):
    root = tmp_path_factory.mktemp("runs")
    common = {"classifier": str(classifier_path), "quality_samples": 500}
    models = {"vae": {}, "flow": {"prior": "flow", "flow_layers": 2, "flow_hidden": 16}, "ae": {"kind": "ae"}}
    for name, model in models.items():
        run(small(model=model, **common), root / name, data=digits)
    return root


def test_run_writes_sample_quality(runs):
    for name in ("vae", "flow", "ae"):
        q = json.loads((runs / name / "metrics.json").read_text())["test"]["quality"]
        assert 0.0 <= q["reconstruction_accuracy"] <= 1.0 and q["classifier_accuracy"] > 0.8
        assert q["fd_train_vs_test"] >= 0 and q["test_images"] == 300
        keys = ("samples", "samples_fitted") if name == "ae" else ("samples",)
        assert set(keys) <= set(q) and ("samples_fitted" in q) == (name == "ae")
        assert "class_kept_by_groups" not in q  # one latent group: nothing to resample by groups
        for key in keys:
            s = q[key]
            assert s["n"] == 500 and s["fd"] > 0 and 0.1 <= s["mean_top_probability"] <= 1.0
            assert 0.0 <= s["class_entropy_nats"] <= math.log(10) + 1e-9 and sum(s["class_histogram"]) == 500


def test_evaluate_cli_prints_sample_quality(runs, classifier_path):
    done = subprocess.run(
        [sys.executable, "-m", "training.evaluate", "--checkpoint", str(runs / "flow" / "best.pt"), "--k", "5",
         "--images", "20", "--samples", "300", "--classifier", str(classifier_path)],
        capture_output=True, text=True, timeout=180,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    result = json.loads(done.stdout)
    assert result["quality"]["samples"]["n"] == 300 and math.isfinite(result["nll"])
    assert "FD" in done.stderr and "reconstruction accuracy" in done.stderr and "class entropy" in done.stderr


def test_compare_figure(runs, tmp_path):
    out = tmp_path / "compare.png"
    done = subprocess.run(
        [sys.executable, "-m", "training.compare", "--runs", str(runs / "vae"), str(runs / "flow"), str(runs / "ae"),
         "--out", str(out), "--n", "16"],
        capture_output=True, text=True, timeout=180,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    from training.compare import panels

    drawn = [panel for run in ("vae", "flow", "ae") for panel in panels(runs / run, 4, 0, (1.0, 0.5))]
    assert [len(images) for _, images in drawn] == [2] * 4 and "flow prior" in drawn[1][0] and "fitted" in drawn[3][0]
    one, half = drawn[0][1]  # the same noise, scaled: a cooler sample is another image, not another draw
    assert one.shape == half.shape and not torch.equal(one, half)


def test_a_classifier_of_another_layout_is_refused_with_what_to_do(tmp_path):
    state = {"image_shape": [1, 28, 28], "classes": 10, "width": 8, "dataset": "mnist"}
    state["model"] = FeatureNet((1, 8, 8), 10, 8).state_dict()  # one stage: the old 28x28 layout
    torch.save(state, tmp_path / "features.pt")
    with pytest.raises(ValueError, match="train it again with python -m training.features --dataset mnist"):
        load_feature_net(tmp_path / "features.pt")


def test_numpy_fallback_is_used_without_scipy(monkeypatch):
    monkeypatch.setattr(quality, "_scipy_sqrtm", None)
    s1, s2 = np.diag([1.0, 4.0]), np.diag([4.0, 1.0])
    assert trace_sqrt_product(s1, s2) == pytest.approx(4.0)
    with pytest.raises(ValueError):
        trace_sqrt_product(s1, s2, "scipy")


@pytest.mark.parametrize("shape, stages", [((1, 8, 8), 1), ((1, 28, 28), 2)])
def test_classifier_sees_the_whole_image_before_pooling(shape, stages):
    """Stride-2 stages until the map is 4x4 or less: the pooled features are of the whole digit,
    not a bag of small patches (the digits classifier keeps its one stage and its saved layout)."""
    net = FeatureNet(shape)
    convs = [m for m in net.back if isinstance(m, torch.nn.Conv2d)]
    assert len(convs) == stages
    if shape == (1, 8, 8):  # the layout digits classifiers were saved with
        keys = {f"{layer}.{p}" for layer in ("front.0", "front.2", "back.0", "back.4") for p in ("weight", "bias")}
        assert set(net.state_dict()) == keys
    maps = net.back[: 2 * stages](net.features(torch.zeros(1, *shape)))
    assert max(maps.shape[-2:]) <= 4 and net.embed(torch.zeros(3, *shape)).shape == (3, 64)

