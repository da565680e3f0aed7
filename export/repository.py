"""Writing the model repository: MODELS/NAME/<version>/{encoder.onnx, decoder.onnx, model.json},
plus prior_sample.onnx and prior_density.onnx for a flow prior.

A version is built in a hidden temporary folder beside its final place, verified there, and only
then renamed into place: a reader never sees half a version, and a failed export leaves nothing.
"""

from __future__ import annotations

import shutil
import tempfile
from datetime import datetime, timezone
from importlib.metadata import version as package_version
from pathlib import Path
from typing import Any

import numpy as np
import torch

from export.graphs import export_fp16_decoder, export_graphs, export_int8_decoder
from export.onnx_files import OPSET
from export.triton import triton_config
from export.verify import verify_parity
# The reader's own roles and writer: export and service cannot disagree on model.json.
from service.manifest import (
    CLASS_MEANS, DECODER_PRECISIONS, FAMILY_ROLES, IMAGE, PRIOR_ROLES, ROLES, sha256, version_numbers, write_manifest,
)
from training.config import TrainConfig
from training.data import preprocessing
from training.model import VAE


# How each reduced-precision decoder of DECODER_PRECISIONS is made from decoder.onnx.
REDUCED_EXPORTERS = {"fp16": export_fp16_decoder, "int8": export_int8_decoder}


def reduced(signature: dict[str, Any]) -> dict[str, Any]:
    """A reduced-precision decoder's signature: the decoder's, its parameters alone."""
    return {**signature, "outputs": {k: v for k, v in signature["outputs"].items() if k != IMAGE}}


def class_files(model: VAE, folder: Path, class_means: torch.Tensor | None) -> dict[str, Any]:
    """What model.json says of the classes beyond their names: a conditional model's log p(y), and
    class_means.npy [K, D] float32 (written into `folder`) with its sha256."""
    out: dict[str, Any] = {}
    if model.conditional:
        out |= {"conditional": True, "class_log_prior": [float(v) for v in model.cond.log_prior]}
    if class_means is not None:
        means = class_means.detach().cpu().numpy().astype(np.float32)
        if means.shape[1] != model.noise_size:
            raise ValueError(f"the checkpoint's class means are {means.shape[1]} wide; the latent is {model.noise_size}")
        np.save(folder / CLASS_MEANS, means)
        out["class_means"] = {"file": CLASS_MEANS, "sha256": sha256(folder / CLASS_MEANS), "shape": list(means.shape)}
    return out


def next_version(model_dir: Path) -> int:
    return max(version_numbers(model_dir), default=0) + 1


def publish(
    model: VAE, cfg: TrainConfig, models: Path, name: str, metrics: dict[str, Any] | None = None,
    max_batch_size: int = 256, precisions: tuple[str, ...] = (), classes: list[str] | None = None,
    class_means: torch.Tensor | None = None,
) -> Path:  # fmt: skip
    """Export, verify and atomically publish the next version; return its folder. `precisions`
    adds reduced-precision decoders beside decoder.onnx: "fp16" (GPUs), "int8" (CPUs); `classes`
    names the training data's classes, for clients to show, and `class_means` [K, D] (from the
    checkpoint) each class's mean latent, for edits (class_means.npy). A conditional model's
    model.json also gives log p(y) (`class_log_prior`)."""
    if cfg.model.kind == "ae":
        raise ValueError("an autoencoder is not exported: it is no generative model (docs/training.md)")
    if model.conditional and len(classes or []) != cfg.model.classes:
        raise ValueError(f"a conditional model of {cfg.model.classes} classes needs their names; the checkpoint gives {len(classes or [])}")
    unknown = sorted(set(precisions) - set(DECODER_PRECISIONS))
    if unknown:
        raise ValueError(f"no decoder precision {', '.join(unknown)}; there are {', '.join(DECODER_PRECISIONS)}")
    model_dir = models / name
    model_dir.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=".staging-", dir=model_dir))
    staging.chmod(0o755)  # mkdtemp makes it owner-only; a server running as another user must read it
    try:
        signatures = export_graphs(model, staging)
        for precision in precisions:
            REDUCED_EXPORTERS[precision](staging)
        parity = verify_parity(model, staging)
        conditioning = class_files(model, staging, class_means)
        m = cfg.model
        served = (*ROLES, *PRIOR_ROLES[m.prior], *FAMILY_ROLES[model.family])  # what the service runs, each with a Triton config
        reduced_roles = DECODER_PRECISIONS.values()  # the decoder's signature, other arithmetic
        roles = [role for role in (*served, *reduced_roles) if (staging / f"{role}.onnx").exists()]
        while True:
            version = next_version(model_dir)
            write_manifest(
                staging, name=name, version=version, latent_dim=model.noise_size, image_shape=m.image_shape,
                likelihood=m.likelihood, gaussian_std=m.gaussian_std, dataset=cfg.dataset, prior=m.prior, family=model.family,
                latent_groups=model.latent_groups,
                mixtures=model.likelihood.spec.mixtures,
                preprocessing=preprocessing(cfg).to_json(), classes=classes or [],
                graphs={role: reduced(signatures["decoder"]) if role in reduced_roles else signatures[role] for role in roles},
                max_batch_size=max_batch_size, metrics=metrics or {}, opset=OPSET,
                exporters={pkg: package_version(pkg) for pkg in ("torch", "onnx", "onnxruntime")},
                parity_max_abs_diff=parity, created=datetime.now(timezone.utc).isoformat(timespec="seconds"), **conditioning,
            )  # fmt: skip
            for role in served:
                text = triton_config(name, role, signatures[role], max_batch_size)
                (staging / f"{role}.config.pbtxt").write_text(text)
            try:
                staging.rename(model_dir / str(version))  # atomic; fails if another export took it
                return model_dir / str(version)
            except OSError:
                if not (model_dir / str(version)).exists():
                    raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)
