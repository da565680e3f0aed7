"""Parity: ONNX Runtime must compute what PyTorch computes before a version is published."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnxruntime as ort
import torch

from training.model import VAE

BATCH_SIZES = (1, 7, 64)
TOLERANCE = 1e-4
FP16_TOLERANCE = 3e-2  # half precision keeps about 3 significant digits; logits of tens lose ~1e-2


class ParityError(RuntimeError):
    """The exported graphs disagree with the PyTorch model by more than the tolerance."""


def max_differences(model: VAE, folder: Path, batch_sizes: tuple[int, ...] = BATCH_SIZES, seed: int = 0) -> dict[str, float]:
    """Largest absolute difference per graph output over every batch size: {'encoder.mu': 3e-7, ...}.

    Every graph in the folder is checked: encoder, decoder, and decoder_fp16 when it was written."""
    cfg = model.cfg
    rng = np.random.default_rng(seed)
    options = ort.SessionOptions()
    options.log_severity_level = 3
    roles = [r for r in ("encoder", "decoder", "decoder_fp16") if (folder / f"{r}.onnx").exists()]
    sessions = {r: ort.InferenceSession(str(folder / f"{r}.onnx"), options, providers=["CPUExecutionProvider"]) for r in roles}
    worst: dict[str, float] = {}
    model = model.eval().cpu()
    for n in batch_sizes:
        x = rng.random((n, *cfg.image_shape), dtype=np.float32)
        z = rng.standard_normal((n, cfg.latent_dim), dtype=np.float32)
        with torch.no_grad():
            decoded = [model.decode(torch.from_numpy(z)).numpy()]
            expected = {"encoder": [t.numpy() for t in model.encode(torch.from_numpy(x))], "decoder": decoded}
        for role, session in sessions.items():
            feed = {"x": x} if role == "encoder" else {"z": z}
            for meta, want, have in zip(session.get_outputs(), expected[role.removesuffix("_fp16")], session.run(None, feed)):
                key = f"{role}.{meta.name}"
                diff = float(np.max(np.abs(want - have))) if want.shape == have.shape else float("inf")
                worst[key] = max(worst.get(key, 0.0), diff)
    return worst


def verify_parity(model: VAE, folder: Path) -> dict[str, float]:
    """The differences, or ParityError naming every output over its tolerance (looser for FP16)."""
    worst = max_differences(model, folder)
    limit = {k: FP16_TOLERANCE if k.startswith("decoder_fp16.") else TOLERANCE for k in worst}
    if any(not v <= limit[k] for k, v in worst.items()):
        figures = ", ".join(f"{k} {v:.3g} (limit {limit[k]:g})" for k, v in worst.items())
        raise ParityError(f"ONNX Runtime and PyTorch disagree at batch sizes {BATCH_SIZES}: {figures}")
    return worst
