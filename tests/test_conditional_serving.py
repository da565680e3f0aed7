"""Conditional models served (`--conditional`, exported with the class in each graph row): the class in
every vae.v1 operation, Classify and Edit, over gRPC, HTTP, the Open Inference Protocol (with
tritonclient), the client's command line and the playground, each answer checked against PyTorch for
the same noise and classes; and an unconditional model's edits by its class means."""

import base64
import io
import json
import subprocess
import sys
from pathlib import Path

import grpc
import httpx
import numpy as np
import pytest
import torch
import tritonclient.http as triton
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image
from selenium.webdriver.common.by import By
from selenium.webdriver.support.ui import Select

from export.repository import publish
from service.api.vae.v1 import vae_pb2 as pb
from service.client import VaeClient
from service.dataplane import class_index, class_list
from service.engine import normal
from service.errors import BadRequest
from service.tensors import from_array
from tests.conftest import ServerProcess
from tests.test_playground import idle, wait, wait_for_grid, wait_for_new_src
from training import checkpoint
from training.config import ModelConfig, TrainConfig
from training.train import run

ROOT = Path(__file__).resolve().parent.parent
CLASSES = 10


def trained(out: Path, digits, model: ModelConfig, epochs: int, conditional: bool = True):
    cfg = TrainConfig(model=model, epochs=epochs, batch_size=32, lr=2e-3, iwae_k=2, eval_images=20, free_bits=0.0,
                      conditional=conditional)  # fmt: skip
    run(cfg, out, data=digits)
    model, cfg, _ = checkpoint.load_model(out / "best.pt")
    return model.eval(), cfg, checkpoint.load(out / "best.pt")


@pytest.fixture(scope="module")
def models(tmp_path_factory, digits):
    """A flat conditional model ("cvae"), a hierarchical one ("chvae") and an unconditional one with
    class means ("plain"), really trained on digits, in one repository."""
    root = tmp_path_factory.mktemp("conditional-serving")
    repo = root / "models"
    flat = ModelConfig(latent_dim=8, widths=(16, 32), hidden=64)
    made = {
        "cvae": trained(root / "cvae", digits, flat, 6),
        "chvae": trained(root / "chvae", digits, ModelConfig(kind="hvae", groups="4:1,2:1", width=16, z_channels=4), 1),
        "plain": trained(root / "plain", digits, flat, 2, conditional=False),
    }
    for name, (model, cfg, state) in made.items():
        publish(model, cfg, repo, name, {}, classes=state["classes"], class_means=state["class_means"])
    return repo, {name: (model, state) for name, (model, _, state) in made.items()}


@pytest.fixture(scope="module")
def server(models, tmp_path_factory):
    proc = ServerProcess(models[0], tmp_path_factory.mktemp("conditional-server") / "server.log", "--max-batch-delay-ms", "5", http=True)
    yield proc
    assert proc.terminate() == 0


def images_of(model, u: np.ndarray, y: np.ndarray | None) -> np.ndarray:
    with torch.no_grad():
        params = model.decode(torch.from_numpy(u.astype(np.float32)), None if y is None else torch.from_numpy(y))
        return model.mean_image(params).numpy()


def one_hot(labels) -> np.ndarray:
    return np.eye(CLASSES, dtype=np.float32)[np.asarray(labels)]


def test_model_info_says_which_models_are_conditional_and_lists_their_classes(server, models):
    for name, conditional in (("cvae", True), ("chvae", True), ("plain", False)):
        with VaeClient(server.target, model=name) as client:
            info = client.info()
        assert info.conditional is conditional and list(info.classes) == [str(d) for d in range(10)] and info.editable
        prior = np.exp(models[1][name][0].cond.log_prior.numpy()) if conditional else []
        np.testing.assert_allclose(info.class_prior, prior, atol=1e-6)


