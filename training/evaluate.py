"""Test-set evaluation: ELBO and its terms, the importance-weighted log-likelihood bound (IWAE), and
sample quality judged by the project's classifier (`training.quality`).

`python -m training.evaluate --checkpoint DIR/best.pt --k 1000 --images 1000 [--classifier F.pt]`
scores any checkpoint. Bernoulli models are scored on test images binarized once with a fixed seed,
so figures from different runs are comparable. Under a flow prior, the KL is the Monte Carlo estimate
log q(z|x) - log p(z) and the IWAE weights use the flow's log p(z). An autoencoder has no density:
it gets its reconstruction loss, no ELBO and no NLL.
"""

from __future__ import annotations

import json
import logging
import math
import time
from pathlib import Path
from typing import Any

import torch

from service import commands
from service.commands import Parser, writable_folder
from service.imaging import encoded, to_uint8
from training import checkpoint
from training.checkpoint import load_model
from training.cli import check_data
from training.data import Dataset, load_data, to_unit
from training.distributed import Dist, gather_rows
from training.features import check_classifier, load_feature_net
from training.likelihoods import Likelihood
from training.losses import iwae_bound, skip_iwae_noise
from training.families import Model
from training.quality import sample_quality

AE_NOTE = "a deterministic autoencoder defines no density: no ELBO, KL or NLL, only its reconstruction loss"

log = logging.getLogger(__name__)


def eval_rows(total: int, n: int | None = None, seed: int = 0) -> torch.Tensor | slice:
    """Which of `total` test images are scored: `n` drawn with a fixed seed (all when n is None or
    larger). A seeded draw rather than the first n: MNIST's test set is ordered, and its first half
    is the easier one, so the first 1000 images would flatter every model."""
    if n is not None and n < total:
        return torch.randperm(total, generator=torch.Generator().manual_seed(seed))[:n].sort().values
    return slice(None)


def prepare_eval_images(x: torch.Tensor, likelihood: Likelihood, n: int | None = None, seed: int = 0) -> torch.Tensor:
    """What the model is scored on: the `eval_rows` of x, binarized once with a fixed seed for
    Bernoulli models (their labels: the same rows of the split's labels)."""
    x = to_unit(x[eval_rows(len(x), n, seed)])
    return likelihood.scored_data(x, seed)


@torch.no_grad()
def elbo_terms(
    model: Model, x: torch.Tensor, batch_size: int = 500, eps: torch.Tensor | None = None, dist: Dist = Dist(),
    y: torch.Tensor | None = None,
) -> dict[str, torch.Tensor]:  # fmt: skip
    """Per-example reconstruction NLL, KL and ELBO (one z sample each), plus the posterior means.

    KL is closed form under N(0, I), the one-sample estimate log q(z|x) - log p(z) under the flow
    prior. An autoencoder gets only "recon" (decoded from its code) and "mu". `eps` is the noise
    [N, D] (drawn batch by batch when None); `y` the images' classes, for a conditional model (its
    ELBO bounds log p(x|y)). Under torchrun (`dist`) each rank scores its share of x with its rows
    of the noise one process would draw, and every rank gets every row."""
    if dist.active:
        return _shared_elbo_terms(model, x, batch_size, dist, y)
    recon, kl, mus = [], [], []
    for i, xb in enumerate(x.split(batch_size)):
        rows = slice(i * batch_size, i * batch_size + len(xb))
        terms = model(xb, None if eps is None else eps[rows], None if y is None else y[rows])
        recon.append(-model.likelihood.log_prob(xb, terms.params))
        if terms.kl is not None:
            kl.append(model.group_kl(terms.kl))
        mus.append(terms.mu)
    r = torch.cat(recon)
    if not kl:
        return {"recon": r, "mu": torch.cat(mus)}
    groups = torch.cat(kl)  # [N, G]
    k = groups.sum(dim=1)
    return {"recon": r, "kl": k, "elbo": -(r + k), "mu": torch.cat(mus), "kl_groups": groups}


