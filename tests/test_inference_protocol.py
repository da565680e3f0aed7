"""The Open Inference Protocol on the real server, called with the real `tritonclient` (gRPC).

tritonclient brings its own generated `inference.*` messages; the server's live in the server
process only (this process never imports service.oip_grpc or service.server), since one
descriptor pool holds each symbol once.
"""

from collections import Counter

import grpc
import numpy as np
import onnxruntime as ort
import pytest
import tritonclient.grpc as triton
from grpc_health.v1 import health_pb2, health_pb2_grpc
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from tritonclient.grpc import service_pb2, service_pb2_grpc
from tritonclient.utils import InferenceServerException

from service.client import VaeClient
from tests.conftest import ServerProcess
from tests.helpers import metric, scrape


def tensor(name: str, array: np.ndarray) -> triton.InferInput:
    datatype = {np.float32: "FP32", np.int64: "INT64"}[array.dtype.type]
    t = triton.InferInput(name, list(array.shape), datatype)
    t.set_data_from_numpy(array)
    return t


def onnx(path, feed: dict[str, np.ndarray]) -> list[np.ndarray]:
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return session.run(None, feed)


@pytest.fixture(scope="module")
def client(server):
    with triton.InferenceServerClient(server.target) as c:
        yield c


def refused(call) -> tuple[grpc.StatusCode | str, str]:
    with pytest.raises(InferenceServerException) as err:
        call()
    return err.value.status(), err.value.message()


def test_server_and_model_metadata(client, model_repo):
    assert client.is_server_live() and client.is_server_ready()
    meta = client.get_server_metadata(as_json=True)
    assert meta["name"] == "vae-serve" and set(meta["extensions"]) == {"model_repository", "model_configuration", "statistics", "binary_tensor_data"}
    for kind in ("encoder", "decoder", "sample"):
        assert client.is_model_ready(f"digits_{kind}") and client.is_model_ready(f"digits_{kind}", "1")
    assert not client.is_model_ready("digits_encoder", "9")
    enc = client.get_model_metadata("digits_encoder", as_json=True)
    assert enc["versions"] == ["1"] and enc["platform"] == "onnxruntime_onnx"
    # The same names, datatypes and shapes as the Triton configs export wrote for these files.
    assert [(t["name"], t["datatype"], t["shape"]) for t in enc["inputs"]] == [("x", "FP32", ["-1", "1", "8", "8"])]
    assert [(t["name"], t["shape"]) for t in enc["outputs"]] == [("mu", ["-1", "8"]), ("logvar", ["-1", "8"])]
    dec = client.get_model_metadata("digits_decoder", as_json=True)
    assert [(t["name"], t["shape"]) for t in dec["outputs"]] == [("logits", ["-1", "1", "8", "8"]), ("image", ["-1", "1", "8", "8"])]
    exported = (model_repo / "digits" / "1" / "decoder.config.pbtxt").read_text()
    assert 'name: "z"' in exported and 'name: "logits"' in exported and "dims: [ 1, 8, 8 ]" in exported

    config = client.get_model_config("digits_decoder", as_json=True)["config"]
    assert config["max_batch_size"] == 1024 and config["dynamic_batching"]["preferred_batch_size"] == [256]
    assert [(i["name"], i["data_type"], i["dims"]) for i in config["input"]] == [("z", "TYPE_FP32", ["8"])]
    sample = client.get_model_config("digits_sample", as_json=True)["config"]
    assert [(i["name"], i.get("optional", False)) for i in sample["input"]] == [
        ("num_samples", False), ("seed", True), ("temperature", True), ("temperatures", True)
    ]  # fmt: skip
    index = client.get_model_repository_index(as_json=True)["models"]
    assert {(m["name"], m["version"], m["state"]) for m in index} == {
        (f"digits_{k}", "1", "READY") for k in ("encoder", "decoder", "sample")
    }  # fmt: skip