@pytest.mark.parametrize("name", ["cvae", "chvae"])
def test_sample_takes_a_class_by_name_or_index_per_request_or_per_row(server, models, name):
    model = models[1][name][0]
    with VaeClient(server.target, model=name) as client:
        sevens = client.sample(4, seed=3, classes=["7"])
        assert client.classes == ["7"] * 4
        by_index = client.sample(4, seed=3, classes=[7])
        per_row = client.sample(3, seed=5, classes=["1", "2", "9"])
        assert client.classes == ["1", "2", "9"]
    assert sevens.tobytes() == by_index.tobytes()
    u = normal(3, (4, getattr(model, "noise_size", 8)))
    np.testing.assert_allclose(sevens, images_of(model, u, one_hot([7] * 4)), atol=1e-5)
    np.testing.assert_allclose(per_row, images_of(model, normal(5, (3, u.shape[1])), one_hot([1, 2, 9])), atol=1e-5)


def test_sample_without_a_class_draws_classes_from_p_y_with_the_seed_and_says_which(server, models):
    model = models[1]["cvae"][0]
    with VaeClient(server.target, model="cvae") as client:
        images = client.sample(6, seed=11)
        drawn = client.classes
        again = client.sample(6, seed=11)
        assert client.classes == drawn and again.tobytes() == images.tobytes()
        many = client.sample(1000, seed=12, format="uint8")
        counts = np.bincount([int(c) for c in client.classes], minlength=CLASSES)
    np.testing.assert_allclose(images, images_of(model, normal(11, (6, 8)), one_hot([int(c) for c in drawn])), atol=1e-5)
    # Drawn from p(y): each class's count within 5 standard deviations of its expectation under p(y).
    p = np.exp(model.cond.log_prior.numpy())
    assert len(many) == 1000 and (np.abs(counts - 1000 * p) < 5 * np.sqrt(1000 * p * (1 - p))).all(), counts
    with VaeClient(server.target, model="cvae") as client:  # in chunks: the same images and classes
        streamed = client.sample_stream(6, seed=11, chunk_rows=4)
        assert client.classes == drawn and streamed.tobytes() == images.tobytes()
        asked = client.sample_stream(5, seed=2, chunk_rows=2, classes=["8"])
        assert client.classes == ["8"] * 5 and asked.tobytes() == client.sample(5, seed=2, classes=["8"]).tobytes()


@pytest.mark.parametrize("name", ["cvae", "chvae"])
def test_classify_is_bayes_rule_over_the_per_class_likelihoods_that_score_gives(server, name):
    with VaeClient(server.target, model=name) as client:
        x = client.sample(3, seed=4, temperature=0.5, classes=["0", "4", "8"])
        names, p = client.classify(x, k=8, seed=9)
        assert names == [str(d) for d in range(10)] and p.shape == (3, CLASSES)
        np.testing.assert_allclose(p.sum(1), 1.0, atol=1e-9)
        assert client.classes == [names[i] for i in p.argmax(1)]
        request = pb.ClassifyRequest(images=from_array(x), importance_samples=8, seed=9, model_name=name)
        response = client.stub.Classify(request, timeout=30)
        # A one-image Score given a class draws what Classify draws for it: the same bound, to rounding.
        given = client.score(x[:1], k=8, seed=9, classes=["3"])
        assert abs(given["log_likelihood"][0] - response.results[0].class_log_likelihoods[3]) < 1e-6
        # Score without a class is the marginal log p(x) = logsumexp_y [log p(x|y) + log p(y)] Classify gives.
        marginal = client.score(x, k=8, seed=9)
        assert client.classes == [r.class_name for r in response.results]
    np.testing.assert_allclose(marginal["log_likelihood"], [r.log_likelihood for r in response.results], atol=1e-6)
    # A mixture of the classes' likelihoods lies below the largest of them.
    assert all(r.log_likelihood <= max(r.class_log_likelihoods) + 1e-9 for r in response.results)


def test_the_flat_model_classifies_its_own_class_samples(server):
    """Samples of each class at a low temperature, classified by the model's own likelihoods:
    chance is 0.1, and the model was trained for a few seconds."""
    with VaeClient(server.target, model="cvae") as client:
        x = client.sample(40, seed=2, temperature=0.3, classes=[str(d % 10) for d in range(40)])
        _, p = client.classify(x, k=4, seed=0)
    assert (p.argmax(1) == np.arange(40) % 10).mean() >= 0.7


