"""The training loop: negative ELBO with beta, KL warm-up and free bits (or, for the autoencoder
baseline, the reconstruction alone); best and last checkpoints.

Everything random draws from generators seeded by the config, and their states are saved in the
last checkpoint, so the same seed gives the same run and `--resume` continues it exactly.

Under torchrun the same loop runs data-parallel (`training.distributed`): the global batch is
`--batch-size`, split over the ranks, and DDP averages the gradients, so a run means the same on
any number of processes. SIGTERM on any rank stops every rank at the next step with last.pt saved
there (`Stopped`), and `--resume` continues from that step.
"""

from __future__ import annotations

import inspect
import json
import logging
import math
import signal
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NoReturn

import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torch.optim.swa_utils import AveragedModel
from tqdm import tqdm

from service.commands import UsageError
from training import checkpoint, distributed
from training.config import TrainConfig, to_dict
from training.data import Dataset, load_data
from training.distributed import Dist, all_sum, any_rank, from_main, global_mean
from training.evaluate import (
    active_units, codec_bits_per_dim, conditional_line, elbo_terms, eval_rows, evaluate, evaluate_quality, prepare_eval_images, quality_lines,
)
from training.features import FeatureNet, feature_distance, load_feature_net
from training.board import Board
from training.figures import write_figures
from training.families import Model, build
from training.hvae import HVAE, TopPrior
from training.model import Pass

log = logging.getLogger(__name__)


SKIP_WARMUP_STEPS = 50  # steps whose norms make the typical norm before any step is judged exploding
NORM_DECAY = 0.99  # of the moving average of log gradient norms


def warm_ema(decay: float) -> Callable[[list[torch.Tensor], list[torch.Tensor], torch.Tensor], None]:
    """The moving average's update for torch's AveragedModel: avg <- r avg + (1 - r) weights, with
    r = min(decay, (1 + n) / (10 + n)) after n updates (TensorFlow's ExponentialMovingAverage warm-up),
    so a run of a few thousand steps is not evaluated on an average still near its initial weights."""

    @torch.no_grad()
    def update(averaged: list[torch.Tensor], current: list[torch.Tensor], num_averaged: torch.Tensor) -> None:
        n = float(num_averaged)
        rate = min(decay, (1 + n) / (10 + n))
        for avg, weights in zip(averaged, current):
            avg.lerp_(weights, 1 - rate)

    return update


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


@dataclass
class Shard:
    """The rows of a global batch of `total` images that this process computes: all of them in one
    process, its share under DDP (`net`: the model, or the DDP-wrapped model). DDP averages the
    ranks' gradients, so each batch mean is this rank's sum times world_size / total: the average is
    then the gradient of the mean over the whole batch, whatever each rank's share (the last batch of
    an epoch splits unevenly); in one process it is the batch mean."""

    net: nn.Module
    total: int
    dist: Dist

    def mean(self, rows: torch.Tensor) -> torch.Tensor:
        return rows.sum(dim=0) * (self.dist.world_size / self.total)


def _rows_mean(rows: torch.Tensor) -> float:
    """A statistic's mean over this rank's rows (0 for none: it is weighted by their count)."""
    return rows.mean().item() if len(rows) else 0.0


