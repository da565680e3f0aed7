"""The HTTP application: the Open Inference Protocol's REST routes (`service.rest.oip`), vae.v1's
plain routes (`service.rest.vae`), the OpenAPI document with its docs page served from this port
(Swagger UI's files come from the `swagger-ui-bundle` package: no CDN), and the playground page.

Every error is `{"error": message}` with the HTTP status of its typed error (`service.errors`).
A guard in front of the routes refuses, before any body is read, a caller without a token that
may make the call (401, or 403 for model control without an admin token), and a body over the cap
(413, with the cap in the message)."""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from pathlib import Path

import swagger_ui_bundle
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.openapi.docs import get_swagger_ui_html
from fastapi.responses import FileResponse, HTMLResponse, JSONResponse
from fastapi.staticfiles import StaticFiles
from starlette.exceptions import HTTPException
from starlette.requests import ClientDisconnect
from starlette.middleware.cors import CORSMiddleware
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from service.dataplane import DataPlane
from service.errors import PayloadTooLarge, ServiceError
from service.oip_models import server_metadata
from service.rest import oip, vae
from service.rest.responses import error
from service.security import Authorizer

log = logging.getLogger(__name__)
STATIC = Path(__file__).parent / "static"
# Open without a token, as gRPC's health service is: probes carry none, and the page and the
# docs hold no data (the page asks for a token before it calls the API).
OPEN_PATHS = frozenset({"/", "/v2/health/live", "/v2/health/ready", "/openapi.json", "/docs"})
OPEN_PREFIXES = ("/static/", "/docs/")


@dataclass(frozen=True)
class HttpSettings:
    max_body_bytes: int = 64 * 1024 * 1024
    cors_origins: tuple[str, ...] = ()


def is_control(path: str, method: str) -> bool:
    """Model control: loading and unloading, on either protocol's routes."""
    return method == "POST" and path.endswith(("/load", "/unload")) and path.startswith(("/v2/repository/models/", "/v1/models/"))


class Guard:
    """Auth and the body cap, as plain ASGI in front of the routes, so that a refused request's body
    is never read (a large body from an unknown caller costs nothing but the connection)."""

    def __init__(self, app: ASGIApp, auth: Authorizer | None, max_body_bytes: int) -> None:
        self.app, self.auth, self.max_body_bytes = app, auth, max_body_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "websocket":  # no route speaks it: refused before anything else
            return await send({"type": "websocket.close", "code": 1008})
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        path, method = scope["path"], scope["method"]
        scope.setdefault("state", {})["received"] = time.perf_counter()  # for the metrics of calls refused unrouted
        if self.auth is not None and path not in OPEN_PATHS and not path.startswith(OPEN_PREFIXES):
            header = next((v.decode("latin-1") for k, v in scope["headers"] if k == b"authorization"), "")
            try:
                self.auth.check(header, is_control(path, method), f"{method} {path}")
            except ServiceError as err:
                return await error(err.http_status, str(err))(scope, receive, send)
        length = next((v for k, v in scope["headers"] if k == b"content-length"), None)
        if length is not None and length.isdigit() and int(length) > self.max_body_bytes:
            return await error(413, self._too_large(int(length)))(scope, receive, send)
        received, over = 0, False
        started = False

        async def capped() -> Message:
            """The body as it arrives (chunked, or lying about its length), refused past the cap."""
            nonlocal received, over
            message = await receive()
            received += len(message.get("body", b""))
            if received > self.max_body_bytes:
                over = True
                raise PayloadTooLarge(self._too_large(received, more=True))
            return message

        async def answer(message: Message) -> None:
            """The app's answer, unless the body went over the cap: then 413, whatever the app made
            of the error its body parser met (FastAPI answers those 400)."""
            nonlocal started
            if over:
                if not started:
                    started = True
                    await error(413, self._too_large(received, more=True))(scope, receive, send)
                return
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, capped, answer)
        except ClientDisconnect:
            return  # nobody is left to answer
        except Exception:  # noqa: BLE001 - answered 500 already (the app's handler); logged here, once
            log.error("%s %r failed", method, path, exc_info=True)
            if not started:
                await error(500, "internal error")(scope, receive, send)

    def _too_large(self, size: int, more: bool = False) -> str:
        return f"request body of {'more than ' if more else ''}{size} bytes; at most {self.max_body_bytes} (--max-message-bytes)"


def build_app(plane: DataPlane, auth: Authorizer | None, settings: HttpSettings) -> ASGIApp:
    app = FastAPI(
        title="vae-serve", version=server_metadata()["version"], docs_url=None, redoc_url=None, openapi_url="/openapi.json",
        description="A VAE served over the Open Inference Protocol (KServe v2 REST, `/v2`) and vae.v1 as plain HTTP "
        "(`/v1`). The same models, batchers, limits and metrics answer on the gRPC port.",
    )  # fmt: skip
    app.openapi_version = "3.0.3"  # the bundled Swagger UI (4.x) renders 3.0 documents

    @app.exception_handler(ServiceError)
    async def service_error(request: Request, err: ServiceError) -> JSONResponse:
        return error(err.http_status, str(err))

    @app.exception_handler(RequestValidationError)
    async def invalid(request: Request, err: RequestValidationError) -> JSONResponse:
        """A request FastAPI could not read into a route's parameters: counted under the route's `rpc`
        label (the vae.v1 routes are named for it) as gRPC counts a request it could not parse."""
        rpc = getattr(request.scope.get("route"), "name", "")
        if rpc.startswith(vae.PREFIX):
            plane.metrics.answered(rpc, "INVALID_ARGUMENT", "", "", time.perf_counter() - request.state.received)
        problems = "; ".join(f"{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in err.errors()[:5])
        return error(400, problems)

    @app.exception_handler(HTTPException)
    async def http_error(request: Request, err: HTTPException) -> JSONResponse:
        return error(err.status_code, str(err.detail))

    @app.exception_handler(Exception)
    async def internal(request: Request, err: Exception) -> JSONResponse:
        """The answer to a fault; Starlette raises it on after answering, and the guard logs it."""
        return error(500, f"internal error: {type(err).__name__}")

    app.include_router(oip.router(plane))
    app.include_router(vae.router(plane))
    app.mount("/docs/assets", StaticFiles(directory=swagger_ui_bundle.swagger_ui_path), name="docs-assets")
    app.mount("/static", StaticFiles(directory=STATIC), name="static")

    @app.get("/docs", include_in_schema=False)
    async def docs() -> HTMLResponse:
        return get_swagger_ui_html(
            openapi_url="/openapi.json", title="vae-serve API", swagger_js_url="/docs/assets/swagger-ui-bundle.js",
            swagger_css_url="/docs/assets/swagger-ui.css", swagger_favicon_url="/docs/assets/favicon-32x32.png",
        )  # fmt: skip

    @app.get("/", include_in_schema=False)
    async def playground() -> FileResponse:
        return FileResponse(STATIC / "playground.html", media_type="text/html")

    guarded: ASGIApp = Guard(app, auth, settings.max_body_bytes)
    if settings.cors_origins:  # outermost, so a preflight needs no token
        guarded = CORSMiddleware(
            guarded, allow_origins=list(settings.cors_origins), allow_methods=["GET", "POST"],
            allow_headers=["authorization", "content-type", "inference-header-content-length"],
            expose_headers=["inference-header-content-length"],
        )  # fmt: skip
    return guarded