@pytest.mark.parametrize("name", ["cvae", "chvae"])
def test_encode_reconstruct_and_decode_use_the_class_given_or_classify_s(server, models, name):
    model = models[1][name][0]
    with VaeClient(server.target, model=name) as client:
        x = client.sample(2, seed=6, temperature=0.5, classes=["2", "5"])
        mu, _, _ = client.encode(x, classes=["5"])
        assert client.classes == ["5", "5"]
        np.testing.assert_allclose(mu, client_mu(model, x, 5), atol=1e-4)
        recon = client.reconstruct(x, classes=["2"])
        assert client.classes == ["2", "2"]
        decoded = client.decode(mu, classes=["5", "5"])
        np.testing.assert_allclose(decoded, images_of(model, mu, one_hot([5, 5])), atol=1e-5)
        client.decode(mu)  # no class: p(y)'s most probable
        assert client.classes == [str(int(model.cond.log_prior.argmax()))] * 2
    np.testing.assert_allclose(recon, images_of(model, client_mu(model, x, 2), one_hot([2, 2])), atol=1e-4)


def client_mu(model, x: np.ndarray, label: int) -> np.ndarray:
    """PyTorch's posterior mean (u) of images under one class."""
    with torch.no_grad():
        mu, _ = model.encode(torch.from_numpy(x), torch.from_numpy(one_hot([label] * len(x))))
    return mu.numpy()


def test_an_implied_class_is_classify_s_most_probable_for_the_image_alone(server):
    """Where a call gives no class, each image's is what a one-image Classify (k=16, seed 0) gives
    it, wherever the image lies in the request."""
    with VaeClient(server.target, model="cvae") as client:
        x = client.sample(6, seed=8, temperature=0.8, classes=["0", "1", "2", "3", "4", "5"])
        client.encode(x)
        implied = client.classes
        client.reconstruct(x[::-1].copy())
        assert client.classes == implied[::-1]
        alone = []
        for image in x:
            names, p = client.classify(image[None], k=16, seed=0)
            alone.append(names[int(p.argmax())])
    assert implied == alone


def test_a_hierarchical_model_draws_from_its_posterior_under_the_class(server, models):
    with VaeClient(server.target, model="chvae") as client:
        x = client.sample(2, seed=1, classes=["3"])
        _, _, z = client.encode(x, sample=True, seed=4, classes=["3"])
        _, _, again = client.encode(x, sample=True, seed=4, classes=["3"])
        _, _, other = client.encode(x, sample=True, seed=4, classes=["8"])
    assert z.shape == (2, models[1]["chvae"][0].noise_size) and np.array_equal(z, again) and not np.allclose(z, other)


def test_interpolate_moves_the_class_weights_from_one_end_s_class_to_the_other_s(server, models):
    model = models[1]["cvae"][0]
    u = normal(21, (2, 8))
    with VaeClient(server.target, model="cvae") as client:
        images, path = client.interpolate(u[0], u[1], 5, latents=True, classes=["1", "7"])
        assert client.classes == ["1", "7"]
    t = np.linspace(0, 1, 5, dtype=np.float32)[:, None]
    y = (1 - t) * one_hot([1]) + t * one_hot([7])
    np.testing.assert_allclose(images, images_of(model, path, y), atol=1e-5)


def test_edit_keeps_a_conditional_model_s_latent_and_moves_its_class(server, models):
    model = models[1]["cvae"][0]
    with VaeClient(server.target, model="cvae") as client:
        x = client.sample(3, seed=7, temperature=0.5, classes=["1"])
        whole = client.edit(x, target="7", sources=["1"])
        assert client.classes == ["1"] * 3
        half = client.edit(x, target=7, strength=0.5, sources=["1"])
        none = client.edit(x, target="7", strength=0.0, sources=["1"])
        recon = client.reconstruct(x, classes=["1"])
    u = client_mu(model, x, 1)
    np.testing.assert_allclose(whole, images_of(model, u, one_hot([7] * 3)), atol=1e-5)
    np.testing.assert_allclose(half, images_of(model, u, 0.5 * one_hot([1] * 3) + 0.5 * one_hot([7] * 3)), atol=1e-5)
    np.testing.assert_allclose(none, recon, atol=1e-6)


