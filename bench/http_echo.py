"""The HTTP transport limit: a bare uvicorn server (raw ASGI, no framework) that reads a request's
body and answers with a prebuilt reply for its path: the very bytes and headers the service gave
for the same request, with no model behind them.

    python -m bench.http_echo --port 18001 --replies replies.json
    replies.json: {"/v2/models/digits_sample/infer": {"body": "reply.bin", "headers": [["inference-header-content-length", "123"]]}}
"""

from __future__ import annotations

import argparse
import asyncio
import json
from pathlib import Path
from typing import Any

import uvicorn

from service import commands


def app_for(replies: dict[str, tuple[bytes, list[tuple[bytes, bytes]]]]) -> Any:
    """An ASGI app answering each path with its reply; 404 for any other."""
    prepared = {
        path: ({"type": "http.response.start", "status": 200, "headers": [(b"content-length", str(len(body)).encode()), *headers]},
               {"type": "http.response.body", "body": body})
        for path, (body, headers) in replies.items()
    }  # fmt: skip
    missing = ({"type": "http.response.start", "status": 404, "headers": [(b"content-length", b"0")]}, {"type": "http.response.body"})

    async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return
        while (await receive()).get("more_body"):
            pass
        start, body = prepared.get(scope["path"], missing)
        await send(start)
        await send(body)

    return app


def load_replies(index: Path) -> dict[str, tuple[bytes, list[tuple[bytes, bytes]]]]:
    listed = json.loads(index.read_text())
    return {
        path: ((index.parent / r["body"]).read_bytes(), [(k.encode(), v.encode()) for k, v in r["headers"]])
        for path, r in listed.items()
    }  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=commands.summary(__doc__))
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--replies", type=Path, required=True)
    args = parser.parse_args()
    app = app_for(load_replies(args.replies))
    config = uvicorn.Config(app, host="127.0.0.1", port=args.port, log_level="warning", access_log=False, lifespan="off", http="httptools")
    asyncio.run(serve(uvicorn.Server(config), args.port))


async def serve(server: uvicorn.Server, port: int) -> None:
    """Serve; say so once the port listens (what the benchmark waits for)."""
    running = asyncio.ensure_future(server.serve())
    while not server.started and not running.done():
        await asyncio.sleep(0.01)
    print(f"http echo on port {port}", flush=True)
    await running


if __name__ == "__main__":
    main()
