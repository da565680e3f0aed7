"""The Open Inference Protocol's view of the served models, free of any wire format: both of its
front ends (gRPC and REST) render these plain values.

Per served model NAME the protocol shows three models:
  NAME_encoder   the encoder graph as exported: x [N, C, H, W] -> mu, logvar [N, D]
  NAME_decoder   the decoder graph as exported: z [N, D] -> logits (or mean) [N, C, H, W]
  NAME_sample    num_samples (INT64 [1]), optional seed (INT64 [1]) and temperature (FP32 [1])
                 -> images (FP32 [N, C, H, W] in [0, 1]) and seed: the bytes of vae.v1 Sample;
                 a conditional model's also an optional class (BYTES names or INT64 indices, [1] or
                 [N]) and its class of each image (INT64 [N], indices into the metadata's classes)
with the tensor names, datatypes and shapes `python -m export.triton` gives Triton for the same
files. Metadata, config and statistics are dicts in the JSON of Triton's REST API, whose keys are
the protobuf messages' field names, so the gRPC front end parses them into its messages.
"""

from __future__ import annotations

from importlib.metadata import PackageNotFoundError
from importlib.metadata import version as package_version
import json
from typing import Any

import numpy as np

from service import dataplane
from service.engine import Engine
from service.errors import BadRequest
from service.manifest import FAMILY_ROLES, IMAGE
from service.metrics import Metrics
from service.models import Models
from service.registry import READY, ModelNotFound, Status

KINDS = ("encoder", "decoder", "sample")  # every model's; a family's own graphs are protocol models too (FAMILY_ROLES)
GRAPH_KINDS = {role for roles in FAMILY_ROLES.values() for role in roles}
# The protocol's extensions (Triton's names) that this server implements, and no others.
EXTENSIONS = ("model_repository", "model_configuration", "statistics", "binary_tensor_data")
MAX_INT64 = (1 << 63) - 1
Signature = tuple[list[tuple[str, str, list[int]]], list[tuple[str, str, list[int]]]]


def server_metadata() -> dict[str, Any]:
    try:
        version = package_version("vae-serve")
    except PackageNotFoundError:
        version = "unknown"
    return {"name": "vae-serve", "version": version, "extensions": list(EXTENSIONS)}


def split_name(name: str) -> tuple[str, str]:
    """`digits_sample` -> ("digits", "sample"); an unknown kind is NOT_FOUND, as any unknown model."""
    base, _, kind = name.rpartition("_")
    if not base or (kind not in KINDS and kind not in GRAPH_KINDS):
        raise ModelNotFound(
            f"model {name!r} not found: this protocol serves NAME_encoder, NAME_decoder and NAME_sample for each "
            "model NAME, and a hierarchical model's NAME_posterior (the repository index lists them)"
        )
    return base, kind


def parse_version(version: str) -> int:
    """"" is the newest version served (0); otherwise a positive integer."""
    if not version:
        return 0
    if not (version.isascii() and version.isdigit()) or int(version) < 1:
        raise BadRequest(f"model_version: {version!r}; give a version number, or nothing for the newest")
    return int(version)


def target(name: str, version: str) -> tuple[str, int]:
    """The served model and version behind a protocol model name (NAME_kind) and version string."""
    return split_name(name)[0], parse_version(version)


def route(name: str, version: str) -> tuple[str, int, str, Exception | None]:
    """(served model, version, kind) of an inference request, or ("", 0, "") and the error that
    refuses it: the data plane's call accounts the refusal, so it is returned, not raised."""
    try:
        (base, kind), number = split_name(name), parse_version(version)
    except (ModelNotFound, BadRequest) as err:
        return "", 0, "", err
    return base, number, kind, None


def resolve(models: Models, name: str, version: str) -> tuple[Engine, str]:
    """The engine serving a protocol model name and version, and the model's kind."""
    engine, kind = models.resolve(*target(name, version)), split_name(name)[1]
    if kind in GRAPH_KINDS and kind not in engine.family:
        raise ModelNotFound(f"model {name!r} not found: a {engine.spec.family} model has no {kind} graph")
    return engine, kind


def base_name(name: str) -> str:
    """The served model behind a name given to load or unload: NAME, or any of its three protocol models."""
    dataplane.check_model_name(name)
    base, _, kind = name.rpartition("_")
    return base if base and (kind in KINDS or kind in GRAPH_KINDS) else name


