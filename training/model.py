"""The VAE: a convolutional encoder q(z|x), the reparameterization trick, a convolutional decoder p(x|z).

Built from the image shape, so 8x8, 28x28 and 3-channel images all work: each encoder stage halves
the spatial size (rounding up) and the decoder's transposed convolutions undo exactly those sizes.

The same class holds the two variants the config names: a flow prior (`prior="flow"`, the
`training.flow.FlowPrior` as the submodule `flow`) in place of N(0, I), and the deterministic
autoencoder baseline (`kind="ae"`: the encoder gives only the code mu, `encode` returns logvar None,
and the buffers `code_mean`, `code_scale_tril` hold a Gaussian fitted to its training codes).
A standard-prior VAE has neither, so its state dict is what it always was.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

import torch
from torch import nn

from training.conditioning import ClassInput, Classes, Conditioning
from training.config import ModelConfig
from training.flow import FlowPrior
from training.likelihoods import for_model
from training.losses import gaussian_kl_per_dim, gaussian_log_prob, kl_per_dim, monte_carlo_kl, standard_normal_log_prob


class ResBlock(nn.Module):
    def __init__(self, channels: int) -> None:
        super().__init__()
        self.body = nn.Sequential(
            nn.SiLU(), nn.Conv2d(channels, channels, 3, padding=1), nn.SiLU(), nn.Conv2d(channels, channels, 3, padding=1)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.body(x)


def stage_sizes(height: int, width: int, stages: int) -> list[tuple[int, int]]:
    """Spatial size before each stride-2 stage and after the last: 28 -> 14 -> 7."""
    sizes = [(height, width)]
    for _ in range(stages):
        h, w = sizes[-1]
        sizes.append(((h - 1) // 2 + 1, (w - 1) // 2 + 1))
    return sizes


class Encoder(nn.Module):
    """x [N, C, H, W] in [0, 1] -> mu, logvar [N, D]; for an autoencoder mu alone (logvar None)."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        c, h, w = cfg.image_shape
        layers: list[nn.Module] = []
        in_ch = c
        for width in cfg.stage_widths:
            layers += [nn.Conv2d(in_ch, width, 3, stride=2, padding=1), nn.SiLU()]
            layers += [ResBlock(width) for _ in range(cfg.blocks)]
            in_ch = width
        fh, fw = stage_sizes(h, w, len(cfg.stage_widths))[-1]
        self.features = nn.Sequential(*layers, nn.Flatten())
        extra = cfg.class_dim if cfg.classes else 0  # q(z|x, y): the class embedding beside the features
        self.hidden = nn.Sequential(nn.Linear(in_ch * fh * fw + extra, cfg.hidden), nn.SiLU())
        self.variational = cfg.kind == "vae"
        self.head = nn.Linear(cfg.hidden, (2 if self.variational else 1) * cfg.latent_dim)

    def forward(self, x: torch.Tensor, e: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
        """`e`: a conditional model's class embedding [N, E]."""
        h = self.features(x)
        out = self.head(self.hidden(h if e is None else torch.cat([h, e], dim=1)))
        if not self.variational:
            return out, None
        mu, logvar = out.chunk(2, dim=-1)
        return mu, logvar


class Decoder(nn.Module):
    """z [N, D] -> the likelihood's parameters [N, P, H, W]: Bernoulli logits or Gaussian mean (P = C),
    or a logistic mixture's K logits, means and log-scales per pixel (P = K (1 + 2C))."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        c, h, w = cfg.image_shape
        widths = list(cfg.stage_widths)
        sizes = stage_sizes(h, w, len(widths))
        self.start_shape = (widths[-1], *sizes[-1])
        self.project = nn.Sequential(
            nn.Linear(cfg.latent_dim + (cfg.class_dim if cfg.classes else 0), cfg.hidden),  # p(x|z, y)
            nn.SiLU(),
            nn.Linear(cfg.hidden, widths[-1] * sizes[-1][0] * sizes[-1][1]),
            nn.SiLU(),
        )
        layers: list[nn.Module] = []
        outs = widths[-2::-1] + [widths[0]]
        for i, (in_ch, out_ch) in enumerate(zip(widths[::-1], outs)):
            (th, tw), (sh, sw) = sizes[-2 - i], sizes[-1 - i]
            layers += [ResBlock(in_ch) for _ in range(cfg.blocks)]
            # (s - 1) * 2 - 2 + 3 + output_padding == target: output_padding picks the exact size.
            pad = (th - (2 * sh - 1), tw - (2 * sw - 1))
            layers += [nn.ConvTranspose2d(in_ch, out_ch, 3, stride=2, padding=1, output_padding=pad), nn.SiLU()]
        layers.append(nn.Conv2d(widths[0], for_model(cfg).spec.param_channels, 3, padding=1))
        self.body = nn.Sequential(*layers)

    def forward(self, z: torch.Tensor, e: torch.Tensor | None = None) -> torch.Tensor:
        """`e`: a conditional model's class embedding [N, E]."""
        h = self.project(z if e is None else torch.cat([z, e], dim=1))
        return self.body(h.view(-1, *self.start_shape))


class Pass(NamedTuple):
    """One pass of a model over a batch, per row."""

    params: torch.Tensor  # the likelihood's parameters [N, P, H, W]
    mu: torch.Tensor  # the posterior means (an autoencoder's code) [N, D]
    # KL(q(z|x) || p(z)) [N, U] in units that free bits floor one by one: per latent dimension under
    # N(0, I) (closed form; a conditional model's to p(z|y)), one unit under a flow (the one-sample
    # log q - log p); None for an autoencoder
    kl: torch.Tensor | None


class VAE(ClassInput, nn.Module):
    family = "vae"  # what model.json says: it decides the graphs and how the service runs them

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.likelihood = for_model(cfg)
        self.encoder = Encoder(cfg)
        self.decoder = Decoder(cfg)
        if cfg.prior == "flow":
            self.flow = FlowPrior(cfg.latent_dim, cfg.flow_layers, cfg.flow_hidden)
        if cfg.kind == "ae":
            self.register_buffer("code_mean", torch.zeros(cfg.latent_dim))
            self.register_buffer("code_scale_tril", torch.eye(cfg.latent_dim))
        if cfg.classes:
            self.cond = Conditioning(cfg.classes, cfg.class_dim)
            self.class_prior = nn.Linear(cfg.class_dim, 2 * cfg.latent_dim)  # p(z|y): its mean and log-variance
            nn.init.zeros_(self.class_prior.weight)  # every class starts at N(0, I)
            nn.init.zeros_(self.class_prior.bias)

    @property
    def variational(self) -> bool:
        return self.cfg.kind == "vae"

    def class_prior_params(self, e: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The mean and log-variance of p(z|y) [N, D] for class embeddings e."""
        p_mu, p_logvar = self.class_prior(e).chunk(2, dim=1)
        return p_mu, p_logvar

    def encode(self, x: torch.Tensor, y: Classes = None) -> tuple[torch.Tensor, torch.Tensor | None]:
        """mu and logvar of q(z|x); an autoencoder's code and None. A conditional model's in the
        coordinates of its prior p(z|y), (mu - p_mu) / p_sigma and logvar - p_logvar: its latent u
        is N(0, I) under every class's prior, so the same u decoded with another class is the edit."""
        e = self.condition(y)
        mu, logvar = self.encoder(x, e)
        if e is None or logvar is None:
            return mu, logvar
        p_mu, p_logvar = self.class_prior_params(e)
        return (mu - p_mu) * torch.exp(-0.5 * p_logvar), logvar - p_logvar

    def prior_log_prob(self, z: torch.Tensor) -> torch.Tensor:
        """log p(z) summed over the last dimension: N(0, I), or the flow's change of variables."""
        if self.cfg.prior == "flow":
            return self.flow.log_prob(z)
        return standard_normal_log_prob(z)

    def prior_z(self, eps: torch.Tensor) -> torch.Tensor:
        """The latent for base noise eps: eps itself under N(0, I), f(eps) under the flow prior."""
        return self.flow(eps) if self.cfg.prior == "flow" else eps

    @torch.no_grad()
    def fit_code_gaussian(self, codes: torch.Tensor, jitter: float = 1e-4) -> None:
        """An autoencoder's ex-post density: the mean and full covariance of its codes [N, D]."""
        mean = codes.mean(dim=0)
        centred = codes - mean
        cov = centred.T @ centred / max(len(codes) - 1, 1)
        eye = torch.eye(len(mean), dtype=cov.dtype, device=cov.device)
        self.code_mean.copy_(mean)
        self.code_scale_tril.copy_(torch.linalg.cholesky(cov + jitter * cov.diagonal().mean().clamp_min(1e-8) * eye))

    @staticmethod
    def reparameterize(mu: torch.Tensor, logvar: torch.Tensor, eps: torch.Tensor | None = None) -> torch.Tensor:
        """z = mu + eps * sigma: the noise is an input, so gradients flow through mu and sigma."""
        if eps is None:
            eps = torch.randn_like(mu)
        return mu + eps * torch.exp(0.5 * logvar)

    def decode(self, z: torch.Tensor, y: Classes = None) -> torch.Tensor:
        """The likelihood's parameters for the latent z; a conditional model's latent is u (see
        `encode`), z = p_mu + p_sigma u under class y."""
        e = self.condition(y)
        if e is None:
            return self.decoder(z)
        p_mu, p_logvar = self.class_prior_params(e)
        return self.decoder(p_mu + torch.exp(0.5 * p_logvar) * z, e)

    def mean_image(self, params: torch.Tensor) -> torch.Tensor:
        """The decoder's output as an image in [0, 1], exactly as the service shows it: a fixed
        function of z, so seeded samples never depend on what else was batched with them."""
        return self.likelihood.image(params)

    @property
    def noise_size(self) -> int:
        """Standard normal values per image that draw its latents (`forward`'s eps)."""
        return self.cfg.latent_dim

    @property
    def kl_unit_dims(self) -> torch.Tensor:
        """Latent dimensions per column of `Pass.kl` [U]: what each free-bits floor covers."""
        if self.cfg.prior == "flow":
            return torch.tensor([float(self.cfg.latent_dim)])
        return torch.ones(self.cfg.latent_dim)

    @property
    def latent_groups(self) -> list[list[int]]:
        """The latent's groups (model.json's layout): one, the whole latent."""
        return [[self.cfg.latent_dim]]

    @property
    def group_dims(self) -> list[int]:
        """The latent's dimensions per group: one group, the whole latent."""
        return [self.cfg.latent_dim]

    @staticmethod
    def group_kl(kl: torch.Tensor) -> torch.Tensor:
        """`Pass.kl` per group [N, 1]."""
        return kl.sum(dim=1, keepdim=True)

    def group_names(self) -> list[str]:
        return [f"the latent ({self.cfg.latent_dim} dims)"]

    def log_weights(self, x: torch.Tensor, y: Classes = None) -> Callable[[torch.Tensor], torch.Tensor]:
        """For images x [n, ...] (of classes y, for a conditional model): the function from noise eps
        [n, m, D] to the importance log-weights log p(x|z) + log p(z) - log q(z|x) [n, m] at
        z = mu + eps * sigma (the IWAE bound's; given y, each term is conditioned on it). The
        encoder runs once, here."""
        e = self.condition(y)
        mu, logvar = self.encoder(x, e)
        if logvar is None:
            raise ValueError("an autoencoder defines no density: no importance weights")
        sigma = torch.exp(0.5 * logvar).unsqueeze(1)
        prior = None if e is None else [p.unsqueeze(1) for p in self.class_prior_params(e)]

        def weights(eps: torch.Tensor) -> torch.Tensor:
            n, m, d = eps.shape
            z = mu.unsqueeze(1) + eps * sigma
            xs = x.unsqueeze(1).expand(n, m, *x.shape[1:]).reshape(n * m, *x.shape[1:])
            es = None if e is None else e.unsqueeze(1).expand(n, m, e.shape[1]).reshape(n * m, e.shape[1])
            log_px = self.likelihood.log_prob(xs, self.decoder(z.reshape(n * m, d), es)).view(n, m)
            log_pz = self.prior_log_prob(z) if prior is None else gaussian_log_prob(z, *prior)
            return log_px + log_pz - gaussian_log_prob(z, mu.unsqueeze(1), logvar.unsqueeze(1))

        return weights

    def forward(self, x: torch.Tensor, eps: torch.Tensor | None = None, y: Classes = None) -> Pass:
        """One pass over x (of classes y, for a conditional model) with z = mu + eps * sigma (eps
        drawn when None; z = mu for an autoencoder): the terms training's loss and evaluation's
        ELBO are made of, one module call so that DDP can wrap the model and sync its gradients.
        A conditional model's KL is to its prior p(z|y), and its `Pass.mu` is in that prior's
        coordinates (see `encode`)."""
        e = self.condition(y)
        mu, logvar = self.encoder(x, e)
        if logvar is None:
            return Pass(self.decoder(mu), mu, None)
        z = self.reparameterize(mu, logvar, eps)
        if e is not None:
            p_mu, p_logvar = self.class_prior_params(e)
            kl = gaussian_kl_per_dim(mu, logvar, p_mu, p_logvar)
            return Pass(self.decoder(z, e), (mu - p_mu) * torch.exp(-0.5 * p_logvar), kl)
        if self.cfg.prior == "flow":
            kl = monte_carlo_kl(z, mu, logvar, self.prior_log_prob(z)).unsqueeze(1)
        else:
            kl = kl_per_dim(mu, logvar)
        return Pass(self.decoder(z), mu, kl)

    @torch.no_grad()
    def sample_z(
        self, n: int, temperature: float = 1.0, generator: torch.Generator | None = None, source: str = "prior"
    ) -> torch.Tensor:
        """Latents to decode: eps ~ N(0, temperature^2 I) mapped through the prior (N(0, I) or the flow);
        `source="fitted"` (autoencoders) maps eps through the Gaussian fitted to the training codes."""
        device = next(self.parameters()).device
        eps = torch.randn(n, self.cfg.latent_dim, generator=generator) * temperature  # CPU draw: same z on any device
        eps = eps.to(device)
        if source == "fitted":
            if self.cfg.kind != "ae":
                raise ValueError("only an autoencoder has a fitted code Gaussian")
            return self.code_mean + eps @ self.code_scale_tril.T
        if source != "prior":
            raise ValueError(f"source must be prior or fitted, got {source!r}")
        return self.prior_z(eps)

    @torch.no_grad()
    def sample(
        self, n: int, temperature: float = 1.0, generator: torch.Generator | None = None, source: str = "prior",
        y: Classes = None,
    ) -> torch.Tensor:  # fmt: skip
        """Images decoded from z = f(eps), eps ~ N(0, temperature^2 I) (f the identity under the standard
        prior): the encoder is not needed to generate. See `sample_z` for `source`. A conditional
        model draws them of classes y, or of classes drawn from p(y) (first, with `generator`)."""
        if self.conditional and y is None:
            y = self.cond.draw(n, generator)
        return self.mean_image(self.decode(self.sample_z(n, temperature, generator, source), y))
