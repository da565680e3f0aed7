"""The HTTP port on the real server: the Open Inference Protocol's REST API called with the real
`tritonclient.http`, and vae.v1's plain routes called with httpx, each compared with the gRPC
port's answers for the same request."""

import io
import json

import grpc
import httpx
import numpy as np
import pytest
import tritonclient.grpc as triton_grpc
import tritonclient.http as triton
from PIL import Image
from tritonclient.utils import InferenceServerException

from service.client import VaeClient
from service.imaging import grid
from tests.conftest import ServerProcess
from tests.helpers import metric, scrape

ADMIN = "admin-secret"


@pytest.fixture(scope="module")
def server(model_repo, tmp_path_factory):
    """A server with an HTTP port; model control needs the admin token, inference is open."""
    tmp = tmp_path_factory.mktemp("http")
    (tmp / "admin").write_text(ADMIN + "\n")
    proc = ServerProcess(model_repo, tmp / "server.log", "--admin-token-file", str(tmp / "admin"), "--max-batch-delay-ms", "5",
                         "--max-message-bytes", str(1 << 20), http=True)  # fmt: skip
    yield proc
    proc.terminate()


@pytest.fixture(scope="module")
def client(server):
    c = triton.InferenceServerClient(server.http_url.removeprefix("http://"))
    yield c
    c.close()


@pytest.fixture(scope="module")
def web(server):
    with httpx.Client(base_url=server.http_url, timeout=60) as c:
        yield c


def inp(name: str, array: np.ndarray, binary: bool = True) -> triton.InferInput:
    t = triton.InferInput(name, list(array.shape), {np.float32: "FP32", np.int64: "INT64"}[array.dtype.type])
    t.set_data_from_numpy(array, binary_data=binary)
    return t


