"""A flow-prior model, exported and served: the prior graphs, model.json, and the real server's
Sample, Score and Interpolate against PyTorch (tests/test_flow.py covers the flow in training)."""

import hashlib
import json
import shutil

import numpy as np
import onnxruntime as ort
import pytest
import torch
from google.protobuf import text_format
from tritonclient.grpc.model_config_pb2 import ModelConfig as TritonModelConfig

from bench.mixes import standard_prior_twin
from export.graphs import export_prior_graphs
from export.repository import publish
from export.triton import layout
from export.verify import verify_parity
from service.client import VaeClient
from service.engine import normal, slerp
from service.manifest import RepositoryError, read_manifest
from tests.conftest import ServerProcess, expected_sample
from tests.helpers import metric, scrape
from training.checkpoint import load_model
from training.config import ModelConfig, TrainConfig
from training.data import fixed_binarization
from training.evaluate import iwae_nll
from training.losses import standard_normal_log_prob
from training.model import VAE
from training.train import Trainer

PRIOR_GRAPHS = ("prior_sample", "prior_density")
CPU = "CPUExecutionProvider"


@pytest.fixture(scope="module")
def flow_trained(tmp_path_factory, digits):
    """A small flow-prior VAE really trained on digits (the architecture of conftest's `trained`)."""
    out = tmp_path_factory.mktemp("flow-run")
    model = ModelConfig(latent_dim=8, widths=(16, 32), hidden=64, prior="flow", flow_layers=4, flow_hidden=32)
    Trainer(TrainConfig(model=model, epochs=8, batch_size=32), out, digits).fit()
    return out


@pytest.fixture(scope="module")
def flow_model(flow_trained):
    model, cfg, _ = load_model(flow_trained / "best.pt")
    return model.eval(), cfg


@pytest.fixture(scope="module")
def flow_repo(tmp_path_factory, flow_model, model_repo):
    """One repository with the flow model ("flow") beside the standard one ("digits", copied)."""
    repo = tmp_path_factory.mktemp("flow-models")
    model, cfg = flow_model
    publish(model, cfg, repo, "flow", {"elbo": -27.0, "nll": 26.0})
    shutil.copytree(model_repo / "digits", repo / "digits")
    return repo


@pytest.fixture(scope="module")
def flow_server(flow_repo, tmp_path_factory):
    proc = ServerProcess(flow_repo, tmp_path_factory.mktemp("flow-server") / "server.log", "--max-batch-delay-ms", "5")
    yield proc
    assert proc.terminate() == 0


@pytest.fixture(scope="module")
def client(flow_server):
    with VaeClient(flow_server.target, model="flow") as c:
        yield c


def far_from_identity(seed: int = 0) -> VAE:
    """A flow-prior VAE whose couplings get random last layers: f moves every point, so inverting
    it through the graphs is a real test (a briefly trained flow is near the identity)."""
    torch.manual_seed(seed)
    model = VAE(ModelConfig(image_shape=(1, 8, 8), latent_dim=6, widths=(8,), hidden=16, prior="flow", flow_hidden=16))
    with torch.no_grad():
        for layer in model.flow.layers:
            layer.net[-1].weight.normal_(0, 0.5)
            layer.net[-1].bias.normal_(0, 0.5)
    return model.eval()


def test_prior_graphs_invert_each_other_and_give_the_flows_density(tmp_path):
    model = far_from_identity()
    signatures = export_prior_graphs(model, tmp_path, {"latent_dim": "6"})
    assert signatures["prior_density"]["outputs"] == {"eps": [-1, 6], "log_prob": [-1]}
    sample, density = (ort.InferenceSession(str(tmp_path / f"{g}.onnx"), providers=[CPU]) for g in PRIOR_GRAPHS)
    eps = np.random.default_rng(0).standard_normal((300, 6), dtype=np.float32) * 1.5
    (z,) = sample.run(None, {"eps": eps})
    back, log_prob = density.run(None, {"z": z})
    assert np.abs(z - eps).max() > 0.5  # not the identity
    np.testing.assert_allclose(back, eps, atol=1e-4, rtol=0)  # f^-1(f(eps)) = eps through the graphs
    with torch.no_grad():
        t_z = model.flow(torch.from_numpy(eps))
        t_eps, t_log_prob = model.flow.inverse(torch.from_numpy(z))
    np.testing.assert_allclose(z, t_z.numpy(), atol=1e-4, rtol=0)
    np.testing.assert_allclose(log_prob, t_log_prob.numpy(), atol=1e-4, rtol=0)  # training/flow.py's density
    assert np.abs(log_prob - standard_normal_log_prob(t_eps).numpy()).max() > 0.1  # with a real log-Jacobian


