"""A hierarchical VAE's own graph (`training.hvae`): posterior, a draw from q(z|x) for given noise,
x_eps (an image and its noise in one row, so one batcher feeds it) -> the likelihood's parameters,
log p(z) - log q(z|x) and the draw as the latent u. Its encoder and decoder are exported as a flat
VAE's (`export.graphs`): its latent is u.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import torch
from torch import nn

from export.onnx_files import describe, write_graph
from service.manifest import with_classes
from training.hvae import HVAE


class PosteriorGraph(nn.Module):
    """A hierarchical model's draw from q(z|x) for given noise, its inputs in one row (so one
    batcher feeds it): x_eps [N, C*H*W + D], the image flattened, then its noise; a conditional
    model's x_eps_y [N, C*H*W + D + K], then its class weights."""

    def __init__(self, model: HVAE) -> None:
        super().__init__()
        self.model = model
        self.pixels = math.prod(model.cfg.image_shape)

    def forward(self, x_eps: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        x = x_eps[:, : self.pixels].reshape(-1, *self.model.cfg.image_shape)
        end = self.pixels + self.model.noise_size
        y = x_eps[:, end:] if self.model.cfg.classes else None
        return self.model.posterior_draw(x, x_eps[:, self.pixels : end], y)


def posterior_input(model: HVAE) -> tuple[str, int]:
    """The posterior graph's input: its name and its row's width."""
    width = math.prod(model.cfg.image_shape) + model.noise_size + model.cfg.classes
    return ("x_eps_y" if model.cfg.classes else "x_eps"), width


def export_posterior_graph(model: HVAE, folder: Path, metadata: dict[str, str]) -> dict[str, dict[str, object]]:
    """posterior.onnx: x_eps [N, C*H*W + D] (x_eps_y: then class weights [N, K]) -> params,
    log_ratio = log p(z) - log q(z|x) [N], u [N, D]."""
    c, h, w = model.cfg.image_shape
    d, pixels, k = model.noise_size, c * h * w, model.cfg.classes
    p, out_name = model.likelihood.spec.param_channels, model.likelihood.spec.output
    name, width = posterior_input(model)
    with torch.no_grad():
        example = torch.cat([torch.rand(2, pixels), torch.randn(2, d), *([torch.eye(k)[[0, k - 1]]] if k else [])], dim=1)
        write_graph(PosteriorGraph(model).eval(), example, folder / "posterior.onnx", [name], [out_name, "log_ratio", "u"])
    groups = len(model.sizes)
    describe(
        folder / "posterior.onnx",
        "posterior",
        f"Hierarchical VAE, a draw from q(z|x): {name} [N,{width}] float32 (x [N,{c},{h},{w}] in [0,1] "
        f"flattened, then its noise eps [N,{d}] ~ N(0, I) for {groups} groups"
        f"{f', then class weights [N,{k}]' if k else ''}) -> {out_name} [N,{p},{h},{w}], "
        f"log_ratio = log p(z) - log q(z|x) [N] nats, u [N,{d}] (the draw, standardized under the prior)",
        metadata,
    )
    return {"posterior": {"inputs": {name: [-1, width]},
                          "outputs": {out_name: [-1, p, h, w], "log_ratio": [-1], "u": [-1, d]}}}  # fmt: skip


def posterior_reference(
    model: HVAE, x: np.ndarray, eps: np.ndarray, y: np.ndarray | None = None
) -> tuple[np.ndarray, list[np.ndarray]]:
    """The posterior graph's input rows for images x, noise eps (and a conditional model's class
    weights y), and PyTorch's outputs for them (parity)."""
    feed = with_classes(np.concatenate([x.reshape(len(x), -1), eps], axis=1), y)
    classes = None if y is None else torch.from_numpy(y)
    with torch.no_grad():
        return feed, [t.numpy() for t in model.posterior_draw(torch.from_numpy(x), torch.from_numpy(eps), classes)]
