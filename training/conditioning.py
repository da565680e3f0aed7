"""What a conditional model adds to its family (`--conditional`, Sohn et al. 2015): a class
embedding that enters the prior, the decoder and the posterior, and log p(y), the training set's
class frequencies.

A class reaches a model as labels [N] (int64) or as class weights [N, C]: one-hot, or a mix of two
classes for an edit part of the way. The embedding is the weights times a table, so interpolating
two classes' weights interpolates their embeddings, which is what an edit's strength moves along.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

import torch
from torch import nn

if TYPE_CHECKING:
    from training.config import ModelConfig
    from training.families import Model

Classes = torch.Tensor | None  # labels [N] or class weights [N, C]; None for an unconditional model


class Conditioning(nn.Module):
    """The class embedding table and log p(y) (a buffer: it travels in the state dict to export)."""

    def __init__(self, classes: int, dim: int) -> None:
        super().__init__()
        self.classes = classes
        self.table = nn.Linear(classes, dim, bias=False)
        nn.init.normal_(self.table.weight)  # nn.Embedding's scale: one N(0, 1) vector per class
        self.register_buffer("log_prior", torch.full((classes,), -math.log(classes)))

    def forward(self, y: Classes) -> torch.Tensor:
        """The embedding [N, E] of labels or class weights."""
        if y is None:
            raise ValueError("a conditional model needs a class for each image")
        y = y.to(self.log_prior.device)
        if not y.is_floating_point():
            y = nn.functional.one_hot(y, self.classes).to(self.table.weight.dtype)
        return self.table(y)

    @torch.no_grad()
    def set_prior(self, counts: torch.Tensor) -> None:
        """log p(y) from the training images per class [C] (a class with none counts as one image)."""
        counts = counts.double().clamp_min(1)
        self.log_prior.copy_((counts / counts.sum()).log())

    def draw(self, n: int, generator: torch.Generator | None = None) -> torch.Tensor:
        """n labels from p(y), drawn on the CPU with `generator` (the same labels on any device)."""
        return torch.multinomial(self.log_prior.exp().cpu(), n, replacement=True, generator=generator)


class ClassInput:
    """What every family's model has of the class input (a mixin beside nn.Module): whether it takes
    one (`cfg.classes` > 0, with its `cond`), and the embedding of y."""

    cfg: ModelConfig
    cond: Conditioning

    @property
    def conditional(self) -> bool:
        return self.cfg.classes > 0

    def condition(self, y: Classes) -> torch.Tensor | None:
        """The class embedding of y [N, E]; None for an unconditional model, which ignores y."""
        return self.cond(y) if self.cfg.classes else None


@torch.no_grad()
def edit(
    model: Model, x: torch.Tensor, source: torch.Tensor, target: torch.Tensor, strength: float,
    class_means: torch.Tensor | None = None,
) -> torch.Tensor:  # fmt: skip
    """Images x moved from their classes `source` [N] towards `target` [N] by `strength` in [0, 1],
    as the server's Edit does: a conditional model keeps each image's posterior mean u (under its
    class) and mixes the class weights; an unconditional one moves its latent by strength x
    (target's mean latent - source's), from `class_means` [K, D]."""
    if model.conditional:
        k = model.cfg.classes
        y_source = nn.functional.one_hot(source, k).float()
        u, _ = model.encode(x, y_source)
        y = (1 - strength) * y_source + strength * nn.functional.one_hot(target, k).float()
        return model.mean_image(model.decode(u, y))
    if class_means is None:
        raise ValueError("an unconditional model's edit needs its class means")
    means = class_means.to(x.device)
    mu, _ = model.encode(x)
    return model.mean_image(model.decode(mu + strength * (means[target] - means[source])))
