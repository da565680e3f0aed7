"""The model families training builds, by the config's `kind`: the flat VAE (`training.model`, also
the autoencoder baseline) and the hierarchical VAE (`training.hvae`). Each gives the same interface
to the loop, evaluation and figures: forward(x, eps, y) -> Pass, log_weights, noise_size,
kl_unit_dims, encode, decode, sample, mean_image, likelihood. A new family is one module here and
one line in FAMILIES.
"""

from __future__ import annotations

from training.config import ModelConfig
from training.hvae import HVAE
from training.model import VAE

FAMILIES: dict[str, type[VAE] | type[HVAE]] = {"vae": VAE, "ae": VAE, "hvae": HVAE}
Model = VAE | HVAE


def build(cfg: ModelConfig) -> Model:
    """The network a model config describes, untrained."""
    return FAMILIES[cfg.kind](cfg)
