"""The hierarchical VAE (`--model hvae`): a bottom-up residual encoder and a top-down decoder with
groups of latents from coarse to fine (LVAE, NVAE, VDVAE). Each group's prior p(z_l | z_<l) and
posterior q(z_l | x, z_<l) are diagonal Gaussians computed from the top-down state, the posterior
also from the encoder's activations at the group's resolution.

Its latent, for everything outside training, is the standardized noise u of all groups: under the
prior z_l = p_mu_l + p_sigma_l u_l, so u ~ N(0, I) and `decode(u)` runs the top-down path on the
prior's means and scales. `encode(x)` gives u at the posterior means (z_l = q_mu_l along the path,
u_l = (q_mu_l - p_mu_l) / p_sigma_l) and its log-variance 2 (log q_sigma_l - log p_sigma_l), so
decode(encode(x)[0]) reconstructs, and straight or spherical paths in u mean what they mean under
N(0, I). A draw from q is not mu + eps sigma after the fact (lower groups depend on upper ones):
`forward(x, eps)` and `log_weights` take the noise of every group and run the path.

With `top_prior` (`--top-prior L`), the top L groups' u has a full-covariance Gaussian prior
N(m, A A^T), fitted to the training images' encodings after training; the latent is then
v = A^-1 (u_top - m) for those groups (u for the others), N(0, I) again under the whole prior, so
every graph and the service still feed and interpolate N(0, I) noise. Its density enters the bound
by the change of variables (`TopPrior.log_ratio`).

Built for a CPU: bottleneck blocks (a quarter of the width inside), residual branches whose last
convolution starts at zero, so the untrained network is the identity on its state and the prior
starts as N(0, I).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from training.conditioning import ClassInput, Classes, Conditioning
from training.config import ModelConfig
from training.likelihoods import for_model
from training.model import Pass

LOG_2PI = math.log(2 * math.pi)


class Block(nn.Module):
    """A bottleneck branch: 1x1 in, two 3x3 at a quarter of the width (at least 8), 1x1 out; the
    last convolution starts at zero where `zero_last`."""

    def __init__(self, c_in: int, c_out: int, width: int, zero_last: bool = True) -> None:
        super().__init__()
        mid = max(8, width // 4)
        last = nn.Conv2d(mid, c_out, 1)
        if zero_last:
            nn.init.zeros_(last.weight)
            nn.init.zeros_(last.bias)
        self.net = nn.Sequential(
            nn.GELU(), nn.Conv2d(c_in, mid, 1), nn.GELU(), nn.Conv2d(mid, mid, 3, padding=1),
            nn.GELU(), nn.Conv2d(mid, mid, 3, padding=1), nn.GELU(), last,
        )  # fmt: skip

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


def group_sizes(cfg: ModelConfig) -> list[tuple[int, int]]:
    """The spatial size of each latent group, coarse to fine: the image's size over each factor of
    `cfg.groups`, once per group there."""
    _, h, w = cfg.image_shape
    return [(-(-h // f), -(-w // f)) for f, count in cfg.group_factors for _ in range(count)]


class Group(nn.Module):
    """One latent group of the top-down path."""

    def __init__(self, width: int, z_channels: int, groups: int) -> None:
        super().__init__()
        self.z_channels = z_channels
        self.prior = Block(width, 2 * z_channels + width, width)  # p_mu, log p_sigma, and a state update
        self.posterior = Block(2 * width, 2 * z_channels, width, zero_last=False)
        self.z_in = nn.Conv2d(z_channels, width, 1)
        self.z_in.weight.data *= math.sqrt(1 / groups)  # scaled, as VDVAE's: the sum over groups stays O(1)
        self.res = Block(width, width, width)

    def forward(self, h: torch.Tensor, act: torch.Tensor | None, noise: torch.Tensor, mode: str) -> tuple[torch.Tensor, Step]:
        """The state after this group, and what the group drew. `mode`: "posterior" draws
        z = q_mu + q_sigma noise; "mean" takes z = q_mu; "prior" z = p_mu + p_sigma noise."""
        zc = self.z_channels
        p_mu, p_log_sigma, update = self.prior(h).split([zc, zc, h.shape[1]], dim=1)
        if mode == "prior":
            q_mu = q_log_sigma = None
            z = p_mu + torch.exp(p_log_sigma) * noise
        else:
            q_mu, q_log_sigma = self.posterior(torch.cat([h, act], dim=1)).chunk(2, dim=1)
            z = q_mu if mode == "mean" else q_mu + torch.exp(q_log_sigma) * noise
        h = h + update + self.z_in(z)
        return h + self.res(h), Step(z, p_mu, p_log_sigma, q_mu, q_log_sigma)


class Step(NamedTuple):
    """One group's draw on the top-down path, [N, Z, h, w] each (the posterior's None under the prior)."""

    z: torch.Tensor
    p_mu: torch.Tensor
    p_log_sigma: torch.Tensor
    q_mu: torch.Tensor | None
    q_log_sigma: torch.Tensor | None

    def kl(self) -> torch.Tensor:
        """KL(q || p) of the group in closed form, summed over its dimensions: [N]."""
        ratio = torch.exp(2 * (self.q_log_sigma - self.p_log_sigma))
        diff = (self.q_mu - self.p_mu) * torch.exp(-self.p_log_sigma)
        return (0.5 * (ratio + diff.pow(2) - 1) - (self.q_log_sigma - self.p_log_sigma)).flatten(1).sum(dim=1)

    def u_mean(self) -> torch.Tensor:
        """The posterior mean in the prior's standardized coordinates, (q_mu - p_mu) / p_sigma: 0
        wherever q is p, so a collapsed group's is 0 for every image."""
        return (self.q_mu - self.p_mu) * torch.exp(-self.p_log_sigma)

    def log_ratio(self) -> torch.Tensor:
        """log p(z|z_above) - log q(z|x, z_above) at the drawn z, summed over its dimensions: [N]."""
        return (_log_normal(self.z, self.p_mu, self.p_log_sigma) - _log_normal(self.z, self.q_mu, self.q_log_sigma)).flatten(1).sum(1)


