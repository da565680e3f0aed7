"""The training loop: negative ELBO with beta, KL warm-up and free bits (or, for the autoencoder
baseline, the reconstruction alone); best and last checkpoints.

Everything random draws from generators seeded by the config, and their states are saved in the
last checkpoint, so the same seed gives the same run and `--resume` continues it exactly.
"""

from __future__ import annotations

import json
import logging
import math
import time
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm

from training import checkpoint
from training.config import TrainConfig, to_dict
from training.data import Dataset, binarize, load_data
from training.evaluate import active_units, codec_bits_per_dim, elbo_terms, evaluate, evaluate_quality, prepare_eval_images, quality_lines
from training.features import FeatureNet, feature_distance, load_feature_net
from training.figures import write_figures
from training.losses import free_bits_kl, free_bits_total, kl_divergence, monte_carlo_kl, reconstruction_nll
from training.model import VAE

log = logging.getLogger(__name__)


def pick_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def kl_weight(cfg: TrainConfig, progress: float) -> float:
    """beta, ramped linearly from 0 over the first `warmup_epochs` (progress counts epochs, fractional)."""
    if cfg.warmup_epochs <= 0:
        return cfg.beta
    return cfg.beta * min(1.0, progress / cfg.warmup_epochs)


def learning_rate(cfg: TrainConfig, epoch: int) -> float:
    """Stateless schedule (a function of the epoch alone), so resuming needs no scheduler state."""
    if cfg.lr_schedule == "constant":
        return cfg.lr
    return cfg.lr * 0.5 * (1 + math.cos(math.pi * epoch / cfg.epochs))


def objective(
    model: VAE, x: torch.Tensor, cfg: TrainConfig, beta: float, feature_net: FeatureNet | None
) -> tuple[torch.Tensor, dict[str, float]]:
    """The loss to minimise and the true (unweighted) per-example terms for logging.

    The KL term: closed form against N(0, I) with free bits per dimension; under the flow prior the
    one-sample Monte Carlo estimate log q(z|x) - log p(z) at the reparameterized z, with free bits as
    one floor of free_bits * latent_dim nats on its batch mean (a flow's KL has no per-dimension
    split). An autoencoder has no KL term: its loss is the reconstruction alone."""
    mcfg = model.cfg
    mu, logvar = model.encode(x)
    z = model.reparameterize(mu, logvar) if logvar is not None else mu
    params = model.decode(z)
    pixel = reconstruction_nll(params, x, mcfg.likelihood, mcfg.gaussian_std)
    recon_term = torch.zeros((), device=x.device)
    if cfg.reconstruction in ("pixel", "both"):
        recon_term = recon_term + pixel.mean()
    if feature_net is not None:
        # The unclipped mean: clipping a Gaussian mean to [0, 1] here would stop this term's gradient
        # for every pixel outside the range, and with features alone nothing would pull it back.
        x_hat = model.likelihood_mean(params)
        recon_term = recon_term + cfg.feature_weight * feature_distance(feature_net, x, x_hat).mean()
    if logvar is None:
        return recon_term, {"loss": recon_term.item(), "recon": pixel.mean().item()}
    if mcfg.prior == "flow":
        kl = monte_carlo_kl(z, mu, logvar, model.prior_log_prob(z))
        kl_term = free_bits_total(kl, cfg.free_bits, mcfg.latent_dim) if cfg.free_bits > 0 else kl.mean()
    else:
        kl = kl_divergence(mu, logvar)
        kl_term = free_bits_kl(mu, logvar, cfg.free_bits) if cfg.free_bits > 0 else kl.mean()
    loss = recon_term + beta * kl_term
    stats = {"loss": loss.item(), "recon": pixel.mean().item(), "kl": kl.mean().item()}
    return loss, stats