def _shared_elbo_terms(
    model: Model, x: torch.Tensor, batch_size: int, dist: Dist, y: torch.Tensor | None
) -> dict[str, torch.Tensor]:
    eps = None
    if model.variational:  # the draws one process makes, batch by batch, in its order
        eps = torch.cat([torch.randn(len(xb), model.noise_size, device=x.device) for xb in x.split(batch_size)])
    rows = dist.share(len(x))
    local = elbo_terms(model, x[rows], batch_size, None if eps is None else eps[rows], y=None if y is None else y[rows])
    return {key: gather_rows(dist, value, rows, len(x)) for key, value in local.items()}


# Lossless codecs at their strongest settings in Pillow: what a likelihood's bits/dim is read against.
CODECS = {"png": ("PNG", {"optimize": True, "compress_level": 9}), "webp": ("WEBP", {"lossless": True, "quality": 100, "method": 6})}


def codec_bits_per_dim(x: torch.Tensor) -> dict[str, float]:
    """What lossless PNG and lossless WebP need for the same images (x in [0, 1] on the 8-bit grid,
    after the model's preprocessing), in bits per dimension, each image its own file."""
    pixels = to_uint8(x.detach().cpu().numpy())
    result: dict[str, float] = {"images": len(pixels)}
    for name, (fmt, options) in CODECS.items():
        result[f"{name}_bits_per_dim"] = 8 * sum(len(encoded(image, fmt, **options)) for image in pixels) / pixels.size
    return result


@torch.no_grad()
def reconstruction_psnr(
    model: Model, x: torch.Tensor, batch_size: int = 500, dist: Dist = Dist(), y: torch.Tensor | None = None
) -> float:
    """PSNR in dB of the reconstructions (the mean image decoded from mu, given the class y for a
    conditional model) against x in [0, 1]: a figure for any likelihood, and the one to read when
    there are no classes to judge samples by."""
    rows = dist.share(len(x))
    ys = [None] * len(x) if y is None else y[rows].split(batch_size)
    errors = []
    for xb, yb in zip(x[rows].split(batch_size), ys):
        mu, _ = model.encode(xb, yb)
        errors.append((model.mean_image(model.decode(mu, yb)) - xb).pow(2).flatten(1).mean(dim=1))
    per_image = torch.cat(errors) if errors else x.new_zeros(0)
    per_image = gather_rows(dist, per_image, rows, len(x))
    mse = per_image.mean().clamp_min(1e-12).item()
    return 10.0 * math.log10(1.0 / mse)


def active_units(mu: torch.Tensor, threshold: float = 0.01) -> int:
    """Latent dimensions whose posterior mean varies across inputs (Cov_x E_q[z_u] > 0.01, Burda et al.)."""
    return int((mu.var(dim=0) > threshold).sum())


def group_figures(model: Model, terms: dict[str, torch.Tensor]) -> list[dict[str, Any]]:
    """Per latent group (one for the flat VAE): its dimensions, mean KL in nats and active units; a
    group with no active unit is collapsed, its images decoded alike whatever its posterior."""
    mus = terms["mu"].split(model.group_dims, dim=1)
    return [
        {"group": name, "dims": dims, "kl": kl.item(), "active_units": active_units(mu), "collapsed": active_units(mu) == 0}
        for name, dims, kl, mu in zip(model.group_names(), model.group_dims, terms["kl_groups"].mean(dim=0), mus)
    ]  # fmt: skip


