"""Parity: ONNX Runtime must compute what PyTorch computes before a version is published."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnxruntime as ort
import torch

from training.model import VAE

BATCH_SIZES = (1, 7, 64)
TOLERANCE = 1e-4


class ParityError(RuntimeError):
    """The exported graphs disagree with the PyTorch model by more than the tolerance."""


def max_differences(model: VAE, folder: Path, batch_sizes: tuple[int, ...] = BATCH_SIZES, seed: int = 0) -> dict[str, float]:
    """Largest absolute difference per graph output over every batch size: {'encoder.mu': 3e-7, ...}."""
    cfg = model.cfg
    rng = np.random.default_rng(seed)
    options = ort.SessionOptions()
    options.log_severity_level = 3
    sessions = {
        role: ort.InferenceSession(str(folder / f"{role}.onnx"), options, providers=["CPUExecutionProvider"])
        for role in ("encoder", "decoder")
    }
    worst: dict[str, float] = {}
    model = model.eval().cpu()
    for n in batch_sizes:
        x = rng.random((n, *cfg.image_shape), dtype=np.float32)
        z = rng.standard_normal((n, cfg.latent_dim), dtype=np.float32)
        with torch.no_grad():
            expected = {
                "encoder": [t.numpy() for t in model.encode(torch.from_numpy(x))],
                "decoder": [model.decode(torch.from_numpy(z)).numpy()],
            }
        got = {"encoder": sessions["encoder"].run(None, {"x": x}), "decoder": sessions["decoder"].run(None, {"z": z})}
        for role, session in sessions.items():
            for meta, want, have in zip(session.get_outputs(), expected[role], got[role]):
                key = f"{role}.{meta.name}"
                diff = float(np.max(np.abs(want - have))) if want.shape == have.shape else float("inf")
                worst[key] = max(worst.get(key, 0.0), diff)
    return worst


def verify_parity(model: VAE, folder: Path, tolerance: float = TOLERANCE) -> dict[str, float]:
    """The differences, or ParityError naming every output over the tolerance."""
    worst = max_differences(model, folder)
    failed = {k: v for k, v in worst.items() if not v <= tolerance}
    if failed:
        figures = ", ".join(f"{k} {v:.3g}" for k, v in worst.items())
        raise ParityError(
            f"ONNX Runtime and PyTorch disagree by more than {tolerance:g} at batch sizes {BATCH_SIZES}: {figures}"
        )
    return worst
