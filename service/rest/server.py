"""uvicorn serving the HTTP application inside the server's own asyncio loop, beside grpc.aio, as
MLServer runs its REST server: uvicorn's signal handlers stay off, so the server's own SIGTERM
drain covers both ports."""

from __future__ import annotations

import asyncio
import contextlib
import socket
import ssl
from collections.abc import Iterator
from pathlib import Path

import uvicorn
from starlette.types import ASGIApp


class _Server(uvicorn.Server):
    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        yield  # the serving process owns SIGTERM, SIGINT and SIGHUP


class HttpServer:
    def __init__(
        self, app: ASGIApp, sock: socket.socket, cert: Path | None = None, key: Path | None = None,
        client_ca: Path | None = None,
    ) -> None:  # fmt: skip
        """Serves on `sock`, bound by `service.listen` (uvicorn's own binding makes an IPv6
        wildcard IPv6-only). TLS with `cert` and `key`; with `client_ca`, clients must present a
        certificate it signed."""
        self.sock = sock
        config = uvicorn.Config(
            app, log_level="warning", access_log=False, lifespan="off",
            ssl_certfile=cert, ssl_keyfile=key, ssl_ca_certs=client_ca,
            ssl_cert_reqs=ssl.CERT_REQUIRED if client_ca else ssl.CERT_NONE,
            http="httptools" if _has_httptools() else "h11", loop="none", timeout_graceful_shutdown=1,
        )  # fmt: skip
        self.server = _Server(config)
        self.task: asyncio.Task | None = None

    async def start(self) -> int:
        """Listen; returns the port (the one chosen when asked for port 0)."""
        self.task = asyncio.ensure_future(self.server.serve(sockets=[self.sock]))
        while not self.server.started:
            if self.task.done():
                self.sock.close()  # uvicorn closes it only once started (a bad certificate stops it before)
                self.task.result()  # raises what stopped it
                raise RuntimeError("the HTTP server stopped during its start")
            await asyncio.sleep(0.01)
        return self.server.servers[0].sockets[0].getsockname()[1]

    async def stop(self) -> None:
        """Stop listening, finish the responses being written, close the connections."""
        self.server.should_exit = True
        if self.task is not None:
            await self.task


def _has_httptools() -> bool:
    try:
        import httptools  # noqa: F401 - uvicorn's faster HTTP/1.1 parser, where installed
    except ImportError:
        return False
    return True
