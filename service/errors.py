"""The errors a request can meet, as one set of typed exceptions shared by every front end.

The data plane and what lies below it raise these; each front end maps `code` to its own wire:
gRPC front ends to the status code of the same name, HTTP to `HTTP_STATUS` (Triton's mapping
where Triton has one) with a `{"error": message}` body. Anything else that escapes is INTERNAL.
"""

from __future__ import annotations

from typing import ClassVar

# HTTP statuses by gRPC code name: Triton's for the codes it maps, the usual ones for the rest.
HTTP_STATUS = {
    "INVALID_ARGUMENT": 400,
    "FAILED_PRECONDITION": 400,
    "UNAUTHENTICATED": 401,
    "PERMISSION_DENIED": 403,
    "NOT_FOUND": 404,
    "RESOURCE_EXHAUSTED": 429,
    "INTERNAL": 500,
    "UNAVAILABLE": 503,
    "DEADLINE_EXCEEDED": 504,
}


class ServiceError(Exception):
    """An error a caller can act on; `code` names the gRPC status it maps to."""

    code: ClassVar[str] = "INTERNAL"

    @property
    def http_status(self) -> int:
        return HTTP_STATUS[self.code]


class BadRequest(ServiceError, ValueError):
    """A malformed request; the message says what is wrong."""

    code = "INVALID_ARGUMENT"


class NotFound(ServiceError, LookupError):
    code = "NOT_FOUND"


class Unavailable(ServiceError, RuntimeError):
    code = "UNAVAILABLE"


class ResourceExhausted(ServiceError, RuntimeError):
    code = "RESOURCE_EXHAUSTED"


class DeadlineExceeded(ServiceError, RuntimeError):
    code = "DEADLINE_EXCEEDED"


class FailedPrecondition(ServiceError, RuntimeError):
    code = "FAILED_PRECONDITION"


class Internal(ServiceError, RuntimeError):
    """A fault of the server, not of the request: logged, and answered with INTERNAL."""

    code = "INTERNAL"


class Unauthenticated(ServiceError):
    code = "UNAUTHENTICATED"


class PermissionDenied(ServiceError):
    code = "PERMISSION_DENIED"


class TooManyCalls(ResourceExhausted):
    """The server already runs --max-concurrent-calls calls."""


class PayloadTooLarge(ResourceExhausted):
    """An HTTP body over the size cap: 413, where gRPC's own message limit answers RESOURCE_EXHAUSTED."""

    http_status = 413  # type: ignore[assignment]


def code_of(err: BaseException) -> str:
    return err.code if isinstance(err, ServiceError) else "INTERNAL"
