"""The Open Inference Protocol over gRPC (KServe v2, `inference.GRPCInferenceService`), beside
vae.v1 on the same port, so that clients written for Triton, KServe or MLServer (`tritonclient`
among them) work. A thin front end: it reads the protocol's messages into the data plane's calls
and `service.oip_models`' plain values back into messages (`rpc` label `oip.<method>`)."""

from __future__ import annotations


import grpc
import numpy as np
from google.protobuf import json_format

from service import oip_models
from service.api.inference import grpc_service_pb2 as oip
from service.dataplane import DataPlane
from service.errors import BadRequest
from service.grpc_calls import abort, deadline_of, refusal, uncapped
from service.tensors import DATATYPES, oip_tensor

SERVICE = oip.DESCRIPTOR.services_by_name["GRPCInferenceService"].full_name
ADMIN_METHODS = frozenset(f"/{SERVICE}/{name}" for name in ("RepositoryModelLoad", "RepositoryModelUnload"))
PREFIX = "oip."
CONTENTS = {"FP32": "fp32_contents", "FP64": "fp64_contents", "INT64": "int64_contents", "UINT64": "uint64_contents",
            "INT32": "int_contents", "UINT8": "uint_contents", "BYTES": "bytes_contents"}  # fmt: skip
HEALTH = frozenset({"ServerLive", "ServerReady", "ModelReady"})  # answered while draining: probes need them most then


def inputs_of(request: oip.ModelInferRequest) -> dict[str, tuple[str, np.ndarray]]:
    """The request's input tensors by name, read from raw_input_contents or typed contents."""
    raw = request.raw_input_contents
    if raw and len(raw) != len(request.inputs):
        raise BadRequest(f"raw_input_contents has {len(raw)} entries for {len(request.inputs)} inputs")
    inputs: dict[str, tuple[str, np.ndarray]] = {}
    for i, tensor in enumerate(request.inputs):
        name, datatype, shape = tensor.name, tensor.datatype, list(tensor.shape)
        if name in inputs:
            raise BadRequest(f"input {name!r} given twice")
        if raw:
            inputs[name] = (datatype, oip_tensor(name, datatype, shape, raw=raw[i]))
        else:
            contents = getattr(tensor.contents, CONTENTS[datatype]) if datatype in CONTENTS else None
            inputs[name] = (datatype, oip_tensor(name, datatype, shape, values=contents, what="contents"))
    return inputs


class InferenceServicer:
    def __init__(self, plane: DataPlane) -> None:
        self.plane = plane
        self.models = plane.models

    @uncapped(PREFIX, HEALTH)
    async def ServerLive(self, request: oip.ServerLiveRequest) -> oip.ServerLiveResponse:
        return oip.ServerLiveResponse(live=True)

    @uncapped(PREFIX, HEALTH)
    async def ServerReady(self, request: oip.ServerReadyRequest) -> oip.ServerReadyResponse:
        return oip.ServerReadyResponse(ready=self.plane.ready)

    @uncapped(PREFIX, HEALTH)
    async def ServerMetadata(self, request: oip.ServerMetadataRequest) -> oip.ServerMetadataResponse:
        return oip.ServerMetadataResponse(**oip_models.server_metadata())

    @uncapped(PREFIX, HEALTH)
    async def ModelReady(self, request: oip.ModelReadyRequest) -> oip.ModelReadyResponse:
        return oip.ModelReadyResponse(ready=not self.plane.draining and oip_models.model_ready(self.models, request.name, request.version))

    @uncapped(PREFIX, HEALTH)
    async def ModelMetadata(self, request: oip.ModelMetadataRequest) -> oip.ModelMetadataResponse:
        engine, kind = oip_models.resolve(self.models, request.name, request.version)
        metadata = oip_models.metadata(self.models, engine, request.name, kind)
        metadata.pop("parameters", None)  # the protocol's gRPC message has no field for them; the config gives the classes
        return json_format.ParseDict(metadata, oip.ModelMetadataResponse())

    @uncapped(PREFIX, HEALTH)
    async def ModelConfig(self, request: oip.ModelConfigRequest) -> oip.ModelConfigResponse:
        engine, kind = oip_models.resolve(self.models, request.name, request.version)
        return oip.ModelConfigResponse(config=json_format.ParseDict(oip_models.config(engine, request.name, kind), oip.ModelConfig()))

    @uncapped(PREFIX, HEALTH)
    async def ModelStatistics(self, request: oip.ModelStatisticsRequest) -> oip.ModelStatisticsResponse:
        stats = oip_models.statistics(self.models, self.plane.metrics, request.name, request.version)
        return json_format.ParseDict({"model_stats": stats}, oip.ModelStatisticsResponse())

    @uncapped(PREFIX, HEALTH)
    async def RepositoryIndex(self, request: oip.RepositoryIndexRequest) -> oip.RepositoryIndexResponse:
        return json_format.ParseDict({"models": oip_models.index(self.plane.statuses(), request.ready)}, oip.RepositoryIndexResponse())

    @uncapped(PREFIX, HEALTH)
    async def RepositoryModelLoad(self, request: oip.RepositoryModelLoadRequest) -> oip.RepositoryModelLoadResponse:
        """Loads the model behind the name: NAME, or any of NAME_encoder/_decoder/_sample."""
        await self.plane.load(oip_models.base_name(request.model_name))
        return oip.RepositoryModelLoadResponse()

    @uncapped(PREFIX, HEALTH)
    async def RepositoryModelUnload(self, request: oip.RepositoryModelUnloadRequest) -> oip.RepositoryModelUnloadResponse:
        """Unloads the model behind the name, and with it its three protocol models."""
        await self.plane.unload(oip_models.base_name(request.model_name))
        return oip.RepositoryModelUnloadResponse()

    async def ModelInfer(self, request: oip.ModelInferRequest, context: grpc.aio.ServicerContext) -> oip.ModelInferResponse:
        bad, deadline = refusal(request), deadline_of(context)
        model, version, kind = "", 0, ""
        if bad is None:
            model, version, kind, bad = oip_models.route(request.model_name, request.model_version)
        try:
            async with self.plane.call(PREFIX + "ModelInfer", model, version, deadline, bad) as engine:
                inputs = inputs_of(request)
                outputs = await oip_models.infer(engine, kind, inputs, [o.name for o in request.outputs], deadline)
                response = oip.ModelInferResponse(model_name=request.model_name, model_version=str(engine.spec.version), id=request.id)
                for name, datatype, array in outputs:
                    response.outputs.add(name=name, datatype=datatype, shape=array.shape)
                    response.raw_output_contents.append(np.ascontiguousarray(array, dtype=DATATYPES[datatype]).tobytes())
                return response
        except Exception as err:  # noqa: BLE001
            await abort(context, err)