def test_edit_moves_an_unconditional_model_s_latent_by_the_class_means(server, models):
    model, state = models[1]["plain"]
    means = state["class_means"].numpy()
    with VaeClient(server.target, model="plain") as client:
        x = client.sample(3, seed=7)
        edited = client.edit(x, target="4", strength=0.75, sources=["0", "1", "2"])
        mu, _, _ = client.encode(x)
        client.edit(x, target="4")
        nearest = client.classes
    shift = 0.75 * (means[4] - means[[0, 1, 2]])
    np.testing.assert_allclose(edited, images_of(model, mu + shift, None), atol=1e-5)
    assert nearest == [str(i) for i in ((mu[:, None] - means[None]) ** 2).sum(-1).argmin(1)]


def refused(call) -> tuple[grpc.StatusCode, str]:
    with pytest.raises(grpc.RpcError) as err:
        call()
    return err.value.code(), err.value.details()


def test_mistakes_are_one_line_and_the_server_keeps_serving(server):
    with VaeClient(server.target, model="cvae") as client:
        code, message = refused(lambda: client.sample(2, classes=["cats"]))
        assert code == grpc.StatusCode.INVALID_ARGUMENT and "'cats' is no class of model cvae" in message and "0, 1, 2" in message
        code, message = refused(lambda: client.sample(3, classes=["1", "2"]))
        assert code == grpc.StatusCode.INVALID_ARGUMENT and "2 classes for 3 rows" in message
        code, message = refused(lambda: client.edit(client.sample(1, seed=0), target="7", strength=1.5))
        assert code == grpc.StatusCode.INVALID_ARGUMENT and "strength: 1.5" in message
        code, message = refused(lambda: client.edit(client.sample(1, seed=0), target=""))
        assert code == grpc.StatusCode.INVALID_ARGUMENT and "target_class: required" in message
        assert client.sample(2, seed=1, classes=["3"]).shape == (2, 1, 8, 8)
    with VaeClient(server.target, model="plain") as client:
        code, message = refused(lambda: client.classify(client.sample(1, seed=0)))
        assert code == grpc.StatusCode.FAILED_PRECONDITION and "trained without --conditional" in message
        code, message = refused(lambda: client.sample(1, classes=["3"]))
        assert code == grpc.StatusCode.INVALID_ARGUMENT and "not conditional" in message
    for message in (code, message):
        assert "\n" not in str(message)


class Named:
    """What the class checks read of an engine: its spec's name and classes, and whether it is conditional."""

    def __init__(self, classes: tuple[str, ...]) -> None:
        self.spec = type("Spec", (), {"name": "m", "classes": classes})()
        self.classes = len(classes)


NAMES = ("Animals & Nature", "Flags", "People & Body", "7", "Objects")


@settings(max_examples=300, deadline=None)
@given(value=st.one_of(st.text(max_size=80), st.integers(-(2**70), 2**70), st.binary(max_size=40)))
def test_a_class_is_its_name_else_its_index_and_anything_else_is_one_line(value):
    """Names win over indices ("7" is the class named 7, index 3); an index must be a plain decimal
    integer in range; any other string, number or bytes is refused naming the classes."""
    engine = Named(NAMES)
    text = value.decode("utf-8", "replace") if isinstance(value, bytes) else value
    if isinstance(text, str) and text in NAMES:
        expected = NAMES.index(text)
    elif isinstance(text, str) and text.isascii() and text.isdigit() and int(text) < len(NAMES):
        expected = int(text)
    elif isinstance(text, int) and 0 <= text < len(NAMES):
        expected = text
    else:
        with pytest.raises(BadRequest) as err:
            class_index(engine, value, "classes")
        assert "\n" not in str(err.value) and "Animals & Nature, Flags" in str(err.value)
        return
    assert class_index(engine, value, "classes") == expected


@settings(max_examples=100, deadline=None)
@given(n=st.integers(1, 20), given_count=st.integers(0, 22))
def test_classes_are_none_one_or_one_per_row(n, given_count):
    engine = Named(NAMES)
    values = [i % len(NAMES) for i in range(given_count)]
    if given_count not in (0, 1, n):
        with pytest.raises(BadRequest, match=f"{given_count} classes for {n} rows"):
            class_list(engine, values, n, "classes")
        return
    labels = class_list(engine, values, n, "classes")
    assert labels is None if given_count == 0 else labels.tolist() == (values * n if given_count == 1 else values)


