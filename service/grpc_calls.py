"""What both gRPC front ends (vae.v1 and the Open Inference Protocol) share: registering a servicer
with deserializers that cannot fail, a call's deadline, and typed errors as status codes.

Requests are parsed by a deserializer that cannot fail: bytes that are no valid message become a
request the handler refuses with INVALID_ARGUMENT, rather than gRPC's own INTERNAL.
"""

from __future__ import annotations

import functools
from collections.abc import Awaitable, Callable
from typing import Any

import grpc
from google.protobuf.message import DecodeError

from service.dataplane import deadline_in
from service.errors import BadRequest, code_of


class Malformed:
    """What the deserializer hands over when the bytes are not a valid message."""

    def __init__(self, message: str, error: str) -> None:
        self.error = BadRequest(f"request is not a valid {message}: {error}")


def _parse(message: type) -> Callable[[bytes], Any]:
    def parse(data: bytes) -> Any:
        try:
            return message.FromString(data)
        except (DecodeError, ValueError, RuntimeError) as err:
            return Malformed(message.__name__, str(err) or type(err).__name__)

    return parse


def refusal(request: Any) -> BadRequest | None:
    return request.error if isinstance(request, Malformed) else None


def deadline_of(context: grpc.aio.ServicerContext) -> float | None:
    return deadline_in(context.time_remaining())


async def abort(context: grpc.aio.ServicerContext, err: Exception) -> None:
    """End the call with the error's status code; its message travels in a size-limited trailer."""
    await context.abort(getattr(grpc.StatusCode, code_of(err)), str(err)[:1000])


def uncapped(prefix: str = "", while_draining: frozenset[str] = frozenset()) -> Callable[..., Any]:
    """A decorator for handlers of calls that are not inference (listings, metadata, health, model
    control): counted and timed under `rpc` label prefix + name, not held to --max-concurrent-calls;
    those named in `while_draining` also answer during a drain. The handler takes (self, request)."""

    def decorate(handler: Callable[..., Awaitable[Any]]) -> Callable[..., Awaitable[Any]]:
        name = handler.__name__

        @functools.wraps(handler)
        async def wrapped(self: Any, request: Any, context: grpc.aio.ServicerContext) -> Any:
            try:
                async with self.plane.uncapped(prefix + name, while_draining=name in while_draining):
                    bad = refusal(request)
                    if bad:
                        raise bad
                    return await handler(self, request)
            except Exception as err:  # noqa: BLE001 - typed errors become their status code, others INTERNAL
                await abort(context, err)

        return wrapped

    return decorate


def add_to_server(servicer: Any, server: grpc.aio.Server, module: Any, service: str) -> None:
    """Register every RPC of `service` (in the generated `module`) with the servicer's method of
    the same name, each with a deserializer that cannot fail."""
    descriptor = module.DESCRIPTOR.services_by_name[service]
    handlers = {}
    for method in descriptor.methods:
        request, response = getattr(module, method.input_type.name), getattr(module, method.output_type.name)
        make = grpc.unary_stream_rpc_method_handler if method.server_streaming else grpc.unary_unary_rpc_method_handler
        handlers[method.name] = make(
            getattr(servicer, method.name), request_deserializer=_parse(request), response_serializer=response.SerializeToString
        )
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(descriptor.full_name, handlers),))