def grpc_infer(server, model: str, feed: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    with triton_grpc.InferenceServerClient(server.target) as c:
        inputs = []
        for name, a in feed.items():
            t = triton_grpc.InferInput(name, list(a.shape), {np.float32: "FP32", np.int64: "INT64"}[a.dtype.type])
            t.set_data_from_numpy(a)
            inputs.append(t)
        result = c.infer(model, inputs)
        return {o.name: result.as_numpy(o.name) for o in result.get_response().outputs}


def refused(call) -> tuple[str, str]:
    with pytest.raises(InferenceServerException) as err:
        call()
    return err.value.status(), err.value.message()


def test_health_metadata_config_and_index(client):
    assert client.is_server_live() and client.is_server_ready()
    meta = client.get_server_metadata()
    assert meta["name"] == "vae-serve" and "binary_tensor_data" in meta["extensions"]
    for kind in ("encoder", "decoder", "sample"):
        assert client.is_model_ready(f"digits_{kind}") and client.is_model_ready(f"digits_{kind}", "1")
        m = client.get_model_metadata(f"digits_{kind}")
        assert m["name"] == f"digits_{kind}" and m["versions"] == ["1"]
    decoder = client.get_model_metadata("digits_decoder", "1")
    assert decoder["inputs"] == [{"name": "z", "datatype": "FP32", "shape": [-1, 8]}]
    config = client.get_model_config("digits_encoder")
    assert config["max_batch_size"] == 1024 and config["input"][0]["dims"] == [1, 8, 8]
    index = client.get_model_repository_index()
    assert {(m["name"], m["state"]) for m in index} == {(f"digits_{k}", "READY") for k in ("encoder", "decoder", "sample")}


def test_infer_on_all_three_models_binary_and_json_equals_grpc(client, server):
    rng = np.random.default_rng(0)
    feeds = {
        "digits_sample": {"num_samples": np.array([5], np.int64), "seed": np.array([7], np.int64)},
        "digits_decoder": {"z": rng.standard_normal((3, 8)).astype(np.float32)},
        "digits_encoder": {"x": rng.random((4, 1, 8, 8)).astype(np.float32)},
    }
    for model, feed in feeds.items():
        expected = grpc_infer(server, model, feed)
        for binary in (True, False):
            result = client.infer(model, [inp(n, a, binary) for n, a in feed.items()],
                                  outputs=None if binary else [triton.InferRequestedOutput(n, binary_data=False) for n in expected])  # fmt: skip
            for name, want in expected.items():
                got = result.as_numpy(name)
                assert got.dtype == want.dtype and got.shape == want.shape, (model, name, binary)
                assert got.tobytes() == want.tobytes(), (model, name, binary)
    stats = client.get_inference_statistics("digits_decoder")["model_stats"][0]
    assert stats["name"] == "digits_decoder" and int(stats["inference_count"]) > 0


def test_errors_have_status_and_message(client, server, web):
    assert "not found" in refused(lambda: client.get_model_metadata("nope_decoder"))[1]
    r = web.get("/v2/models/nope_decoder")
    assert r.status_code == 404 and "not found" in r.json()["error"]
    r = web.get("/v2/models/digits_decoder/versions/7")
    assert r.status_code == 404 and "version" in r.json()["error"]
    r = web.get("/v2/models/digits_decoder/versions/7/ready")
    assert r.status_code == 400 and r.json()["ready"] is False
    bad = {"inputs": [{"name": "z", "datatype": "FP32", "shape": [1, 9], "data": [0.0] * 9}]}
    r = web.post("/v2/models/digits_decoder/infer", json=bad)
    assert r.status_code == 400 and r.json()["error"] == "input 'z': shape [1, 9]; must be [N, 8]"
    status, message = refused(lambda: client.infer("digits_decoder", [inp("z", np.full((1, 8), np.nan, np.float32))]))
    assert "contains NaN" in message
    r = web.post("/v2/models/digits_decoder/infer", content=b'{"inputs": []}xx', headers={"Inference-Header-Content-Length": "99"})
    assert r.status_code == 400 and "Inference-Header-Content-Length" in r.json()["error"]
    head = json.dumps({"inputs": [{"name": "z", "datatype": "FP32", "shape": [1, 8], "parameters": {"binary_data_size": 32}}]}).encode()
    r = web.post("/v2/models/digits_decoder/infer", content=head + bytes(16), headers={"Inference-Header-Content-Length": str(len(head))})
    assert r.status_code == 400 and "binary_data_size 32 runs past the 16 bytes" in r.json()["error"]
    r = web.post("/v2/models/digits_decoder/infer", content=b"{not json")
    assert r.status_code == 400 and "not valid JSON" in r.json()["error"]
    r = web.post("/v2/models/digits_decoder/infer", content=bytes(2 << 20))
    assert r.status_code == 413 and str(1 << 20) in r.json()["error"]
    assert web.get("/v2/nothing/here").status_code == 404 and "error" in web.get("/v2/nothing/here").json()
    assert web.get("/v2/health/ready").status_code == 200


def test_load_and_unload_need_the_admin_token(client, web):
    status, message = refused(lambda: client.unload_model("digits"))
    assert "no bearer token" in message
    r = web.post("/v2/repository/models/digits/unload", headers={"Authorization": "Bearer wrong"})
    assert r.status_code == 401 and "unknown token" in r.json()["error"]
    admin = {"Authorization": f"Bearer {ADMIN}"}
    client.unload_model("digits_sample", headers=admin)
    r = web.get("/v2/models/digits_sample/ready")
    assert r.status_code == 400 and r.json()["ready"] is False
    assert web.get("/v2/health/ready").status_code == 400  # no model left to serve
    client.load_model("digits", headers=admin)
    assert client.is_model_ready("digits_sample") and client.is_server_ready()


def grpc_samples(server, n: int, seed: int, **kw) -> np.ndarray:
    with VaeClient(server.target) as vae:
        return vae.sample(n, seed=seed, **kw)


def test_sample_png_is_the_grid_of_grpc_samples(server, web):
    r = web.get("/v1/models/digits/sample.png", params={"n": 9, "seed": 1, "temperature": 0.8})
    assert r.status_code == 200 and r.headers["content-type"] == "image/png"
    buf = io.BytesIO()
    grid(grpc_samples(server, 9, 1, temperature=0.8)).save(buf, format="PNG", compress_level=1)
    assert r.content == buf.getvalue()
    assert web.get("/v1/models/digits/sample.png", params={"n": 9, "seed": 2}).content != r.content


def test_json_routes_give_grpc_bytes(server, web):
    with VaeClient(server.target) as vae:
        pngs = vae.sample(3, seed=5, format="png")
        x = vae.sample(2, seed=6)
        mu, sigma = vae.encode(x)[:2]
        decoded = vae.decode(mu)
        scores = vae.score(x, k=16, seed=3)
    r = web.post("/v1/models/digits/sample", json={"num_samples": 3, "seed": 5, "format": "png"})
    assert r.status_code == 200 and r.json()["seed"] == 5 and r.json()["model_name"] == "digits"
    import base64

    assert [base64.b64decode(p) for p in r.json()["images"]["png"]] == pngs
    tensor = {"shape": list(x.shape), "b64": base64.b64encode(x.tobytes()).decode()}
    e = web.post("/v1/models/digits/encode", json={"images": tensor}).json()
    assert np.array(e["mu"]["data"], np.float32).tobytes() == mu.ravel().tobytes()
    assert np.array(e["sigma"]["data"], np.float32).tobytes() == sigma.ravel().tobytes()
    d = web.post("/v1/models/digits/decode", json={"latents": {"shape": list(mu.shape), "data": mu.tolist()}, "encoding": "base64"}).json()
    assert base64.b64decode(d["images"]["b64"]) == decoded.tobytes()
    s = web.post("/v1/models/digits/score", json={"images": {"shape": list(x.shape), "data": x.tolist()}, "importance_samples": 16, "seed": 3}).json()
    assert [v["log_likelihood"] for v in s["scores"]] == pytest.approx(scores["log_likelihood"].tolist(), rel=1e-6)
    i = web.post("/v1/models/digits/interpolate", json={"start": {"latent": {"shape": [8], "data": [0.0] * 8}},
                                                        "end": {"latent": {"shape": [8], "data": [1.0] * 8}}, "steps": 5}).json()  # fmt: skip
    assert i["latents"]["shape"] == [5, 8] and i["images"]["shape"] == [5, 1, 8, 8]
    assert metric(scrape(server), "vae_requests_total", rpc="http.Sample", code="OK", model="digits") >= 1


BAD = [
    ("post", "/v1/models/digits/sample", {"content": b"{oops", "headers": {"content-type": "application/json"}}, 400, "JSON"),
    ("post", "/v1/models/digits/sample", {"content": b"num_samples=3", "headers": {"content-type": "text/plain"}}, 400, "body"),
    ("post", "/v1/models/digits/sample", {"json": {"num_samples": 0}}, 400, "num_samples: 0; must be between 1 and 1024"),
    ("post", "/v1/models/digits/sample", {"json": {"num_samples": 2, "temperature": -1}}, 400, "temperature"),
    ("post", "/v1/models/nope/sample", {"json": {"num_samples": 1}}, 404, "nope"),
    ("get", "/v1/models/digits?version=9", {}, 404, "version"),
    ("post", "/v1/models/digits/decode", {"json": {"latents": {"shape": [1, 8], "data": [1e30] * 8}}}, 400, "magnitude"),
    ("post", "/v1/models/digits/decode", {"json": {"latents": {"shape": [1, 8], "b64": "!!"}}}, 400, "base64"),
    ("post", "/v1/models/digits/reconstruct", {"json": {"image_files": ["aGVsbG8="]}}, 400, "image_files[0]: not an image"),
    ("post", "/v1/models/digits/reconstruct.png", {"files": {"image": ("a.txt", b"hello", "text/plain")}}, 400, "image"),
    ("post", "/v1/models/digits/reconstruct.png", {"json": {}}, 400, "image"),
    ("post", "/v1/models/digits/sample", {"content": bytes(2 << 20)}, 413, "at most 1048576"),
    ("post", "/v1/models/digits/load", {}, 401, "bearer token"),
    ("post", "/v1/models/digits/decode", {"json": {"latents": {"shape": [2**20, 2**20], "data": []}}}, 400, "elements; at most"),
    ("post", "/v1/models/digits/decode", {"json": {"latents": {"shape": [10**23], "data": []}}}, 400, "dimensions must be"),
    ("post", "/v1/models/digits/decode", {"json": {"latents": {"shape": [1, 8], "dtype": "uint8", "data": [0] * 8}}}, 400, "float32"),
    ("post", "/v2/models/digits_decoder/infer", {"json": {"inputs": [{"name": "z", "datatype": "FP32", "shape": [10**30, 0], "data": []}]}},
     400, "dimensions must be"),
    ("post", "/v2/models/digits_decoder/infer", {"json": {"inputs": [{"name": "z", "datatype": "FP32", "shape": [1] * 70, "data": [0]}]}},
     400, "70 dimensions"),
    ("post", "/v2/models/digits_sample/infer", {"json": {"inputs": [
        {"name": "num_samples", "datatype": "INT64", "shape": [1], "data": [1]},
        {"name": "seed", "datatype": "UINT64", "shape": [1], "data": [2**63]}]}}, 400, "2^63 - 1"),
    ("post", "/v2/models/digits_sample/infer", {"json": {"inputs": [{"name": "num_samples", "datatype": "INT64", "shape": [1], "data": [1]}],
                                                         "outputs": [{"name": "seed", "parameters": [1]}]}}, 400, "'parameters'"),
    ("post", "/v2/models/digits_sample/infer", {"content": b"[" * 100000}, 400, "nests too deeply"),
    ("post", "/v2/models/digits_sample/infer", {"content": b"{}", "headers": {"Inference-Header-Content-Length": b"\xb2"}}, 400,
     "Inference-Header-Content-Length"),
    ("get", "/v2/models/digits_sample/versions/%C2%B2", {}, 400, "give a version number"),
    ("get", "/v2/models/digits_sample/versions/%D9%A1/ready", {}, 400, "give a version number"),
    ("get", "/v1/models/digits/sample.png?timeout=0", {}, 400, "timeout: Input should be greater than 0"),
    ("post", "/v1/models/digits/sample?timeout=nan", {"json": {"num_samples": 1}}, 400, "timeout: Input should be a finite number"),
]  # fmt: skip


@pytest.mark.parametrize("method, path, kw, status, message", BAD, ids=[f"{p}-{m}" for _, p, _, _, m in BAD])
def test_bad_requests_are_refused_clearly_and_the_server_goes_on(web, method, path, kw, status, message):
    r = getattr(web, method)(path, **kw)
    assert r.status_code == status, r.text
    assert message in r.json()["error"], r.json()
    assert web.get("/v1/models/digits/sample.png", params={"n": 1, "seed": 0}).status_code == 200


def test_unreadable_requests_are_counted_under_their_rpc(server, web):
    """FastAPI refuses these before the route runs; the metrics count them as gRPC counts a request
    it could not parse."""
    before = scrape(server)
    assert web.get("/v1/models/digits/sample.png", params={"n": "abc"}).status_code == 400
    assert web.post("/v1/models/digits/encode", json={"sample": "perhaps"}).status_code == 400
    after = scrape(server)
    for rpc in ("http.Sample", "http.Encode"):
        labels = {"rpc": rpc, "code": "INVALID_ARGUMENT"}
        assert metric(after, "vae_requests_total", **labels) == metric(before, "vae_requests_total", **labels) + 1
    assert metric(after, "vae_request_duration_seconds_count", rpc="http.Encode") > metric(
        before, "vae_request_duration_seconds_count", rpc="http.Encode"
    )


def test_health_answers_head_for_probes_that_send_it(web):
    for path in ("/v2/health/live", "/v2/health/ready"):
        r = web.head(path)
        assert r.status_code == 200 and r.content == b""
        assert web.get(path).json() in ({"live": True}, {"ready": True})


def upload(fmt: str) -> bytes:
    rng = np.random.default_rng(1)
    buf = io.BytesIO()
    Image.fromarray((rng.random((40, 30, 3)) * 255).astype(np.uint8)).save(buf, format=fmt)
    return buf.getvalue()


def test_uploaded_png_and_jpeg_reconstruct_as_over_grpc(server, web):
    files = [upload("PNG"), upload("JPEG")]
    with VaeClient(server.target) as vae:
        expected = vae.reconstruct(files, format="png")
    for data, want in zip(files, expected):
        r = web.post("/v1/models/digits/reconstruct.png", files={"image": ("photo", data, "application/octet-stream")})
        assert r.status_code == 200 and r.headers["content-type"] == "image/png"
        assert r.content == want
    both = web.post("/v1/models/digits/reconstruct.png", files=[("image", ("a.png", files[0])), ("image", ("b.jpg", files[1]))])
    assert Image.open(io.BytesIO(both.content)).size[0] > Image.open(io.BytesIO(expected[0])).size[0]  # a grid of two


def test_a_chunked_body_over_the_cap_is_413_on_every_route(web):
    def chunks():  # a well-formed start, so that every parser reads on: one file part without end
        yield b'--x\r\nContent-Disposition: form-data; name="image"; filename="a.png"\r\n\r\n'
        for _ in range(40):
            yield b"x" * (64 << 10)

    multipart = "multipart/form-data; boundary=x"
    for path, kind in (("/v1/models/digits/sample", "application/json"), ("/v2/models/digits_sample/infer", "application/json"),
                       ("/v1/models/digits/reconstruct.png", multipart)):  # fmt: skip
        r = web.post(path, content=chunks(), headers={"content-type": kind})
        assert r.status_code == 413 and "more than" in r.json()["error"], (path, r.text)


def test_openapi_document_and_docs_page_work_offline(web):
    doc = web.get("/openapi.json").json()
    assert "/v1/models/{name}/sample.png" in doc["paths"] and "/v2/models/{model}/infer" in doc["paths"]
    page = web.get("/docs").text
    assert "/docs/assets/swagger-ui-bundle.js" in page and "cdn" not in page.lower()
    for asset in ("/docs/assets/swagger-ui-bundle.js", "/docs/assets/swagger-ui.css"):
        assert web.get(asset).status_code == 200


def test_tokens_guard_http_as_grpc_and_cors_admits_only_listed_origins(model_repo, tmp_path):
    (tmp_path / "tokens").write_text("user-token\n")
    proc = ServerProcess(model_repo, tmp_path / "s.log", "--auth-token-file", str(tmp_path / "tokens"),
                         "--cors-origins", "https://page.example", http=True)  # fmt: skip
    try:
        with httpx.Client(base_url=proc.http_url, timeout=30) as web:
            assert web.get("/v2/health/ready").status_code == 200  # probes carry no token
            r = web.post("/v2/models/digits_sample/infer", json={"inputs": []})
            assert r.status_code == 401 and "no bearer token" in r.json()["error"]
            user = {"Authorization": "Bearer user-token"}
            assert web.get("/v1/models/digits/sample.png", params={"n": 1}, headers=user).status_code == 200
            r = web.post("/v1/models/digits/unload", headers=user)
            assert r.status_code == 403 and "admin token" in r.json()["error"]
            preflight = {"Origin": "https://page.example", "Access-Control-Request-Method": "POST",
                         "Access-Control-Request-Headers": "authorization,content-type"}  # fmt: skip
            r = web.options("/v1/models/digits/sample", headers=preflight)  # a preflight carries no token
            assert r.status_code == 200 and r.headers["access-control-allow-origin"] == "https://page.example"
            r = web.options("/v1/models/digits/sample", headers=preflight | {"Origin": "https://other.example"})
            assert "access-control-allow-origin" not in r.headers
            r = web.get("/v1/models", headers=user | {"Origin": "https://page.example"})
            assert r.headers["access-control-allow-origin"] == "https://page.example"
        with pytest.raises(grpc.RpcError) as err, VaeClient(proc.target) as vae:
            vae.sample(1)
        assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED
    finally:
        proc.terminate()