def test_encoder_and_decoder_answer_as_onnx_runtime(client, server, model_repo):
    rng = np.random.default_rng(0)
    x = rng.random((5, 1, 8, 8), dtype=np.float32)
    result = client.infer("digits_encoder", [tensor("x", x)])
    mu, logvar = onnx(model_repo / "digits" / "1" / "encoder.onnx", {"x": x})
    np.testing.assert_allclose(result.as_numpy("mu"), mu, atol=1e-5)
    np.testing.assert_allclose(result.as_numpy("logvar"), logvar, atol=1e-5)
    assert result.get_response().model_version == "1"

    z = rng.standard_normal((7, 8), dtype=np.float32)
    only = client.infer("digits_decoder", [tensor("z", z)], outputs=[triton.InferRequestedOutput("logits")])
    logits, image = onnx(model_repo / "digits" / "1" / "decoder.onnx", {"z": z})
    np.testing.assert_allclose(only.as_numpy("logits"), logits, atol=1e-5)
    assert only.as_numpy("image") is None  # only the output asked for
    np.testing.assert_allclose(client.infer("digits_decoder", [tensor("z", z)]).as_numpy("image"), image, atol=1e-6)
    # Typed contents instead of raw bytes: the same answer.
    request = service_pb2.ModelInferRequest(model_name="digits_decoder")
    request.inputs.add(name="z", datatype="FP32", shape=[7, 8]).contents.fp32_contents.extend(z.ravel().tolist())
    with grpc.insecure_channel(server.target) as channel:
        response = service_pb2_grpc.GRPCInferenceServiceStub(channel).ModelInfer(request, timeout=30)
    np.testing.assert_allclose(np.frombuffer(response.raw_output_contents[0], "<f4").reshape(7, 1, 8, 8), logits, atol=1e-5)


def test_sample_gives_the_bytes_of_vae_sample(client, server):
    inputs = [tensor("num_samples", np.array([6], np.int64)), tensor("seed", np.array([11], np.int64))]
    result = client.infer("digits_sample", inputs)
    with VaeClient(server.target) as vae:
        expected = vae.sample(6, seed=11)
        cooler = vae.sample(6, seed=11, temperature=0.5)
    assert result.as_numpy("images").tobytes() == expected.tobytes()
    assert result.as_numpy("seed").tolist() == [11]
    warm = client.infer("digits_sample", [*inputs, tensor("temperature", np.array([0.5], np.float32))])
    assert warm.as_numpy("images").tobytes() == cooler.tobytes()
    per_group = client.infer("digits_sample", [*inputs, tensor("temperatures", np.array([0.5], np.float32))])
    assert per_group.as_numpy("images").tobytes() == cooler.tobytes()  # a flat VAE's one group
    unseeded = client.infer("digits_sample", inputs[:1])
    assert unseeded.as_numpy("seed")[0] >= 0 and unseeded.as_numpy("images").shape == (6, 1, 8, 8)
    text = scrape(server)
    assert metric(text, "vae_requests_total", rpc="oip.ModelInfer", code="OK", model="digits") >= 3


BAD_INPUTS = [
    ("digits_decoder", [("q", "FP32", [2, 8], np.zeros(16, "<f4").tobytes())], "input 'q': not an input of this model"),
    ("digits_decoder", [("z", "FP64", [2, 8], np.zeros(16, "<f8").tobytes())], "input 'z': datatype 'FP64'; must be FP32"),
    ("digits_decoder", [("z", "FP32", [2, 9], np.zeros(18, "<f4").tobytes())], "input 'z': shape [2, 9]; must be [N, 8]"),
    ("digits_decoder", [("z", "FP32", [2, 8], b"\x00" * 60)], "needs 64 bytes, got 60"),
    ("digits_decoder", [("z", "FP32", [1, 8], np.full(8, np.nan, "<f4").tobytes())], "contains NaN"),
    ("digits_encoder", [("x", "FP32", [0, 1, 8, 8], b"")], "0 rows; must be between 1 and 1024"),
    ("digits_sample", [("num_samples", "INT64", [1], np.array([0], "<i8").tobytes())], "'num_samples': 0"),
    ("digits_sample", [("seed", "INT64", [1], np.array([1], "<i8").tobytes())], "input 'num_samples': missing"),
    ("digits_sample", [("num_samples", "INT64", [1], np.array([2], "<i8").tobytes()),
                       ("temperature", "FP32", [1], np.array([-1], "<f4").tobytes())], "'temperature': -1.0"),
    ("digits_sample", [("num_samples", "INT64", [1], np.array([2], "<i8").tobytes()),
                       ("seed", "UINT64", [1], np.array([2**63], "<u8").tobytes())], "'seed': 9223372036854775808"),
    ("digits_decoder", [("z", "FP32", [2**62, 0], b"")], "dimensions must be whole numbers"),
    ("digits_decoder", [("z", "FP32", [1] * 70, b"\x00" * 4)], "70 dimensions"),
]  # fmt: skip