def mirror_half(x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """x [N, C, H, W] with each image mirrored left to right with probability 1/2 (drawn from the
    data generator, so a seed gives the same flips and --resume continues them)."""
    flip = torch.rand(len(x), generator=generator) < 0.5
    return torch.where(flip.view(-1, 1, 1, 1), x.flip(-1), x)


class Trainer:
    def __init__(self, cfg: TrainConfig, out: Path, data: Dataset | None = None) -> None:
        self.cfg = cfg
        self.out = out
        self.device = pick_device(cfg.device)
        torch.manual_seed(cfg.seed)
        self.data = data or load_data(cfg)
        cfg.model.image_shape = self.data.image_shape
        cfg.model.widths = cfg.model.stage_widths  # the checkpoint records the stages, whatever the default becomes
        self.model = VAE(cfg.model).to(self.device)
        self.optimizer = torch.optim.AdamW(self.model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
        self.feature_net = load_feature_net(cfg.feature_checkpoint, self.device) if cfg.reconstruction != "pixel" else None
        self.data_gen = torch.Generator().manual_seed(cfg.seed + 1)
        self.val_x = prepare_eval_images(self.data.val.unit(), cfg.model.likelihood, seed=cfg.seed).to(self.device)
        self.history: list[dict[str, Any]] = []
        self.best_val = -math.inf
        self.start_epoch = 0

    def resume(self) -> None:
        """Continue from last.pt: weights, optimizer, history and every random generator's state.

        The checkpoint is read onto the CPU, where the generators' states must be; the weights are
        copied into the model on its device, and the optimizer's state follows its parameters' device
        (torch's `Optimizer.load_state_dict` moves it)."""
        state = checkpoint.load(self.out / "last.pt")
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.history = state["history"]
        self.best_val = state["best_val"]
        self.start_epoch = state["epoch"]
        torch.set_rng_state(state["torch_rng"])
        if "cuda_rng" in state and self.device.type == "cuda":
            torch.cuda.set_rng_state(state["cuda_rng"], self.device)
        self.data_gen.set_state(state["data_rng"])
        log.info("resumed from %s at epoch %d", self.out / "last.pt", self.start_epoch)

    def train_epoch(self, epoch: int) -> dict[str, float]:
        cfg, model = self.cfg, self.model
        model.train()
        for group in self.optimizer.param_groups:
            group["lr"] = learning_rate(cfg, epoch)
        batches = torch.randperm(len(self.data.train), generator=self.data_gen).split(cfg.batch_size)
        totals = {"loss": 0.0, "recon": 0.0, "kl": 0.0} if model.variational else {"loss": 0.0, "recon": 0.0}
        seen = skipped = 0
        bar = tqdm(batches, desc=f"epoch {epoch + 1}/{cfg.epochs}", leave=False, disable=None)
        for i, idx in enumerate(bar):
            x = self.data.train.batch(idx)
            if cfg.hflip:
                x = mirror_half(x, self.data_gen)
            if cfg.model.likelihood == "bernoulli" and cfg.dynamic_binarization:
                x = binarize(x, self.data_gen)
            x = x.to(self.device)
            beta = kl_weight(cfg, epoch + i / len(batches))
            loss, stats = objective(model, x, cfg, beta, self.feature_net)
            self.optimizer.zero_grad(set_to_none=True)
            loss.backward()
            norm = torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip if cfg.grad_clip > 0 else math.inf)
            if not torch.isfinite(norm):  # one bad batch must not turn every weight into NaN
                skipped += 1
                continue
            self.optimizer.step()
            for key in totals:
                totals[key] += stats[key] * len(idx)
            seen += len(idx)
            bar.set_postfix(loss=f"{totals['loss'] / seen:.2f}")
        if skipped:
            log.warning("epoch %d: %d of %d steps skipped, their gradients not finite (try a lower --lr or --grad-clip)",
                        epoch + 1, skipped, len(batches))  # fmt: skip
        if seen == 0:
            raise RuntimeError(f"training diverged in epoch {epoch + 1}: no step had a finite gradient; lower --lr or set --grad-clip")
        avg = {k: v / seen for k, v in totals.items()}
        if model.variational:
            avg["neg_elbo"] = avg["recon"] + avg["kl"]
            avg["beta"] = beta
        return avg

    @torch.no_grad()
    def validate(self) -> dict[str, float]:
        self.model.eval()
        devices = [self.device] if self.device.type == "cuda" else []
        with torch.random.fork_rng(devices=devices):  # the same noise every epoch; the training stream untouched
            torch.manual_seed(self.cfg.seed)
            terms = elbo_terms(self.model, self.val_x)
        recon = terms["recon"].mean().item()
        if "kl" not in terms:  # an autoencoder: reconstruction only
            return {"recon": recon, "active_units": active_units(terms["mu"])}
        kl = terms["kl"].mean().item()
        return {"neg_elbo": recon + kl, "recon": recon, "kl": kl, "active_units": active_units(terms["mu"])}

    def fit(self) -> list[dict[str, Any]]:
        self.out.mkdir(parents=True, exist_ok=True)
        if self.start_epoch == 0:
            torch.manual_seed(self.cfg.seed)  # the reparameterization noise; a resumed run restores its own
        for epoch in range(self.start_epoch, self.cfg.epochs):
            started = time.perf_counter()
            train = self.train_epoch(epoch)
            val = self.validate()
            record = {"epoch": epoch + 1, "train": train, "val": val, "seconds": round(time.perf_counter() - started, 2)}
            self.history.append(record)
            if self.model.variational:
                log.info(
                    "epoch %d/%d  train -elbo %.2f (recon %.2f, kl %.2f)  val -elbo %.2f (recon %.2f, kl %.2f)  "
                    "active units %d  %.1fs",
                    epoch + 1, self.cfg.epochs, train["neg_elbo"], train["recon"], train["kl"],
                    val["neg_elbo"], val["recon"], val["kl"], val["active_units"], record["seconds"],
                )  # fmt: skip
            else:
                log.info(
                    "epoch %d/%d  train recon %.2f  val recon %.2f  active units %d  %.1fs",
                    epoch + 1, self.cfg.epochs, train["recon"], val["recon"], val["active_units"], record["seconds"],
                )  # fmt: skip
            # The best checkpoint: highest validation ELBO (an autoencoder: lowest reconstruction loss).
            score = -val["neg_elbo"] if "neg_elbo" in val else -val["recon"]
            if score > self.best_val:
                self.best_val = score
                checkpoint.save(self.out / "best.pt", self.model, self.cfg, epoch=epoch + 1)
            checkpoint.save(
                self.out / "last.pt",
                self.model,
                self.cfg,
                epoch=epoch + 1,
                optimizer=self.optimizer.state_dict(),
                history=self.history,
                best_val=self.best_val,
                torch_rng=torch.get_rng_state(),
                data_rng=self.data_gen.get_state(),
                **({"cuda_rng": torch.cuda.get_rng_state(self.device)} if self.device.type == "cuda" else {}),
            )
        return self.history


@torch.no_grad()
def fit_autoencoder_codes(model: VAE, data: Dataset, batch_size: int = 1000) -> None:
    """An autoencoder's ex-post Gaussian: mean and covariance of its codes for the training images
    (prepared as for scoring: binarized once for Bernoulli models)."""
    device = next(model.parameters()).device
    gen = torch.Generator().manual_seed(1)  # the one binarization of prepare_eval_images(seed=1), chunk by chunk
    codes = []
    for rows in torch.arange(len(data.train)).split(batch_size):
        xb = data.train.batch(rows)
        xb = binarize(xb, gen) if model.cfg.likelihood == "bernoulli" else xb
        codes.append(model.encode(xb.to(device))[0])
    model.fit_code_gaussian(torch.cat(codes))


def data_summary(data: Dataset) -> dict[str, Any]:
    """What metrics.json says of the data: the split sizes, the classes (and, for a folder, their
    counts, every skipped file with its reason, and the cache)."""
    return {
        "dataset": data.name, "image_shape": list(data.image_shape), "classes": data.classes,
        "splits": {"train": len(data.train), "val": len(data.val), "test": len(data.test)},
        "preprocessing": data.preprocessing.to_json(), **data.info,
    }  # fmt: skip


def collapse_warning(test: dict[str, Any], cfg: TrainConfig) -> str | None:
    """A message when the posterior collapsed (no active latent unit: every image decodes from the
    same z, so every sample looks alike), naming the flags that help; None otherwise."""
    if test.get("elbo") is None or test["active_units"] > 0:
        return None
    return (
        f"posterior collapse: 0 active latent units (KL {test['kl']:.2f} nats): the decoder ignores z and every "
        f"sample is alike. Try --free-bits 0.25 (now {cfg.free_bits:g}), a longer KL warm-up --warmup-epochs "
        f"{max(5.0, 2 * cfg.warmup_epochs):g} (now {cfg.warmup_epochs:g}), a smaller --beta (now {cfg.beta:g}), or a "
        "lower --lr"
    )


def run(cfg: TrainConfig, out: Path, resume: bool = False, data: Dataset | None = None) -> dict[str, Any]:
    """Train, then evaluate the best checkpoint on the test set, write metrics.json and the figures.

    An autoencoder's best checkpoint gets its fitted code Gaussian first (and is saved again with it)."""
    started = time.perf_counter()
    trainer = Trainer(cfg, out, data)
    if resume and (out / "last.pt").exists():
        trainer.resume()
    history = trainer.fit()
    train_seconds = sum(h["seconds"] for h in history)

    model, _, best = checkpoint.load_model(out / "best.pt", trainer.device)
    if not model.variational:
        fit_autoencoder_codes(model, trainer.data)
        checkpoint.save(out / "best.pt", model, cfg, epoch=best["epoch"])
    test_x = prepare_eval_images(trainer.data.test.unit(), cfg.model.likelihood, cfg.eval_images).to(trainer.device)
    log.info("evaluating the best checkpoint (epoch %d) on %d test images, k=%d", best["epoch"], len(test_x), cfg.iwae_k)
    test = evaluate(model, test_x, cfg.iwae_k)
    if cfg.dataset == "folder":  # 8-bit images: what lossless codecs need for the same test images
        test["codecs"] = codec_bits_per_dim(test_x)
        log.info(
            "the same %d test images need %.3f bits/dim as lossless PNG, %.3f as lossless WebP",
            test["codecs"]["images"], test["codecs"]["png_bits_per_dim"], test["codecs"]["webp_bits_per_dim"],
        )  # fmt: skip
    if cfg.classifier and trainer.data.classes:
        test["quality"] = evaluate_quality(model, trainer.data, cfg.classifier, cfg.quality_samples)
        for line in quality_lines(test["quality"]):
            log.info("%s", line)
    elif cfg.classifier:
        log.warning("--classifier ignored: sample quality (FD, class statistics) needs class folders; see bits/dim and PSNR")
    elif trainer.data.classes:
        log.info("no --classifier: no sample-quality figures (train one with python -m training.features)")
    else:
        log.info("no class folders: no FD or class statistics (they need a classifier of classes); see bits/dim and PSNR")
    figures = write_figures(model, trainer.data.test.unit().to(trainer.device), history, out, cfg.seed)
    metrics = {
        "config": to_dict(cfg),
        "data": data_summary(trainer.data),
        "best_epoch": best["epoch"],
        "train_seconds": round(train_seconds, 1),
        "total_seconds": round(time.perf_counter() - started, 1),
        "test": test,
        "history": history,
        "figures": [p.name for p in figures],
    }
    collapse = collapse_warning(test, cfg)
    if collapse:
        metrics["warnings"] = [collapse]
    (out / "metrics.json").write_text(json.dumps(metrics, indent=2) + "\n")
    if model.variational:
        log.info(
            "test: -elbo %.2f nats, nll (iwae k=%d) %.2f nats = %.3f bits/dim, kl %.2f, active units %d, psnr %.2f dB",
            -test["elbo"], cfg.iwae_k, test["nll"], test["nll_bits_per_dim"], test["kl"], test["active_units"],
            test["psnr_db"],
        )  # fmt: skip
        if collapse:
            log.warning("%s", collapse)
    else:
        log.info("test: reconstruction %.2f nats (an autoencoder: no NLL)", test["reconstruction"])
    return metrics
