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

from training.config import ModelConfig
from training.flow import FlowPrior
from training.likelihoods import for_model
from training.losses import gaussian_log_prob, kl_per_dim, monte_carlo_kl, standard_normal_log_prob


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
        self.hidden = nn.Sequential(nn.Linear(in_ch * fh * fw, cfg.hidden), nn.SiLU())
        self.variational = cfg.kind == "vae"
        self.head = nn.Linear(cfg.hidden, (2 if self.variational else 1) * cfg.latent_dim)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        out = self.head(self.hidden(self.features(x)))
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
            nn.Linear(cfg.latent_dim, cfg.hidden),
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

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return self.body(self.project(z).view(-1, *self.start_shape))


class Pass(NamedTuple):
    """One pass of a model over a batch, per row."""

    params: torch.Tensor  # the likelihood's parameters [N, P, H, W]
    mu: torch.Tensor  # the posterior means (an autoencoder's code) [N, D]
    # KL(q(z|x) || p(z)) [N, U] in units that free bits floor one by one: per latent dimension under
    # N(0, I) (closed form), one unit under a flow (the one-sample log q - log p); None for an autoencoder
    kl: torch.Tensor | None


class VAE(nn.Module):
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

    @property
    def variational(self) -> bool:
        return self.cfg.kind == "vae"

    def encode(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """mu and logvar of q(z|x); an autoencoder's code and None."""
        return self.encoder(x)

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

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        return self.decoder(z)

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

    def log_weights(self, x: torch.Tensor) -> Callable[[torch.Tensor], torch.Tensor]:
        """For images x [n, ...]: the function from noise eps [n, m, D] to the importance log-weights
        log p(x|z) + log p(z) - log q(z|x) [n, m] at z = mu + eps * sigma (the IWAE bound's). The
        encoder runs once, here."""
        mu, logvar = self.encode(x)
        if logvar is None:
            raise ValueError("an autoencoder defines no density: no importance weights")
        sigma = torch.exp(0.5 * logvar).unsqueeze(1)

        def weights(eps: torch.Tensor) -> torch.Tensor:
            n, m, d = eps.shape
            z = mu.unsqueeze(1) + eps * sigma
            xs = x.unsqueeze(1).expand(n, m, *x.shape[1:]).reshape(n * m, *x.shape[1:])
            log_px = self.likelihood.log_prob(xs, self.decode(z.reshape(n * m, d))).view(n, m)
            return log_px + self.prior_log_prob(z) - gaussian_log_prob(z, mu.unsqueeze(1), logvar.unsqueeze(1))

        return weights

    def forward(self, x: torch.Tensor, eps: torch.Tensor | None = None) -> Pass:
        """One pass over x with z = mu + eps * sigma (eps drawn when None; z = mu for an
        autoencoder): the terms training's loss and evaluation's ELBO are made of, one module call
        so that DDP can wrap the model and sync its gradients."""
        mu, logvar = self.encode(x)
        if logvar is None:
            return Pass(self.decode(mu), mu, None)
        z = self.reparameterize(mu, logvar, eps)
        if self.cfg.prior == "flow":
            kl = monte_carlo_kl(z, mu, logvar, self.prior_log_prob(z)).unsqueeze(1)
        else:
            kl = kl_per_dim(mu, logvar)
        return Pass(self.decode(z), mu, kl)

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
        self, n: int, temperature: float = 1.0, generator: torch.Generator | None = None, source: str = "prior"
    ) -> torch.Tensor:
        """Images decoded from z = f(eps), eps ~ N(0, temperature^2 I) (f the identity under the standard
        prior): the encoder is not needed to generate. See `sample_z` for `source`."""
        return self.mean_image(self.decode(self.sample_z(n, temperature, generator, source)))