def test_http_takes_the_class_in_query_strings_and_json_and_names_it(server, models):
    base = f"{server.http_url}/v1/models"
    with httpx.Client(timeout=60) as http:
        png = http.get(f"{base}/cvae/sample.png", params={"n": 4, "seed": 3, "class": "7"})
        assert png.status_code == 200 and png.headers["vae-class-indices"] == "7,7,7,7"
        with VaeClient(server.target, model="cvae") as client:
            expected = client.sample(4, seed=3, classes=["7"], format="png")
        one = http.post(f"{base}/cvae/sample", json={"num_samples": 4, "seed": 3, "classes": [7], "format": "png"}).json()
        assert one["classes"] == ["7"] * 4 and [base64.b64decode(p) for p in one["images"]["png"]] == expected
        x = np.asarray(Image.open(io.BytesIO(expected[0])))[None, None]
        body = {"images": {"shape": list(x.shape), "dtype": "uint8", "data": x.ravel().tolist()}}
        classified = http.post(f"{base}/cvae/classify", json={**body, "importance_samples": 4, "seed": 1}).json()
        assert classified["classes"] == [str(d) for d in range(10)] and len(classified["results"][0]["probabilities"]) == 10
        edited = http.post(f"{base}/cvae/edit.png", params={"target": "1", "source": "7", "strength": 0.5},
                           files=[("image", ("seven.png", expected[0], "image/png"))])  # fmt: skip
        assert edited.status_code == 200 and edited.headers["vae-class-indices"] == "7"
        assert Image.open(io.BytesIO(edited.content)).size == (8, 8)
        bad = http.get(f"{base}/cvae/sample.png", params={"n": 2, "class": "Cats & Dogs"})
        assert bad.status_code == 400 and "'Cats & Dogs' is no class of model cvae" in bad.json()["error"]
        unconditional = http.post(f"{base}/plain/classify", json=body)
        assert unconditional.status_code == 400 and "cannot classify" in unconditional.json()["error"]
        # An unconditional model's answers are as they were: no classes in them.
        plain = http.post(f"{base}/plain/sample", json={"num_samples": 1, "seed": 1})
        assert plain.status_code == 200 and "classes" not in plain.json() and "vae-class-indices" not in http.get(
            f"{base}/plain/sample.png", params={"n": 1}).headers  # fmt: skip
        wrong = http.post(f"{base}/cvae/edit.png", params={"target": "eleven"}, files=[("image", ("x.png", expected[0], "image/png"))])
        assert wrong.status_code == 400 and wrong.json()["error"].startswith("target: 'eleven' is no class")


def test_the_inference_protocol_sample_takes_a_class_by_name_or_index(server):
    """tritonclient, over HTTP: NAME_sample's optional class input, BYTES or INT64, and its class output."""
    client = triton.InferenceServerClient(server.http_url.removeprefix("http://"))
    metadata = client.get_model_metadata("cvae_sample")
    assert {"name": "class", "datatype": "BYTES", "shape": [-1]} in metadata["inputs"]
    assert metadata["parameters"]["classes"] == [str(d) for d in range(10)]

    def infer(datatype: str, value: np.ndarray) -> dict[str, np.ndarray]:
        inputs = [triton.InferInput("num_samples", [1], "INT64"), triton.InferInput("seed", [1], "INT64"),
                  triton.InferInput("class", [1], datatype)]  # fmt: skip
        for t, a in zip(inputs, (np.array([3], np.int64), np.array([5], np.int64), value)):
            t.set_data_from_numpy(a)
        result = client.infer("cvae_sample", inputs)
        return {name: result.as_numpy(name) for name in ("images", "class")}

    named, indexed = infer("BYTES", np.array([b"6"], dtype=object)), infer("INT64", np.array([6], np.int64))
    assert named["class"].tolist() == [6, 6, 6] and named["images"].tobytes() == indexed["images"].tobytes()
    with VaeClient(server.target, model="cvae") as vae:
        assert vae.sample(3, seed=5, classes=["6"]).tobytes() == named["images"].tobytes()


def cli(server, *args: str) -> subprocess.CompletedProcess:
    command = [sys.executable, "-m", "service.client", "--target", server.target, "--model", "cvae", *args]
    return subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=120)


