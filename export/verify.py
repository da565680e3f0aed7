"""Parity: ONNX Runtime must compute what PyTorch computes before a version is published."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnxruntime as ort
import torch

from service.manifest import DECODER_PRECISIONS, with_classes
from training.families import Model
from export.hvae import posterior_reference

BATCH_SIZES = (1, 7, 64)
TOLERANCE = 1e-4
# Reduced-precision decoders are held to the float32 model's answers more loosely, by output:
# Bernoulli logits (tens) or Gaussian means (pixels in [0, 1]). Half precision keeps about 3
# significant digits (logits lose ~1e-2); int8 weights and activations move logits by tenths (MNIST
# recipe: 0.25 at most, 0.04 on average, its test NLL within 0.01 nats) and means by about 0.01.
# A logistic mixture's params (logits, means in [-1, 1], log-scales) are held as logits are.
REDUCED_TOLERANCE = {
    "decoder_fp16": {"logits": 3e-2, "mean": 3e-2, "params": 3e-2, "image": 3e-2},
    "decoder_int8": {"logits": 0.5, "mean": 0.05, "params": 0.5, "image": 0.05},
}


class ParityError(RuntimeError):
    """The exported graphs disagree with the PyTorch model by more than the tolerance."""


GRAPHS = ("encoder", "decoder", *DECODER_PRECISIONS.values(), "prior_sample", "prior_density", "posterior")  # checked when present
# Outputs that sum over every latent dimension (thousands in a hierarchical model) are held to a
# tolerance relative to their size: float32 sums of that many terms differ in their last digits.
RELATIVE = {"posterior.log_ratio"}
# A family's own graph and its PyTorch reference (images x, noise z -> the graph's feed, the outputs), by family.
FAMILY_REFERENCES = {"hvae": ("posterior", posterior_reference)}
Feeds = dict[str, np.ndarray]  # role -> the graph's one input


def max_differences(model: Model, folder: Path, batch_sizes: tuple[int, ...] = BATCH_SIZES, seed: int = 0) -> dict[str, float]:
    """Largest absolute difference per graph output over every batch size: {'encoder.mu': 3e-7, ...}.

    Every graph in the folder is checked: encoder, decoder, the reduced-precision decoders when they
    were written, and a flow prior's prior_sample and prior_density."""
    cfg = model.cfg
    rng = np.random.default_rng(seed)
    options = ort.SessionOptions()
    options.log_severity_level = 3
    roles = [r for r in GRAPHS if (folder / f"{r}.onnx").exists()]
    sessions = {r: ort.InferenceSession(str(folder / f"{r}.onnx"), options, providers=["CPUExecutionProvider"]) for r in roles}
    worst: dict[str, float] = {}
    model = model.eval().cpu()
    for n in batch_sizes:
        x = rng.random((n, *cfg.image_shape), dtype=np.float32)
        z = rng.standard_normal((n, model.noise_size), dtype=np.float32)
        feeds, expected = _references(model, x, z, class_weights(model, n, rng))
        for role, session in sessions.items():
            graph = "decoder" if role in DECODER_PRECISIONS.values() else role  # held to the decoder's answers
            have_all = session.run(None, {session.get_inputs()[0].name: feeds[graph]})
            for meta, want, have in zip(session.get_outputs(), expected[graph], have_all):
                key = f"{role}.{meta.name}"
                diff = float(np.max(np.abs(want - have))) if want.shape == have.shape else float("inf")
                if key in RELATIVE:
                    diff /= max(1.0, float(np.max(np.abs(want))))
                worst[key] = max(worst.get(key, 0.0), diff)
    return worst


def class_weights(model: Model, n: int, rng: np.random.Generator) -> np.ndarray | None:
    """A conditional model's class weights for n rows: one-hot, and every third row a mix of two
    classes (an edit part of the way); None for an unconditional model."""
    k = model.cfg.classes
    if not k:
        return None
    y = np.eye(k, dtype=np.float32)[rng.integers(0, k, n)]
    mix = np.arange(n) % 3 == 2
    y[mix] = 0.7 * y[mix] + 0.3 * np.eye(k, dtype=np.float32)[rng.integers(0, k, int(mix.sum()))]
    return y


@torch.no_grad()
def _references(
    model: Model, x: np.ndarray, z: np.ndarray, y: np.ndarray | None = None
) -> tuple[Feeds, dict[str, list[np.ndarray]]]:
    """Each graph's input rows and PyTorch's outputs for them, by role; a conditional model's rows
    end with the class weights y. The prior graphs get the same standard normal rows: as eps for
    prior_sample and as z for prior_density."""
    classes = None if y is None else torch.from_numpy(y)
    feeds = {"encoder": with_classes(x, y), "decoder": with_classes(z, y)}
    params = model.decode(torch.from_numpy(z), classes)
    expected = {
        "encoder": [t.numpy() for t in model.encode(torch.from_numpy(x), classes)],
        "decoder": [params.numpy(), model.mean_image(params).numpy()],
    }
    if model.family in FAMILY_REFERENCES:
        role, reference = FAMILY_REFERENCES[model.family]
        feeds[role], expected[role] = reference(model, x, z, y)  # type: ignore[arg-type]
    if model.cfg.prior == "flow":
        feeds |= {"prior_sample": z, "prior_density": z}
        expected["prior_sample"] = [model.flow(torch.from_numpy(z)).numpy()]
        expected["prior_density"] = [t.numpy() for t in model.flow.inverse(torch.from_numpy(z))]
    return feeds, expected


def tolerance(key: str) -> float:
    """The limit for one output, keyed as max_differences keys it: 'decoder_int8.logits'."""
    role, _, output = key.partition(".")
    return REDUCED_TOLERANCE.get(role, {}).get(output, TOLERANCE)


def verify_parity(model: Model, folder: Path) -> dict[str, float]:
    """The differences, or ParityError naming every output over its tolerance (looser for the
    reduced-precision decoders)."""
    worst = max_differences(model, folder)
    limit = {k: tolerance(k) for k in worst}
    if any(not v <= limit[k] for k, v in worst.items()):
        figures = ", ".join(f"{k} {v:.3g} (limit {limit[k]:g})" for k, v in worst.items())
        raise ParityError(f"ONNX Runtime and PyTorch disagree at batch sizes {BATCH_SIZES}: {figures}")
    return worst
