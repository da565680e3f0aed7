"""Checkpoints: plain tensors and containers, loaded with weights_only=True (nothing is unpickled).

A checkpoint carries the full config, so `load_model` can rebuild the network without any flags.
Checkpoints are always read onto the CPU: the random generators' saved states must be CPU
ByteTensors to be restored, whatever device trained the model. Weights move to the device after.
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
    """Write atomically and durably: a temp file, flushed to disk, renamed over `path`, and the
    rename itself flushed, so neither a crash nor a power cut leaves a torn or missing checkpoint."""
    state = {"format": FORMAT, "config": to_dict(cfg), "model": model.state_dict(), **extra}
    tmp = path.with_suffix(".tmp")
    with open(tmp, "wb") as f:
        torch.save(state, f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    _fsync_dir(path.parent)


def _fsync_dir(folder: Path) -> None:
    """Make a rename in `folder` durable; a no-op where directories cannot be opened (Windows)."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass  # some filesystems refuse fsync on a directory; the file itself is already on disk
    finally:
        os.close(fd)


def load(path: Path | str) -> dict[str, Any]:
    """The checkpoint dict, every tensor on the CPU."""
    state = torch.load(path, map_location="cpu", weights_only=True)
    if state.get("format") != FORMAT:
        raise ValueError(f"{path}: unsupported checkpoint format {state.get('format')!r}")
    return state


def load_model(path: Path | str, device: torch.device | str = "cpu") -> tuple[VAE, TrainConfig, dict[str, Any]]:
    """The VAE on `device` in eval mode, its training config, and the whole checkpoint dict (on the CPU)."""
    state = load(path)
    model, cfg = model_from_state(state, device)
    return model, cfg, state


def model_from_state(state: dict[str, Any], device: torch.device | str = "cpu") -> tuple[VAE, TrainConfig]:
    """The VAE a loaded checkpoint dict holds, on `device` in eval mode, and its training config."""
    cfg = from_dict(TrainConfig, state["config"])
    model = VAE(cfg.model)
    model.load_state_dict(state["model"])
    return model.to(device).eval(), cfg