@pytest.mark.parametrize("model, inputs, message", BAD_INPUTS)
def test_wrong_inputs_are_invalid_argument(server, model, inputs, message):
    request = service_pb2.ModelInferRequest(model_name=model)
    for name, datatype, shape, data in inputs:
        request.inputs.add(name=name, datatype=datatype, shape=shape)
        request.raw_input_contents.append(data)
    with grpc.insecure_channel(server.target) as channel:
        with pytest.raises(grpc.RpcError) as err:
            service_pb2_grpc.GRPCInferenceServiceStub(channel).ModelInfer(request, timeout=30)
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT and message in err.value.details(), err.value.details()
        status = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest()).status
        assert status == health_pb2.HealthCheckResponse.SERVING


def test_unknown_models_and_versions(client):
    z = tensor("z", np.zeros((1, 8), np.float32))
    code, message = refused(lambda: client.infer("nope_decoder", [z]))
    assert code == "StatusCode.NOT_FOUND" and "this server has: digits" in message
    code, message = refused(lambda: client.infer("digits_generator", [z]))
    assert code == "StatusCode.NOT_FOUND" and "NAME_encoder, NAME_decoder and NAME_sample" in message
    code, message = refused(lambda: client.infer("digits_decoder", [z], model_version="7"))
    assert code == "StatusCode.NOT_FOUND" and "no version 7" in message
    code, message = refused(lambda: client.infer("digits_decoder", [z], model_version="latest"))
    assert code == "StatusCode.INVALID_ARGUMENT" and "model_version" in message
    assert refused(lambda: client.get_model_metadata("nope_sample"))[0] == "StatusCode.NOT_FOUND"


def test_versions_and_model_control(model_repo, tmp_path, digits):
    """Two versions served side by side answer with their own graphs; unloading needs an admin token."""
    import shutil

    from export.repository import publish
    from tests.helpers import train

    repo = tmp_path / "models"
    shutil.copytree(model_repo, repo)
    publish(*train(digits, tmp_path / "v2", epochs=1), repo, "digits")
    (tmp_path / "tokens").write_text("user\n")
    (tmp_path / "admin").write_text("root\n")
    proc = ServerProcess(
        repo, tmp_path / "oip.log", "--version-policy", "all", "--auth-token-file", str(tmp_path / "tokens"),
        "--admin-token-file", str(tmp_path / "admin"),
    )  # fmt: skip
    user, admin = {"authorization": "Bearer user"}, {"authorization": "Bearer root"}
    try:
        with triton.InferenceServerClient(proc.target) as c:
            z = np.random.default_rng(1).standard_normal((3, 8), dtype=np.float32)
            for version in ("1", "2"):
                got = c.infer("digits_decoder", [tensor("z", z)], model_version=version, headers=user)
                want, _ = onnx(repo / "digits" / version / "decoder.onnx", {"z": z})
                np.testing.assert_allclose(got.as_numpy("logits"), want, atol=1e-5)
                assert got.get_response().model_version == version
            newest = c.infer("digits_decoder", [tensor("z", z)], headers=user)
            assert newest.get_response().model_version == "2"
            assert c.get_model_metadata("digits_sample", headers=user, as_json=True)["versions"] == ["1", "2"]
            assert refused(lambda: c.is_server_live())[0] == "StatusCode.UNAUTHENTICATED"
            code, message = refused(lambda: c.unload_model("digits_sample", headers=user))
            assert code == "StatusCode.PERMISSION_DENIED" and "admin token" in message
            c.unload_model("digits_sample", headers=admin)  # the model behind it, with its three protocol models
            assert not c.is_model_ready("digits_decoder", headers=user)
            index = c.get_model_repository_index(headers=user, as_json=True)["models"]
            assert {m["state"] for m in index} == {"UNAVAILABLE"} and "unloaded by UnloadModel" in index[0]["reason"]
            c.load_model("digits", headers=admin)
            assert c.is_model_ready("digits_decoder", "1", headers=user) and c.is_model_ready("digits_decoder", "2", headers=user)
            stats = c.get_inference_statistics("digits_decoder", "2", headers=user, as_json=True)["model_stats"][0]
            assert stats["name"] == "digits_decoder" and stats["version"] == "2"
        assert metric(scrape(proc), "vae_rejections_total", reason="permission_denied") == 1
    finally:
        assert proc.terminate() == 0


