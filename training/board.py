"""TensorBoard event files for a run (torch.utils.tensorboard), written into its --out folder, so
`tensorboard --logdir runs` shows every run under runs/ while it trains: each epoch's loss terms,
KL per latent group, bits/dim (or nats), learning rate, gradient norm, skipped steps and images/s,
and sample grids at fixed seeds and reconstructions of fixed validation images. Rank 0 alone writes.
A resumed run continues its curves: events of epochs after the checkpoint it resumes from are
dropped (`purge_step`).
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.tensorboard import SummaryWriter

from training.families import Model
from training.figures import image_grid

SAMPLE_SEED = 1234  # the samples drawn each epoch: the same noise every epoch, so the grids show the model change


class Board:
    def __init__(self, out: Path, first_epoch: int) -> None:
        """Events go to `out`; the run starts (or resumes) at `first_epoch` (0-based)."""
        self.writer = SummaryWriter(log_dir=str(out), purge_step=first_epoch + 1 if first_epoch else None)

    def epoch(
        self, record: dict[str, Any], model: Model, lr: float, grad_norm: float, shown: torch.Tensor,
        shown_classes: torch.Tensor | None = None,
    ) -> None:  # fmt: skip
        """One epoch's record (as metrics.json's history holds it) and pictures of `model` (the
        weights validated), at step = the epoch's number; `shown` are the validation images whose
        reconstructions are drawn (given their classes, for a conditional model)."""
        step, writer = record["epoch"], self.writer
        for split in ("train", "val"):
            for key, value in record[split].items():
                if isinstance(value, int | float) and math.isfinite(value):
                    writer.add_scalar(f"{split}/{key}", value, step)
        for i, kl in enumerate(record["val"].get("kl_groups", [])):
            writer.add_scalar(f"kl_per_group/{i}", kl, step)
        if "neg_elbo" in record["val"]:
            c, h, w = model.cfg.image_shape
            writer.add_scalar("val/elbo_bits_per_dim", float(model.likelihood.spec.bits_per_dim(record["val"]["neg_elbo"], c * h * w)), step)
        writer.add_scalar("optimisation/learning_rate", lr, step)
        writer.add_scalar("optimisation/gradient_norm", grad_norm, step)
        writer.add_scalar("optimisation/skipped_steps", record["skipped_steps"], step)
        writer.add_scalar("optimisation/images_per_second", record["images_per_second"], step)
        with torch.no_grad():
            samples = model.sample(36, generator=torch.Generator().manual_seed(SAMPLE_SEED))
            recon = model.mean_image(model.decode(model.encode(shown, shown_classes)[0], shown_classes))
        writer.add_image("samples", _pixels(samples, 6), step, dataformats="HWC")
        pairs = torch.stack([shown, recon], dim=1).reshape(-1, *shown.shape[1:])
        writer.add_image("reconstructions", _pixels(pairs, 8), step, dataformats="HWC")
        writer.flush()

    def close(self) -> None:
        self.writer.close()


def _pixels(images: torch.Tensor, cols: int) -> np.ndarray:
    """A grid of images in [0, 1] as HWC uint8 (RGB, grey drawn as RGB)."""
    return np.asarray(image_grid(images, cols).convert("RGB"))
