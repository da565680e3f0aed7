"""The real server (`python -m service`) on a real exported model, called over real gRPC."""

import asyncio
import io
import json
from concurrent.futures import ThreadPoolExecutor

import grpc
import numpy as np
import pytest
import torch
from grpc_health.v1 import health_pb2, health_pb2_grpc
from google.protobuf import descriptor_pb2
from grpc_reflection.v1alpha import reflection_pb2 as reflection_pb
from grpc_reflection.v1alpha.proto_reflection_descriptor_database import ProtoReflectionDescriptorDatabase
from PIL import Image

from service.api.vae.v1 import vae_pb2 as pb
from service.api.vae.v1 import vae_pb2_grpc
from service.client import VaeClient
from service.engine import normal
from service.tensors import from_array
from training.checkpoint import load_model
from training.data import fixed_binarization
from training.evaluate import elbo_terms, iwae_nll
from training.losses import kl_divergence
from tests.helpers import metric, scrape


@pytest.fixture(scope="module")
def client(server):
    with VaeClient(server.target) as c:
        yield c


@pytest.fixture(scope="module")
def stub(server):
    with grpc.insecure_channel(server.target) as channel:
        yield vae_pb2_grpc.VaeServiceStub(channel)


@pytest.fixture(scope="module")
def images(digits):
    return digits.test.images[:16].numpy()


def test_model_info(client, model_repo):
    info = client.info()
    manifest = json.loads((model_repo / "digits" / "1" / "model.json").read_text())
    assert (info.name, info.version, info.latent_dim) == ("digits", 1, manifest["latent_dim"])
    assert list(info.image_shape) == [1, 8, 8] and info.likelihood == "bernoulli"
    assert info.execution_provider == "CPUExecutionProvider"
    assert info.max_batch_rows == 256 and info.metrics["nll"] == 26.0


def test_sample_formats_and_seeds(client):
    x = client.sample(10, seed=3)
    assert x.shape == (10, 1, 8, 8) and x.dtype == np.float32
    assert 0.0 <= x.min() and x.max() <= 1.0 and x.std() > 0.01
    assert np.array_equal(client.sample(10, seed=3), x)
    assert not np.array_equal(client.sample(10, seed=4), x)
    u8 = client.sample(10, seed=3, format="uint8")
    assert u8.dtype == np.uint8 and np.array_equal(u8, np.rint(x * 255).astype(np.uint8))
    pngs = client.sample(10, seed=3, format="png")
    decoded = np.stack([np.asarray(Image.open(io.BytesIO(p))) for p in pngs])
    assert decoded.shape == (10, 8, 8) and np.array_equal(decoded, u8[:, 0])
    cold = client.sample(10, seed=3, temperature=0.0)
    assert np.allclose(cold, cold[0])  # temperature 0: every sample is the decoded origin


def test_noise_is_a_function_of_the_seed_alone():
    first = normal(5, (4, 16))
    normal(7, (3,))  # a draw between must not shift the stream
    with ThreadPoolExecutor(1) as other:  # nor the thread it is drawn on
        assert np.array_equal(other.submit(normal, 5, (4, 16)).result(), first)
    assert np.array_equal(normal(5, (4, 16)), first)
    # The stream is part of the API (a saved seed must keep giving the same images): pinned.
    assert np.allclose(normal(1, (3,)), [-0.3228221, 1.0913948, -1.6034505], atol=1e-6)
    assert not np.array_equal(normal(6, (4, 16)), first)
    assert normal(0, (2,)).dtype == np.float32 and normal(2**64 - 1, (2,), np.float64).dtype == np.float64
    draws = np.concatenate([normal(seed, (1000,), np.float64) for seed in range(200)])  # neighbouring seeds
    assert abs(draws.mean()) < 0.01 and abs(draws.std() - 1) < 0.01
    assert abs(np.corrcoef(draws.reshape(200, 1000)[:-1, 0], draws.reshape(200, 1000)[1:, 0])[0, 1]) < 0.25


def test_sample_stream_equals_sample(client):
    assert np.array_equal(client.sample_stream(700, seed=9, chunk_rows=256), client.sample(700, seed=9))


