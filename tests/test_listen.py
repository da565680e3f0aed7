"""Every port the server opens, with its default addresses, takes IPv4 and IPv6 clients: on this
host, on one whose `net.ipv6.bindv6only` is 1, and on one with IPv6 turned off (the last two in
network namespaces made here, which needs root and iproute2: CI has both, elsewhere they skip).
An explicit address binds just that one. Clients connect by 127.0.0.1 and ::1, never by a name
that would hide which family answered."""

from __future__ import annotations

import contextlib
import json
import os
import re
import socket
import subprocess
import sys
import uuid
from collections.abc import Iterator

import pytest
import tritonclient.http as triton_http

from tests.conftest import ROOT, ServerProcess
from tests.helpers import free_port
from tests.reach import FAMILIES, grpc_health, host_has_ipv6, http_get, url


def health_port(server: ServerProcess) -> int:
    return int(re.search(r"health alone, in plaintext, on port (\d+)", server.log.read_text())[1])


def probes(server: ServerProcess, host: str) -> list[str]:
    """`python -m tests.reach` arguments for every port of `server`, by `host`."""
    return [
        "grpc", host, str(server.port), "grpc", host, str(health_port(server)),
        "http", url(host, server.http_port, "/v2/health/ready"), "http", url(host, server.metrics_port, "/metrics"),
    ]  # fmt: skip


SERVING = ["SERVING", "SERVING", "200", "200"]


@pytest.fixture(scope="module")
def default_server(model_repo, tmp_path_factory):
    """The server with its default addresses (only the ports chosen), as `make run` and the image start it."""
    log = tmp_path_factory.mktemp("defaults") / "server.log"
    proc = ServerProcess(model_repo, log, "--health-port", str(free_port()), http=True, loopback=False)
    yield proc
    assert proc.terminate() == 0


@pytest.mark.parametrize("host", FAMILIES)
def test_default_addresses_take_each_family_on_every_port(default_server, host):
    from tests.reach import main as reach

    assert list(reach(probes(default_server, host)).values()) == SERVING
    # The Open Inference Protocol's own client, by the literal address.
    client = triton_http.InferenceServerClient(f"[{host}]:{default_server.http_port}" if ":" in host else
                                               f"{host}:{default_server.http_port}")  # fmt: skip
    assert client.is_server_ready() and client.is_model_ready("digits_decoder")
    # The log says what each port binds.
    said = re.search(r"listening: (.*)", default_server.log.read_text())[1]
    for what in ("gRPC", "HTTP", "health", "metrics"):
        assert re.search(rf"{what} \[::\]:\d+ \(IPv4 and IPv6\)", said), said


def test_an_explicit_address_binds_that_address_alone(model_repo, tmp_path, server):
    # The session's server binds 127.0.0.1 on every port: IPv6 clients are refused, not served.
    if host_has_ipv6():
        assert grpc_health("::1", server.port, timeout=5) == "UNAVAILABLE"
        assert http_get(url("::1", server.metrics_port, "/metrics")) == "ConnectionRefusedError"
    assert grpc_health("127.0.0.1", server.port) == "SERVING"
    if not host_has_ipv6():
        pytest.skip("no IPv6 here: ::1 alone cannot be bound")
    with ipv4_side_held(4) as (port, health, http, metrics):
        proc = ServerProcess(model_repo, tmp_path / "server.log", "--host", "::1", "--metrics-addr", "[::1]",
                             "--port", str(port), "--health-port", str(health), "--http-port", str(http),
                             "--metrics-port", str(metrics), http=True, loopback=False)  # fmt: skip
        try:
            from tests.reach import main as reach

            assert list(reach(probes(proc, "::1")).values()) == SERVING
            refused = reach(probes(proc, "127.0.0.1"))
            assert list(refused.values()) == ["UNAVAILABLE", "UNAVAILABLE", "ConnectionRefusedError",
                                              "ConnectionRefusedError"], refused  # fmt: skip
        finally:
            assert proc.terminate() == 0


@contextlib.contextmanager
def ipv4_side_held(count: int) -> Iterator[list[int]]:
    """`count` ports free on ::1 whose 127.0.0.1 side this test holds bound and not listening, so
    that the kernel refuses an IPv4 client there: a server that a test running beside this one
    (pytest -n) started on 127.0.0.1 cannot take the same number and answer in its place."""
    held: list[socket.socket] = []
    try:
        while len(held) < count:
            with socket.socket(socket.AF_INET6) as six:
                six.bind(("::1", 0))
                four = socket.socket(socket.AF_INET)
                try:
                    four.bind(("127.0.0.1", six.getsockname()[1]))
                except OSError:
                    four.close()
                    continue
                held.append(four)
        yield [s.getsockname()[1] for s in held]
    finally:
        for s in held:
            s.close()


