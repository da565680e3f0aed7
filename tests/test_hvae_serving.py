"""A hierarchical VAE exported and served beside a flat one in one repository: its graphs and
model.json, and the real server's operations against PyTorch for the same noise (tests/test_hvae.py
covers the model in training)."""

import math
import shutil
from dataclasses import replace

import numpy as np
import onnxruntime as ort
import pytest
import torch

from export.repository import publish
from service.client import VaeClient
from service.engine import normal
from service.manifest import read_manifest
from tests.conftest import ServerProcess
from training.checkpoint import load_model
from training.config import ModelConfig, TrainConfig
from training.data import fixed_binarization
from training.evaluate import iwae_nll
from training.families import build
from training.hvae import HVAE
from training.train import Trainer, fit_top_prior


@pytest.fixture(scope="module")
def hvae(tmp_path_factory, digits) -> HVAE:
    """A small hierarchical VAE really trained on digits (8x8): groups at 2x2 (two) and 4x4."""
    out = tmp_path_factory.mktemp("hvae-run")
    model = ModelConfig(kind="hvae", groups="4:2,2:1", z_channels=4, width=16)
    Trainer(TrainConfig(model=model, epochs=4, batch_size=32, lr=3e-3), out, digits).fit()
    trained, _, _ = load_model(out / "best.pt")
    return trained.eval()


@pytest.fixture(scope="module")
def hvae_top(hvae, digits) -> HVAE:
    """The same weights with the top two groups' prior fitted to the digits' encodings (--top-prior 2)."""
    model = build(replace(hvae.cfg, top_prior=2))
    model.load_state_dict(hvae.state_dict(), strict=False)
    model.set_top_prior(fit_top_prior(model, digits))
    return model.eval()


@pytest.fixture(scope="module")
def repo(tmp_path_factory, hvae, hvae_top, model_repo):
    """"hier" and "hier-top" beside the flat "digits" (copied from conftest's repository)."""
    repo = tmp_path_factory.mktemp("hvae-models")
    publish(hvae, TrainConfig(model=hvae.cfg, dataset="digits"), repo, "hier", {"elbo": -30.0})
    publish(hvae_top, TrainConfig(model=hvae_top.cfg, dataset="digits"), repo, "hier-top", {"elbo": -30.0})
    shutil.copytree(model_repo / "digits", repo / "digits")
    return repo


@pytest.fixture(scope="module")
def server(repo, tmp_path_factory):
    proc = ServerProcess(repo, tmp_path_factory.mktemp("hvae-server") / "server.log", "--max-batch-delay-ms", "5", http=True)
    yield proc
    assert proc.terminate() == 0


@pytest.fixture(scope="module")
def client(server):
    with VaeClient(server.target, model="hier") as c:
        yield c


def test_the_export_names_the_family_and_its_posterior_graph(repo, hvae):
    spec = read_manifest(repo / "hier" / "1")
    assert spec.family == "hvae" and spec.family_graphs == ("posterior",) and spec.latent_dim == hvae.noise_size
    assert spec.interface["family"] == "hvae"
    session = ort.InferenceSession(str(spec.graph("posterior")), providers=["CPUExecutionProvider"])
    assert [i.name for i in session.get_inputs()] == ["x_eps"] and [o.name for o in session.get_outputs()] == ["logits", "log_ratio", "u"]
    assert (repo / "hier" / "1" / "posterior.config.pbtxt").exists()
    assert read_manifest(repo / "digits" / "1").family == "vae"  # exported before families: a flat VAE


def test_model_info_gives_the_family_and_the_latents_groups(client, server, hvae):
    info = client.info()
    assert info.family == "hvae" and info.latent_dim == hvae.noise_size
    assert [(list(g.shape), g.offset) for g in info.latent_groups] == [([4, 2, 2], 0), ([4, 2, 2], 16), ([4, 4, 4], 32)]
    with VaeClient(server.target, model="digits") as flat:
        (group,) = flat.info().latent_groups
        assert flat.info().family == "vae" and list(group.shape) == [flat.info().latent_dim] and group.offset == 0


