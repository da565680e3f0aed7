"""Where each port listens: one rule for the gRPC, HTTP, health and metrics ports.

A wildcard host (`[::]`, `::` or empty, the defaults) takes IPv4 and IPv6 clients on one socket:
IPv6 with IPV6_V6ONLY cleared explicitly, since asyncio (so uvicorn) sets it and a host's
`net.ipv6.bindv6only` may too; on a host without IPv6 it is IPv4's `0.0.0.0`. Any other host binds
just that address: `0.0.0.0` all of IPv4, `127.0.0.1` or `::1` one loopback. gRPC's core applies
the same rule to `[::]` by itself; the HTTP and metrics ports get their sockets from here.
"""

from __future__ import annotations

import contextlib
import socket
from collections.abc import Iterator
from dataclasses import dataclass

from service.config import ConfigError

WILDCARDS = ("", "::")


def bare(host: str) -> str:
    """'[::1]' -> '::1': the address without URL brackets."""
    return host.strip().removeprefix("[").removesuffix("]")


def grpc_address(host: str, port: int) -> str:
    """gRPC's 'host:port', with an IPv6 address in brackets ('::1' -> '[::1]:50051')."""
    h = bare(host)
    if h in WILDCARDS:
        h = "::"
    return f"[{h}]:{port}" if ":" in h else f"{h}:{port}"


@dataclass(frozen=True)
class Endpoint:
    """A resolved listening address: its family, the address to bind, and whether the socket also
    takes IPv4 clients (IPv4-mapped addresses on an IPv6 wildcard)."""

    family: socket.AddressFamily
    address: tuple
    dual_stack: bool

    def prepare(self, sock: socket.socket) -> None:
        """The options a listening socket needs before bind()."""
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if self.family == socket.AF_INET6:
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0 if self.dual_stack else 1)

    def bind(self) -> socket.socket:
        """A socket bound to this endpoint (not yet listening)."""
        # IPPROTO_TCP, not 0: asyncio sets TCP_NODELAY only on sockets that say they are TCP, and
        # without it a keep-alive client's small requests wait out Nagle and delayed ACKs (~40 ms).
        sock = socket.socket(self.family, socket.SOCK_STREAM, socket.IPPROTO_TCP)
        try:
            self.prepare(sock)
            sock.bind(self.address)
        except BaseException:
            sock.close()
            raise
        return sock

    def describe(self, port: int) -> str:
        """How the log names it: '[::]:8000 (IPv4 and IPv6)', '127.0.0.1:9090'."""
        host = self.address[0]
        where = f"[{host}]:{port}" if self.family == socket.AF_INET6 else f"{host}:{port}"
        return f"{where} (IPv4 and IPv6)" if self.dual_stack else where


def endpoint(host: str, port: int, flag: str = "--host") -> Endpoint:
    """The endpoint `host` names; a wildcard is dual-stack where the host has IPv6, else IPv4's.
    ConfigError, naming `flag`, for a host that resolves to no address."""
    h = bare(host)
    if h in WILDCARDS:
        if _has_ipv6():
            return Endpoint(socket.AF_INET6, ("::", port), True)
        return Endpoint(socket.AF_INET, ("0.0.0.0", port), False)
    try:
        infos = socket.getaddrinfo(h, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except socket.gaierror as err:
        raise ConfigError(f"{flag} {host}: no address to listen on ({err.strerror})") from None
    addresses = sorted({info[4][0] for info in infos})
    if len(addresses) > 1:  # gRPC would bind them all and the other ports one: say which, once
        raise ConfigError(
            f"{flag} {host} names {len(addresses)} addresses ({', '.join(addresses)}): give one, or [::] for all"
        )
    family, _, _, _, address = infos[0]
    return Endpoint(family, address, False)


def _has_ipv6() -> bool:
    """Whether this host can bind an IPv6 wildcard socket (a kernel booted with ipv6.disable=1 cannot)."""
    if not socket.has_ipv6:
        return False
    try:
        Endpoint(socket.AF_INET6, ("::", 0), True).bind().close()
    except OSError:  # no IPv6 here (EAFNOSUPPORT ...), or a sandbox that forbids it: IPv4 alone
        return False
    return True


@contextlib.contextmanager
def binding(what: str, where: Endpoint) -> Iterator[None]:
    """Turns a failure to listen (a port in use, an address this host lacks) into one ConfigError
    line naming the port; gRPC says it with a RuntimeError."""
    try:
        yield
    except (OSError, RuntimeError) as err:
        reason = err.strerror if isinstance(err, OSError) and err.strerror else str(err)
        raise ConfigError(f"cannot listen for {what} on {where.describe(where.address[1])}: {reason}") from None