@torch.no_grad()
def iwae_nll(
    model: Model, x: torch.Tensor, k: int, seed: int = 0, batch_size: int = 10, dist: Dist = Dist(),
    y: torch.Tensor | None = None,
) -> torch.Tensor:  # fmt: skip
    """-log p(x) estimated with the k-sample IWAE bound, per image: [N] (an upper bound on the NLL),
    with the model's own prior density (N(0, I) or the flow); -log p(x|y) for a conditional model
    given the classes y.

    Under torchrun (`dist`) each rank scores a contiguous share of the batches, first drawing and
    dropping the noise of the batches before its own (`skip_iwae_noise`), so every image gets the
    samples one process would give it; every rank gets every image's figure."""
    if not model.variational:
        raise ValueError(AE_NOTE)
    gen = torch.Generator(device=x.device).manual_seed(seed)
    batches = x.split(batch_size)
    classes = [None] * len(batches) if y is None else y.split(batch_size)
    mine = dist.share(len(batches))
    out = []
    for i, (xb, yb) in enumerate(zip(batches[: mine.stop], classes)):
        if i < mine.start:
            skip_iwae_noise(len(xb), model.noise_size, k, generator=gen, device=x.device)
            continue
        out.append(-iwae_bound(model.log_weights(xb, yb), len(xb), model.noise_size, k, generator=gen, device=x.device))
    nll = torch.cat(out) if out else x.new_zeros(0)
    return gather_rows(dist, nll, slice(mine.start * batch_size, min(mine.stop * batch_size, len(x))), len(x))


def class_log_likelihoods(model: Model, x: torch.Tensor, k: int, seed: int = 0, dist: Dist = Dist()) -> torch.Tensor:
    """log p(x|y) of a conditional model for every class y, IWAE with k samples: [N, classes]. Every
    class draws the same noise, so the differences between classes are the model's, not the draw's;
    it costs classes x k decoder rows per image."""
    return torch.stack([
        -iwae_nll(model, x, k, seed, dist=dist, y=torch.full((len(x),), c, dtype=torch.long, device=x.device))
        for c in range(model.cfg.classes)
    ], dim=1)  # fmt: skip


def bayes_figures(model: Model, log_px_y: torch.Tensor, y: torch.Tensor, names: list[str]) -> tuple[torch.Tensor, dict[str, Any]]:
    """The marginal log p(x) = logsumexp_y [log p(x|y) + log p(y)] [N], and what Bayes' rule makes
    of the per-class likelihoods [N, C] for images of labels y: log p(x|y) at the true class, the
    accuracy of argmax_y p(y|x), and both per class."""
    c, h, w = model.cfg.image_shape
    spec, dims = model.likelihood.spec, c * h * w
    joint = log_px_y + model.cond.log_prior.to(log_px_y.device)
    log_px = torch.logsumexp(joint, dim=1)
    y = y.to(log_px_y.device)
    given = -log_px_y.gather(1, y[:, None]).squeeze(1)
    right = joint.argmax(dim=1) == y
    per_class = [
        {"class": name, "images": int((y == i).sum()),
         "nll_given_class": given[y == i].mean().item() if (y == i).any() else None,
         "bayes_recall": right[y == i].double().mean().item() if (y == i).any() else None}
        for i, name in enumerate(names)
    ]  # fmt: skip
    return log_px, {
        "nll_given_class": given.mean().item(),
        "nll_given_class_bits_per_dim": float(spec.bits_per_dim(given.mean().item(), dims)),
        "bayes_accuracy": right.double().mean().item(),
        "per_class": per_class,
    }


