"""The ONNX graphs: encoder x -> (mu, logvar) and decoder z -> the likelihood's parameters, and
for a flow prior its two directions: prior_sample eps -> z = f(eps) and prior_density
z -> (eps = f^-1(z), log p(z)).

Each graph is exported with a dynamic batch axis N and carries a description of itself in its
ONNX metadata, so a graph file found alone still says what it is.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import onnx
import torch
from torch import nn

from training.likelihoods import for_model
from training.model import VAE

OPSET = 18
logging.getLogger("torch.onnx").setLevel(logging.ERROR)  # the exporter warns about every absent torchvision op


class EncoderGraph(nn.Module):
    def __init__(self, model: VAE) -> None:
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.model.encode(x)


class DecoderGraph(nn.Module):
    def __init__(self, model: VAE) -> None:
        super().__init__()
        self.model = model

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return self.model.decode(z)


class PriorSampleGraph(nn.Module):
    """z = f(eps): what Sample (and a spherical Interpolate's path) maps the Gaussian noise through."""

    def __init__(self, model: VAE) -> None:
        super().__init__()
        self.flow = model.flow

    def forward(self, eps: torch.Tensor) -> torch.Tensor:
        return self.flow(eps)


class PriorDensityGraph(nn.Module):
    """eps = f^-1(z) and log p(z): Score's log p(z), and the base point a spherical path starts from."""

    def __init__(self, model: VAE) -> None:
        super().__init__()
        self.flow = model.flow

    def forward(self, z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.flow.inverse(z)


def _export(module: nn.Module, example: torch.Tensor, path: Path, inputs: list[str], outputs: list[str]) -> None:
    batch = torch.export.Dim("N", min=1, max=65536)
    torch.onnx.export(
        module,
        (example,),
        str(path),
        input_names=inputs,
        output_names=outputs,
        dynamic_shapes=({0: batch},),
        opset_version=OPSET,
        dynamo=True,
        verbose=False,
    )


def _describe(path: Path, role: str, description: str, metadata: dict[str, str]) -> None:
    """Write the graph again with a doc string and metadata (and all weights inside the one file)."""
    graph = onnx.load(str(path))
    graph.doc_string = description
    graph.producer_name = "vae-serve export"
    del graph.metadata_props[:]
    for key, value in {"role": role, **metadata}.items():
        graph.metadata_props.add(key=key, value=value)
    onnx.save_model(graph, str(path), save_as_external_data=False)
    for extra in path.parent.glob(f"{path.name}.data"):
        extra.unlink()
    onnx.checker.check_model(str(path), full_check=True)  # full_check runs shape inference too


def export_graphs(model: VAE, folder: Path) -> dict[str, dict[str, object]]:
    """Write encoder.onnx and decoder.onnx into `folder`, and for a flow prior prior_sample.onnx and
    prior_density.onnx too; return every graph's input/output signature by role."""
    cfg = model.cfg
    model = model.eval().cpu()
    c, h, w = cfg.image_shape
    d = cfg.latent_dim
    spec = for_model(cfg).spec
    p, out_name = spec.param_channels, spec.output  # C, or a mixture's K (1 + 2C)
    metadata = {
        "latent_dim": str(d),
        "image_shape": json.dumps(list(cfg.image_shape)),
        "likelihood": cfg.likelihood,
        **({"mixtures": str(spec.mixtures)} if spec.components else {}),
    }
    with torch.no_grad():
        _export(EncoderGraph(model).eval(), torch.rand(2, c, h, w), folder / "encoder.onnx", ["x"], ["mu", "logvar"])
        _export(DecoderGraph(model).eval(), torch.randn(2, d), folder / "decoder.onnx", ["z"], [out_name])
    _describe(
        folder / "encoder.onnx",
        "encoder",
        f"VAE encoder q(z|x): x [N,{c},{h},{w}] float32 in [0,1] -> mu, logvar [N,{d}]",
        metadata,
    )
    _describe(
        folder / "decoder.onnx",
        "decoder",
        f"VAE decoder p(x|z): z [N,{d}] float32 -> {out_name} [N,{p},{h},{w}] ({cfg.likelihood})",
        metadata,
    )
    signatures: dict[str, dict[str, object]] = {
        "encoder": {"inputs": {"x": [-1, c, h, w]}, "outputs": {"mu": [-1, d], "logvar": [-1, d]}},
        "decoder": {"inputs": {"z": [-1, d]}, "outputs": {out_name: [-1, p, h, w]}},
    }
    if cfg.prior == "flow":
        signatures |= export_prior_graphs(model, folder, metadata)
    return signatures


def export_prior_graphs(model: VAE, folder: Path, metadata: dict[str, str]) -> dict[str, dict[str, object]]:
    """prior_sample.onnx (eps [N, D] -> z [N, D]) and prior_density.onnx (z [N, D] -> eps [N, D],
    log_prob [N]): the flow's two directions as separate graphs, so the service batches each on its
    own and never needs torch. Their signatures by role."""
    d = model.cfg.latent_dim
    layers = f"{len(model.flow.layers)} affine couplings"
    with torch.no_grad():
        example = torch.randn(2, d)
        _export(PriorSampleGraph(model).eval(), example, folder / "prior_sample.onnx", ["eps"], ["z"])
        _export(PriorDensityGraph(model).eval(), example, folder / "prior_density.onnx", ["z"], ["eps", "log_prob"])
    prior = {**metadata, "prior": "flow"}
    _describe(
        folder / "prior_sample.onnx",
        "prior_sample",
        f"VAE flow prior, sampling: eps [N,{d}] float32 ~ N(0, T^2 I) -> z = f(eps) [N,{d}] ({layers})",
        prior,
    )
    _describe(
        folder / "prior_density.onnx",
        "prior_density",
        f"VAE flow prior, density: z [N,{d}] float32 -> eps = f^-1(z) [N,{d}], log_prob = log p(z) [N], nats "
        f"({layers})",
        prior,
    )
    return {
        "prior_sample": {"inputs": {"eps": [-1, d]}, "outputs": {"z": [-1, d]}},
        "prior_density": {"inputs": {"z": [-1, d]}, "outputs": {"eps": [-1, d], "log_prob": [-1]}},
    }


def export_fp16_decoder(folder: Path) -> None:
    """decoder_fp16.onnx: the decoder's weights and arithmetic in half precision for GPUs, with
    float32 input and output kept (casts at the edges), so callers see the same interface."""
    from onnxconverter_common import float16

    graph = onnx.load(str(folder / "decoder.onnx"))
    half = float16.convert_float_to_float16(graph, keep_io_types=True)
    half.doc_string = graph.doc_string + " (float16 inside, float32 at the edges)"
    for prop in half.metadata_props:
        if prop.key == "role":
            prop.value = "decoder_fp16"
    onnx.save_model(half, str(folder / "decoder_fp16.onnx"))
    onnx.checker.check_model(str(folder / "decoder_fp16.onnx"), full_check=True)


def export_int8_decoder(folder: Path) -> None:
    """decoder_int8.onnx: ONNX Runtime's dynamic quantization of the decoder for CPUs: weights in
    8 bits, activations quantized per batch as they come, float32 at the edges. It pays where the
    decoder's matrices are large (the MNIST recipe's: faster at batch 1 and 256, the same test NLL
    within 0.01 nats); on a tiny decoder the quantizing costs more than it saves (docs/benchmarks.md)."""
    from onnxruntime.quantization import QuantType, quantize_dynamic

    target = folder / "decoder_int8.onnx"
    quantize_dynamic(folder / "decoder.onnx", target, weight_type=QuantType.QUInt8)
    graph = onnx.load(str(target))
    graph.doc_string += " (weights int8, activations quantized dynamically)"
    for prop in graph.metadata_props:
        if prop.key == "role":
            prop.value = "decoder_int8"
    onnx.save_model(graph, str(target))
    onnx.checker.check_model(str(target), full_check=True)
