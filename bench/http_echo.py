"""The HTTP transport limit: a bare uvicorn server (raw ASGI, no framework) that reads any request's
body and answers with a prebuilt response, the very bytes and headers the service gave for the
same request, with no model behind it.

    python -m bench.http_echo --port 18001 --body response.bin --header inference-header-content-length:123
"""

from __future__ import annotations

import argparse
from pathlib import Path

import uvicorn


def app_for(body: bytes, headers: list[tuple[bytes, bytes]]):  # noqa: ANN201 - an ASGI callable
    start = {"type": "http.response.start", "status": 200, "headers": [(b"content-length", str(len(body)).encode()), *headers]}
    reply = {"type": "http.response.body", "body": body}

    async def app(scope, receive, send) -> None:  # noqa: ANN001
        if scope["type"] != "http":
            return
        while (await receive()).get("more_body"):
            pass
        await send(start)
        await send(reply)

    return app


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--body", type=Path, required=True)
    parser.add_argument("--header", action="append", default=[], help="name:value, repeated")
    args = parser.parse_args()
    headers = [tuple(h.encode() for h in item.split(":", 1)) for item in args.header]
    print(f"http echo on port {args.port}", flush=True)
    uvicorn.run(app_for(args.body.read_bytes(), headers), host="127.0.0.1", port=args.port, log_level="warning",
                access_log=False, lifespan="off", http="httptools")  # fmt: skip


if __name__ == "__main__":
    main()