def test_sample_decodes_the_seeds_noise_as_torch_does(client, hvae):
    u = normal(4, (9, hvae.noise_size)) * np.float32(0.7)
    with torch.no_grad():
        expected = hvae.mean_image(hvae.decode(torch.from_numpy(u))).numpy()
    np.testing.assert_allclose(client.sample(9, seed=4, temperature=0.7), expected, atol=1e-5)


def test_encode_decode_and_reconstruct_share_the_latent(client, hvae, digits):
    x = fixed_binarization(digits.test.images[:6])
    mu, sigma, u = client.encode(x.numpy(), sample=True, seed=8)
    with torch.no_grad():
        t_mu, t_logvar = hvae.encode(x)
        eps = torch.from_numpy(normal(8, (6, hvae.noise_size)))
        _, _, t_u = hvae.posterior_draw(x, eps)
        reconstruction = hvae.mean_image(hvae.decode(t_mu)).numpy()
    np.testing.assert_allclose(mu, t_mu.numpy(), atol=1e-4)
    np.testing.assert_allclose(sigma, torch.exp(0.5 * t_logvar).numpy(), rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(u, t_u.numpy(), atol=1e-4)  # the draw runs the posterior graph, not mu + eps sigma
    assert not np.allclose(u, mu + normal(8, mu.shape) * sigma, atol=1e-3)
    np.testing.assert_allclose(client.reconstruct(x.numpy()), reconstruction, atol=1e-5)
    np.testing.assert_allclose(client.decode(mu), reconstruction, atol=1e-4)


def test_score_is_trainings_bound_for_the_same_noise(client, hvae, digits):
    """Score's draws through the posterior graph against training's log_weights on the service's own
    noise: the same IWAE bound and ELBO within float32's rounding of sums over the latent."""
    assert_score_is_trainings_bound(client, hvae, fixed_binarization(digits.test.images[:12]))


def test_a_fitted_top_prior_is_served_as_torch_computes_it(server, hvae, hvae_top, digits):
    """hier-top: the same weights as hier with a fitted top prior, whose graphs map the server's
    N(0, I) noise through it: samples, the latent and Score as PyTorch gives them, and not hier's."""
    x = fixed_binarization(digits.test.images[:12])
    u = normal(4, (9, hvae_top.noise_size))
    with VaeClient(server.target, model="hier-top") as top, torch.no_grad():
        images = top.sample(9, seed=4)
        np.testing.assert_allclose(images, hvae_top.mean_image(hvae_top.decode(torch.from_numpy(u))).numpy(), atol=1e-5)
        assert not np.allclose(images, hvae.mean_image(hvae.decode(torch.from_numpy(u))).numpy(), atol=1e-2)
        mu = top.encode(x.numpy())[0]
        np.testing.assert_allclose(mu, hvae_top.encode(x)[0].numpy(), atol=1e-4)
        assert_score_is_trainings_bound(top, hvae_top, x)


def assert_score_is_trainings_bound(client: VaeClient, hvae: HVAE, x: torch.Tensor) -> None:
    k, seed = 40, 5
    scores = client.score(x.numpy(), k=k, seed=seed)
    eps = torch.from_numpy(normal(seed, (len(x), k, hvae.noise_size), np.float64)).float()
    with torch.no_grad():
        log_w = hvae.log_weights(x)(eps).double()
    iwae = (torch.logsumexp(log_w, dim=1) - math.log(k)).numpy()
    np.testing.assert_allclose(scores["log_likelihood"], iwae, rtol=1e-4, atol=1e-3)
    np.testing.assert_allclose(scores["elbo"], log_w.mean(dim=1).numpy(), rtol=1e-4, atol=1e-3)
    np.testing.assert_allclose(scores["elbo"], -(scores["reconstruction"] + scores["kl"]), rtol=1e-9)
    with torch.no_grad():  # and statistically: training's own estimate with its own noise
        nll = iwae_nll(hvae, x, k=k).numpy()
    assert abs(-scores["log_likelihood"].mean() - nll.mean()) < 1.0


def test_both_families_serve_from_one_repository(server, client):
    with VaeClient(server.target, model="digits") as flat:
        assert flat.sample(3, seed=1).shape == (3, 1, 8, 8)
        images = flat.sample(2, seed=2)
        assert np.isfinite(flat.score(images, k=8, seed=1)["log_likelihood"]).all()
    d = client.info().latent_dim
    a, b = normal(1, (2, d))
    images, path = client.interpolate(a, b, steps=5, spherical=True, latents=True)
    assert images.shape == (5, 1, 8, 8) and np.array_equal(path[0], a) and np.array_equal(path[-1], b)


def test_temperatures_per_group_scale_each_groups_noise_on_every_front_end(client, server, hvae):
    import httpx

    u = normal(6, (4, hvae.noise_size))
    scale = np.repeat(np.array([0.0, 1.0, 0.5], np.float32), hvae.group_dims)
    with torch.no_grad():
        expected = hvae.mean_image(hvae.decode(torch.from_numpy(u * scale))).numpy()
    np.testing.assert_allclose(client.sample(4, seed=6, temperatures=[0.0, 1.0, 0.5]), expected, atol=1e-5)
    np.testing.assert_allclose(client.sample(4, seed=6, temperatures=[0.7] * 3), client.sample(4, seed=6, temperature=0.7))
    with pytest.raises(Exception, match="3 latent groups"):
        client.sample(4, seed=6, temperatures=[1.0, 1.0])
    with pytest.raises(Exception, match="not both"):
        client.sample(4, seed=6, temperature=1.0, temperatures=[1.0, 1.0, 1.0])
    assert client.sample(2, seed=1).shape == (2, 1, 8, 8)  # and the server keeps serving
    with httpx.Client(base_url=server.http_url) as web:
        body = {"num_samples": 4, "seed": 6, "temperatures": [0.0, 1.0, 0.5]}
        answer = web.post("/v1/models/hier/sample", json=body).json()
        np.testing.assert_allclose(np.array(answer["images"]["data"], np.float32).reshape(expected.shape), expected, atol=1e-5)
        png = web.get("/v1/models/hier/sample.png", params={"n": 4, "seed": 6, "temperatures": "0,1,0.5"})
        assert png.status_code == 200 and png.headers["content-type"] == "image/png"
        bad = web.get("/v1/models/hier/sample.png", params={"n": 4, "temperatures": "0,x,1"})
        assert bad.status_code == 400 and "temperatures" in bad.json()["error"] and "\n" not in bad.json()["error"]


def test_the_posterior_graph_is_a_model_of_the_inference_protocol(server, repo, hvae):
    import tritonclient.grpc as triton

    with triton.InferenceServerClient(server.target) as oip:
        names = {m["name"] for m in oip.get_model_repository_index(as_json=True)["models"]}
        assert {"hier_posterior", "hier_sample", "digits_sample"} <= names and "digits_posterior" not in names
        meta = oip.get_model_metadata("hier_posterior", as_json=True)
        d = hvae.noise_size
        assert [(t["name"], t["shape"]) for t in meta["inputs"]] == [("x_eps", ["-1", str(64 + d)])]
        assert [(t["name"], t["shape"]) for t in meta["outputs"]] == [
            ("logits", ["-1", "1", "8", "8"]), ("log_ratio", ["-1"]), ("u", ["-1", str(d)])
        ]  # fmt: skip
        x_eps = np.concatenate([np.random.default_rng(0).random((3, 64)), normal(2, (3, d))], axis=1).astype(np.float32)
        feed = triton.InferInput("x_eps", list(x_eps.shape), "FP32")
        feed.set_data_from_numpy(x_eps)
        result = oip.infer("hier_posterior", [feed])
        session = ort.InferenceSession(str(repo / "hier" / "1" / "posterior.onnx"), providers=["CPUExecutionProvider"])
        for name, want in zip(("logits", "log_ratio", "u"), session.run(None, {"x_eps": x_eps})):
            np.testing.assert_allclose(result.as_numpy(name), want, rtol=1e-5, atol=1e-5)
        with pytest.raises(triton.InferenceServerException, match="no posterior graph"):
            oip.get_model_metadata("digits_posterior")
