"""The HTTP port under abuse and under shutdown: a fuzz of malformed requests gets no server fault,
and SIGTERM drains the calls admitted on both ports before closing them."""

import json
import random
import signal
import socket
import threading

import grpc
import httpx
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from service.api.vae.v1 import vae_pb2 as pb
from service.api.vae.v1 import vae_pb2_grpc
from tests.conftest import ServerProcess, wait_for
from tests.helpers import metric, scrape

PATHS = [
    "/", "/docs", "/openapi.json", "/v2", "/v2/health/live", "/v2/health/ready", "/v2/models/stats",
    "/v2/models/{m}", "/v2/models/{m}/ready", "/v2/models/{m}/config", "/v2/models/{m}/stats", "/v2/models/{m}/infer",
    "/v2/models/{m}/versions/{v}/infer", "/v2/models/{m}/versions/{v}", "/v2/repository/index",
    "/v2/repository/models/{m}/load", "/v2/repository/models/{m}/unload", "/v1/models", "/v1/models/{n}",
    "/v1/models/{n}/sample", "/v1/models/{n}/sample.png", "/v1/models/{n}/encode", "/v1/models/{n}/decode",
    "/v1/models/{n}/reconstruct", "/v1/models/{n}/reconstruct.png", "/v1/models/{n}/interpolate", "/v1/models/{n}/score",
]  # fmt: skip
NAMES = ["digits", "digits_sample", "digits_decoder", "digits_encoder", "nope", "", "digits_", "_sample", "%00", "..", "a" * 300, "ü"]
INPUTS = ["num_samples", "seed", "temperature", "z", "x", "images", "latents", "", "q"]
TYPES = ["FP32", "INT64", "INT32", "FP64", "UINT8", "BYTES", "BOOL", "fp32", "", None, 7]
METHODS = ["GET", "POST", "POST", "POST", "PUT", "DELETE", "PATCH", "HEAD", "OPTIONS"]


def value(rng: random.Random, depth: int = 0):
    kind = rng.randrange(9 if depth < 3 else 6)
    return [
        lambda: None, lambda: rng.choice([True, False]), lambda: rng.randint(-(2**70), 2**70), lambda: rng.uniform(-1e40, 1e40),
        lambda: rng.choice(["", "x" * rng.randrange(100), "NaN", "1e999"]), lambda: rng.choice([float("nan"), 0, 1, -1, 1024, 10**6]),
        lambda: [value(rng, depth + 1) for _ in range(rng.randrange(4))],
        lambda: {rng.choice(["shape", "data", "b64", "name", "dtype", "format", "steps"]): value(rng, depth + 1) for _ in range(rng.randrange(4))},
        lambda: [rng.random() for _ in range(rng.choice([0, 1, 7, 8, 64, 65]))],
    ][kind]()  # fmt: skip


def tensor(rng: random.Random) -> dict:
    shape = rng.choice([[1], [2, 8], [1, 1, 8, 8], [-1, 8], [0, 8], [10**9, 10**9], [], [1, 9], [2**62, 0], [10**30, 0], [1] * 70,
                        [2**20, 2**20], value(rng)])
    spec = {"name": rng.choice(INPUTS), "datatype": rng.choice(TYPES), "shape": shape}
    if rng.random() < 0.5:
        spec["data"] = value(rng) if rng.random() < 0.3 else [rng.random() for _ in range(rng.choice([1, 8, 16, 64, 3]))]
    else:
        spec["parameters"] = {"binary_data_size": rng.choice([0, 1, 8, 32, 64, 256, -4, 10**12, "x", None])}
    return spec


def request(rng: random.Random) -> dict:
    path = rng.choice(PATHS).format(m=rng.choice(NAMES), n=rng.choice(NAMES), v=rng.choice(["1", "0", "-1", "x", "99", "%C2%B2", "%D9%A1"]))
    if rng.random() < 0.05:
        path += "/" + "".join(rng.choice("ab/%?#.~") for _ in range(rng.randrange(12)))
    headers = {}
    if rng.random() < 0.3:
        headers["content-type"] = rng.choice(["application/json", "text/plain", "multipart/form-data; boundary=x", "application/octet-stream", "x/y"])
    if rng.random() < 0.2:
        headers["authorization"] = rng.choice(["Bearer", "Bearer x", "Basic abc", "", "bearer " + "z" * 500])
    if rng.random() < 0.1:
        headers["accept-encoding"] = rng.choice(["gzip", "br", "*"])
    kind = rng.randrange(6)
    if kind == 0:
        body = bytes(rng.randrange(256) for _ in range(rng.randrange(300)))
    elif kind == 5:  # JSON nested past any parser's recursion
        body = rng.choice([b"[", b'{"a":']) * rng.choice([10, 1000, 100_000])
    elif kind == 1:
        body = json.dumps(value(rng)).encode()
    else:  # an inference request, possibly with a binary tail whose lengths disagree with its header
        head = {"inputs": [tensor(rng) for _ in range(rng.randrange(4))]}
        if rng.random() < 0.3:
            head["outputs"] = [{"name": rng.choice(["images", "seed", "mu", "x", 3]), "parameters": value(rng)}]
        if rng.random() < 0.1:  # a seed past INT64
            head["inputs"].append({"name": "seed", "datatype": "UINT64", "shape": [1], "data": [rng.choice([2**63, 2**64 - 1, 2**64])]})
        if rng.random() < 0.3:
            head["parameters"] = rng.choice([{"binary_data_output": True}, {"timeout": rng.randint(-5, 10**7)}, value(rng)])
        for key in ("num_samples", "seed", "temperature", "format", "latents", "images", "image_files", "steps", "start"):
            if rng.random() < 0.15:
                head[key] = value(rng)
        text = json.dumps(head).encode()
        tail = bytes(rng.randrange(256) for _ in range(rng.choice([0, 4, 32, 64, 100])))
        body = text + tail
        if tail or rng.random() < 0.3:
            headers["inference-header-content-length"] = rng.choice([str(n) for n in (len(text), len(text) - 1, len(body) + 5, 0, -3)]
                                                                   + ["x", b"\xb2"])  # fmt: skip
    return {"method": rng.choice(METHODS), "url": path, "headers": headers, "content": body}


