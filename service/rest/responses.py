"""Response bodies shared by the HTTP routes."""

from __future__ import annotations

import json
from typing import Any

from starlette.responses import JSONResponse, Response


def error(status: int, message: str) -> JSONResponse:
    """Every HTTP error's body: `{"error": message}`, as Triton's HTTP API answers."""
    return JSONResponse({"error": message[:1000]}, status_code=status)


def json_response(body: Any, status: int = 200) -> Response:
    """JSON without FastAPI's validation pass: the bodies here are plain dicts and lists already."""
    return Response(json.dumps(body, separators=(",", ":")), status_code=status, media_type="application/json")
