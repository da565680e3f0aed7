"""Transport security and authentication: TLS or mutual TLS, bearer tokens, for every front end.

Tokens come from a file (one per line) or the VAE_AUTH_TOKENS environment variable (comma
separated), never from a flag, so they do not show in process listings or in the logged config.
They are compared in constant time. Health checks stay open, so probes need no token.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import os
from collections.abc import Awaitable, Callable
from pathlib import Path

import grpc

from service.errors import PermissionDenied, ServiceError, Unauthenticated

log = logging.getLogger(__name__)

OPEN_PREFIXES = ("/grpc.health.v1.Health/",)


def load_tokens(token_file: Path | None, env: dict[str, str] | None = None, variable: str = "VAE_AUTH_TOKENS") -> list[bytes]:
    env = os.environ if env is None else env
    tokens = [t.strip() for t in env.get(variable, "").split(",")]
    if token_file:
        tokens += [line.strip() for line in Path(token_file).read_text().splitlines()]
    return [t.encode() for t in tokens if t and not t.startswith("#")]


def server_credentials(cert: Path, key: Path, client_ca: Path | None) -> grpc.ServerCredentials:
    """TLS with the server's certificate; with `client_ca`, clients must present a certificate it signed."""
    return grpc.ssl_server_credentials(
        [(Path(key).read_bytes(), Path(cert).read_bytes())],
        root_certificates=Path(client_ca).read_bytes() if client_ca else None,
        require_client_auth=client_ca is not None,
    )


def _digest(token: bytes) -> bytes:
    return hashlib.sha256(token).digest()


def _token_matches(presented: bytes, digests: list[bytes]) -> bool:
    """Constant time: digests of equal length hide the token's length, and every configured token
    is compared, whatever matched first."""
    candidate = _digest(presented)
    matched = False
    for digest in digests:
        matched |= hmac.compare_digest(candidate, digest)
    return matched


class Authorizer:
    """The auth decision every front end asks for, from the `Authorization` header's value.

    Model control takes admin tokens only: an inference token gets PERMISSION_DENIED there. With
    admin tokens alone (no inference tokens), inference is open and only model control is guarded;
    with inference tokens alone, model control is refused to all."""

    def __init__(
        self, tokens: list[bytes], admin_tokens: list[bytes] | None = None, on_denied: Callable[[str], None] | None = None
    ) -> None:  # fmt: skip
        if not tokens and not admin_tokens:
            raise ValueError("token authentication needs at least one token")
        self.digests = [_digest(t) for t in tokens]
        self.admin_digests = [_digest(t) for t in admin_tokens or ()]
        self.on_denied = on_denied

    def check(self, header: str, control: bool, what: str) -> None:
        """Nothing if the header's bearer token may make this call (`control`: model control);
        otherwise Unauthenticated or PermissionDenied, logged and counted. `what` names the call."""
        scheme, _, presented = header.partition(" ")
        token = presented.strip().encode() if scheme.lower() == "bearer" else None
        admin = token is not None and bool(self.admin_digests) and _token_matches(token, self.admin_digests)
        if control:
            if admin:
                return
            if token is not None and self.digests and _token_matches(token, self.digests):
                self._deny(what, "permission_denied", PermissionDenied(
                    "model control needs an admin token (--admin-token-file); this token may only call inference"
                ))  # fmt: skip
        elif admin or not self.digests or (token is not None and _token_matches(token, self.digests)):
            return
        reason = "no bearer token" if not header else "unknown token"
        self._deny(what, "unauthenticated", Unauthenticated(f"{reason}: send 'authorization: Bearer <token>'"))

    def _deny(self, what: str, reason: str, err: Exception) -> None:
        log.warning("auth: denied %r (%s)", what, str(err).split(":")[0])  # %r: a path may hold a newline
        if self.on_denied:
            self.on_denied(reason)
        raise err


class TokenAuth(grpc.aio.ServerInterceptor):
    """The gRPC side of `Authorizer`: a denied call gets a handler that only aborts, and its body is
    never read. `admin_methods` are the model-control methods."""

    def __init__(self, authorizer: Authorizer, admin_methods: frozenset[str] = frozenset()) -> None:
        self.authorizer = authorizer
        self.admin_methods = admin_methods

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        method = details.method
        if method.startswith(OPEN_PREFIXES):
            return await continuation(details)
        header = dict(details.invocation_metadata or ()).get("authorization", "")
        try:
            self.authorizer.check(header, method in self.admin_methods, method)
        except ServiceError as err:
            return _deny(await continuation(details), str(err), getattr(grpc.StatusCode, err.code))
        return await continuation(details)


def _unread(data: bytes) -> None:
    """The deserializer of a denied call: its body is never parsed, so an unauthenticated caller
    costs no message decoding, however large or malformed what it sent."""
    return None


def _deny(
    handler: grpc.RpcMethodHandler | None, message: str, code: grpc.StatusCode = grpc.StatusCode.UNAUTHENTICATED
) -> grpc.RpcMethodHandler:
    """A handler of the same shape as the real one that only aborts with `code`."""

    async def abort(request: object, context: grpc.aio.ServicerContext) -> None:
        await context.abort(code, message)

    async def abort_stream(request: object, context: grpc.aio.ServicerContext):  # noqa: ANN202
        await context.abort(code, message)
        yield  # pragma: no cover - makes this an async generator

    serializer = handler.response_serializer if handler else None
    if handler is not None and handler.response_streaming and not handler.request_streaming:
        return grpc.unary_stream_rpc_method_handler(abort_stream, _unread, serializer)
    if handler is not None and handler.request_streaming:
        return grpc.stream_stream_rpc_method_handler(abort_stream, _unread, serializer)
    return grpc.unary_unary_rpc_method_handler(abort, _unread, serializer)
