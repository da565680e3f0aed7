"""The Open Inference Protocol (KServe v2, `inference.GRPCInferenceService`) beside vae.v1, on the
same port, so that clients written for Triton, KServe or MLServer (`tritonclient` among them) work.

Per served model NAME it shows three models:
  NAME_encoder   the encoder graph as exported: x [N, C, H, W] -> mu, logvar [N, D]
  NAME_decoder   the decoder graph as exported: z [N, D] -> logits (or mean) [N, C, H, W]
  NAME_sample    num_samples (INT64 [1]), optional seed (INT64 [1]) and temperature (FP32 [1])
                 -> images (FP32 [N, C, H, W] in [0, 1]) and seed: the bytes of vae.v1 Sample
with the tensor names, datatypes and shapes `python -m export.triton` gives Triton for the same
files. Calls go through the same routing, batchers, limits, deadlines and metrics as vae.v1 (`rpc`
label `oip.<method>`); model control is bound to the same admin rule.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from importlib.metadata import PackageNotFoundError
from importlib.metadata import version as package_version
from typing import Any

import numpy as np

from service.api.inference import grpc_service_pb2 as oip
from service.engine import Engine, new_seed
from service.handlers import Call, VaeServicer, check_latents, control, deadline_of
from service.models import READY, ModelNotFound
from service.tensors import BadRequest

SERVICE = oip.DESCRIPTOR.services_by_name["GRPCInferenceService"].full_name
ADMIN_METHODS = frozenset(f"/{SERVICE}/{name}" for name in ("RepositoryModelLoad", "RepositoryModelUnload"))
KINDS = ("encoder", "decoder", "sample")
# The protocol's extensions (Triton's names) that this server implements, and no others.
EXTENSIONS = ("model_repository", "model_configuration", "statistics")
DATATYPES = {
    "FP32": np.dtype("<f4"), "FP64": np.dtype("<f8"), "INT64": np.dtype("<i8"), "UINT64": np.dtype("<u8"),
    "INT32": np.dtype("<i4"),
}  # fmt: skip
CONTENTS = {"FP32": "fp32_contents", "FP64": "fp64_contents", "INT64": "int64_contents", "UINT64": "uint64_contents", "INT32": "int_contents"}
MAX_ELEMENTS = 1 << 31  # more than any request a limit lets through; keeps shape arithmetic sane


def split_name(name: str) -> tuple[str, str]:
    """`digits_sample` -> ("digits", "sample"); BadRequest-free: an unknown kind is NOT_FOUND."""
    base, _, kind = name.rpartition("_")
    if not base or kind not in KINDS:
        raise ModelNotFound(
            f"model {name!r} not found: this protocol serves NAME_encoder, NAME_decoder and NAME_sample for each "
            "model NAME (RepositoryIndex lists them)"
        )
    return base, kind


def parse_version(version: str) -> int:
    """"" is the newest version served (0); otherwise a positive integer."""
    if not version:
        return 0
    if not version.isdigit() or int(version) < 1:
        raise BadRequest(f"model_version: {version!r}; give a version number, or nothing for the newest")
    return int(version)


def route(request: Any) -> tuple[str, int]:
    """(model, version) of an inference request, for `Call`."""
    return target(request.model_name, request.model_version)


def target(name: str, version: str) -> tuple[str, int]:
    """The served model and version behind a protocol model name (NAME_kind) and version string."""
    return split_name(name)[0], parse_version(version)


class Tensors:
    """The request's inputs by name, read from raw_input_contents or typed contents, each checked
    against what the model expects; BadRequest names the input and what is wrong."""

    def __init__(self, request: oip.ModelInferRequest) -> None:
        raw = request.raw_input_contents
        if raw and len(raw) != len(request.inputs):
            raise BadRequest(f"raw_input_contents has {len(raw)} entries for {len(request.inputs)} inputs")
        self.request = request
        self.by_name = {}
        for i, tensor in enumerate(request.inputs):
            if tensor.name in self.by_name:
                raise BadRequest(f"input {tensor.name!r} given twice")
            self.by_name[tensor.name] = (i, tensor)

    def check_names(self, expected: Iterable[str]) -> None:
        unknown = sorted(set(self.by_name) - set(expected))
        if unknown:
            raise BadRequest(f"input {unknown[0]!r}: not an input of this model (it takes {', '.join(expected)})")

    def get(self, name: str, datatypes: tuple[str, ...], shape: tuple[int | None, ...], required: bool = True) -> np.ndarray | None:
        """The input `name` as an array of `shape` (None: any size), of one of `datatypes`."""
        if name not in self.by_name:
            if required:
                raise BadRequest(f"input {name!r}: missing")
            return None
        i, tensor = self.by_name[name]
        if tensor.datatype not in datatypes:
            raise BadRequest(f"input {name!r}: datatype {tensor.datatype!r}; must be {' or '.join(datatypes)}")
        dims = tuple(tensor.shape)
        if len(dims) != len(shape) or any(d < 0 or (want is not None and d != want) for d, want in zip(dims, shape)):
            shown = ", ".join("N" if want is None else str(want) for want in shape)
            raise BadRequest(f"input {name!r}: shape {list(dims)}; must be [{shown}]")
        count = math.prod(dims)
        if count > MAX_ELEMENTS:
            raise BadRequest(f"input {name!r}: shape {list(dims)} is too large")
        dtype = DATATYPES[tensor.datatype]
        if self.request.raw_input_contents:
            data = self.request.raw_input_contents[i]
            if len(data) != count * dtype.itemsize:
                raise BadRequest(
                    f"input {name!r}: shape {list(dims)} of {tensor.datatype} needs {count * dtype.itemsize} bytes, got {len(data)}"
                )
            array = np.frombuffer(data, dtype=dtype).reshape(dims)
        else:
            values = getattr(tensor.contents, CONTENTS[tensor.datatype])
            if len(values) != count:
                raise BadRequest(f"input {name!r}: shape {list(dims)} needs {count} values in contents, got {len(values)}")
            array = np.array(values, dtype=dtype).reshape(dims)
        if array.dtype.kind == "f" and not np.isfinite(array).all():
            raise BadRequest(f"input {name!r}: contains NaN or infinity")
        return array


class Outputs:
    """The response's outputs, in the order the model declares them, limited to those asked for."""

    def __init__(self, request: oip.ModelInferRequest, declared: list[str]) -> None:
        asked = [o.name for o in request.outputs]
        unknown = sorted(set(asked) - set(declared))
        if unknown:
            raise BadRequest(f"output {unknown[0]!r}: not an output of this model (it gives {', '.join(declared)})")
        self.names = [n for n in declared if n in asked] if asked else declared
        self.response = oip.ModelInferResponse(model_name=request.model_name, id=request.id)

    def add(self, name: str, array: np.ndarray, datatype: str = "FP32") -> None:
        if name not in self.names:
            return
        self.response.outputs.add(name=name, datatype=datatype, shape=array.shape)
        self.response.raw_output_contents.append(np.ascontiguousarray(array, dtype=DATATYPES[datatype]).tobytes())


