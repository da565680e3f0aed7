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
from training.hvae import HVAE


class PosteriorGraph(nn.Module):
    """A hierarchical model's draw from q(z|x) for given noise, its two inputs in one row (so one
    batcher feeds it): x_eps [N, C*H*W + D], the image flattened, then its noise."""

    def __init__(self, model: HVAE) -> None:
        super().__init__()
        self.model = model
        self.pixels = math.prod(model.cfg.image_shape)

    def forward(self, x_eps: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        x = x_eps[:, : self.pixels].reshape(-1, *self.model.cfg.image_shape)
        return self.model.posterior_draw(x, x_eps[:, self.pixels :])


def export_posterior_graph(model: HVAE, folder: Path, metadata: dict[str, str]) -> dict[str, dict[str, object]]:
    """posterior.onnx: x_eps [N, C*H*W + D] -> params, log_ratio = log p(z) - log q(z|x) [N], u [N, D]."""
    c, h, w = model.cfg.image_shape
    d, pixels = model.noise_size, c * h * w
    p, out_name = model.likelihood.spec.param_channels, model.likelihood.spec.output
    with torch.no_grad():
        example = torch.cat([torch.rand(2, pixels), torch.randn(2, d)], dim=1)
        write_graph(PosteriorGraph(model).eval(), example, folder / "posterior.onnx", ["x_eps"], [out_name, "log_ratio", "u"])
    groups = len(model.sizes)
    describe(
        folder / "posterior.onnx",
        "posterior",
        f"Hierarchical VAE, a draw from q(z|x): x_eps [N,{pixels + d}] float32 (x [N,{c},{h},{w}] in [0,1] "
        f"flattened, then its noise eps [N,{d}] ~ N(0, I) for {groups} groups) -> {out_name} [N,{p},{h},{w}], "
        f"log_ratio = log p(z) - log q(z|x) [N] nats, u [N,{d}] (the draw, standardized under the prior)",
        metadata,
    )
    return {"posterior": {"inputs": {"x_eps": [-1, pixels + d]},
                          "outputs": {out_name: [-1, p, h, w], "log_ratio": [-1], "u": [-1, d]}}}  # fmt: skip


def posterior_reference(model: HVAE, x: np.ndarray, eps: np.ndarray) -> tuple[dict[str, np.ndarray], list[np.ndarray]]:
    """The posterior graph's feed for images x and noise eps, and PyTorch's outputs for it (parity)."""
    feed = {"x_eps": np.concatenate([x.reshape(len(x), -1), eps], axis=1)}
    with torch.no_grad():
        return feed, [t.numpy() for t in model.posterior_draw(torch.from_numpy(x), torch.from_numpy(eps))]