names = st.sampled_from(["digits_encoder", "digits_decoder", "digits_sample", "digits", "nope_sample", "", "_sample"])
inputs = st.lists(
    st.tuples(
        st.sampled_from(["x", "z", "num_samples", "seed", "temperature", "junk", ""]),
        st.sampled_from(["FP32", "INT64", "UINT64", "FP16", "BYTES", "INT32", ""]),
        st.lists(st.integers(-3, 2**40), max_size=5),
        st.binary(max_size=300),
    ),
    max_size=4,
)


def test_fuzz_model_infer(server):
    """Malformed ModelInfer requests get a status that says so, never INTERNAL, and the server stays healthy."""
    tried: Counter = Counter()
    with grpc.insecure_channel(server.target) as channel:
        stub = service_pb2_grpc.GRPCInferenceServiceStub(channel)
        raw = channel.unary_unary("/inference.GRPCInferenceService/ModelInfer")

        @settings(max_examples=700, deadline=None, suppress_health_check=list(HealthCheck), database=None)
        @given(names, st.sampled_from(["", "1", "2", "x", "-1"]), inputs, st.booleans(), st.lists(st.sampled_from(["images", "mu", "q"]), max_size=2))
        def typed(name, version, tensors, raw_contents, outputs):
            request = service_pb2.ModelInferRequest(model_name=name, model_version=version)
            for tensor_name, datatype, shape, data in tensors:
                t = request.inputs.add(name=tensor_name, datatype=datatype, shape=shape)
                if raw_contents:
                    request.raw_input_contents.append(data)
                else:
                    t.contents.fp32_contents.extend(np.frombuffer(data[: len(data) // 4 * 4], "<f4").tolist())
            for output in outputs:
                request.outputs.add(name=output)
            try:
                stub.ModelInfer(request, timeout=10)
                code = "OK"
            except grpc.RpcError as err:
                code = err.code().name
            tried[code] += 1
            assert code not in {"INTERNAL", "UNKNOWN"}, (request, code)

        @settings(max_examples=300, deadline=None, suppress_health_check=list(HealthCheck), database=None)
        @given(st.binary(max_size=300))
        def garbage(payload):
            try:
                raw(payload, timeout=10)
                code = "OK"
            except grpc.RpcError as err:
                code = err.code().name
            tried[code] += 1
            assert code not in {"INTERNAL", "UNKNOWN"}, (payload, code)

        typed()
        garbage()
        assert health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest()).status == health_pb2.HealthCheckResponse.SERVING
    print(f"\nModelInfer fuzz: {sum(tried.values())} requests, by status: {dict(tried)}")
    assert tried["INVALID_ARGUMENT"] > 300