@pytest.fixture(scope="module")
def server(model_repo, tmp_path_factory):
    """Model control is behind an admin token the fuzz never sends: it reaches those routes, but
    cannot unload what the rest of it calls."""
    tmp = tmp_path_factory.mktemp("fuzz")
    (tmp / "admin").write_text("admin-only\n")
    proc = ServerProcess(model_repo, tmp / "server.log", "--max-message-bytes", str(1 << 20), "--admin-token-file", str(tmp / "admin"),
                         http=True)  # fmt: skip
    yield proc
    proc.terminate()


def test_ten_thousand_malformed_requests_get_no_server_fault(server):
    rng = random.Random(20261206)
    statuses: dict[int, int] = {}
    with httpx.Client(base_url=server.http_url, timeout=60) as web:
        for i in range(10_000):
            spec = request(rng)
            try:
                r = web.request(**spec)
            except httpx.RemoteProtocolError as err:  # the server dropped the connection: name the request
                raise AssertionError(f"request {i} {spec['method']} {spec['url']} dropped: {err}") from err
            statuses[r.status_code] = statuses.get(r.status_code, 0) + 1
            assert r.status_code < 500, f"request {i}: {spec['method']} {spec['url']} {spec['headers']} -> {r.status_code} {r.text[:300]}"
            if r.status_code >= 400 and spec["method"] != "HEAD" and r.headers.get("content-type") == "application/json":
                assert "error" in r.json(), (i, r.text[:300])
        assert web.get("/v2/health/ready").status_code == 200
        assert web.get("/v1/models/digits/sample.png", params={"n": 4, "seed": 1}).status_code == 200
    assert sum(statuses.values()) == 10_000 and len(statuses) > 3, statuses  # a fuzz that reached many answers
    assert metric(scrape(server), "vae_requests_total", code="INTERNAL") == 0


def test_sigterm_drains_calls_on_both_ports_then_closes_them(model_repo, tmp_path):
    proc = ServerProcess(
        model_repo, tmp_path / "drain.log", "--max-batch-delay-ms", "5000", "--batch-delay", "always",
        "--max-batch-rows", "8", "--grace-seconds", "60", http=True,
    )  # fmt: skip
    web = httpx.Client(base_url=proc.http_url, timeout=60)
    answers: list[httpx.Response] = []
    http_call = threading.Thread(target=lambda: answers.append(web.post("/v1/models/digits/sample", json={"num_samples": 2, "seed": 3})))
    with grpc.insecure_channel(proc.target) as channel:
        stub = vae_pb2_grpc.VaeServiceStub(channel)
        grpc_call = stub.Sample.future(pb.SampleRequest(num_samples=3, seed=1), timeout=60)
        http_call.start()
        wait_for(lambda: metric(scrape(proc), "vae_queue_rows", graph="decoder") == 5)  # both admitted, held for a batch
        proc.proc.send_signal(signal.SIGTERM)
        with httpx.Client(base_url=proc.http_url, timeout=30) as probe:
            wait_for(lambda: probe.get("/v2/health/ready").status_code == 400)
            refused = probe.post("/v1/models/digits/sample", json={"num_samples": 1})
            assert refused.status_code == 503 and "shutting down" in refused.json()["error"]
            assert probe.get("/v2/health/live").status_code == 200
        health = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(service=""), timeout=5)
        assert health.status == health_pb2.HealthCheckResponse.NOT_SERVING
        assert grpc_call.result().images.tensor.shape == [3, 1, 8, 8]
        http_call.join(60)
        assert answers[0].status_code == 200 and answers[0].json()["images"]["shape"] == [2, 1, 8, 8]
    web.close()
    assert proc.proc.wait(60) == 0
    for closed in (proc.http_port, proc.port):
        with pytest.raises(OSError), socket.create_connection(("127.0.0.1", closed), timeout=5):
            pass
    log = proc.log.read_text()
    assert "stopped" in log and "after the grace period" not in log