def test_encode_decode_reconstruct(client, trained, images):
    model, _, _ = load_model(trained / "best.pt")
    mu, sigma, z = client.encode(images, sample=True, seed=1)
    with torch.no_grad():
        t_mu, t_logvar = model.encode(torch.from_numpy(images))
    np.testing.assert_allclose(mu, t_mu.numpy(), atol=1e-4)
    np.testing.assert_allclose(sigma, np.exp(0.5 * t_logvar.numpy()), rtol=1e-4, atol=1e-5)
    assert z.shape == mu.shape and not np.allclose(z, mu)
    assert np.array_equal(client.encode(images, sample=True, seed=1)[2], z)
    decoded = client.decode(mu)
    with torch.no_grad():
        np.testing.assert_allclose(decoded, torch.sigmoid(model.decode(t_mu)).numpy(), atol=1e-4)
    np.testing.assert_allclose(client.reconstruct(images), decoded, atol=1e-6)
    u8 = (images * 255).round().astype(np.uint8)  # uint8 input is accepted as pixels / 255
    np.testing.assert_allclose(client.encode(u8)[0], client.encode(u8.astype(np.float32) / 255)[0], atol=1e-6)


@pytest.mark.parametrize("spherical", [False, True])
def test_interpolate_end_points(client, images, spherical):
    a, b = client.encode(images[:2])[0]
    path_images, path = client.interpolate(a, b, steps=7, spherical=spherical, latents=True)
    assert path_images.shape == (7, 1, 8, 8) and path.shape == (7, a.shape[0])
    np.testing.assert_array_equal(path[0], a)
    np.testing.assert_array_equal(path[-1], b)
    ends = client.decode(np.stack([a, b]))
    np.testing.assert_allclose(path_images[[0, -1]], ends, atol=1e-6)
    if spherical:
        norms = np.linalg.norm(path, axis=1)
        assert norms.min() >= min(norms[0], norms[-1]) - 1e-4  # slerp does not cut through the origin
    _, opposite = client.interpolate(a, -a, steps=5, spherical=spherical, latents=True)  # no great circle: a line
    assert np.isfinite(opposite).all() and np.abs(opposite).max() <= np.abs(a).max() + 1e-5
    from_images, image_path = client.interpolate(images[0], images[1], steps=5, spherical=spherical)
    np.testing.assert_allclose(image_path[[0, -1]], np.stack([a, b]), atol=1e-6)
    np.testing.assert_allclose(from_images[[0, -1]], ends, atol=1e-5)


def test_score_agrees_with_the_training_package(client, trained, digits):
    model, _, _ = load_model(trained / "best.pt")
    x = fixed_binarization(digits.test.images[:200])
    scores = client.score(x.numpy(), k=64, seed=0)
    with torch.no_grad():
        mu, logvar = model.encode(x)
        kl = kl_divergence(mu, logvar).numpy()
        torch.manual_seed(0)
        terms = elbo_terms(model, x)
        nll = iwae_nll(model, x, k=64).numpy()
    np.testing.assert_allclose(scores["kl"], kl, rtol=1e-3, atol=1e-3)  # closed form: no noise
    assert abs(scores["elbo"].mean() - terms["elbo"].mean().item()) < 0.5  # two Monte Carlo estimates
    assert abs(-scores["log_likelihood"].mean() - nll.mean()) < 0.3
    assert (scores["log_likelihood"] >= scores["elbo"] - 1.0).all()  # IWAE is the tighter bound
    np.testing.assert_allclose(scores["elbo"], -(scores["reconstruction"] + scores["kl"]), rtol=1e-9)


def test_seeded_answers_do_not_depend_on_batch_neighbours(server, client):
    solo = {seed: client.sample(1 + seed % 5, seed=seed) for seed in range(12)}

    async def load() -> dict[int, np.ndarray]:
        async with grpc.aio.insecure_channel(server.target) as channel:
            stub = vae_pb2_grpc.VaeServiceStub(channel)

            async def one(seed: int) -> tuple[int, np.ndarray]:
                r = await stub.Sample(pb.SampleRequest(num_samples=1 + seed % 5, seed=seed))
                return seed, np.frombuffer(r.images.tensor.data, np.float32).reshape(r.images.tensor.shape)

            noise = [stub.Sample(pb.SampleRequest(num_samples=7)) for _ in range(40)]
            results = await asyncio.gather(*(one(s) for s in range(12) for _ in range(3)), *noise)
            return results[: 12 * 3]

    for seed, images in asyncio.run(load()):
        assert np.array_equal(images, solo[seed]), f"seed {seed} changed under load"


