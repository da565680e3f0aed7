"""Test-set evaluation: ELBO and its terms, and the importance-weighted log-likelihood bound (IWAE).

`python -m training.evaluate --checkpoint DIR/best.pt --k 1000 --images 1000` scores any checkpoint.
Bernoulli models are scored on test images binarized once with a fixed seed, so figures from
different runs are comparable.
"""

from __future__ import annotations

import argparse
import json
import logging
import time
from pathlib import Path
from typing import Any

import torch

from training.checkpoint import load_model
from training.data import fixed_binarization, load_dataset
from training.losses import iwae_bound, kl_divergence, reconstruction_nll
from training.model import VAE

log = logging.getLogger(__name__)


def prepare_eval_images(x: torch.Tensor, likelihood: str, n: int | None = None, seed: int = 0) -> torch.Tensor:
    """What the model is scored on: `n` test images drawn with a fixed seed (all when n is None or
    larger), binarized once with a fixed seed for Bernoulli models.

    A seeded draw rather than the first n: MNIST's test set is ordered, and its first half is the
    easier one, so the first 1000 images would flatter every model.
    """
    if n is not None and n < len(x):
        x = x[torch.randperm(len(x), generator=torch.Generator().manual_seed(seed))[:n].sort().values]
    return fixed_binarization(x, seed) if likelihood == "bernoulli" else x


@torch.no_grad()
def elbo_terms(model: VAE, x: torch.Tensor, batch_size: int = 500) -> dict[str, torch.Tensor]:
    """Per-example reconstruction NLL, KL and ELBO (one z sample each), plus the posterior means."""
    cfg = model.cfg
    recon, kl, mus = [], [], []
    for xb in x.split(batch_size):
        mu, logvar = model.encode(xb)
        params = model.decode(model.reparameterize(mu, logvar))
        recon.append(reconstruction_nll(params, xb, cfg.likelihood, cfg.gaussian_std))
        kl.append(kl_divergence(mu, logvar))
        mus.append(mu)
    r, k = torch.cat(recon), torch.cat(kl)
    return {"recon": r, "kl": k, "elbo": -(r + k), "mu": torch.cat(mus)}


def active_units(mu: torch.Tensor, threshold: float = 0.01) -> int:
    """Latent dimensions whose posterior mean varies across inputs (Cov_x E_q[z_u] > 0.01, Burda et al.)."""
    return int((mu.var(dim=0) > threshold).sum())


@torch.no_grad()
def iwae_nll(model: VAE, x: torch.Tensor, k: int, seed: int = 0, batch_size: int = 10) -> torch.Tensor:
    """-log p(x) estimated with the k-sample IWAE bound, per image: [N] (an upper bound on the NLL)."""
    cfg = model.cfg
    gen = torch.Generator(device=x.device).manual_seed(seed)

    def decode_nll(z: torch.Tensor, xs: torch.Tensor) -> torch.Tensor:
        return reconstruction_nll(model.decode(z), xs, cfg.likelihood, cfg.gaussian_std)

    out = []
    for xb in x.split(batch_size):
        mu, logvar = model.encode(xb)
        out.append(-iwae_bound(decode_nll, xb, mu, logvar, k, generator=gen))
    return torch.cat(out)


def evaluate(model: VAE, x: torch.Tensor, k: int, seed: int = 0) -> dict[str, Any]:
    """Means over the images x (already prepared with `prepare_eval_images`), in nats."""
    torch.manual_seed(seed)
    started = time.perf_counter()
    terms = elbo_terms(model, x)
    nll = iwae_nll(model, x, k, seed)
    c, h, w = model.cfg.image_shape
    return {
        "images": len(x),
        "iwae_k": k,
        "elbo": terms["elbo"].mean().item(),
        "reconstruction": terms["recon"].mean().item(),
        "kl": terms["kl"].mean().item(),
        "nll": nll.mean().item(),
        "nll_bits_per_dim": nll.mean().item() / (c * h * w * torch.log(torch.tensor(2.0)).item()),
        "active_units": active_units(terms["mu"]),
        "seconds": round(time.perf_counter() - started, 2),
    }


def evaluate_checkpoint(path: Path, k: int, images: int | None, data_dir: str | None = None) -> dict[str, Any]:
    model, cfg, _ = load_model(path)
    data = load_dataset(cfg.dataset, Path(data_dir or cfg.data_dir) if (data_dir or cfg.data_dir) else None, seed=cfg.seed)
    x = prepare_eval_images(data.test.images, cfg.model.likelihood, images)
    return evaluate(model, x, k)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--checkpoint", type=Path, required=True)
    parser.add_argument("--k", type=int, default=1000, help="importance samples per image")
    parser.add_argument("--images", type=int, default=1000, help="test images, a seeded draw (0: all)")
    parser.add_argument("--data-dir", help="overrides the data directory stored in the checkpoint")
    parser.add_argument("--out", type=Path, help="write the figures as JSON here")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    result = evaluate_checkpoint(args.checkpoint, args.k, args.images or None, args.data_dir)
    text = json.dumps(result, indent=2)
    print(text)
    if args.out:
        args.out.write_text(text + "\n")


if __name__ == "__main__":
    main()
