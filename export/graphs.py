"""The ONNX graphs: encoder x -> (mu, logvar) and decoder z -> the likelihood's parameters, and
for a flow prior its two directions: prior_sample eps -> z = f(eps) and prior_density
z -> (eps = f^-1(z), log p(z)). A hierarchical VAE's latent is its standardized noise u
(`training.hvae`), so its encoder and decoder have the flat signatures, and its family adds
graphs of its own (`export.hvae`: the posterior draw), by FAMILY_GRAPHS.

Each graph is exported with a dynamic batch axis N and carries a description of itself in its
ONNX metadata, so a graph file found alone still says what it is.
"""

from __future__ import annotations

import json
from pathlib import Path

import onnx
import torch
from torch import nn

from export.onnx_files import describe, write_graph
from export.hvae import export_posterior_graph
from service.manifest import IMAGE
from training.likelihoods import for_model
from training.families import Model



class EncoderGraph(nn.Module):
    def __init__(self, model: Model) -> None:
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.model.encode(x)


class DecoderGraph(nn.Module):
    """z -> the likelihood's parameters and the image the client sees (`mean_image`), computed in
    the graph so that the server does not post-process them in numpy."""

    def __init__(self, model: Model) -> None:
        super().__init__()
        self.model = model

    def forward(self, z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        params = self.model.decode(z)
        return params, self.model.mean_image(params)


class PriorSampleGraph(nn.Module):
    """z = f(eps): what Sample (and a spherical Interpolate's path) maps the Gaussian noise through."""

    def __init__(self, model: Model) -> None:
        super().__init__()
        self.flow = model.flow

    def forward(self, eps: torch.Tensor) -> torch.Tensor:
        return self.flow(eps)


class PriorDensityGraph(nn.Module):
    """eps = f^-1(z) and log p(z): Score's log p(z), and the base point a spherical path starts from."""

    def __init__(self, model: Model) -> None:
        super().__init__()
        self.flow = model.flow

    def forward(self, z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.flow.inverse(z)


def export_graphs(model: Model, folder: Path) -> dict[str, dict[str, object]]:
    """Write encoder.onnx and decoder.onnx into `folder`, and for a flow prior prior_sample.onnx and
    prior_density.onnx too; return every graph's input/output signature by role."""
    cfg = model.cfg
    model = model.eval().cpu()
    c, h, w = cfg.image_shape
    d = model.noise_size
    spec = for_model(cfg).spec
    p, out_name = spec.param_channels, spec.output  # C, or a mixture's K (1 + 2C)
    metadata = {
        "latent_dim": str(d),
        "image_shape": json.dumps(list(cfg.image_shape)),
        "likelihood": cfg.likelihood,
        **({"mixtures": str(spec.mixtures)} if spec.components else {}),
        "family": model.family,
    }
    with torch.no_grad():
        write_graph(EncoderGraph(model).eval(), torch.rand(2, c, h, w), folder / "encoder.onnx", ["x"], ["mu", "logvar"])
        write_graph(DecoderGraph(model).eval(), torch.randn(2, d), folder / "decoder.onnx", ["z"], [out_name, IMAGE])
    describe(
        folder / "encoder.onnx",
        "encoder",
        f"VAE encoder q(z|x): x [N,{c},{h},{w}] float32 in [0,1] -> mu, logvar [N,{d}]",
        metadata,
    )
    describe(
        folder / "decoder.onnx",
        "decoder",
        f"VAE decoder p(x|z): z [N,{d}] float32 -> {out_name} [N,{p},{h},{w}] ({cfg.likelihood}), "
        f"{IMAGE} [N,{c},{h},{w}] in [0,1] (what Sample shows)",
        metadata,
    )
    signatures: dict[str, dict[str, object]] = {
        "encoder": {"inputs": {"x": [-1, c, h, w]}, "outputs": {"mu": [-1, d], "logvar": [-1, d]}},
        "decoder": {"inputs": {"z": [-1, d]}, "outputs": {out_name: [-1, p, h, w], IMAGE: [-1, c, h, w]}},
    }
    if cfg.prior == "flow":
        signatures |= export_prior_graphs(model, folder, metadata)
    if model.family in FAMILY_GRAPHS:
        signatures |= FAMILY_GRAPHS[model.family](model, folder, metadata)  # type: ignore[arg-type]
    return signatures


# The graphs a model family adds to the encoder and decoder (service.manifest.FAMILY_ROLES), by family.
FAMILY_GRAPHS = {"hvae": export_posterior_graph}


def export_prior_graphs(model: Model, folder: Path, metadata: dict[str, str]) -> dict[str, dict[str, object]]:
    """prior_sample.onnx (eps [N, D] -> z [N, D]) and prior_density.onnx (z [N, D] -> eps [N, D],
    log_prob [N]): the flow's two directions as separate graphs, so the service batches each on its
    own and never needs torch. Their signatures by role."""
    d = model.cfg.latent_dim
    layers = f"{len(model.flow.layers)} affine couplings"
    with torch.no_grad():
        example = torch.randn(2, d)
        write_graph(PriorSampleGraph(model).eval(), example, folder / "prior_sample.onnx", ["eps"], ["z"])
        write_graph(PriorDensityGraph(model).eval(), example, folder / "prior_density.onnx", ["z"], ["eps", "log_prob"])
    prior = {**metadata, "prior": "flow"}
    describe(
        folder / "prior_sample.onnx",
        "prior_sample",
        f"VAE flow prior, sampling: eps [N,{d}] float32 ~ N(0, T^2 I) -> z = f(eps) [N,{d}] ({layers})",
        prior,
    )
    describe(
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


def parameters_only(folder: Path) -> onnx.ModelProto:
    """decoder.onnx without its image output (the nodes that made it dropped): what the
    reduced-precision decoders are made from. Their images are the server's to make, as for
    versions exported before the image output; converting the image's nodes to float16 breaks the
    converter's casts at the edges."""
    graph = onnx.load(str(folder / "decoder.onnx"))
    params = [o.name for o in graph.graph.output if o.name != IMAGE]
    return onnx.utils.Extractor(graph).extract_model([i.name for i in graph.graph.input], params)


def export_fp16_decoder(folder: Path) -> None:
    """decoder_fp16.onnx: the decoder's weights and arithmetic in half precision for GPUs, with
    float32 input and output kept (casts at the edges): the parameters alone (`parameters_only`)."""
    from onnxconverter_common import float16

    graph = parameters_only(folder)
    half = float16.convert_float_to_float16(graph, keep_io_types=True)
    half.doc_string = graph.doc_string + " (float16 inside, float32 at the edges)"
    for prop in half.metadata_props:
        if prop.key == "role":
            prop.value = "decoder_fp16"
    onnx.save_model(half, str(folder / "decoder_fp16.onnx"))
    onnx.checker.check_model(str(folder / "decoder_fp16.onnx"), full_check=True)


def export_int8_decoder(folder: Path) -> None:
    """decoder_int8.onnx: ONNX Runtime's dynamic quantization of the decoder for CPUs: weights in
    8 bits, activations quantized per batch as they come, float32 at the edges, the parameters alone
    (`parameters_only`). It pays where the
    decoder's matrices are large (the MNIST recipe's: faster at batch 1 and 256, the same test NLL
    within 0.01 nats); on a tiny decoder the quantizing costs more than it saves (docs/benchmarks.md)."""
    from onnxruntime.quantization import QuantType, quantize_dynamic

    target, source = folder / "decoder_int8.onnx", folder / ".decoder_parameters.onnx"
    onnx.save_model(parameters_only(folder), str(source))
    try:
        quantize_dynamic(source, target, weight_type=QuantType.QUInt8)
    finally:
        source.unlink()
    graph = onnx.load(str(target))
    graph.doc_string += " (weights int8, activations quantized dynamically)"
    for prop in graph.metadata_props:
        if prop.key == "role":
            prop.value = "decoder_int8"
    onnx.save_model(graph, str(target))
    onnx.checker.check_model(str(target), full_check=True)
