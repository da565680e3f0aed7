"""The ONNX graphs: encoder x -> (mu, logvar) and decoder z -> the likelihood's parameters, and
for a flow prior its two directions: prior_sample eps -> z = f(eps) and prior_density
z -> (eps = f^-1(z), log p(z)). A hierarchical VAE's latent is its standardized noise u
(`training.hvae`), so its encoder and decoder have the flat signatures, and its family adds
graphs of its own (`export.hvae`: the posterior draw), by FAMILY_GRAPHS.

A conditional model's graphs take the class too, as class weights [N, K] (one-hot, or a mix of two
classes for an edit) packed after each row's other input, as the posterior graph packs an image and
its noise: the service's batchers feed one array per graph. Its encoder is x_y [N, C*H*W + K] (the
image flattened, then its class weights), its decoder z_y [N, D + K].

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


def split_classes(model: Model, rows: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
    """A conditional model's packed rows [N, F + K] as their first F values and their class weights
    [N, K]; an unconditional model's rows as they are, and no classes."""
    k = model.cfg.classes
    return (rows[:, :-k], rows[:, -k:]) if k else (rows, None)


class EncoderGraph(nn.Module):
    """x -> mu, logvar (a conditional model's: x_y, its image flattened then its class weights)."""

    def __init__(self, model: Model) -> None:
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        pixels, y = split_classes(self.model, x)
        if y is not None:
            pixels = pixels.reshape(-1, *self.model.cfg.image_shape)
        return self.model.encode(pixels, y)


class DecoderGraph(nn.Module):
    """z -> the likelihood's parameters and the image the client sees (`mean_image`), computed in
    the graph so that the server does not post-process them in numpy (a conditional model's: z_y,
    the latent then its class weights)."""

    def __init__(self, model: Model) -> None:
        super().__init__()
        self.model = model

    def forward(self, z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        params = self.model.decode(*split_classes(self.model, z))
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
    d, k = model.noise_size, cfg.classes
    spec = for_model(cfg).spec
    p, out_name = spec.param_channels, spec.output  # C, or a mixture's K (1 + 2C)
    metadata = {
        "latent_dim": str(d),
        "image_shape": json.dumps(list(cfg.image_shape)),
        "likelihood": cfg.likelihood,
        **({"mixtures": str(spec.mixtures)} if spec.components else {}),
        "family": model.family,
        **({"classes": str(k)} if k else {}),
    }
    x_name, x_shape = ("x_y", [-1, c * h * w + k]) if k else ("x", [-1, c, h, w])
    z_name, z_shape = ("z_y", [-1, d + k]) if k else ("z", [-1, d])
    given = f", then class weights [N,{k}] (one-hot, or a mix of two classes)" if k else ""
    with torch.no_grad():
        weights = torch.eye(k)[[0, k - 1]] if k else None
        x = torch.rand(2, c, h, w)
        example_x = torch.cat([x.flatten(1), weights], dim=1) if k else x
        example_z = torch.cat([torch.randn(2, d), weights], dim=1) if k else torch.randn(2, d)
        write_graph(EncoderGraph(model).eval(), example_x, folder / "encoder.onnx", [x_name], ["mu", "logvar"])
        write_graph(DecoderGraph(model).eval(), example_z, folder / "decoder.onnx", [z_name], [out_name, IMAGE])
    x_text = f"x_y [N,{c * h * w + k}] float32 (x [N,{c},{h},{w}] in [0,1] flattened{given})" if k else f"x [N,{c},{h},{w}] float32 in [0,1]"
    z_text = f"z_y [N,{d + k}] float32 (z [N,{d}]{given})" if k else f"z [N,{d}] float32"
    describe(folder / "encoder.onnx", "encoder", f"VAE encoder q(z|x): {x_text} -> mu, logvar [N,{d}]", metadata)
    describe(
        folder / "decoder.onnx",
        "decoder",
        f"VAE decoder p(x|z): {z_text} -> {out_name} [N,{p},{h},{w}] ({cfg.likelihood}), "
        f"{IMAGE} [N,{c},{h},{w}] in [0,1] (what Sample shows)",
        metadata,
    )
    signatures: dict[str, dict[str, object]] = {
        "encoder": {"inputs": {x_name: x_shape}, "outputs": {"mu": [-1, d], "logvar": [-1, d]}},
        "decoder": {"inputs": {z_name: z_shape}, "outputs": {out_name: [-1, p, h, w], IMAGE: [-1, c, h, w]}},
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
