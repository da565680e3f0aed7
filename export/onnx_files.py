"""Writing one ONNX graph file: torch.onnx's dynamo exporter with a dynamic batch axis N, then the
file rewritten with its description and metadata and checked (`onnx.checker`, full shape inference)."""

from __future__ import annotations

import logging
from pathlib import Path

import onnx
import torch
from torch import nn

OPSET = 18
logging.getLogger("torch.onnx").setLevel(logging.ERROR)  # the exporter warns about every absent torchvision op


def write_graph(module: nn.Module, example: torch.Tensor, path: Path, inputs: list[str], outputs: list[str]) -> None:
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


def describe(path: Path, role: str, description: str, metadata: dict[str, str]) -> None:
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