def test_the_command_line_samples_a_class_classifies_and_edits(server, tmp_path):
    done = cli(server, "sample", "-n", "4", "--seed", "2", "--class", "3", "--out", str(tmp_path / "threes.npy"))
    assert done.returncode == 0, done.stderr
    assert "classes: 3, 3, 3, 3" in done.stderr and np.load(tmp_path / "threes.npy").shape == (4, 1, 8, 8)
    done = cli(server, "classify", "--input", str(tmp_path / "threes.npy"), "-k", "4")
    answer = json.loads(done.stdout)
    assert done.returncode == 0 and answer["classes"] == [str(d) for d in range(10)] and len(answer["most_probable"]) == 4
    done = cli(server, "edit", "--input", str(tmp_path / "threes.npy"), "--to", "8", "--out", str(tmp_path / "eights.png"))
    assert done.returncode == 0, done.stderr
    assert "classes:" in done.stderr and Image.open(tmp_path / "eights.png").size[0] > 8
    done = cli(server, "sample", "-n", "1", "--class", "eleven")
    assert done.returncode == 1 and done.stderr.startswith("INVALID_ARGUMENT: classes: 'eleven' is no class") and done.stderr.count("\n") == 1


def test_the_playground_picks_a_class_and_edits_a_sample(browser, server):
    """In a real browser: the class picker asks for one class, and the edit section moves a picked
    sample to another class, showing the PNG the server's Edit gives for it."""
    d = browser
    d.get(server.http_url + "/")
    wait_for_grid(d, 24)
    Select(d.find_element(By.ID, "model")).select_by_value("cvae")
    wait(d, lambda d: "cvae v1" in d.find_element(By.ID, "model-info").text, "the conditional model's info")
    assert "conditional on 10 classes" in d.find_element(By.ID, "model-info").text
    wait_for_grid(d, 24)
    assert d.find_element(By.ID, "class-label").is_displayed() and d.find_element(By.ID, "edit").is_displayed()
    Select(d.find_element(By.ID, "class")).select_by_value("4")
    d.find_element(By.ID, "sample").click()
    wait(d, lambda d: {b.get_attribute("data-class") for b in d.find_elements(By.CSS_SELECTOR, "#grid button")} == {"4"},
         "a grid of class 4")  # fmt: skip
    sources = wait_for_grid(d, 24)
    d.find_elements(By.CSS_SELECTOR, "#grid button")[0].click()
    Select(d.find_element(By.ID, "edit-target")).select_by_value("9")
    edited = wait_for_new_src(d, "edit-output", None)
    idle(d, "edit")
    assert "4 → 9" in d.find_element(By.ID, "edit-caption").text
    with VaeClient(server.target, model="cvae") as client:
        x = np.asarray(Image.open(io.BytesIO(base64.b64decode(sources[0].split(",", 1)[1]))))[None, None]
        (png,) = client.edit(x, target="9", strength=1.0, sources=["4"], format="png")
    assert edited == "data:image/png;base64," + base64.b64encode(png).decode()
    assert not d.find_elements(By.CSS_SELECTOR, "#messages .message")


def serialized(items: list[bytes]) -> bytes:
    """The protocol's BYTES serialization: each element's length as 4 bytes little-endian, then it."""
    return b"".join(len(item).to_bytes(4, "little") + item for item in items)


@settings(max_examples=300, deadline=None)
@given(items=st.lists(st.binary(max_size=20), max_size=6), extra=st.binary(max_size=8), shape_offset=st.integers(-2, 2))
def test_bytes_tensors_read_what_was_serialized_and_refuse_anything_else_in_one_line(items, extra, shape_offset):
    """Raw BYTES as tritonclient serializes them come back element for element; trailing bytes, a
    torn length or a shape that disagrees with the count are a one-line BadRequest, never another error."""
    from service.tensors import oip_tensor

    shape = [max(0, len(items) + shape_offset)]
    raw = serialized(items) + extra
    try:
        array = oip_tensor("class", "BYTES", shape, raw=raw)
    except BadRequest as err:
        assert "\n" not in str(err) and str(err).startswith("input 'class'")
        assert extra or shape_offset, "what tritonclient serializes must be read"
        return
    # Trailing bytes that happen to serialize more elements are read as them: the count must then match.
    assert array.shape == tuple(shape) and array.tolist()[: len(items)] == items
