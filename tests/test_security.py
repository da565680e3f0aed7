"""TLS, mutual TLS and bearer tokens on the real server: the right client gets in, every wrong one
gets the right status code."""

import asyncio
import ssl
from types import SimpleNamespace

import grpc
import httpx
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha.proto_reflection_descriptor_database import ProtoReflectionDescriptorDatabase

from service.api.vae.v1 import vae_pb2 as pb
from service.api.vae.v1 import vae_pb2_grpc
from service.client import VaeClient
from service.config import parse_config
from service.security import Authorizer, TokenAuth, load_tokens
from tests.certs import CA
from tests.conftest import ServerProcess
from tests.helpers import free_port, metric, scrape

TOKEN = "s3cret-token-for-tests"


@pytest.fixture(scope="module")
def pki(tmp_path_factory):
    folder = tmp_path_factory.mktemp("pki")
    ca, rogue = CA(folder, "ca"), CA(folder, "rogue")
    return {
        "ca": ca.path, "rogue_ca": rogue.path, "server": ca.issue("server", server=True),
        "client": ca.issue("client", server=False), "rogue_client": rogue.issue("rogue-client", server=False),
    }  # fmt: skip


def tls_context(ca, client: tuple | None = None) -> ssl.SSLContext:
    context = ssl.create_default_context(cafile=str(ca))
    if client:
        context.load_cert_chain(*map(str, client))
    return context


def refused(make_client, code=grpc.StatusCode.UNAVAILABLE) -> str:
    with make_client() as client, pytest.raises(grpc.RpcError) as err:
        client.sample(1, seed=0)
    assert err.value.code() == code, err.value.details()
    return err.value.details()


def test_tls(model_repo, pki, tmp_path):
    cert, key = pki["server"]
    health_port = free_port()
    proc = ServerProcess(
        model_repo, tmp_path / "tls.log", "--tls-cert", str(cert), "--tls-key", str(key), "--health-port", str(health_port),
        http=True,
    )  # fmt: skip
    try:
        with grpc.insecure_channel(f"127.0.0.1:{health_port}") as channel:  # probes speak plaintext
            status = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=5).status
            assert status == health_pb2.HealthCheckResponse.SERVING
            with pytest.raises(grpc.RpcError) as err:  # and that port offers nothing else
                vae_pb2_grpc.VaeServiceStub(channel).GetModelInfo(pb.GetModelInfoRequest(), timeout=5)
            assert err.value.code() == grpc.StatusCode.UNIMPLEMENTED
        with VaeClient(proc.target, ca=pki["ca"]) as client:
            assert client.sample(2, seed=0).shape == (2, 1, 8, 8)
        refused(lambda: VaeClient(proc.target, timeout=5))  # plaintext against TLS
        refused(lambda: VaeClient(proc.target, timeout=5, ca=pki["rogue_ca"]))  # server not trusted
        https = proc.http_url.replace("http://", "https://")  # the HTTP port has the same certificate
        assert httpx.get(https + "/v1/models", verify=tls_context(pki["ca"])).json()["default_model"] == "digits"
        with pytest.raises(httpx.TransportError):
            httpx.get(proc.http_url + "/v1/models")  # plaintext against TLS
        with pytest.raises(httpx.ConnectError):
            httpx.get(https + "/v1/models", verify=tls_context(pki["rogue_ca"]))
    finally:
        assert proc.terminate() == 0
    assert "transport: TLS" in proc.log.read_text()


def test_mutual_tls(model_repo, pki, tmp_path):
    cert, key = pki["server"]
    proc = ServerProcess(
        model_repo, tmp_path / "mtls.log", "--tls-cert", str(cert), "--tls-key", str(key), "--tls-client-ca", str(pki["ca"]),
        http=True,
    )  # fmt: skip
    try:
        client_cert, client_key = pki["client"]
        with VaeClient(proc.target, ca=pki["ca"], cert=client_cert, key=client_key) as client:
            assert client.info().name == "digits"
        refused(lambda: VaeClient(proc.target, timeout=5, ca=pki["ca"]))  # no client certificate
        rogue_cert, rogue_key = pki["rogue_client"]
        refused(lambda: VaeClient(proc.target, timeout=5, ca=pki["ca"], cert=rogue_cert, key=rogue_key))
        https = proc.http_url.replace("http://", "https://") + "/v1/models"
        assert httpx.get(https, verify=tls_context(pki["ca"], pki["client"])).status_code == 200
        for without in (tls_context(pki["ca"]), tls_context(pki["ca"], pki["rogue_client"])):
            with pytest.raises(httpx.TransportError):  # the handshake fails: no request is read
                httpx.get(https, verify=without)
    finally:
        assert proc.terminate() == 0
    assert "transport: mutual TLS" in proc.log.read_text()