def evaluate(
    model: Model, x: torch.Tensor, k: int, seed: int = 0, dist: Dist = Dist(), y: torch.Tensor | None = None,
    classes: list[str] | None = None,
) -> dict[str, Any]:  # fmt: skip
    """Means over the images x (already prepared with `prepare_eval_images`), in nats; under
    torchrun (`dist`) the images split over the ranks, every rank getting the same figures.

    A conditional model needs the images' labels y (and the class names): its NLL is the marginal
    -log p(x) over every class, beside -log p(x|y) and Bayes' rule's classification
    (`bayes_figures`); its ELBO, KL and reconstructions are given the true class."""
    torch.manual_seed(seed)
    started = time.perf_counter()
    if model.conditional and y is None:
        raise ValueError("a conditional model is evaluated with its test images' labels")
    y = y if model.conditional else None
    terms = elbo_terms(model, x, dist=dist, y=y)
    c, h, w = model.cfg.image_shape
    if not model.variational:
        return {
            "images": len(x),
            "model": "ae",
            "reconstruction": terms["recon"].mean().item(),
            "elbo": None,
            "kl": None,
            "nll": None,
            "note": AE_NOTE,
            "psnr_db": reconstruction_psnr(model, x, dist=dist),
            "active_units": active_units(terms["mu"]),
            "seconds": round(time.perf_counter() - started, 2),
        }
    conditional: dict[str, Any] = {}
    if y is not None:
        log_px, figures = bayes_figures(model, class_log_likelihoods(model, x, k, seed, dist), y, classes or [])
        nll, conditional = -log_px, {"conditional": figures}
    else:
        nll = iwae_nll(model, x, k, seed, dist=dist)
    dims, spec = c * h * w, model.likelihood.spec
    return {
        "images": len(x),
        "iwae_k": k,
        "elbo": terms["elbo"].mean().item(),
        "reconstruction": terms["recon"].mean().item(),
        "kl": terms["kl"].mean().item(),
        "nll": nll.mean().item(),
        "nll_bits_per_dim": float(spec.bits_per_dim(nll.mean().item(), dims)),
        "elbo_bits_per_dim": float(spec.bits_per_dim(-terms["elbo"].mean().item(), dims)),
        "bits_per_dim_note": spec.bits_note,
        "groups": group_figures(model, terms),
        "psnr_db": reconstruction_psnr(model, x, dist=dist, y=y),
        "active_units": active_units(terms["mu"]),
        **conditional,
        "seconds": round(time.perf_counter() - started, 2),
    }


def evaluate_quality(
    model: Model, data: Dataset, classifier: str | Path, n: int = 10_000, seed: int = 0,
    class_means: torch.Tensor | None = None,
) -> dict[str, Any]:  # fmt: skip
    """Sample quality (`training.quality.sample_quality`) on the whole test set, with the classifier
    read from `classifier` (a features.pt); `seed` draws the samples; with `class_means` (or a
    conditional model) its edits too. The model encodes the test images as it is scored on them:
    binarized once with seed 0 for Bernoulli models."""
    started = time.perf_counter()
    device = next(model.parameters()).device
    net = load_feature_net(classifier, device)
    test = data.test.unit()
    inputs = prepare_eval_images(test, model.likelihood)
    labels, train = data.test.labels, data.train.images
    result = sample_quality(model, net, test.to(device), labels, inputs.to(device), train, n, seed, names=data.classes,
                            class_means=class_means)  # fmt: skip
    return {"classifier": str(classifier), **result, "seconds": round(time.perf_counter() - started, 2)}


def evaluate_checkpoint(
    path: Path, k: int, images: int | None, data_dir: str | None = None, classifier: str | None = None,
    quality_samples: int | None = None,
) -> dict[str, Any]:  # fmt: skip
    """Scores of a checkpoint; quality figures with `classifier`, or the one its run was trained with."""
    model, cfg, _ = load_model(path)
    means = checkpoint.load(path).get("class_means")
    cfg.data_dir = data_dir or cfg.data_dir
    check_data(cfg.dataset, cfg.data_dir, cfg.download)
    if classifier or cfg.classifier:
        flag = "--classifier" if classifier else "the run's own --classifier (pass --classifier to use another)"
        classifier = classifier or cfg.classifier
        check_classifier(classifier, flag, cfg.model.image_shape)
    data = load_data(cfg)
    x = prepare_eval_images(data.test.unit(), model.likelihood, images)
    result = evaluate(model, x, k, y=data.test.labels[eval_rows(len(data.test), images)], classes=data.classes)
    if cfg.dataset == "folder":
        result["codecs"] = codec_bits_per_dim(x)
    if classifier and data.classes:
        result["quality"] = evaluate_quality(model, data, classifier, quality_samples or cfg.quality_samples, class_means=means)
    return result