def test_an_address_that_is_not_one_is_refused_in_one_line(model_repo):
    done = subprocess.run(
        [sys.executable, "-m", "service", "--model-repo", str(model_repo), "--metrics-addr", "no-such-host.invalid",
         "--port", "0", "--http-port", "0", "--metrics-port", "0"],
        cwd=ROOT, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert done.returncode == 2, done.stderr
    assert "cannot serve: --metrics-addr no-such-host.invalid: no address to listen on" in done.stderr
    assert "Traceback" not in done.stderr


def test_a_port_in_use_is_named_in_one_line(model_repo):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        done = subprocess.run(
            [sys.executable, "-m", "service", "--model-repo", str(model_repo), "--host", "127.0.0.1",
             "--metrics-addr", "127.0.0.1", "--port", "0", "--http-port", str(taken.getsockname()[1]),
             "--metrics-port", "0"],
            cwd=ROOT, capture_output=True, text=True, timeout=120,
        )  # fmt: skip
    assert done.returncode == 2, done.stderr
    assert re.search(r"cannot serve: cannot listen for HTTP on 127\.0\.0\.1:\d+: Address already in use", done.stderr)
    assert "Traceback" not in done.stderr


class NetNamespace:
    """A network namespace of its own (`ip netns`), its loopback up, with the sysctls given; the
    server and its clients run in it through `launcher`."""

    def __init__(self, *sysctls: str) -> None:
        self.name = f"vae-test-{uuid.uuid4().hex[:8]}"
        self.launcher = ("ip", "netns", "exec", self.name)
        subprocess.run(["ip", "netns", "add", self.name], check=True, capture_output=True)
        try:
            if sysctls:
                self.run("sysctl", "-qw", *sysctls)
            self.run("ip", "link", "set", "lo", "up")
        except BaseException:
            self.close()
            raise

    def run(self, *cmd: str) -> str:
        return subprocess.run([*self.launcher, *cmd], check=True, capture_output=True, text=True, cwd=ROOT,
                              timeout=120).stdout  # fmt: skip

    def reach(self, args: list[str]) -> dict[str, str]:
        return json.loads(self.run(sys.executable, "-m", "tests.reach", *args))

    def close(self) -> None:
        subprocess.run(["ip", "netns", "delete", self.name], capture_output=True)


@pytest.fixture
def namespace(request):
    """NetNamespace(*request.param); skipped without root or iproute2, except in CI, where it must run."""
    try:
        ns = NetNamespace(*request.param)
    except (OSError, subprocess.CalledProcessError) as err:
        reason = f"cannot make a network namespace here (needs root and iproute2): {getattr(err, 'stderr', '') or err}"
        if os.environ.get("CI") == "true":
            pytest.fail(reason)
        pytest.skip(reason)
    yield ns
    ns.close()


@pytest.mark.parametrize("namespace", [("net.ipv6.bindv6only=1",)], indirect=True)
def test_a_host_that_makes_ipv6_sockets_ipv6_only_still_serves_ipv4(namespace, model_repo, tmp_path):
    assert namespace.run("sysctl", "-n", "net.ipv6.bindv6only").strip() == "1"
    proc = ServerProcess(model_repo, tmp_path / "server.log", "--health-port", "50052", http=True, loopback=False,
                         launcher=namespace.launcher)  # fmt: skip
    try:
        for host in ("127.0.0.1", "::1"):
            assert list(namespace.reach(probes(proc, host)).values()) == SERVING, host
    finally:
        assert proc.terminate() == 0


IPV6_OFF = ("net.ipv6.conf.all.disable_ipv6=1", "net.ipv6.conf.default.disable_ipv6=1", "net.ipv6.conf.lo.disable_ipv6=1")


@pytest.mark.parametrize("namespace", [IPV6_OFF], indirect=True)
def test_a_host_without_ipv6_starts_and_serves_ipv4(namespace, model_repo, tmp_path):
    assert "inet6" not in namespace.run("ip", "address", "show", "lo")
    proc = ServerProcess(model_repo, tmp_path / "server.log", "--health-port", "50052", http=True, loopback=False,
                         launcher=namespace.launcher)  # fmt: skip
    try:
        assert list(namespace.reach(probes(proc, "127.0.0.1")).values()) == SERVING
    finally:
        assert proc.terminate() == 0


@pytest.mark.parametrize("host", ["[::]", "127.0.0.1"])
def test_connections_on_a_bound_socket_send_small_answers_at_once(host):
    """asyncio (so uvicorn) turns Nagle's algorithm off only on sockets that say they are TCP; a
    socket made without IPPROTO_TCP left keep-alive HTTP clients waiting ~40 ms per request."""
    import asyncio

    from service.listen import endpoint

    async def accepted_nodelay() -> int:
        got: asyncio.Future[int] = asyncio.get_running_loop().create_future()

        def connected(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            got.set_result(writer.get_extra_info("socket").getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY))
            writer.close()

        sock = endpoint(host, 0).bind()
        server = await asyncio.start_server(connected, sock=sock)
        _, writer = await asyncio.open_connection("127.0.0.1", sock.getsockname()[1])
        try:
            return await got
        finally:
            writer.close()
            server.close()

    assert asyncio.run(accepted_nodelay()) != 0