BAD_REQUESTS = [
    ("Sample", pb.SampleRequest(num_samples=0), "num_samples"),
    ("Sample", pb.SampleRequest(num_samples=10**6), "num_samples"),
    ("Sample", pb.SampleRequest(num_samples=2, temperature=float("nan")), "temperature"),
    ("Sample", pb.SampleRequest(num_samples=2, format=17), "format"),
    ("Decode", pb.DecodeRequest(), "latents: missing"),
    ("Decode", pb.DecodeRequest(latents=pb.Tensor(shape=[2, 3], dtype=pb.DTYPE_FLOAT32, data=bytes(24))), "shape"),
    ("Decode", pb.DecodeRequest(latents=pb.Tensor(shape=[2, 8], dtype=pb.DTYPE_FLOAT32, data=bytes(10))), "bytes"),
    ("Decode", pb.DecodeRequest(latents=pb.Tensor(shape=[1, 8], dtype=pb.DTYPE_UINT8, data=bytes(8))), "dtype"),
    ("Decode", pb.DecodeRequest(latents=from_array(np.full((1, 8), np.nan, np.float32))), "NaN"),
    ("Decode", pb.DecodeRequest(latents=from_array(np.full((1, 8), np.inf, np.float32))), "infinity"),
    ("Decode", pb.DecodeRequest(latents=pb.Tensor(shape=[0, 8], dtype=pb.DTYPE_FLOAT32)), "rows"),
    ("Decode", pb.DecodeRequest(latents=from_array(np.full((2, 8), 1e38, np.float32))), "magnitude 1e+38"),
    ("Decode", pb.DecodeRequest(latents=from_array(np.full((1, 8), -1.5e4, np.float32))), "within [-10000, 10000]"),
    ("Decode", pb.DecodeRequest(latents=pb.Tensor(shape=[3] * 20000, dtype=pb.DTYPE_FLOAT32)), "20000 dimensions"),
    ("Decode", pb.DecodeRequest(latents=pb.Tensor(shape=[2**62, 0], dtype=pb.DTYPE_FLOAT32)), "dimensions must be whole numbers"),
    ("Decode", pb.DecodeRequest(latents=pb.Tensor(shape=[2**20, 2**20], dtype=pb.DTYPE_FLOAT32)), "elements; at most"),
    ("Encode", pb.EncodeRequest(images=from_array(np.zeros((2, 1, 9, 8), np.float32))), "shape"),
    ("Encode", pb.EncodeRequest(images=from_array(np.full((1, 1, 8, 8), 3.0, np.float32))), "[0, 1]"),
    ("Encode", pb.EncodeRequest(images=pb.Tensor(shape=[1, 1, 8, 8], dtype=99, data=bytes(64))), "dtype"),
    ("Reconstruct", pb.ReconstructRequest(images=from_array(np.zeros((2000, 1, 8, 8), np.float32))), "rows"),
    ("Interpolate", pb.InterpolateRequest(start_latent=from_array(np.zeros(8, np.float32)), steps=4), "end"),
    ("Interpolate", pb.InterpolateRequest(
        start_latent=from_array(np.zeros(8, np.float32)), end_latent=from_array(np.ones(8, np.float32)), steps=1
    ), "steps"),  # fmt: skip
    ("Interpolate", pb.InterpolateRequest(
        start_latent=from_array(np.zeros(5, np.float32)), end_latent=from_array(np.ones(8, np.float32)), steps=3
    ), "shape"),  # fmt: skip
    ("Interpolate", pb.InterpolateRequest(
        start_latent=from_array(np.zeros(8, np.float32)), end_latent=from_array(np.full(8, 1e30, np.float32)), steps=3
    ), "end_latent: a latent of magnitude"),  # fmt: skip
    ("Score", pb.ScoreRequest(images=from_array(np.zeros((1, 1, 8, 8), np.float32)), importance_samples=10**6), "importance"),
]