def conditional_line(test: dict[str, Any]) -> str:
    """A conditional model's test figures beside its marginal NLL: log p(x|y) and Bayes' rule."""
    c = test["conditional"]
    return (
        f"given the class: -log p(x|y) {c['nll_given_class']:.2f} nats = {c['nll_given_class_bits_per_dim']:.3f} bits/dim; "
        f"classified by Bayes' rule (k={test['iwae_k']}): accuracy {c['bayes_accuracy']:.3f}"
    )


def quality_lines(quality: dict[str, Any]) -> list[str]:
    """The sample-quality figures as a few readable lines."""
    q = quality
    lines = [
        f"classifier {q['classifier']}: accuracy {q['classifier_accuracy']:.3f} on the {q['test_images']} test "
        f"images ({q['classifier_accuracy_on_model_inputs']:.3f} on the model's inputs)",
        f"reconstruction accuracy {q['reconstruction_accuracy']:.3f} (reconstructions labelled as the input's class)",
        f"FD of real training images vs test: {quality['fd_train_vs_test']:.2f} "
        f"({quality['fd_train_vs_test_n']} images; the floor; FD is this project's classifier, not FID)",
    ]
    sources = {"samples": "samples, z from the prior", "samples_fitted": "samples, z from the fitted Gaussian"}
    for key, what in sources.items():
        if key in quality:
            s = quality[key]
            lines.append(
                f"{what}: n {s['n']}, FD {s['fd']:.2f}, mean top-class probability {s['mean_top_probability']:.3f}, "
                f"class entropy {s['class_entropy_nats']:.3f} nats (max {s['class_entropy_max_nats']:.3f})"
            )
    if "by_class" in quality:
        c = quality["by_class"]
        lines.append(
            f"samples of a class asked for: {c['mean_share']:.3f} labelled as it (weighted by p(y)), "
            f"{c['mean_ratio']:.3f} of the classifier's recall on real images of the class"
        )
    if "class_kept_by_groups" in quality:
        kept = " ".join(f"{share:.3f}" for share in quality["class_kept_by_groups"])
        lines.append(f"labelled as the image's class with the first L = 0, 1, ... groups encoded, the rest drawn: {kept}")
    if quality.get("edits", {}).get("images"):
        e = quality["edits"]
        lines.append(
            f"edits of {e['images']} test images to another class at strength {e['strength']:g}: {e['share_labelled_target']:.3f} "
            f"labelled as the target, {e['share_nearer_source']:.3f} nearer their source than a test image of the target is"
        )
    return lines


def build_parser() -> Parser:
    """The command's parser: a pure reading of the flags (the docs' commands are checked with it)."""
    parser = Parser(prog="python -m training.evaluate", description=commands.summary(__doc__))
    parser.add_argument("--checkpoint", type=Path, required=True)
    parser.add_argument("--k", type=int, default=1000, help="importance samples per image")
    parser.add_argument("--images", type=int, default=1000, help="test images, a seeded draw (0: all)")
    parser.add_argument("--data-dir", help="overrides the data directory stored in the checkpoint")
    parser.add_argument("--classifier", help="features.pt for the sample-quality figures (default: the run's own)")
    parser.add_argument("--samples", type=int, help="samples scored for sample quality (default: the run's, 10000)")
    parser.add_argument("--out", type=Path, help="write the figures as JSON here")
    return parser


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    if args.out:
        writable_folder(args.out.parent, "--out")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    result = evaluate_checkpoint(
        args.checkpoint, args.k, args.images or None, args.data_dir, args.classifier, args.samples
    )
    text = json.dumps(result, indent=2)
    print(text)
    if "conditional" in result:
        log.info("%s", conditional_line(result))
    if "quality" in result:
        for line in quality_lines(result["quality"]):
            log.info("%s", line)
    if args.out:
        args.out.write_text(text + "\n")


if __name__ == "__main__":
    commands.run(main, "python -m training.evaluate")