class TopPrior(NamedTuple):
    """N(mean, scale scale^T) over the top groups' u [D]: `inverse` = scale^-1 and `log_diag` =
    log diag(scale) are kept beside it so the graphs need only matrix products."""

    mean: torch.Tensor
    scale: torch.Tensor
    inverse: torch.Tensor
    log_diag: torch.Tensor

    @classmethod
    def identity(cls, d: int) -> TopPrior:
        """N(0, I): the learned priors themselves (a model before its fit)."""
        return cls(torch.zeros(d), torch.eye(d), torch.eye(d), torch.zeros(d))

    @classmethod
    @torch.no_grad()
    def fit(cls, mu: torch.Tensor, logvar: torch.Tensor, spread: float = 1.0) -> TopPrior:
        """The moment-matched Gaussian of the aggregate posterior, from the posterior means [N, D] and
        log-variances of the training images' top groups: the covariance of the means plus the mean
        posterior variance, positive definite however few the images; its standard deviations
        times `spread`."""
        mu, var = mu.double(), logvar.double().exp()
        cov = torch.cov(mu.T, correction=0).reshape(mu.shape[1], -1) + torch.diag(var.mean(0))
        scale = torch.linalg.cholesky(cov) * spread
        inverse = torch.linalg.solve_triangular(scale, torch.eye(len(cov), dtype=cov.dtype), upper=False)
        return cls(*(t.float() for t in (mu.mean(0), scale, inverse, scale.diagonal().log())))

    def log_ratio(self, u: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """log N(u; mean, scale scale^T) - log N(u; 0, I) per dimension [N, D], for v its
        standardization: the i-th term is u_i's given u_<i (scale is lower triangular), so a group's
        terms sum to its own part of the change."""
        return 0.5 * (u.pow(2) - v.pow(2)) - self.log_diag


def _log_normal(z: torch.Tensor, mu: torch.Tensor, log_sigma: torch.Tensor) -> torch.Tensor:
    return -0.5 * (LOG_2PI + ((z - mu) * torch.exp(-log_sigma)).pow(2)) - log_sigma


def _draw_u(steps: list[Step]) -> torch.Tensor:
    """Each group's draw in its prior's standardized coordinates, (z - p_mu) / p_sigma [N, noise_size]."""
    return torch.cat([((s.z - s.p_mu) * torch.exp(-s.p_log_sigma)).flatten(1) for s in steps], dim=1)


class HVAE(ClassInput, nn.Module):
    """The hierarchical VAE, with the flat VAE's interface (`training.model.VAE`): `forward` for the
    loss, `log_weights` for the IWAE bound, and encode, decode, sample on the standardized latent u
    (v for the top groups under a fitted top prior). `forward`'s posterior means, which training
    counts active units on, stay in u: v mixes the top groups."""

    family = "hvae"  # what model.json says: it decides the graphs and how the service runs them
    variational = True

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.likelihood = for_model(cfg)
        c, h, w = cfg.image_shape
        width, zc = cfg.width, cfg.z_channels
        self.sizes = group_sizes(cfg)
        self.resolutions = sorted(set(self.sizes), key=lambda s: -s[0] * s[1])  # fine to coarse
        self.stem = nn.Conv2d(c, width, 3, padding=1)
        self.up = nn.ModuleList(
            nn.ModuleList(Block(width, width, width) for _ in range(cfg.blocks + 1)) for _ in self.resolutions
        )  # fmt: skip
        self.start = nn.Parameter(torch.zeros(1, width, *self.sizes[0]))
        self.groups = nn.ModuleList(Group(width, zc, len(self.sizes)) for _ in self.sizes)
        self.head = nn.Sequential(nn.GELU(), nn.Conv2d(width, self.likelihood.spec.param_channels, 3, padding=1))
        self.group_dims = [zc * gh * gw for gh, gw in self.sizes]
        self.top_dims = sum(self.group_dims[: cfg.top_prior])
        if self.top_dims:  # N(0, I) until `set_top_prior`: the learned priors, so training is unchanged
            for name, value in TopPrior.identity(self.top_dims)._asdict().items():
                self.register_buffer(f"top_{name}", value)
        if cfg.classes:  # the class enters the top-down path at its start: every prior, posterior and the image see it
            self.cond = Conditioning(cfg.classes, cfg.class_dim)
            self.class_in = nn.Linear(cfg.class_dim, width)
            nn.init.zeros_(self.class_in.weight)  # untrained, every class's prior is N(0, I), as without classes
            nn.init.zeros_(self.class_in.bias)

    @property
    def latent_groups(self) -> list[list[int]]:
        """The latent's groups as [channels, H, W], coarse to fine (model.json's layout)."""
        return [[self.cfg.z_channels, h, w] for h, w in self.sizes]

    @property
    def noise_size(self) -> int:
        """Standard normal values per image: every group's, coarse to fine (also the size of u)."""
        return sum(self.group_dims)

    @property
    def kl_unit_dims(self) -> torch.Tensor:
        """Latent dimensions per group: free bits hold each group's KL at free_bits per dimension."""
        return torch.tensor(self.group_dims, dtype=torch.float32)

    @staticmethod
    def group_kl(kl: torch.Tensor) -> torch.Tensor:
        """`Pass.kl` per group [N, G]: its units are the groups."""
        return kl

    def group_names(self) -> list[str]:
        """Each group's place: its index, coarse to fine, and its size."""
        z = self.cfg.z_channels
        return [f"group {i} ({z}x{h}x{w})" for i, (h, w) in enumerate(self.sizes)]

    @property
    def top_gaussian(self) -> TopPrior:
        return TopPrior(self.top_mean, self.top_scale, self.top_inverse, self.top_log_diag)

    @torch.no_grad()
    def set_top_prior(self, prior: TopPrior) -> None:
        for name, value in prior._asdict().items():
            getattr(self, f"top_{name}").copy_(value)

    def _to_u(self, v: torch.Tensor) -> torch.Tensor:
        """The latent v [N, D] as the groups' standardized noise u."""
        if not self.top_dims:
            return v
        d, prior = self.top_dims, self.top_gaussian
        return torch.cat([prior.mean + v[:, :d] @ prior.scale.T, v[:, d:]], dim=1)

    def _to_v(self, u: torch.Tensor) -> torch.Tensor:
        if not self.top_dims:
            return u
        d, prior = self.top_dims, self.top_gaussian
        return torch.cat([(u[:, :d] - prior.mean) @ prior.inverse.T, u[:, d:]], dim=1)

    def _top_log_ratio(self, u: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """The top prior's change to log p(z) per group above its fit [N, top_prior] at the draw u
        (v: its latent): 0 before the fit."""
        d = self.top_dims
        terms = self.top_gaussian.log_ratio(u[:, :d], v[:, :d])
        return torch.stack([t.sum(1) for t in terms.split(self.group_dims[: self.cfg.top_prior], dim=1)], dim=1)

    def _bottom_up(self, x: torch.Tensor) -> dict[tuple[int, int], torch.Tensor]:
        h = self.stem(x * 2 - 1)
        acts = {}
        for size, blocks in zip(self.resolutions, self.up):
            h = F.adaptive_avg_pool2d(h, size)
            for block in blocks:
                h = h + block(h)
            acts[size] = h
        return acts

    def _top_down(
        self, n: int, acts: dict[tuple[int, int], torch.Tensor] | None, noise: torch.Tensor | None, mode: str,
        e: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, list[Step]]:  # fmt: skip
        """The likelihood's parameters and each group's step. `noise` [n, noise_size] is split over
        the groups coarse to fine (None in mode "mean"); `e` is a conditional model's class
        embedding. `n` is a shape's size, not len(): under torch.export len() is a constant and
        would fix the graphs' batch size."""
        h = self.start.expand(n, -1, -1, -1)
        if e is not None:
            h = h + self.class_in(e)[:, :, None, None]
        parts = noise.split(self.group_dims, dim=1) if noise is not None else [None] * len(self.groups)
        steps = []
        for group, size, part in zip(self.groups, self.sizes, parts):
            if h.shape[-2:] != size:
                h = F.interpolate(h, size=size, mode="nearest")
            eps = part.view(n, self.cfg.z_channels, *size) if part is not None else None
            h, step = group(h, acts[size] if acts is not None else None, eps, mode)
            steps.append(step)
        h = F.interpolate(h, size=self.cfg.image_shape[1:], mode="nearest")
        return self.head(h), steps

    def forward(self, x: torch.Tensor, eps: torch.Tensor | None = None, y: Classes = None) -> Pass:
        """One pass with z drawn from q for the noise eps [N, noise_size] (drawn when None), given
        the classes y for a conditional model."""
        if eps is None:
            eps = torch.randn(len(x), self.noise_size, device=x.device)
        params, steps = self._top_down(x.shape[0], self._bottom_up(x), eps, "posterior", self.condition(y))
        kl = torch.stack([s.kl() for s in steps], dim=1)
        if self.top_dims:  # the learned priors' closed form, less the fitted prior's change at the draw
            u = _draw_u(steps)
            top = kl[:, : self.cfg.top_prior] - self._top_log_ratio(u, self._to_v(u))
            kl = torch.cat([top, kl[:, self.cfg.top_prior :]], dim=1)
        return Pass(params, torch.cat([s.u_mean().flatten(1) for s in steps], dim=1), kl)

    def log_weights(self, x: torch.Tensor, y: Classes = None) -> Callable[[torch.Tensor], torch.Tensor]:
        """For images x [n, ...] (of classes y, for a conditional model): noise [n, m, noise_size]
        -> log p(x|z) + log p(z) - log q(z|x) [n, m], each of the m draws a full top-down pass.
        The encoder runs once, here."""
        acts, e = self._bottom_up(x), self.condition(y)

        def weights(eps: torch.Tensor) -> torch.Tensor:
            n, m, d = eps.shape
            rows = {size: a.repeat_interleave(m, dim=0) for size, a in acts.items()}
            es = None if e is None else e.repeat_interleave(m, dim=0)
            params, log_ratio, _ = self._posterior(rows, eps.reshape(n * m, d), es)
            return (self.likelihood.log_prob(x.repeat_interleave(m, dim=0), params) + log_ratio).view(n, m)

        return weights

    def posterior_draw(
        self, x: torch.Tensor, eps: torch.Tensor, y: Classes = None
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """One draw from q(z|x) for the noise eps [N, noise_size]: the likelihood's parameters,
        log p(z) - log q(z|x) [N] and the draw as the latent u [N, noise_size] (what Score and a
        drawn Encode need; the posterior graph)."""
        return self._posterior(self._bottom_up(x), eps, self.condition(y))

    def _posterior(
        self, acts: dict[tuple[int, int], torch.Tensor], eps: torch.Tensor, e: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        params, steps = self._top_down(eps.shape[0], acts, eps, "posterior", e)
        u, log_ratio = _draw_u(steps), sum(s.log_ratio() for s in steps)
        v = self._to_v(u)
        if self.top_dims:
            log_ratio = log_ratio + self._top_log_ratio(u, v).sum(1)
        return params, log_ratio, v

    def encode(self, x: torch.Tensor, y: Classes = None) -> tuple[torch.Tensor, torch.Tensor]:
        """The latent at the posterior means [N, noise_size] and its log-variance given the groups
        above (under a top prior, its top groups' as if their u were independent)."""
        _, steps = self._top_down(x.shape[0], self._bottom_up(x), None, "mean", self.condition(y))
        mu = torch.cat([s.u_mean().flatten(1) for s in steps], dim=1)
        logvar = torch.cat([(2 * (s.q_log_sigma - s.p_log_sigma)).flatten(1) for s in steps], dim=1)
        if not self.top_dims:
            return mu, logvar
        d = self.top_dims
        top_var = torch.exp(logvar[:, :d]) @ self.top_gaussian.inverse.pow(2).T
        return self._to_v(mu), torch.cat([torch.log(top_var), logvar[:, d:]], dim=1)

    def decode(self, u: torch.Tensor, y: Classes = None) -> torch.Tensor:
        """The likelihood's parameters for the latents u [N, noise_size] (of classes y: the same u
        decoded with another class is an edit)."""
        return self._top_down(u.shape[0], None, self._to_u(u), "prior", self.condition(y))[0]

    def mean_image(self, params: torch.Tensor) -> torch.Tensor:
        return self.likelihood.image(params)

    @torch.no_grad()
    def sample_z(
        self, n: int, temperature: float = 1.0, generator: torch.Generator | None = None, source: str = "prior"
    ) -> torch.Tensor:
        """The latent ~ N(0, temperature^2 I), drawn on the CPU (the same latent on any device)."""
        if source != "prior":
            raise ValueError(f"a hierarchical VAE samples from its prior alone, not {source!r}")
        u = torch.randn(n, self.noise_size, generator=generator) * temperature
        return u.to(self.start.device)

    @torch.no_grad()
    def sample(
        self, n: int, temperature: float = 1.0, generator: torch.Generator | None = None, source: str = "prior",
        y: Classes = None,
    ) -> torch.Tensor:  # fmt: skip
        """Images of classes y, or of classes drawn from p(y) (first, with `generator`), for a
        conditional model."""
        if self.conditional and y is None:
            y = self.cond.draw(n, generator)
        return self.mean_image(self.decode(self.sample_z(n, temperature, generator, source), y))