def objective(
    model: Model, x: torch.Tensor, cfg: TrainConfig, beta: float, feature_net: FeatureNet | None,
    eps: torch.Tensor | None = None, shard: Shard | None = None, y: torch.Tensor | None = None,
) -> tuple[torch.Tensor, dict[str, float]]:  # fmt: skip
    """The loss to minimise for this process's rows x of a batch, and the true (unweighted) terms
    for logging: reconstruction (pixels, the feature loss, or both) plus beta times the KL, whose
    units (`Pass.kl`: per latent dimension under N(0, I), one under a flow) are each held at least
    free_bits x their dimensions nats on the batch mean. An autoencoder's loss is the
    reconstruction alone.

    One path for one process and for DDP (`shard`; one process: the whole batch). Free bits clamp a
    batch mean, which is not a sum over rows; but clamp(m, floor) has the gradient of m where
    m >= floor and none below, so the floor is decided on the whole batch's mean (`global_mean`, an
    all-reduce under DDP) and the term is this rank's share of m for the units above it: DDP's
    average is then the one-process gradient. The logged loss is the whole batch's clamped value;
    the other statistics are this rank's row means. `eps` is the reparameterization noise (drawn
    when None); `y` the images' labels, for a conditional model."""
    shard = shard or Shard(model, len(x), Dist())
    terms: Pass = shard.net(x, eps, y)
    pixel = -model.likelihood.log_prob(x, terms.params)
    pixel_mean = _rows_mean(pixel)  # one .item() (a device sync on CUDA) per statistic and step
    recon_term, recon_value = torch.zeros((), device=x.device), 0.0
    if cfg.reconstruction in ("pixel", "both"):
        recon_term, recon_value = recon_term + shard.mean(pixel), pixel_mean
    if feature_net is not None:
        # The unclipped mean: clipping a Gaussian mean to [0, 1] here would stop this term's gradient
        # for every pixel outside the range, and with features alone nothing would pull it back.
        distance = feature_distance(feature_net, x, model.likelihood.mean(terms.params))
        recon_term = recon_term + cfg.feature_weight * shard.mean(distance)
        recon_value += cfg.feature_weight * _rows_mean(distance)
    if terms.kl is None:
        return recon_term, {"loss": recon_value, "recon": pixel_mean}
    kl = terms.kl.sum(dim=1)
    kl_mean = _rows_mean(kl)
    if cfg.free_bits > 0:
        floor = cfg.free_bits * model.kl_unit_dims.to(terms.kl.device)
        whole = global_mean(shard.dist, terms.kl, shard.total)  # [U]
        kl_term = (shard.mean(terms.kl) * (whole >= floor)).sum()
        kl_value = whole.clamp(min=floor).sum().item()
    else:
        kl_term, kl_value = shard.mean(kl), kl_mean
    loss = recon_term + beta * kl_term
    return loss, {"loss": recon_value + beta * kl_value, "recon": pixel_mean, "kl": kl_mean}