def signature(engine: Engine, kind: str) -> Signature:
    """Inputs and outputs of one protocol model: (name, datatype, shape with -1 for the batch)."""
    c, h, w = engine.spec.image_shape
    d = engine.spec.latent_dim
    if kind == "sample":
        scalars = [("num_samples", "INT64", [1]), ("seed", "INT64", [1]), ("temperature", "FP32", [1]),
                   ("temperatures", "FP32", [-1])]  # fmt: skip
        outputs = [("images", "FP32", [-1, c, h, w]), ("seed", "INT64", [1])]
        if engine.classes:  # the class asked for (by name, BYTES, or index, INT64) and each image's
            return [*scalars, ("class", "BYTES", [-1])], [*outputs, ("class", "INT64", [-1])]
        return scalars, outputs
    if kind in GRAPH_KINDS:  # a hierarchical model's posterior: an image and its noise in -> params, log_ratio, u
        graph = engine.runtime.family[kind]
        out = dict(zip(graph.output_names, ([-1, engine.spec.decoder_channels, h, w], [-1], [-1, d])))
        return [(graph.input_name, "FP32", [-1, *dataplane.graph_input(engine, kind)])], [(n, "FP32", out[n]) for n in graph.output_names]
    graph = engine.runtime.encoder if kind == "encoder" else engine.runtime.decoder
    image, latent = [-1, c, h, w], [-1, d]
    params = [-1, engine.spec.decoder_channels, h, w]  # the likelihood's parameters: C, or a mixture's K (1 + 2C)
    inputs = [(graph.input_name, "FP32", [-1, *dataplane.graph_input(engine, kind)])]
    shapes = {IMAGE: image} if kind == "decoder" else {}
    outputs = [(name, "FP32", shapes.get(name, latent if kind == "encoder" else params)) for name in graph.output_names]
    return inputs, outputs


def _vector(inputs: dict[str, tuple[str, np.ndarray]], name: str, datatypes: tuple[str, ...]) -> list[float]:
    """An optional one-dimensional input's values ([] when absent)."""
    if name not in inputs:
        return []
    datatype, array = inputs[name]
    if datatype not in datatypes:
        raise BadRequest(f"input {name!r}: datatype {datatype!r}; must be {' or '.join(datatypes)}")
    if array.ndim != 1:
        raise BadRequest(f"input {name!r}: shape {list(array.shape)}; must be [G], one value per latent group")
    return array.tolist()


def _classes(inputs: dict[str, tuple[str, np.ndarray]]) -> list[bytes | int]:
    """NAME_sample's optional class input: names (BYTES) or indices (INT64, INT32), [1] or [N]."""
    if "class" not in inputs:
        return []
    datatype, array = inputs["class"]
    if datatype not in ("BYTES", "INT64", "INT32"):
        raise BadRequest(f"input 'class': datatype {datatype!r}; must be BYTES (names) or INT64 (indices)")
    if array.ndim != 1:
        raise BadRequest(f"input 'class': shape {list(array.shape)}; must be [1] or [N]")
    return array.tolist()


def _scalar(inputs: dict[str, tuple[str, np.ndarray]], name: str, datatypes: tuple[str, ...]) -> Any:
    if name not in inputs:
        return None
    datatype, array = inputs[name]
    if datatype not in datatypes:
        raise BadRequest(f"input {name!r}: datatype {datatype!r}; must be {' or '.join(datatypes)}")
    if array.shape != (1,):
        raise BadRequest(f"input {name!r}: shape {list(array.shape)}; must be [1]")
    return array[0].item()


async def infer(
    engine: Engine, kind: str, inputs: dict[str, tuple[str, np.ndarray]], asked: list[str], deadline: float | None
) -> list[tuple[str, str, np.ndarray]]:  # fmt: skip
    """Run one protocol model on its inputs (name -> (datatype, array)); the outputs asked for (all
    if none) as (name, datatype, array), in the order the model declares them."""
    declared_in, declared_out = signature(engine, kind)
    names = [n for n, _, _ in declared_in]
    unknown = sorted(set(inputs) - set(names))
    if unknown:
        raise BadRequest(f"input {unknown[0]!r}: not an input of this model (it takes {', '.join(names)})")
    outs = [n for n, _, _ in declared_out]
    unknown = sorted(set(asked) - set(outs))
    if unknown:
        raise BadRequest(f"output {unknown[0]!r}: not an output of this model (it gives {', '.join(outs)})")
    wanted = [n for n in outs if n in asked] if asked else outs
    if kind == "sample":
        n = _scalar(inputs, "num_samples", ("INT64", "INT32"))
        if n is None:
            raise BadRequest("input 'num_samples': missing")
        seed = _scalar(inputs, "seed", ("INT64", "UINT64"))
        if seed is not None and not 0 <= seed <= MAX_INT64:  # the seed output is INT64
            raise BadRequest(f"input 'seed': {seed}; must be between 0 and 2^63 - 1")
        per_group = _vector(inputs, "temperatures", ("FP32",))
        classes = _classes(inputs)
        images, seed, drawn = await dataplane.sample(
            engine, int(n), seed, _scalar(inputs, "temperature", ("FP32",)), deadline,
            names=("input 'num_samples'", "input 'seed'", "input 'temperature'", "input 'temperatures'", "input 'class'"),
            per_group=per_group, classes=classes,
        )  # fmt: skip
        results = {"images": images, "seed": np.array([seed], np.int64),
                   "class": np.array([engine.spec.classes.index(c) for c in drawn], np.int64)}  # fmt: skip
    else:
        ((name, _, _),) = declared_in
        if name not in inputs:
            raise BadRequest(f"input {name!r}: missing")
        datatype, x = inputs[name]
        if datatype != "FP32":
            raise BadRequest(f"input {name!r}: datatype {datatype!r}; must be FP32")
        field = f"input {name!r}"
        if kind == "encoder":
            arrays = await dataplane.encoder_graph(engine, x, field, deadline)
        elif kind in GRAPH_KINDS:
            arrays = await dataplane.family_graph(engine, kind, x, field, deadline)
        else:
            arrays = await dataplane.decoder_graph(engine, x, field, deadline)
        results = dict(zip(outs, arrays))
    types = {n: t for n, t, _ in declared_out}
    return [(n, types[n], results[n]) for n in wanted]