@pytest.mark.parametrize("rpc,request_,message", BAD_REQUESTS, ids=[f"{r}-{m}" for r, _, m in BAD_REQUESTS])
def test_bad_input_is_invalid_argument_and_the_server_keeps_serving(stub, client, rpc, request_, message):
    with pytest.raises(grpc.RpcError) as err:
        getattr(stub, rpc)(request_, timeout=10)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT, err.value.details()
    assert message in err.value.details()
    assert client.sample(2, seed=0).shape == (2, 1, 8, 8)


def test_latents_at_the_bound_give_finite_images(client):
    for value in (1e4, -1e4):
        for fmt in ("float32", "uint8"):
            images = client.decode(np.full((2, 8), value, np.float32), format=fmt)
            assert np.isfinite(images.astype(np.float32)).all() and images.shape == (2, 1, 8, 8)


def test_health_and_reflection(server):
    with grpc.insecure_channel(server.target) as channel:
        health = health_pb2_grpc.HealthStub(channel)
        for name in ("", "vae.v1.VaeService", "inference.GRPCInferenceService"):
            assert health.Check(health_pb2.HealthCheckRequest(service=name)).status == health_pb2.HealthCheckResponse.SERVING
        db = ProtoReflectionDescriptorDatabase(channel)
        assert {"vae.v1.VaeService", "inference.GRPCInferenceService", "grpc.health.v1.Health"} <= set(db.get_services())
        service = db.FindFileContainingSymbol("vae.v1.VaeService")
        assert "Sample" in str(service)

        # grpc.reflection.v1, which newer clients (grpcurl 1.9 and later) ask for first: the same
        # messages as v1alpha under another package, so v1alpha's classes speak it.
        v1 = channel.stream_stream(
            "/grpc.reflection.v1.ServerReflection/ServerReflectionInfo",
            request_serializer=reflection_pb.ServerReflectionRequest.SerializeToString,
            response_deserializer=reflection_pb.ServerReflectionResponse.FromString,
        )
        asks = [
            reflection_pb.ServerReflectionRequest(list_services=""),
            reflection_pb.ServerReflectionRequest(file_containing_symbol="vae.v1.VaeService"),
        ]
        listed, found = list(v1(iter(asks), timeout=10))
        names = {s.name for s in listed.list_services_response.service}
        assert {"vae.v1.VaeService", "grpc.reflection.v1.ServerReflection", "grpc.reflection.v1alpha.ServerReflection"} <= names
        files = [descriptor_pb2.FileDescriptorProto.FromString(b) for b in found.file_descriptor_response.file_descriptor_proto]
        assert any(f.package == "vae.v1" and "VaeService" in [s.name for s in f.service] for f in files)


def test_metrics_scrape(server, client, stub):
    client.sample(3, seed=0)
    with pytest.raises(grpc.RpcError):
        stub.Decode(pb.DecodeRequest(), timeout=10)
    text = scrape(server)
    assert metric(text, "vae_requests_total", rpc="Sample", code="OK") >= 1
    assert metric(text, "vae_requests_total", rpc="Decode", code="INVALID_ARGUMENT") >= 1
    assert metric(text, "vae_model_info", name="digits", version="1", provider="CPUExecutionProvider") == 1
    # Each family has a sample, not only its HELP and TYPE lines, and the calls above moved it.
    assert metric(text, "vae_request_duration_seconds_count", rpc="Sample") >= 1
    assert metric(text, "vae_request_duration_seconds_bucket", rpc="Sample", le="+Inf") >= 1
    assert metric(text, "vae_queue_wait_seconds_count", graph="decoder") >= 1
    assert metric(text, "vae_compute_seconds_sum", graph="decoder") > 0
    assert metric(text, "vae_batch_rows_bucket", graph="decoder", le="+Inf") >= 1
    assert any(line.startswith('vae_queue_rows{graph="decoder",model="digits",version="1"} ') for line in text.splitlines())
    # The process's own figures, what a memory limit is set against: resident memory as /proc has it.
    rss = int(next(line.split()[1] for line in open(f"/proc/{server.proc.pid}/status") if line.startswith("VmRSS:"))) * 1024
    assert metric(text, "process_resident_memory_bytes") == pytest.approx(rss, rel=0.5)


def test_serving_process_has_not_imported_torch(server):
    maps = open(f"/proc/{server.proc.pid}/maps").read()
    assert "onnxruntime" in maps  # the check sees the libraries it should
    assert "torch" not in maps, "the serving process loaded torch"