def signature(engine: Engine, kind: str) -> tuple[list[tuple[str, str, list[int]]], list[tuple[str, str, list[int]]]]:
    """Inputs and outputs of one protocol model: (name, datatype, shape with -1 for the batch)."""
    c, h, w = engine.spec.image_shape
    d = engine.spec.latent_dim
    if kind == "sample":
        scalars = [("num_samples", "INT64", [1]), ("seed", "INT64", [1]), ("temperature", "FP32", [1])]
        return scalars, [("images", "FP32", [-1, c, h, w]), ("seed", "INT64", [1])]
    graph = engine.runtime.encoder if kind == "encoder" else engine.runtime.decoder
    image, latent = [-1, c, h, w], [-1, d]
    params = [-1, engine.spec.decoder_channels, h, w]  # the likelihood's parameters: C, or a mixture's K (1 + 2C)
    inputs = [(graph.input_name, "FP32", image if kind == "encoder" else latent)]
    outputs = [(name, "FP32", latent if kind == "encoder" else params) for name in graph.output_names]
    return inputs, outputs


class InferenceServicer:
    """The protocol's RPCs, on the same models, state and accounting as `VaeServicer`."""

    rpc_prefix = "oip."

    def __init__(self, vae: VaeServicer) -> None:
        self.vae = vae
        self.models = vae.models
        self.metrics = vae.metrics

    @property
    def draining(self) -> bool:
        return self.vae.draining

    def _engine(self, name: str, version: str) -> tuple[Engine, str]:
        return self.models.resolve(*target(name, version)), split_name(name)[1]

    @control
    async def ServerLive(self, request: oip.ServerLiveRequest, context: Any) -> oip.ServerLiveResponse:
        return oip.ServerLiveResponse(live=True)

    @control
    async def ServerReady(self, request: oip.ServerReadyRequest, context: Any) -> oip.ServerReadyResponse:
        return oip.ServerReadyResponse(ready=bool(self.models.routes))

    @control
    async def ServerMetadata(self, request: oip.ServerMetadataRequest, context: Any) -> oip.ServerMetadataResponse:
        try:
            version = package_version("vae-serve")
        except PackageNotFoundError:
            version = "unknown"
        return oip.ServerMetadataResponse(name="vae-serve", version=version, extensions=EXTENSIONS)

    @control
    async def ModelReady(self, request: oip.ModelReadyRequest, context: Any) -> oip.ModelReadyResponse:
        base, version = target(request.name, request.version)
        if base not in self.models.table:
            raise ModelNotFound(f"model {base!r} not found; this server has: {', '.join(self.models.table) or 'none'}")
        return oip.ModelReadyResponse(ready=(base, version) in self.models.routes)

    @control
    async def ModelMetadata(self, request: oip.ModelMetadataRequest, context: Any) -> oip.ModelMetadataResponse:
        engine, kind = self._engine(request.name, request.version)
        inputs, outputs = signature(engine, kind)
        served = sorted(v for (name, v) in self.models.routes if name == engine.spec.name and v)
        meta = oip.ModelMetadataResponse.TensorMetadata
        return oip.ModelMetadataResponse(
            name=request.name, versions=[str(v) for v in served], platform=_platform(kind),
            inputs=[meta(name=n, datatype=t, shape=s) for n, t, s in inputs],
            outputs=[meta(name=n, datatype=t, shape=s) for n, t, s in outputs],
        )  # fmt: skip

    @control
    async def ModelConfig(self, request: oip.ModelConfigRequest, context: Any) -> oip.ModelConfigResponse:
        """The model as Triton's config would describe it; max_batch_size is the largest request
        this server takes (it forms batches of up to max_batch_rows across requests)."""
        engine, kind = self._engine(request.name, request.version)
        inputs, outputs = signature(engine, kind)
        batched = kind != "sample"
        config = oip.ModelConfig(
            name=request.name, platform=_platform(kind), backend="onnxruntime" if batched else "",
            max_batch_size=engine.limits.max_request_rows if batched else 0,
            input=[
                oip.ModelInput(name=n, data_type=_config_type(t), dims=s[1:] if batched else s, optional=n in ("seed", "temperature"))
                for n, t, s in inputs
            ],
            output=[oip.ModelOutput(name=n, data_type=_config_type(t), dims=s[1:] if batched else s) for n, t, s in outputs],
            dynamic_batching=oip.ModelDynamicBatching(
                preferred_batch_size=[engine.batch.max_batch_rows],
                max_queue_delay_microseconds=round(engine.batch.max_batch_delay_ms * 1000),
            ),
            default_model_filename=f"{kind}.onnx" if batched else "",
        )  # fmt: skip
        config.instance_group.add(kind=oip.ModelInstanceGroup.KIND_CPU if "CPU" in engine.runtime.provider else oip.ModelInstanceGroup.KIND_GPU, count=1)
        return oip.ModelConfigResponse(config=config)

    @control
    async def ModelStatistics(self, request: oip.ModelStatisticsRequest, context: Any) -> oip.ModelStatisticsResponse:
        """From the metrics' own numbers, per graph: NAME_sample and NAME_decoder both report the
        decoder, which computes them both. Every model when no name is given."""
        if request.name:
            engine, kind = self._engine(request.name, request.version)
            pairs = [(engine, kind)]
        else:
            pairs = [(e, kind) for e in self.models.engines() for kind in KINDS]
        return oip.ModelStatisticsResponse(model_stats=[self._statistics(e, kind) for e, kind in pairs])

    def _statistics(self, engine: Engine, kind: str) -> oip.ModelStatistics:
        value = self.metrics.registry.get_sample_value
        labels = {"model": engine.spec.name, "version": str(engine.spec.version), "graph": "encoder" if kind == "encoder" else "decoder"}

        def duration(family: str) -> oip.StatisticDuration:
            count, seconds = value(f"{family}_count", labels) or 0, value(f"{family}_sum", labels) or 0
            return oip.StatisticDuration(count=int(count), ns=int(seconds * 1e9))

        queue, compute = duration("vae_queue_wait_seconds"), duration("vae_compute_seconds")
        return oip.ModelStatistics(
            name=f"{engine.spec.name}_{kind}", version=str(engine.spec.version),
            inference_count=int(value("vae_batch_rows_sum", labels) or 0), execution_count=compute.count,
            inference_stats=oip.InferStatistics(
                success=oip.StatisticDuration(count=queue.count, ns=queue.ns + compute.ns), queue=queue, compute_infer=compute,
            ),
        )  # fmt: skip

    @control
    async def RepositoryIndex(self, request: oip.RepositoryIndexRequest, context: Any) -> oip.RepositoryIndexResponse:
        index = oip.RepositoryIndexResponse()
        for status in self.models.statuses():
            if request.ready and status.state != READY:
                continue
            for kind in KINDS:
                index.models.add(
                    name=f"{status.name}_{kind}", version=str(status.version), state=status.state, reason=status.reason
                )
        return index

    @control
    async def RepositoryModelLoad(self, request: oip.RepositoryModelLoadRequest, context: Any) -> oip.RepositoryModelLoadResponse:
        """Loads the model behind the name: NAME, or any of NAME_encoder/_decoder/_sample."""
        await self.models.load(self._base(request.model_name))
        return oip.RepositoryModelLoadResponse()

    @control
    async def RepositoryModelUnload(
        self, request: oip.RepositoryModelUnloadRequest, context: Any
    ) -> oip.RepositoryModelUnloadResponse:
        """Unloads the model behind the name, and with it its three protocol models."""
        await self.models.unload(self._base(request.model_name))
        return oip.RepositoryModelUnloadResponse()

    def _base(self, name: str) -> str:
        if not name:
            raise BadRequest("model_name: required")
        base, _, kind = name.rpartition("_")
        return base if base and kind in KINDS else name

    async def ModelInfer(self, request: oip.ModelInferRequest, context: Any) -> oip.ModelInferResponse:
        async with Call(self.vae, "oip.ModelInfer", request, context, route) as engine:
            kind = split_name(request.model_name)[1]
            deadline = deadline_of(context)
            inputs, outputs = signature(engine, kind)
            tensors = Tensors(request)
            tensors.check_names([name for name, _, _ in inputs])
            out = Outputs(request, [name for name, _, _ in outputs])
            out.response.model_version = str(engine.spec.version)
            limit = engine.limits.max_request_rows
            if kind == "sample":
                n = int(tensors.get("num_samples", ("INT64", "INT32"), (1,))[0])  # type: ignore[index]
                if not 1 <= n <= limit:
                    raise BadRequest(f"input 'num_samples': {n}; must be between 1 and {limit}")
                seed_in = tensors.get("seed", ("INT64", "UINT64"), (1,), required=False)
                if seed_in is not None and int(seed_in[0]) < 0:
                    raise BadRequest(f"input 'seed': {int(seed_in[0])}; must not be negative")
                t_in = tensors.get("temperature", ("FP32",), (1,), required=False)
                temperature = 1.0 if t_in is None else float(t_in[0])
                if not 0 <= temperature <= 100:
                    raise BadRequest(f"input 'temperature': {temperature}; must be in [0, 100]")
                seed = new_seed(None if seed_in is None else int(seed_in[0]))
                out.add("images", await engine.sample(n, seed, temperature, deadline))
                out.add("seed", np.array([seed], np.int64), "INT64")
                return out.response
            (name, _, shape), = inputs
            x = tensors.get(name, ("FP32",), (None, *shape[1:]))
            assert x is not None
            if not 1 <= len(x) <= limit:
                raise BadRequest(f"input {name!r}: {len(x)} rows; must be between 1 and {limit}")
            if kind == "encoder":
                results = await engine.encoder.submit(x.astype(np.float32), deadline)
            else:
                check_latents(x, f"input {name!r}")
                results = await engine.decoder.submit(x.astype(np.float32), deadline)
            for (output, _, _), array in zip(outputs, results):
                out.add(output, array)
            return out.response


def _platform(kind: str) -> str:
    return "vae_sample" if kind == "sample" else "onnxruntime_onnx"


def _config_type(datatype: str) -> int:
    return {"FP32": oip.TYPE_FP32, "INT64": oip.TYPE_INT64}[datatype]