def mirror_half(x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """x [N, C, H, W] with each image mirrored left to right with probability 1/2 (drawn from the
    data generator, so a seed gives the same flips and --resume continues them)."""
    flip = torch.rand(len(x), generator=generator) < 0.5
    return torch.where(flip.view(-1, 1, 1, 1), x.flip(-1), x)


class Stopped(Exception):
    """Training stopped at a step boundary because a rank was sent SIGTERM (a pod's eviction, or
    torchrun passing its own on); last.pt holds the run up to that step, for `--resume`."""

    def __init__(self, signum: int, epoch: int, step: int) -> None:
        self.signum, self.epoch, self.step = signum, epoch, step
        name = signal.Signals(signum).name
        super().__init__(f"stopped by {name} in epoch {epoch + 1} after step {step}")


class Trainer:
    def __init__(self, cfg: TrainConfig, out: Path, data: Dataset | None = None) -> None:
        self.cfg = cfg
        self.out = out
        self.dist = distributed.current()
        d = self.dist
        self.device = distributed.pick_device(cfg.device, d.local_rank if d.active else None)
        if d.active and cfg.batch_size < d.world_size:
            raise ValueError(f"--batch-size {cfg.batch_size} is the global batch, split over {d.world_size} processes: "
                             f"it must be at least {d.world_size}")  # fmt: skip
        torch.manual_seed(cfg.seed)
        if data is None:
            with distributed.local_main_first(d):
                data = load_data(cfg)
        self.data = data
        cfg.model.image_shape = self.data.image_shape
        if (cfg.conditional or cfg.balance) and not data.classes:
            flag = "--conditional" if cfg.conditional else "--class-balance"
            raise UsageError(f"{flag} needs classes, and {cfg.data_dir} has none: put its images in one sub-folder per class")
        cfg.model.classes = len(data.classes) if cfg.conditional else 0
        cfg.model.widths = cfg.model.stage_widths  # the checkpoint records the stages, whatever the default becomes
        self.model = build(cfg.model).to(self.device)
        self.class_counts = torch.bincount(data.train.labels[data.train.labels >= 0], minlength=len(data.classes))
        if self.model.conditional:
            self.model.cond.set_prior(self.class_counts)
        # Under torchrun: the model wrapped by DDP (which starts every rank from rank 0's weights).
        # Buffers (the flow's masks, an autoencoder's code Gaussian) do not change in training: not broadcast.
        self.net: nn.Module = self.model
        if d.active:
            ids = [self.device.index] if self.device.type == "cuda" else None
            newer = "forward_sync_buffers" in inspect.signature(DistributedDataParallel).parameters  # torch >= 2.13
            quiet = "forward_sync_buffers" if newer else "broadcast_buffers"
            self.net = DistributedDataParallel(self.model, device_ids=ids, **{quiet: False})
        self.optimizer = torch.optim.AdamW(self.model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
        # The weights' moving average (torch's AveragedModel): what is validated, kept as best.pt and exported.
        decay = cfg.ema_decay
        self.ema = AveragedModel(self.model, multi_avg_fn=warm_ema(decay), use_buffers=True) if decay else None
        self.norm_log: float | None = None  # moving average of the steps' log gradient norms (`_exploding`)
        self.norm_steps = 0
        self.skipped_steps = 0  # of the last epoch: gradients not finite, or exploding
        self.grad_norm = 0.0  # the last epoch's mean gradient norm over its finite steps
        self.board: Board | None = None  # TensorBoard's event files, rank 0's (`fit`)
        self.feature_net = load_feature_net(cfg.feature_checkpoint, self.device) if cfg.reconstruction != "pixel" else None
        self.data_gen = torch.Generator().manual_seed(cfg.seed + 1)
        self.val_x = prepare_eval_images(self.data.val.unit(), self.model.likelihood, seed=cfg.seed).to(self.device)
        self.val_y = self.data.val.labels.to(self.device) if self.model.conditional else None
        self.history: list[dict[str, Any]] = []
        self.best_val = -math.inf
        self.start_epoch = 0
        self.partial: dict[str, Any] | None = None  # an epoch stopped part-way (last.pt's "partial")
        self.resumed = False
        self.signalled = 0  # the signal number SIGTERM's handler saw; 0: none
        self.images_per_second = 0.0
        self.carried_seconds = 0.0  # training seconds of a stopped epoch before its resumption

    def resume(self) -> None:
        """Continue from last.pt: weights, optimizer, history and every random generator's state,
        and, for a run stopped part-way through an epoch, that epoch's order and sums so far.

        The checkpoint is read onto the CPU, where the generators' states must be; the weights are
        copied into the model on its device, and the optimizer's state follows its parameters' device
        (torch's `Optimizer.load_state_dict` moves it). Under torchrun rank 0 reads it and hands it
        to the others, so only rank 0 needs the run directory."""
        state = from_main(self.dist, lambda: checkpoint.load(self.out / "last.pt"))
        try:
            self.model.load_state_dict(state["model"])
        except RuntimeError as err:  # the weights' names or shapes differ: other model flags than the run's
            raise checkpoint.CheckpointError(
                f"--resume: {self.out / 'last.pt'} holds a model of other flags than these ({checkpoint.first_line(err)}); "
                f"resume with the flags it was trained with, or train into another --out"
            ) from err
        self.optimizer.load_state_dict(state["optimizer"])
        self.history = state["history"]
        self.best_val = state["best_val"]
        self.start_epoch = state["epoch"]
        torch.set_rng_state(state["torch_rng"])
        if "cuda_rng" in state and self.device.type == "cuda":
            torch.cuda.set_rng_state(state["cuda_rng"], self.device)
        self.data_gen.set_state(state["data_rng"])
        self.norm_log, self.norm_steps = state.get("norm_log"), state.get("norm_steps", 0)
        if self.ema is not None:
            if "ema" not in state:
                raise checkpoint.CheckpointError(f"--resume: {self.out / 'last.pt'} has no moving average of the weights; "
                                                 "resume with --ema 0, as it was trained")  # fmt: skip
            self.ema.load_state_dict(state["ema"])
        self.partial = state.get("partial")
        self.resumed = True
        if self.dist.main:
            at = f", step {self.partial['step']}" if self.partial else ""
            log.info("resumed from %s at epoch %d%s", self.out / "last.pt", self.start_epoch, at)

    def train_epoch(self, epoch: int) -> dict[str, float]:
        cfg, model, d = self.cfg, self.model, self.dist
        model.train()
        for group in self.optimizer.param_groups:
            group["lr"] = learning_rate(cfg, epoch)
        partial, self.partial = self.partial, None
        if partial is None:
            order = self._order()
            start, skipped, elapsed = 0, 0, 0.0
            totals = {"loss": 0.0, "recon": 0.0, "kl": 0.0} if model.variational else {"loss": 0.0, "recon": 0.0}
            seen = 0
        else:  # resumed part-way: the epoch's order and its sums so far (every rank's: rank 0 carries them)
            order, start, skipped, elapsed = partial["order"], partial["step"], partial["skipped"], partial["seconds"]
            totals = {k: v if d.main else 0.0 for k, v in partial["totals"].items()}
            seen = partial["seen"] if d.main else 0
        self.carried_seconds = elapsed
        batches = order.split(cfg.batch_size)
        started, images = time.perf_counter(), 0
        norms, counted = 0.0, 0
        bar = tqdm(batches[start:], desc=f"epoch {epoch + 1}/{cfg.epochs}", leave=False, disable=None if d.main else True,
                   initial=start, total=len(batches))  # fmt: skip
        for i, idx in enumerate(bar, start):
            stop = any_rank(d, self.signalled)
            if stop:
                self._stop(stop, epoch, i, order, totals, seen, skipped, elapsed + time.perf_counter() - started)
            # Every rank prepares the whole global batch, so the data generator draws what one process draws.
            x = self.data.train.batch(idx)
            if cfg.hflip:
                x = mirror_half(x, self.data_gen)
            if cfg.dynamic_binarization:
                x = model.likelihood.training_data(x, self.data_gen)
            beta = kl_weight(cfg, epoch + i / len(batches))
            rows = d.share(len(idx))  # this rank's rows, and their noise from the draw one process makes
            eps = torch.randn(len(idx), model.noise_size, device=self.device)[rows] if model.variational else None
            x = x[rows].to(self.device)
            y = self.data.train.labels[idx][rows].to(self.device) if model.conditional else None
            loss, stats = objective(model, x, cfg, beta, self.feature_net, eps, Shard(self.net, len(idx), d), y)
            images += len(idx)
            self.optimizer.zero_grad(set_to_none=True)
            loss.backward()
            norm = torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip if cfg.grad_clip > 0 else math.inf)
            # One bad batch must not turn every weight into NaN, nor one exploding step undo the run
            # (the norm is the all-reduced gradient's: every rank decides the same).
            value = norm.item()  # one device sync per step
            finite = math.isfinite(value)
            if finite:
                norms += value
                counted += 1
            if not finite or self._exploding(value):
                skipped += 1
                continue
            self.optimizer.step()
            if self.ema is not None:
                self.ema.update_parameters(model)
            for key in totals:
                totals[key] += stats[key] * len(x)
            seen += len(x)
            if seen:
                bar.set_postfix(loss=f"{totals['loss'] / seen:.2f}")
        self.images_per_second = images / max(time.perf_counter() - started, 1e-9)
        self.skipped_steps = skipped
        self.grad_norm = norms / max(counted, 1)
        if d.active:
            totals, seen = self._summed(totals, seen)
        if skipped and d.main:
            log.warning("epoch %d: %d of %d steps skipped, their gradients not finite or exploding (try a lower --lr or --grad-clip)",
                        epoch + 1, skipped, len(batches))  # fmt: skip
        if seen == 0:
            raise RuntimeError(f"training diverged in epoch {epoch + 1}: no step had a finite gradient; lower --lr or set --grad-clip")
        avg = {k: v / seen for k, v in totals.items()}
        if model.variational:
            avg["neg_elbo"] = avg["recon"] + avg["kl"]
            avg["beta"] = beta
        return avg

    def _order(self) -> torch.Tensor:
        """An epoch's images: a permutation; with class balance, as many draws (with replacement) of
        images weighted n_c^-balance, so that class c gets a share of n_c^(1 - balance). Balance
        leaves each class's own images equally likely, so p(x|y) is what a conditional model learns
        either way; it gives small classes more of the steps (`--class-balance`)."""
        train = self.data.train
        if not self.cfg.balance:
            return torch.randperm(len(train), generator=self.data_gen)
        weights = self.class_counts.double().clamp_min(1).pow(-self.cfg.balance)[train.labels]
        return torch.multinomial(weights, len(train), replacement=True, generator=self.data_gen)

    @property
    def evaluated(self) -> Model:
        """The weights validated, kept as best.pt and exported: the moving average, where there is one."""
        return self.ema.module if self.ema is not None else self.model  # type: ignore[return-value]

    def _exploding(self, norm: float) -> bool:
        """Whether a step's gradient norm is over `skip_above` times the run's typical norm, a moving
        average of log norms. Every step moves the average, skipped or not, so gradients that grow
        for good soon count as typical: a run can skip a burst of steps, never every step from some
        point on (openai/vdvae#25, where a fixed threshold did)."""
        factor = self.cfg.skip_above
        if factor <= 0:
            return False
        log_norm, typical = math.log(max(norm, 1e-30)), self.norm_log
        self.norm_log = log_norm if typical is None else NORM_DECAY * typical + (1 - NORM_DECAY) * log_norm
        self.norm_steps += 1
        return typical is not None and self.norm_steps > SKIP_WARMUP_STEPS and log_norm > typical + math.log(factor)

    def _summed(self, totals: dict[str, float], seen: int) -> tuple[dict[str, float], int]:
        """The epoch's sums over every rank's rows."""
        *sums, all_seen = all_sum(self.dist, [*totals.values(), float(seen)])
        return dict(zip(totals, sums)), int(all_seen)

    def _stop(
        self, signum: int, epoch: int, step: int, order: torch.Tensor, totals: dict[str, float], seen: int, skipped: int,
        seconds: float,
    ) -> NoReturn:  # fmt: skip
        """Every rank stops before `step` of `epoch`: rank 0 writes last.pt as of that step (the epoch's
        order, its sums so far, the generators as they stand), the others wait for it, all raise."""
        if self.dist.active:
            totals, seen = self._summed(totals, seen)
        if self.dist.main:
            partial = {"step": step, "order": order, "totals": totals, "seen": seen, "skipped": skipped, "seconds": seconds}
            self.save_last(epoch, partial)
            log.warning("%s: stopping in epoch %d at step %d; wrote %s (continue with --resume)",
                        signal.Signals(signum).name, epoch + 1, step, self.out / "last.pt")  # fmt: skip
        distributed.barrier(self.dist)
        raise Stopped(signum, epoch, step)

    def save_last(self, epochs_done: int, partial: dict[str, Any] | None = None) -> None:
        checkpoint.save(
            self.out / "last.pt",
            self.model,
            self.cfg,
            epoch=epochs_done,
            optimizer=self.optimizer.state_dict(),
            history=self.history,
            best_val=self.best_val,
            torch_rng=torch.get_rng_state(),
            data_rng=self.data_gen.get_state(),
            norm_log=self.norm_log,
            norm_steps=self.norm_steps,
            **({"ema": self.ema.state_dict()} if self.ema is not None else {}),
            **({"cuda_rng": torch.cuda.get_rng_state(self.device)} if self.device.type == "cuda" else {}),
            **({"partial": partial} if partial else {}),
        )

    @torch.no_grad()
    def validate(self) -> dict[str, float]:
        self.evaluated.eval()
        devices = [self.device] if self.device.type == "cuda" else []
        with torch.random.fork_rng(devices=devices):  # the same noise every epoch; the training stream untouched
            torch.manual_seed(self.cfg.seed)
            terms = elbo_terms(self.evaluated, self.val_x, dist=self.dist, y=self.val_y)
        recon = terms["recon"].mean().item()
        if "kl" not in terms:  # an autoencoder: reconstruction only
            return {"recon": recon, "active_units": active_units(terms["mu"])}
        kl = terms["kl"].mean().item()
        record = {"neg_elbo": recon + kl, "recon": recon, "kl": kl, "active_units": active_units(terms["mu"])}
        if len(self.model.group_dims) > 1:
            record["kl_groups"] = [round(v, 3) for v in terms["kl_groups"].mean(dim=0).tolist()]
        return record

    @contextmanager
    def stop_on_sigterm(self) -> Iterator[None]:
        """While training, SIGTERM asks for a stop at the next step (`Stopped`) instead of ending the
        process wherever it is; the previous handler is back afterwards, except after a failed
        collective: another rank is gone, torchrun is sending this one SIGTERM, and the process
        must live to say why it fails (`training.__main__` reports it and exits). Only the main
        thread can take signals: elsewhere (a trainer in a thread) nothing changes."""
        if threading.current_thread() is not threading.main_thread():
            yield
            return

        def note(signum: int, _frame: Any) -> None:
            self.signalled = signum

        previous = signal.signal(signal.SIGTERM, note)
        keep = False
        try:
            yield
        except Exception as err:
            keep = self.dist.active and distributed.is_collective_error(err)
            raise
        finally:
            if not keep:
                signal.signal(signal.SIGTERM, previous)

    def fit(self) -> list[dict[str, Any]]:
        d = self.dist
        if d.main:
            self.out.mkdir(parents=True, exist_ok=True)
        if not self.resumed:
            torch.manual_seed(self.cfg.seed)  # the reparameterization noise; a resumed run restores its own
        if d.main and self.cfg.tensorboard:
            self.board = Board(self.out, self.start_epoch)
        try:
            with self.stop_on_sigterm():
                for epoch in range(self.start_epoch, self.cfg.epochs):
                    self.fit_epoch(epoch)
        finally:
            if self.board is not None:
                self.board.close()
        return self.history

    def fit_epoch(self, epoch: int) -> None:
        d = self.dist
        started = time.perf_counter()
        train = self.train_epoch(epoch)
        val = self.validate()
        seconds = round(time.perf_counter() - started + self.carried_seconds, 2)
        record = {"epoch": epoch + 1, "train": train, "val": val, "seconds": seconds,
                  "images_per_second": round(self.images_per_second, 1), "world_size": d.world_size,
                  "skipped_steps": self.skipped_steps}  # fmt: skip
        self.history.append(record)
        # The best checkpoint: highest validation ELBO (an autoencoder: lowest reconstruction loss).
        # Every rank holds the same validation figures, so every rank takes the same decision.
        score = -val["neg_elbo"] if "neg_elbo" in val else -val["recon"]
        best = score > self.best_val
        if best:
            self.best_val = score
        if not d.main:
            return
        if self.model.variational:
            log.info(
                "epoch %d/%d  train -elbo %.2f (recon %.2f, kl %.2f)  val -elbo %.2f (recon %.2f, kl %.2f)  "
                "active units %d  %.1fs",
                epoch + 1, self.cfg.epochs, train["neg_elbo"], train["recon"], train["kl"],
                val["neg_elbo"], val["recon"], val["kl"], val["active_units"], record["seconds"],
            )  # fmt: skip
            if "kl_groups" in val:
                log.info("  val KL per group, coarse to fine: %s", " ".join(f"{v:.2f}" for v in val["kl_groups"]))
        else:
            log.info(
                "epoch %d/%d  train recon %.2f  val recon %.2f  active units %d  %.1fs",
                epoch + 1, self.cfg.epochs, train["recon"], val["recon"], val["active_units"], record["seconds"],
            )  # fmt: skip
        if self.board is not None:
            lr = self.optimizer.param_groups[0]["lr"]
            shown_y = None if self.val_y is None else self.val_y[:16]
            self.board.epoch(record, self.evaluated, lr, self.grad_norm, self.val_x[:16], shown_y)
        if best:
            checkpoint.save(self.out / "best.pt", self.evaluated, self.cfg, epoch=epoch + 1)
        self.save_last(epoch + 1)


@torch.no_grad()
def training_posteriors(model: Model, data: Dataset, batch_size: int = 1000) -> tuple[torch.Tensor, torch.Tensor]:
    """The encoder's output (posterior mean and log-variance; an autoencoder's code and None) for
    every training image [N, D], prepared as for scoring (binarized once for Bernoulli models),
    given its class for a conditional model."""
    device = next(model.parameters()).device
    gen = torch.Generator().manual_seed(1)  # the one binarization of prepare_eval_images(seed=1), chunk by chunk
    mus, logvars = [], []
    for rows in torch.arange(len(data.train)).split(batch_size):
        xb = model.likelihood.training_data(data.train.batch(rows), gen)
        y = data.train.labels[rows].to(device) if model.conditional else None
        mu, logvar = model.encode(xb.to(device), y)
        mus.append(mu)
        logvars.append(logvar)
    return torch.cat(mus), (None if logvars[0] is None else torch.cat(logvars))


def training_codes(model: Model, data: Dataset) -> torch.Tensor:
    """The latent (the posterior mean; an autoencoder's code) of every training image [N, D]."""
    return training_posteriors(model, data)[0]


def fit_top_prior(model: HVAE, data: Dataset) -> TopPrior:
    """A hierarchical model's top prior (`--top-prior`), fitted to the training images' top groups
    encoded under the learned priors (a refit starts from them, not from an earlier fit). It
    leaves the model on the learned priors: give it the result with `set_top_prior`."""
    model.set_top_prior(TopPrior.identity(model.top_dims))
    mu, logvar = training_posteriors(model, data)
    log.info("fitting the top %d groups' prior (%d dimensions) to %d training images", model.cfg.top_prior, model.top_dims, len(mu))
    return TopPrior.fit(mu[:, : model.top_dims].cpu(), logvar[:, : model.top_dims].cpu(), model.cfg.top_prior_scale)


def fitted_extras(model: Model, data: Dataset) -> dict[str, Any]:
    """What export reads from best.pt beside the weights, fitted to the training images' latents:
    an autoencoder's code Gaussian (its figures need it; its scores do not), fitted into the model,
    and for data with classes each class's mean latent for edits, with the class names."""
    if model.variational and not data.classes:
        return {}
    codes = training_codes(model, data)
    if not model.variational:
        model.fit_code_gaussian(codes)
    if not data.classes:
        return {}
    return {"classes": list(data.classes), "class_means": class_means(codes, data.train.labels, len(data.classes))}


def class_means(codes: torch.Tensor, labels: torch.Tensor, classes: int) -> torch.Tensor:
    """Each class's mean latent over its training images [C, D] (0 for a class with none): an edit
    moves an image's latent by the difference of two classes' means."""
    labels = labels.to(codes.device)
    sums = torch.zeros(classes, codes.shape[1], dtype=codes.dtype, device=codes.device).index_add_(0, labels, codes)
    counts = torch.bincount(labels, minlength=classes).clamp_min(1)
    return (sums / counts[:, None]).cpu()


def data_summary(data: Dataset) -> dict[str, Any]:
    """What metrics.json says of the data: the split sizes, the classes (and, for a folder, their
    counts, every skipped file with its reason, and the cache)."""
    return {
        "dataset": data.name, "image_shape": list(data.image_shape), "classes": data.classes,
        "splits": {"train": len(data.train), "val": len(data.val), "test": len(data.test)},
        "preprocessing": data.preprocessing.to_json(), **data.info,
    }  # fmt: skip


def group_warnings(test: dict[str, Any]) -> list[str]:
    """One message per collapsed latent group of a hierarchical model (a group whose posterior is
    its prior for every image: it carries nothing, and its compute is spent for nothing)."""
    groups = test.get("groups") or []
    if len(groups) < 2:
        return []
    return [
        f"collapsed: {g['group']}, KL {g['kl']:.3f} nats, 0 of {g['dims']} units active; fewer groups (--groups), "
        f"or --free-bits (now per dimension), keep it in use" for g in groups if g["collapsed"]
    ]  # fmt: skip


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


def run(cfg: TrainConfig, out: Path, resume: bool = False, data: Dataset | None = None) -> dict[str, Any] | None:
    """Train, then evaluate the best checkpoint on the test set, write metrics.json and the figures.

    The best checkpoint is saved again with what export reads from it: an autoencoder's fitted code
    Gaussian, and for data with classes each class's mean latent (`class_means`) and the names.
    Under torchrun every rank trains and evaluates its share; rank 0 returns the metrics, the others None."""
    started = time.perf_counter()
    trainer = Trainer(cfg, out, data)
    d = trainer.dist
    if resume and from_main(d, (out / "last.pt").exists):
        trainer.resume()
    history = trainer.fit()
    train_seconds = sum(h["seconds"] for h in history)

    best = from_main(d, lambda: checkpoint.load(out / "best.pt"))  # under torchrun rank 0 reads, all evaluate
    model, _ = checkpoint.model_from_state(best, trainer.device)
    data = trainer.data
    means = None
    if model.cfg.top_prior:  # rank 0 fits it, every rank evaluates with it
        model.set_top_prior(from_main(d, lambda: fit_top_prior(model, data)))
    if d.main and (data.classes or not model.variational or model.cfg.top_prior):
        extra = fitted_extras(model, data)
        means = extra.get("class_means")
        checkpoint.save(out / "best.pt", model, cfg, epoch=best["epoch"], **extra)
    rows = eval_rows(len(data.test), cfg.eval_images)
    test_x = prepare_eval_images(data.test.unit(), model.likelihood, cfg.eval_images).to(trainer.device)
    test_y = data.test.labels[rows].to(trainer.device) if data.classes else None
    if d.main:
        log.info("evaluating the best checkpoint (epoch %d) on %d test images, k=%d", best["epoch"], len(test_x), cfg.iwae_k)
    test = evaluate(model, test_x, cfg.iwae_k, dist=d, y=test_y, classes=data.classes)
    if not d.main:  # the other ranks' part ends here; rank 0 alone scores samples, draws and writes
        return None
    if cfg.dataset == "folder":  # 8-bit images: what lossless codecs need for the same test images
        test["codecs"] = codec_bits_per_dim(test_x)
        log.info(
            "the same %d test images need %.3f bits/dim as lossless PNG, %.3f as lossless WebP",
            test["codecs"]["images"], test["codecs"]["png_bits_per_dim"], test["codecs"]["webp_bits_per_dim"],
        )  # fmt: skip
    if cfg.classifier and trainer.data.classes:
        test["quality"] = evaluate_quality(model, trainer.data, cfg.classifier, cfg.quality_samples, class_means=means)
        for line in quality_lines(test["quality"]):
            log.info("%s", line)
    elif cfg.classifier:
        log.warning("--classifier ignored: sample quality (FD, class statistics) needs class folders; see bits/dim and PSNR")
    elif trainer.data.classes:
        log.info("no --classifier: no sample-quality figures (train one with python -m training.features)")
    else:
        log.info("no class folders: no FD or class statistics (they need a classifier of classes); see bits/dim and PSNR")
    test_labels = data.test.labels.to(trainer.device) if data.classes else None
    figures = write_figures(model, data.test.unit().to(trainer.device), history, out, cfg.seed, test_labels, means)
    metrics = {
        "config": to_dict(cfg),
        "data": data_summary(trainer.data),
        "best_epoch": best["epoch"],
        "world_size": d.world_size,
        "backend": d.backend,
        "train_seconds": round(train_seconds, 1),
        "total_seconds": round(time.perf_counter() - started, 1),
        "test": test,
        "history": history,
        "figures": [p.name for p in figures],
    }
    collapse = collapse_warning(test, cfg)
    warnings = [collapse] if collapse else group_warnings(test)
    if warnings:
        metrics["warnings"] = warnings
    (out / "metrics.json").write_text(json.dumps(metrics, indent=2) + "\n")
    if model.variational:
        log.info(
            "test: -elbo %.2f nats, nll (iwae k=%d) %.2f nats = %.3f bits/dim, kl %.2f, active units %d, psnr %.2f dB",
            -test["elbo"], cfg.iwae_k, test["nll"], test["nll_bits_per_dim"], test["kl"], test["active_units"],
            test["psnr_db"],
        )  # fmt: skip
        if "conditional" in test:
            log.info("%s", conditional_line(test))
        for warning in warnings:
            log.warning("%s", warning)
    else:
        log.info("test: reconstruction %.2f nats (an autoencoder: no NLL)", test["reconstruction"])
    return metrics