def test_flow_model_exports_four_graphs_that_pass_parity(flow_repo, flow_model, tmp_path):
    model, _ = flow_model
    folder = flow_repo / "flow" / "1"
    info = json.loads((folder / "model.json").read_text())
    assert info["prior"] == "flow"
    assert list(info["graphs"]) == ["encoder", "decoder", *PRIOR_GRAPHS]
    for role in info["graphs"]:
        assert info["graphs"][role]["sha256"] == hashlib.sha256((folder / f"{role}.onnx").read_bytes()).hexdigest()
    assert info["graphs"]["prior_sample"]["inputs"] == {"eps": [-1, 8]}
    assert set(info["parity_max_abs_diff"]) == {
        "encoder.mu", "encoder.logvar", "decoder.logits", "decoder.image", "prior_sample.z", "prior_density.eps",
        "prior_density.log_prob",
    }  # fmt: skip
    assert all(v <= 1e-4 for v in info["parity_max_abs_diff"].values())
    assert set(verify_parity(model, folder)) == set(info["parity_max_abs_diff"])  # batches 1, 7 and 64 again
    spec = read_manifest(folder)
    assert spec.prior == "flow" and spec.prior_graphs == PRIOR_GRAPHS

    expected = {"prior_sample": ("eps", {"z": [8]}), "prior_density": ("z", {"eps": [8], "log_prob": [1]})}
    for role, (inp, outputs) in expected.items():
        config = text_format.Parse((folder / f"{role}.config.pbtxt").read_text(), TritonModelConfig())
        assert config.name == f"flow_{role}" and config.default_model_filename == f"{role}.onnx"
        assert config.input[0].name == inp and list(config.input[0].dims) == [8]
        assert {o.name: list(o.dims) for o in config.output} == outputs
    (log_prob,) = [o for o in config.output if o.name == "log_prob"]
    assert log_prob.HasField("reshape") and list(log_prob.reshape.shape) == []  # [N] in the graph: Triton's [N, 1]
    made = layout(flow_repo / "flow", tmp_path / "triton")
    assert [p.name for p in made] == ["flow_encoder", "flow_decoder", "flow_prior_sample", "flow_prior_density"]
    assert (tmp_path / "triton" / "flow_prior_density" / "1" / "prior_density.onnx").stat().st_ino == (
        folder / "prior_density.onnx"
    ).stat().st_ino


def _copy_version(flow_repo, tmp_path, edit=None):
    folder = tmp_path / "flow" / "1"
    shutil.copytree(flow_repo / "flow" / "1", folder)
    if edit:
        info = json.loads((folder / "model.json").read_text())
        edit(info)
        (folder / "model.json").write_text(json.dumps(info))
    return folder


@pytest.mark.parametrize(
    "edit, message",
    [
        (lambda info: info["graphs"].pop("prior_density"), "prior 'flow' needs prior_sample and prior_density"),
        (lambda info: info["graphs"]["prior_sample"].pop("sha256"), "gives no sha256"),
        (lambda info: info.update(prior="maf"), "prior 'maf'"),
    ],
)
def test_a_flow_version_without_its_prior_graphs_is_refused(flow_repo, tmp_path, edit, message):
    with pytest.raises(RepositoryError, match=message):
        read_manifest(_copy_version(flow_repo, tmp_path, edit))


def test_prior_graphs_are_checked_like_the_others(flow_repo, tmp_path):
    torn = _copy_version(flow_repo, tmp_path / "torn")
    with (torn / "prior_sample.onnx").open("ab") as f:
        f.write(b"\0")
    with pytest.raises(RepositoryError, match="prior_sample.onnx: sha256 does not match"):
        read_manifest(torn)
    missing = _copy_version(flow_repo, tmp_path / "missing")
    (missing / "prior_density.onnx").unlink()
    with pytest.raises(RepositoryError, match="prior_density.onnx is missing"):
        read_manifest(missing)


@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_sample_decodes_the_flow_of_the_services_own_noise(client, flow_model, temperature):
    model, _ = flow_model
    images = client.sample(12, seed=5, temperature=temperature)
    eps = torch.from_numpy(normal(5, (12, 8)) * np.float32(temperature))  # engine.latents: the same noise
    with torch.no_grad():
        expected = model.mean_image(model.decode(model.flow(eps))).numpy()
        from_n01 = model.mean_image(model.decode(eps)).numpy()
    np.testing.assert_allclose(images, expected, atol=1e-5)
    assert np.abs(images - from_n01).max() > 1e-3  # the flow really is in the path
    assert np.array_equal(client.sample(12, seed=5, temperature=temperature), images)


