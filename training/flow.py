"""A learned prior: p(z) is an invertible map f of N(0, I), built from RealNVP affine couplings.

Each coupling keeps half of the dimensions (a fixed 0/1 mask, alternating even and odd dimensions
from one layer to the next) and moves the other half by a scale and shift computed from the kept
half:  y = m * x + (1 - m) * (x * exp(s(m * x)) + t(m * x)).  Its inverse needs no solve, and its
log-Jacobian is the sum of s over the moved dimensions. The log-scales are bounded,
s = bound * tanh(raw / bound), so no layer can blow up or shrink a dimension without limit; the
last linear layer of every coupling network starts at zero, so an untrained flow is the identity
and an untrained flow-prior VAE starts exactly where a standard-prior VAE does.

Only plain tensor ops, fixed shapes and no data-dependent control flow, so `forward` and `inverse`
export to ONNX as they are.

- `forward(eps) -> z`: sampling, z = f(eps), eps ~ N(0, T^2 I).
- `inverse(z) -> (eps, log_prob)`: eps = f^-1(z) and log p(z) = log N(eps; 0, I) + log|det J_{f^-1}(z)|.
"""

from __future__ import annotations

import math

import torch
from torch import nn

LOG_2PI = math.log(2 * math.pi)


class AffineCoupling(nn.Module):
    def __init__(self, dim: int, hidden: int, mask: torch.Tensor, scale_bound: float = 2.0) -> None:
        super().__init__()
        self.register_buffer("mask", mask.float())
        self.scale_bound = float(scale_bound)
        self.net = nn.Sequential(
            nn.Linear(dim, hidden), nn.SiLU(), nn.Linear(hidden, hidden), nn.SiLU(), nn.Linear(hidden, 2 * dim)
        )
        nn.init.zeros_(self.net[-1].weight)  # starts as the identity map
        nn.init.zeros_(self.net[-1].bias)

    def scale_shift(self, kept: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Log-scale s (bounded by tanh) and shift t, both zero on the kept dimensions."""
        raw_s, t = self.net(kept).chunk(2, dim=-1)
        moved = 1.0 - self.mask
        s = self.scale_bound * torch.tanh(raw_s / self.scale_bound)
        return s * moved, t * moved

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """y = f(x) and log|det J_f(x)| per row."""
        s, t = self.scale_shift(x * self.mask)
        return x * torch.exp(s) + t, s.sum(dim=-1)

    def inverse(self, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """x = f^-1(y) and log|det J_{f^-1}(y)| per row."""
        s, t = self.scale_shift(y * self.mask)  # the kept half is the same in x and y
        return (y - t) * torch.exp(-s), -s.sum(dim=-1)


def alternating_mask(dim: int, parity: int) -> torch.Tensor:
    return (torch.arange(dim) % 2 == parity).float()


class FlowPrior(nn.Module):
    """p(z) = f_# N(0, I) with f a stack of `layers` affine couplings, `hidden` units per network."""

    def __init__(self, dim: int, layers: int = 4, hidden: int = 64) -> None:
        super().__init__()
        if dim < 2:
            raise ValueError("a coupling flow needs latent_dim >= 2")
        if layers < 1:
            raise ValueError("a flow needs at least one coupling layer")
        self.dim = dim
        self.layers = nn.ModuleList(AffineCoupling(dim, hidden, alternating_mask(dim, i % 2)) for i in range(layers))

    def forward(self, eps: torch.Tensor) -> torch.Tensor:
        """z = f(eps): [N, D] -> [N, D]."""
        z = eps
        for layer in self.layers:
            z, _ = layer(z)
        return z

    def inverse(self, z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """eps = f^-1(z) [N, D] and log p(z) [N] by the change of variables."""
        eps = z
        log_det = torch.zeros(z.shape[:-1], dtype=z.dtype, device=z.device)
        for layer in reversed(self.layers):
            eps, ld = layer.inverse(eps)
            log_det = log_det + ld
        log_base = -0.5 * (LOG_2PI + eps.pow(2)).sum(dim=-1)
        return eps, log_base + log_det

    def log_prob(self, z: torch.Tensor) -> torch.Tensor:
        """log p(z) for z [..., D]: [...]."""
        flat = z.reshape(-1, self.dim)
        return self.inverse(flat)[1].reshape(z.shape[:-1])
