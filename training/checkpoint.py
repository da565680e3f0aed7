"""Checkpoints: plain tensors and containers, loaded with weights_only=True (nothing is unpickled).

A checkpoint carries the full config, so `load_model` can rebuild the network without any flags.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch

from training.config import TrainConfig, from_dict, to_dict
from training.model import VAE

FORMAT = 1


def save(path: Path, model: VAE, cfg: TrainConfig, **extra: Any) -> None:
    """Write atomically (temp file then rename) so a crash never leaves a torn checkpoint."""
    state = {"format": FORMAT, "config": to_dict(cfg), "model": model.state_dict(), **extra}
    tmp = path.with_suffix(".tmp")
    torch.save(state, tmp)
    os.replace(tmp, path)


def load(path: Path | str, device: torch.device | str = "cpu") -> dict[str, Any]:
    state = torch.load(path, map_location=device, weights_only=True)
    if state.get("format") != FORMAT:
        raise ValueError(f"{path}: unsupported checkpoint format {state.get('format')!r}")
    return state


def load_model(path: Path | str, device: torch.device | str = "cpu") -> tuple[VAE, TrainConfig, dict[str, Any]]:
    """The VAE in eval mode, its training config, and the whole checkpoint dict."""
    state = load(path, device)
    cfg = from_dict(TrainConfig, state["config"])
    model = VAE(cfg.model).to(device)
    model.load_state_dict(state["model"])
    return model.eval(), cfg, state