def test_score_is_the_flow_models_iwae_and_monte_carlo_kl(client, flow_model, digits):
    model, _ = flow_model
    x = fixed_binarization(digits.test.images[:200])
    scores = client.score(x.numpy(), k=64, seed=0)
    with torch.no_grad():
        nll = iwae_nll(model, x, k=64).numpy()  # training.evaluate's figure, with the flow's log p(z)
    assert abs(-scores["log_likelihood"].mean() - nll.mean()) < 0.3
    assert (scores["log_likelihood"] >= scores["elbo"] - 1.0).all()  # IWAE is the tighter bound
    np.testing.assert_allclose(scores["elbo"], -(scores["reconstruction"] + scores["kl"]), rtol=1e-9)
    # KL is mean_i log q(z_i|x) - log p(z_i) over the service's own k samples, log p from the flow.
    few, k = x[:10], 16
    kl = client.score(few.numpy(), k=k, seed=3)["kl"]
    with torch.no_grad():
        mu, logvar = (t.double() for t in model.encode(few))
        eps = torch.from_numpy(normal(3, (10, k, 8), np.float64))
        z = mu[:, None] + eps * torch.exp(0.5 * logvar)[:, None]
        log_q = -0.5 * (np.log(2 * np.pi) + logvar[:, None] + eps**2).sum(-1)
        log_p = model.flow.log_prob(z.float()).double()
    np.testing.assert_allclose(kl, (log_q - log_p).mean(1).numpy(), atol=1e-3)


def test_interpolate_walks_the_base_space_when_spherical(client, flow_model, digits):
    model, _ = flow_model
    t = np.linspace(0, 1, 7, dtype=np.float32)
    eps_ends = normal(2, (2, 8))  # two typical prior draws, end points z = f(eps)
    with torch.no_grad():
        a, b = model.flow(torch.from_numpy(eps_ends)).numpy()

    images, path = client.interpolate(a, b, steps=7, spherical=True, latents=True)
    np.testing.assert_array_equal(path[0], a)  # the end points are the latents given
    np.testing.assert_array_equal(path[-1], b)
    with torch.no_grad():
        expected = model.flow(torch.from_numpy(slerp(eps_ends[0], eps_ends[1], t))).numpy()
        decoded = torch.sigmoid(model.decode(torch.from_numpy(path))).numpy()
    np.testing.assert_allclose(path[1:-1], expected[1:-1], atol=1e-4)  # f(slerp(f^-1(a), f^-1(b), t))
    assert np.abs(path[1:-1] - slerp(a, b, t)[1:-1]).max() > 0.05  # not the great circle in z
    np.testing.assert_allclose(images, decoded, atol=1e-5)

    images, path = client.interpolate(a, b, steps=7, spherical=False, latents=True)
    np.testing.assert_allclose(path, (1 - t[:, None]) * a + t[:, None] * b, atol=1e-6)  # linear stays in z
    np.testing.assert_array_equal(path[[0, -1]], np.stack([a, b]))

    x = digits.test.images[:2].numpy()
    mu = client.encode(x)[0]
    _, from_images = client.interpolate(x[0], x[1], 5, spherical=True)
    np.testing.assert_allclose(from_images[[0, -1]], mu, atol=1e-6)  # images: their posterior means


def test_prior_graphs_have_their_own_batchers_and_the_standard_model_none(flow_server, client, trained):
    client.sample(3, seed=1)
    client.score(np.zeros((2, 1, 8, 8), np.float32), k=4, seed=1)
    with VaeClient(flow_server.target, model="digits") as standard:  # served beside it, as before
        standard_model, _, _ = load_model(trained / "best.pt")
        np.testing.assert_allclose(standard.sample(3, seed=1), expected_sample(standard_model, 3, 1), atol=1e-5)
        standard.score(np.zeros((2, 1, 8, 8), np.float32), k=4, seed=1)
    text = scrape(flow_server)
    for graph in PRIOR_GRAPHS:
        assert metric(text, "vae_batch_rows_count", graph=graph, model="flow", version="1") >= 1
        assert metric(text, "vae_batch_rows_count", graph=graph, model="digits") == 0
        # Every batcher shows its queue gauge from its start: the standard model has no prior batchers.
        assert not [line for line in text.splitlines() if f'graph="{graph}"' in line and 'model="digits"' in line]
    assert metric(text, "vae_batch_rows_count", graph="decoder", model="digits") >= 2


def test_sample_stream_equals_sample(client):
    assert np.array_equal(client.sample_stream(300, seed=9, chunk_rows=128), client.sample(300, seed=9))


def test_bench_twin_is_the_flow_models_graphs_under_the_standard_prior(flow_repo, tmp_path):
    """bench --part prior compares a flow model with this twin: same encoder and decoder files
    (hard links), N(0, I) as its prior, and a manifest the server accepts."""
    flow = read_manifest(flow_repo / "flow" / "1")
    standard_prior_twin(flow, tmp_path, "twin")
    twin = read_manifest(tmp_path / "twin" / "1")
    assert (twin.name, twin.prior, twin.prior_graphs) == ("twin", "standard", ())
    assert twin.interface == flow.interface | {"prior": "standard"}
    for role in ("encoder", "decoder"):
        assert twin.graph(role).samefile(flow.graph(role))
    assert sorted(p.name for p in twin.folder.iterdir()) == ["decoder.onnx", "encoder.onnx", "model.json"]
