"""Reaching a server's ports as its clients do, by a literal address (127.0.0.1, ::1), so a test
knows which address family answered. Also a command, for clients that must run inside another
network namespace (`ip netns exec NAME python -m tests.reach ...`):

    python -m tests.reach grpc HOST PORT http URL ...

prints one JSON object: each target and what it answered (a status, or the error's name).
"""

from __future__ import annotations

import json
import socket
import sys
import urllib.error
import urllib.request

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from service.listen import grpc_address


def host_has_ipv6() -> bool:
    """Whether ::1 can be bound here (a host or namespace with IPv6 turned off has no ::1)."""
    try:
        with socket.socket(socket.AF_INET6) as s:
            s.bind(("::1", 0))
    except OSError:
        return False
    return True


FAMILIES = ["127.0.0.1", pytest.param("::1", marks=pytest.mark.skipif(not host_has_ipv6(), reason="no IPv6 here"))]


def grpc_health(host: str, port: int, timeout: float = 10.0) -> str:
    """The overall grpc.health.v1 status at host:port ('SERVING'), or the failure's code ('UNAVAILABLE')."""
    try:
        with grpc.insecure_channel(grpc_address(host, port)) as channel:
            reply = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=timeout)
    except grpc.RpcError as err:
        return err.code().name
    return health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status)


def http_get(url: str, timeout: float = 10.0) -> str:
    """The HTTP status of GET url ('200'), or why there was none ('ConnectionRefusedError')."""
    try:
        with urllib.request.urlopen(url, timeout=timeout) as reply:
            return str(reply.status)
    except urllib.error.HTTPError as err:
        return str(err.code)
    except urllib.error.URLError as err:
        return type(err.reason).__name__ if isinstance(err.reason, BaseException) else str(err.reason)
    except OSError as err:
        return type(err).__name__


def url(host: str, port: int, path: str) -> str:
    return f"http://[{host}]:{port}{path}" if ":" in host else f"http://{host}:{port}{path}"


def main(argv: list[str]) -> dict[str, str]:
    found: dict[str, str] = {}
    while argv:
        kind, *argv = argv
        if kind == "grpc":
            host, port, *argv = argv
            found[f"grpc {host} {port}"] = grpc_health(host, int(port))
        elif kind == "http":
            target, *argv = argv
            found[f"http {target}"] = http_get(target)
        else:
            raise SystemExit(f"reach: unknown kind {kind!r} (grpc HOST PORT, or http URL)")
    return found


if __name__ == "__main__":
    print(json.dumps(main(sys.argv[1:])))
