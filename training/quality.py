"""Sample quality judged by the project's own classifier (`training.features.FeatureNet`).

- FD, the Frechet distance between Gaussians fitted to the classifier's penultimate activations
  for generated images and for real test images:
  ||m1 - m2||^2 + Tr(S1 + S2 - 2 (S1 S2)^(1/2)). It is FID's formula, but on this project's small
  classifier instead of Inception-v3, so it is called FD here and is **not** comparable with
  published FIDs, nor between classifiers; and like FID it is biased upwards at small sample
  sizes, so compare FDs only at the same numbers of images (the real-vs-real figure at the same
  sizes, `fd_train_vs_test`, is the floor to read them against).
- The classifier's mean top-class probability on samples (how recognisable each one is), and the
  entropy in nats of the histogram of its predicted classes (how evenly the classes are covered:
  log 10 = 2.303 is perfect for ten classes, 0 means every sample is the same class).
- Reconstruction accuracy: the fraction of test images whose reconstruction (decoded from mu) the
  classifier labels as the input's class.
- Edits (any model with classes): test images moved to another class at strength 1
  (`training.conditioning.edit`), the share the classifier labels as the target, and the share
  that stay closer to their source image, in the classifier's feature space, than a random test
  image of the target class is.
- Where an image's class is decided (a model with several latent groups): the share of test images
  still labelled as their class when only the first L groups come from the image and the rest from
  the prior (`training.figures.group_resampling`, the pictures of groups.png), L = 0 to every group.
"""

from __future__ import annotations

import math
import warnings
from typing import Any

import numpy as np
import torch

from training.conditioning import edit
from training.data import to_unit
from training.features import FeatureNet
from training.figures import group_resampling
from training.model import VAE

try:  # scipy comes with scikit-learn (a training dependency); the numpy path below is the fallback
    from scipy.linalg import sqrtm as _scipy_sqrtm
except ImportError:  # pragma: no cover - exercised by the tests through `method="eigh"`
    _scipy_sqrtm = None


def sqrtm_psd(a: np.ndarray) -> np.ndarray:
    """The square root of a symmetric positive semi-definite matrix by eigen-decomposition."""
    w, v = np.linalg.eigh((a + a.T) / 2)
    return (v * np.sqrt(np.clip(w, 0, None))) @ v.T


def trace_sqrt_product(s1: np.ndarray, s2: np.ndarray, method: str = "auto") -> float:
    """Tr((S1 S2)^(1/2)) for covariance matrices S1, S2.

    `scipy`: scipy.linalg.sqrtm of the product, as FID implementations do (a tiny multiple of the
    identity is added when the product is near singular; the imaginary round-off is dropped).
    `eigh`: numpy only. S1 S2 is similar to S1^(1/2) S2 S1^(1/2), which is symmetric PSD, so the
    trace is the sum of the square roots of that matrix's eigenvalues. `auto`: scipy if present."""
    if method == "auto":
        method = "scipy" if _scipy_sqrtm is not None else "eigh"
    if method == "eigh":
        r = sqrtm_psd(s1)
        w = np.linalg.eigvalsh(r @ s2 @ r)
        return float(np.sqrt(np.clip(w, 0, None)).sum())
    if method != "scipy" or _scipy_sqrtm is None:
        raise ValueError(f"unknown or unavailable method {method!r}")
    with warnings.catch_warnings():
        # Units a ReLU never turns on make the covariances singular, and sqrtm warns that its result
        # may be inaccurate; the trace still agrees with the eigh path (tests/test_quality.py).
        warnings.simplefilter("ignore")
        covmean = _scipy_sqrtm(s1 @ s2)
        if not np.isfinite(covmean).all():
            offset = np.eye(len(s1)) * 1e-6
            covmean = _scipy_sqrtm((s1 + offset) @ (s2 + offset))
    return float(np.real(np.trace(covmean)))