def test_bearer_tokens(model_repo, tmp_path):
    tokens = tmp_path / "tokens"
    tokens.write_text(f"# one per line\nother-token\n{TOKEN}\n")
    proc = ServerProcess(model_repo, tmp_path / "auth.log", "--auth-token-file", str(tokens))
    try:
        with VaeClient(proc.target, token=TOKEN) as client:
            assert client.sample(2, seed=0).shape == (2, 1, 8, 8)
            assert client.sample_stream(3, seed=1).shape == (3, 1, 8, 8)
        assert "no bearer token" in refused(lambda: VaeClient(proc.target), grpc.StatusCode.UNAUTHENTICATED)
        assert "unknown token" in refused(lambda: VaeClient(proc.target, token=TOKEN + "x"), grpc.StatusCode.UNAUTHENTICATED)
        with VaeClient(proc.target) as client, pytest.raises(grpc.RpcError) as err:
            client.sample_stream(3, seed=1)
        assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED
        with grpc.insecure_channel(proc.target) as channel:  # probes need no token
            status = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest()).status
            assert status == health_pb2.HealthCheckResponse.SERVING
            with pytest.raises(grpc.RpcError):  # reflection is not open
                ProtoReflectionDescriptorDatabase(channel).get_services()
        assert metric(scrape(proc), "vae_rejections_total", reason="unauthenticated") == 4
    finally:
        assert proc.terminate() == 0
    log = proc.log.read_text()
    assert "auth: denied '/vae.v1.VaeService/Sample' (unknown token)" in log
    assert "bearer tokens on a plaintext port travel in clear" in log  # no --tls-cert here
    assert TOKEN not in log


def test_a_denied_call_is_never_parsed():
    """The interceptor's answer to an unknown caller reads nothing: the real handler's
    deserializer, which would decode the body, is never called."""
    parsed = []

    def deserializer(data: bytes) -> bytes:
        parsed.append(data)
        return data

    async def handler(request: object, context: object) -> None:
        raise AssertionError("a denied call reached the handler")

    real = {
        "unary": grpc.unary_unary_rpc_method_handler(handler, deserializer, bytes),
        "server streaming": grpc.unary_stream_rpc_method_handler(handler, deserializer, bytes),
        "bidirectional": grpc.stream_stream_rpc_method_handler(handler, deserializer, bytes),
    }
    auth = TokenAuth(Authorizer([TOKEN.encode()]))
    for kind, method in real.items():

        async def continuation(details: object, method=method) -> grpc.RpcMethodHandler:
            return method

        details = SimpleNamespace(method="/vae.v1.VaeService/Sample", invocation_metadata=(("authorization", "Bearer nope"),))
        denied = asyncio.run(auth.intercept_service(continuation, details))
        assert denied is not method and denied.request_deserializer is not deserializer, kind
        assert denied.request_deserializer(b"\xff" * 1000) is None, kind
        assert (denied.request_streaming, denied.response_streaming) == (method.request_streaming, method.response_streaming)
    assert parsed == []


def test_tokens_from_environment_and_file(tmp_path):
    (tmp_path / "t").write_text("b\n\n# comment\nc\n")
    assert load_tokens(tmp_path / "t", env={"VAE_AUTH_TOKENS": "a, ,d"}) == [b"a", b"d", b"b", b"c"]
    assert load_tokens(None, env={}) == []


def test_tls_flags_must_come_together(tmp_path):
    with pytest.raises(SystemExit):
        parse_config(["--tls-cert", str(tmp_path / "c")], env={})
    with pytest.raises(SystemExit):
        parse_config(["--tls-client-ca", str(tmp_path / "ca")], env={})
    assert parse_config([], env={}).tls_cert is None
