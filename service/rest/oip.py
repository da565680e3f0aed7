"""The Open Inference Protocol over HTTP (KServe v2 REST, with Triton's model repository,
configuration, statistics and binary tensor data extensions), so that `tritonclient.http` and any
other client of the protocol work. A thin front end over the data plane and `service.oip_models`:
the same three models per served model as over gRPC, the same bytes for the same request
(`rpc` label `http.oip.<method>`). Not-ready answers 400, as Triton's do."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Request
from starlette.responses import Response

from service import oip_models
from service.dataplane import DataPlane, deadline_in, within
from service.rest.responses import json_response
from service.rest.bodies import HEADER_LENGTH, asked_outputs, loads, read_inputs, split_body, write_response

PREFIX = "http.oip."
INFER_BODY = {
    "requestBody": {
        "content": {
            "application/json": {"schema": {"type": "object", "description": "an inference request (KServe v2 REST)"}},
            "application/octet-stream": {
                "schema": {"type": "string", "format": "binary"},
                "description": "Triton's binary tensor data: a JSON header of Inference-Header-Content-Length bytes, then the raw tensors",
            },
        }
    }
}  # fmt: skip


def _timeout(head: dict[str, Any]) -> float | None:
    """tritonclient's `timeout` (microseconds, in the request's parameters) as seconds."""
    value = (head.get("parameters") or {}).get("timeout") if isinstance(head.get("parameters"), dict) else None
    return value / 1e6 if isinstance(value, int) and not isinstance(value, bool) and value > 0 else None


def router(plane: DataPlane) -> APIRouter:
    api = APIRouter(prefix="/v2", tags=["Open Inference Protocol"])
    models = plane.models

    @api.api_route("/health/live", methods=["GET", "HEAD"], summary="The server is live")
    async def live() -> Response:
        async with plane.uncapped(PREFIX + "ServerLive", while_draining=True):
            return json_response({"live": True})

    @api.api_route("/health/ready", methods=["GET", "HEAD"], summary="The server is ready (400 while loading or draining)")
    async def ready() -> Response:
        async with plane.uncapped(PREFIX + "ServerReady", while_draining=True):
            return json_response({"ready": plane.ready}, 200 if plane.ready else 400)

    @api.get("", summary="Server metadata")
    async def server() -> Response:
        async with plane.uncapped(PREFIX + "ServerMetadata"):
            return json_response(oip_models.server_metadata())

    async def _ready(model: str, version: str = "") -> Response:
        async with plane.uncapped(PREFIX + "ModelReady", while_draining=True):
            ok = not plane.draining and oip_models.model_ready(models, model, version)
            return json_response({"name": model, "ready": ok}, 200 if ok else 400)

    async def _metadata(model: str, version: str = "") -> Response:
        async with plane.uncapped(PREFIX + "ModelMetadata"):
            engine, kind = oip_models.resolve(models, model, version)
            return json_response(oip_models.metadata(models, engine, model, kind))

    async def _config(model: str, version: str = "") -> Response:
        async with plane.uncapped(PREFIX + "ModelConfig"):
            engine, kind = oip_models.resolve(models, model, version)
            return json_response(oip_models.config(engine, model, kind))

    async def _stats(model: str = "", version: str = "") -> Response:
        async with plane.uncapped(PREFIX + "ModelStatistics"):
            return json_response({"model_stats": oip_models.statistics(models, plane.metrics, model, version)})

    async def _infer(request: Request, model: str, version: str = "") -> Response:
        body = await request.body()  # before the call: a slow upload holds no --max-concurrent-calls slot
        base, number, kind, refusal = oip_models.route(model, version)
        async with plane.call(PREFIX + "ModelInfer", base, number, None, refusal) as engine:
            head, tail = split_body(body, request.headers.get(HEADER_LENGTH))
            inputs = read_inputs(head, tail)
            names, binary = asked_outputs(head)
            deadline = deadline_in(_timeout(head))
            async with within(deadline):
                outputs = await oip_models.infer(engine, kind, inputs, names, deadline)
            answer: dict[str, Any] = {"model_name": model, "model_version": str(engine.spec.version)}
            if isinstance(head.get("id"), str):
                answer["id"] = head["id"]
            body, header_length = write_response(answer, outputs, binary)
        if header_length is None:
            return Response(body, media_type="application/json")
        return Response(body, media_type="application/octet-stream", headers={"Inference-Header-Content-Length": str(header_length)})

    api.add_api_route("/models/stats", _stats, methods=["GET"], summary="Every model's statistics")  # before /models/{model}
    for path in ("/models/{model}", "/models/{model}/versions/{version}"):
        api.add_api_route(path, _metadata, methods=["GET"], summary="Model metadata")
        api.add_api_route(path + "/ready", _ready, methods=["GET"], summary="Model ready (400 if not)")
        api.add_api_route(path + "/config", _config, methods=["GET"], summary="Model configuration, as Triton's")
        api.add_api_route(path + "/stats", _stats, methods=["GET"], summary="Model statistics")
        api.add_api_route(path + "/infer", _infer, methods=["POST"], summary="Inference", openapi_extra=INFER_BODY)

    @api.post("/repository/index", summary="The repository's models and their states")
    async def index(request: Request) -> Response:
        body = await request.body()
        async with plane.uncapped(PREFIX + "RepositoryIndex"):
            asked = loads(body) if body.strip() else {}
            ready_only = isinstance(asked, dict) and asked.get("ready") is True
            return json_response(oip_models.index(plane.statuses(), ready_only))

    @api.post("/repository/models/{model}/load", summary="Load a model (admin token)")
    async def load(model: str) -> Response:
        async with plane.uncapped(PREFIX + "RepositoryModelLoad"):
            await plane.load(oip_models.base_name(model))
            return json_response({})

    @api.post("/repository/models/{model}/unload", summary="Unload a model (admin token)")
    async def unload(model: str) -> Response:
        async with plane.uncapped(PREFIX + "RepositoryModelUnload"):
            await plane.unload(oip_models.base_name(model))
            return json_response({})

    return api