def metadata(models: Models, engine: Engine, name: str, kind: str) -> dict[str, Any]:
    inputs, outputs = signature(engine, kind)
    served = sorted(v for (model, v) in models.routes if model == engine.spec.name and v)
    answer = {
        "name": name, "versions": [str(v) for v in served], "platform": _platform(kind),
        "inputs": [{"name": n, "datatype": t, "shape": s} for n, t, s in inputs],
        "outputs": [{"name": n, "datatype": t, "shape": s} for n, t, s in outputs],
    }  # fmt: skip
    if engine.spec.classes:  # the class list, which the class indices mean (REST only: gRPC's message has no such field)
        answer["parameters"] = {"classes": list(engine.spec.classes)}
    return answer


def config(engine: Engine, name: str, kind: str) -> dict[str, Any]:
    """The model as Triton's config would describe it; max_batch_size is the largest request this
    server takes (it forms batches of up to max_batch_rows across requests)."""
    inputs, outputs = signature(engine, kind)
    batched = kind != "sample"
    gpu = "CPU" not in engine.runtime.provider
    return {
        "name": name, "platform": _platform(kind), "backend": "onnxruntime" if batched else "",
        "max_batch_size": engine.limits.max_request_rows if batched else 0,
        "input": [
            {"name": n, "data_type": "TYPE_STRING" if t == "BYTES" else f"TYPE_{t}", "dims": s[1:] if batched else s,
             "optional": n in ("seed", "temperature", "temperatures", "class")}
            for n, t, s in inputs
        ],
        "output": [{"name": n, "data_type": f"TYPE_{t}", "dims": s[1:] if batched else s} for n, t, s in outputs],
        "dynamic_batching": {
            "preferred_batch_size": [engine.batch.max_batch_rows],
            "max_queue_delay_microseconds": round(engine.batch.max_batch_delay_ms * 1000),
        },
        "instance_group": [{"kind": "KIND_GPU" if gpu else "KIND_CPU", "count": 1}],
        "default_model_filename": f"{kind}.onnx" if batched else "",
        # Triton's free-form parameters: the class list (a JSON list), which the class indices mean
        **({"parameters": {"classes": {"string_value": json.dumps(list(engine.spec.classes))}}} if engine.spec.classes else {}),
    }  # fmt: skip


def statistics(models: Models, metrics: Metrics, name: str, version: str) -> list[dict[str, Any]]:
    """From the metrics' own numbers, per graph: NAME_sample and NAME_decoder both report the
    decoder, which computes them both. Every model when no name is given."""
    if name:
        pairs = [resolve(models, name, version)]
    else:
        pairs = [(e, kind) for e in models.engines() for kind in (*KINDS, *e.family)]
    return [_statistics(metrics, e, kind) for e, kind in pairs]


def _statistics(metrics: Metrics, engine: Engine, kind: str) -> dict[str, Any]:
    value = metrics.registry.get_sample_value
    graph = kind if kind in ("encoder", *GRAPH_KINDS) else "decoder"
    labels = {"model": engine.spec.name, "version": str(engine.spec.version), "graph": graph}

    def duration(family: str) -> dict[str, int]:
        count, seconds = value(f"{family}_count", labels) or 0, value(f"{family}_sum", labels) or 0
        return {"count": int(count), "ns": int(seconds * 1e9)}

    queue, compute = duration("vae_queue_wait_seconds"), duration("vae_compute_seconds")
    return {
        "name": f"{engine.spec.name}_{kind}", "version": str(engine.spec.version),
        "inference_count": int(value("vae_batch_rows_sum", labels) or 0), "execution_count": compute["count"],
        "inference_stats": {
            "success": {"count": queue["count"], "ns": queue["ns"] + compute["ns"]}, "queue": queue, "compute_infer": compute,
        },
    }  # fmt: skip


def index(statuses: list[Status], ready_only: bool) -> list[dict[str, str]]:
    """The repository's protocol models: three per served model version, and its family's graphs."""
    return [
        {"name": f"{s.name}_{kind}", "version": str(s.version), "state": s.state, "reason": s.reason}
        for s in statuses if not ready_only or s.state == READY for kind in (*KINDS, *s.graphs)
    ]  # fmt: skip


def model_ready(models: Models, name: str, version: str) -> bool:
    base, v = target(name, version)
    if base not in models.table:
        raise ModelNotFound(f"model {base!r} not found; this server has: {', '.join(models.table) or 'none'}")
    return (base, v) in models.routes


def _platform(kind: str) -> str:
    return "vae_sample" if kind == "sample" else "onnxruntime_onnx"