def activation_statistics(h: np.ndarray | torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
    """Mean and covariance (rows are observations), in float64."""
    h = np.asarray(h.detach().cpu() if isinstance(h, torch.Tensor) else h, dtype=np.float64)
    return h.mean(axis=0), np.cov(h, rowvar=False)


def frechet_distance(h1: np.ndarray | torch.Tensor, h2: np.ndarray | torch.Tensor, method: str = "auto") -> float:
    """FD between Gaussians fitted to two sets of activations [N1, F] and [N2, F]."""
    m1, s1 = activation_statistics(h1)
    m2, s2 = activation_statistics(h2)
    value = float(((m1 - m2) ** 2).sum() + np.trace(s1) + np.trace(s2) - 2 * trace_sqrt_product(s1, s2, method))
    return max(value, 0.0)  # round-off can leave -1e-12 for identical sets


@torch.no_grad()
def classify(net: FeatureNet, images: torch.Tensor, batch_size: int = 1000) -> tuple[torch.Tensor, torch.Tensor]:
    """Penultimate activations [N, F] and class probabilities [N, classes], on the CPU."""
    device = next(net.parameters()).device
    hs, ps = [], []
    for xb in images.split(batch_size):
        h, logits = net.classify(xb.to(device))
        hs.append(h.cpu())
        ps.append(torch.softmax(logits, dim=-1).cpu())
    return torch.cat(hs), torch.cat(ps)


def class_statistics(probs: torch.Tensor) -> dict[str, Any]:
    """Mean top-class probability and the entropy (nats) of the predicted-class histogram."""
    classes = probs.shape[1]
    histogram = torch.bincount(probs.argmax(dim=1), minlength=classes).double()
    p = histogram / histogram.sum()
    entropy = -(p[p > 0] * p[p > 0].log()).sum().item()
    return {
        "mean_top_probability": probs.max(dim=1).values.mean().item(),
        "class_entropy_nats": entropy,
        "class_entropy_max_nats": math.log(classes),
        "class_histogram": [int(c) for c in histogram.tolist()],
    }


def score_images(net: FeatureNet, images: torch.Tensor, reference_activations: torch.Tensor) -> dict[str, Any]:
    """FD against the reference activations, and the class statistics, for a set of images."""
    h, probs = classify(net, images)
    return {"n": len(images), "fd": frechet_distance(h, reference_activations), **class_statistics(probs)}


@torch.no_grad()
def reconstruction_accuracy(
    net: FeatureNet, model: VAE, x: torch.Tensor, labels: torch.Tensor, batch_size: int = 500
) -> float:
    """Fraction of images x whose reconstruction (decoded from mu; given the true class, for a
    conditional model) the classifier labels as `labels`."""
    device = next(model.parameters()).device
    predicted = []
    for xb, yb in zip(x.split(batch_size), labels.split(batch_size)):
        y = yb if model.conditional else None
        mu, _ = model.encode(xb.to(device), y)
        _, probs = classify(net, model.mean_image(model.decode(mu, y)))
        predicted.append(probs.argmax(dim=1))
    return (torch.cat(predicted) == labels.cpu()).double().mean().item()


@torch.no_grad()
def sample_quality(
    model: VAE,
    net: FeatureNet,
    test_images: torch.Tensor,
    test_labels: torch.Tensor,
    model_inputs: torch.Tensor,
    train_images: torch.Tensor,
    n: int = 10_000,
    seed: int = 0,
    temperature: float = 1.0,
    names: list[str] | None = None,
    class_means: torch.Tensor | None = None,
) -> dict[str, Any]:
    """Every sample-quality figure of one model.

    test_images: the real test images in [0, 1] (the FD reference and the classifier's own accuracy);
    model_inputs: the same images as the model is scored on (binarized once for Bernoulli models),
    encoded for the reconstruction accuracy; train_images: real images for the real-vs-real FD floor.
    An autoencoder is sampled twice: from N(0, I) (`samples`) and from its fitted Gaussian
    (`samples_fitted`). A conditional model's `samples` draw their classes from p(y), and
    `by_class` (`class_fidelity`) asks for each class in turn. A conditional model, or one with
    `class_means`, is also judged on its edits (`edit_fidelity`)."""
    model.eval()
    net_device = next(net.parameters()).device
    reference_h, reference_p = classify(net, test_images.to(net_device))
    real = to_unit(train_images[torch.randperm(len(train_images), generator=torch.Generator().manual_seed(seed))[:n]])
    _, inputs_p = classify(net, model_inputs.to(net_device))
    result: dict[str, Any] = {
        "test_images": len(test_images),
        "classifier_accuracy": (reference_p.argmax(1) == test_labels.cpu()).double().mean().item(),
        "classifier_accuracy_on_model_inputs": (inputs_p.argmax(1) == test_labels.cpu()).double().mean().item(),
        "reconstruction_accuracy": reconstruction_accuracy(net, model, model_inputs, test_labels),
        "fd_train_vs_test": score_images(net, real, reference_h)["fd"],
        "fd_train_vs_test_n": len(real),
        "temperature": temperature,
    }
    sources = ("prior", "fitted") if model.cfg.kind == "ae" else ("prior",)
    for source in sources:
        gen = torch.Generator().manual_seed(seed)
        images = torch.cat(
            [model.sample(len(chunk), temperature, gen, source) for chunk in torch.arange(n).split(1000)]
        )
        result["samples" if source == "prior" else "samples_fitted"] = score_images(net, images, reference_h)
    if model.conditional:
        recall = reference_p.argmax(1) == test_labels.cpu()
        result["by_class"] = class_fidelity(model, net, recall, test_labels.cpu(), names, max(100, n // model.cfg.classes), seed, temperature)
    if len(model.group_dims) > 1:
        result["class_kept_by_groups"] = group_fidelity(model, net, model_inputs, test_labels, seed)
    if model.cfg.kind != "ae" and (model.conditional or class_means is not None):
        result["edits"] = edit_fidelity(model, net, test_images, model_inputs, test_labels, class_means, seed=seed)
    return result


@torch.no_grad()
def edit_fidelity(
    model: VAE, net: FeatureNet, test_images: torch.Tensor, model_inputs: torch.Tensor, labels: torch.Tensor,
    class_means: torch.Tensor | None, n: int = 1000, seed: int = 0, strength: float = 1.0,
) -> dict[str, Any]:  # fmt: skip
    """n test images (`model_inputs`, as the model takes them) each edited from its class to another
    drawn at random: the share the classifier labels as the target, and the share whose features
    lie nearer their source image's (`test_images`) than a random test image of the target class
    does (an edit that kept nothing of its image would be no nearer than that)."""
    gen = torch.Generator().manual_seed(seed)
    labels = labels.cpu()
    present = labels.unique().tolist()  # targets among the classes with test images (the random comparison needs one)
    if len(present) < 2:
        return {"images": 0, "strength": strength, "share_labelled_target": None, "share_nearer_source": None}
    rows = torch.randperm(len(labels), generator=gen)[:n]
    source = labels[rows]
    others = [[c for c in present if c != s] for s in source.tolist()]  # never the source
    target = torch.tensor([o[int(torch.randint(len(o), (1,), generator=gen))] for o in others])
    device = model_inputs.device
    edited = torch.cat([
        edit(model, model_inputs[rows[part].to(device)], source[part].to(device), target[part].to(device), strength, class_means)
        for part in torch.arange(len(rows)).split(500)
    ])  # fmt: skip
    by_class = {c: torch.nonzero(labels == c).flatten() for c in present}
    other = torch.stack([by_class[t][torch.randint(len(by_class[t]), (1,), generator=gen)][0] for t in target.tolist()])
    h_edit, p_edit = classify(net, edited)
    h_source, _ = classify(net, test_images[rows.to(test_images.device)])
    h_other, _ = classify(net, test_images[other.to(test_images.device)])
    nearer = (h_edit - h_source).norm(dim=1) < (h_other - h_source).norm(dim=1)
    return {
        "images": len(rows), "strength": strength,
        "share_labelled_target": (p_edit.argmax(1) == target).double().mean().item(),
        "share_nearer_source": nearer.double().mean().item(),
    }  # fmt: skip


@torch.no_grad()
def group_fidelity(
    model: VAE, net: FeatureNet, model_inputs: torch.Tensor, labels: torch.Tensor, seed: int = 0, batch_size: int = 100
) -> list[float]:  # fmt: skip
    """For L = 0 to every group, the share of the test images whose picture with the first L groups
    encoded from the image and the rest drawn from the prior (`group_resampling`; a conditional
    model given the image's class) the classifier labels as the image's class: where in the
    hierarchy a model decides what an image is. L = 0 is a sample, the last the reconstruction."""
    gen = torch.Generator().manual_seed(seed)
    labels = labels.to(model_inputs.device)
    right = torch.zeros(len(model.group_dims) + 1, dtype=torch.float64)
    for xb, yb in zip(model_inputs.split(batch_size), labels.split(batch_size)):  # a batch's pictures at a time
        columns = group_resampling(model, xb, yb if model.conditional else None, gen).transpose(0, 1)
        right += torch.stack([(classify(net, c)[1].argmax(1).to(yb.device) == yb).sum().cpu() for c in columns])
    return (right / len(labels)).tolist()


@torch.no_grad()
def class_fidelity(
    model: VAE, net: FeatureNet, recall: torch.Tensor, labels: torch.Tensor, names: list[str] | None, n: int,
    seed: int = 0, temperature: float = 1.0,
) -> dict[str, Any]:  # fmt: skip
    """Whether a conditional model's samples are the class asked for: per class, n samples asked
    for it, the share the classifier labels as it, beside the classifier's recall on the real test
    images of that class (`recall`: per test image, whether the classifier was right), and their
    ratio; and the means weighted by p(y)."""
    prior = model.cond.log_prior.exp().cpu()
    rows = []
    for c in range(model.cfg.classes):
        gen = torch.Generator().manual_seed(seed + c)
        y = torch.full((n,), c, dtype=torch.long)
        images = torch.cat([model.sample(len(chunk), temperature, gen, y=y[chunk]) for chunk in torch.arange(n).split(1000)])
        share = (classify(net, images)[1].argmax(1) == c).double().mean().item()
        real = recall[labels == c]
        real_recall = real.double().mean().item() if len(real) else None
        rows.append({
            "class": names[c] if names else str(c), "p_y": prior[c].item(), "samples": n, "share_labelled": share,
            "test_images": len(real), "classifier_recall": real_recall,
            "ratio": share / real_recall if real_recall else None,
        })  # fmt: skip
    ratios = [(r["p_y"], r["ratio"]) for r in rows if r["ratio"] is not None]
    return {
        "classes": rows,
        "mean_share": sum(r["p_y"] * r["share_labelled"] for r in rows),
        "mean_ratio": sum(p * v for p, v in ratios) / max(sum(p for p, _ in ratios), 1e-12),
    }
