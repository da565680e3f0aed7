"""A folder of the user's own image files, end to end: `python -m training --dataset folder` with the
logistic-mixture likelihood on colour images of mixed formats and sizes (written here), `python -m
export`, the real server, and image files sent over gRPC, the Open Inference Protocol and the
client CLI, each held against the training code's own preprocessing and PyTorch model."""

import io
import json
import math

import grpc
import numpy as np
import pytest
import torch
import tritonclient.grpc as triton
from google.protobuf import text_format
from PIL import Image
from tritonclient.grpc.model_config_pb2 import ModelConfig as TritonModelConfig

import export.__main__ as export_cli
import training.__main__ as training_cli
from service import client as client_cli
from service.api.vae.v1 import vae_pb2 as pb
from service.api.vae.v1 import vae_pb2_grpc
from service.client import VaeClient
from service.engine import normal
from service.imaging import Preprocessing, load_image, to_uint8
from service.manifest import read_manifest
from service.tensors import from_array
from tests.conftest import ServerProcess, expected_sample
from training.checkpoint import load_model
from training.evaluate import iwae_nll
from training.figures import write_figures
from training.losses import kl_divergence

NAME = "photos"
SIZE = 16
K = 3  # mixture components: the decoder gives K (1 + 2C) = 21 channels per pixel
PARAMS = K * (1 + 2 * 3)
CLASSES = {"blues": 36, "greens": 38, "reds": 40}  # images written per class folder (sorted: the label order)
# Of these 114 files, split keys put 37 in test at 0.35 (the figures show 32 test images) and 64 in train.
TEST_FRACTION = "0.35"
SIZES = [(20, 24), (24, 20), (22, 22), (19, 27), (30, 21)]  # (width, height) of the folder's files
FORMATS = ["PNG", "JPEG", "WEBP", "RGBA"]  # RGBA: a PNG with a transparent corner
PREP = Preprocessing(channels=3, size=(SIZE, SIZE), fit="crop", background=(255, 255, 255))
LOG2 = math.log(2.0)


def picture(rng: np.random.Generator, width: int, height: int, hue: int) -> np.ndarray:
    """A smooth photo-like RGB picture [H, W, 3] uint8: a gradient, a disc brighter in channel `hue`
    (-1: no channel stands out), and mild noise."""
    yy, xx = np.mgrid[0:height, 0:width].astype(np.float64)
    a = rng.uniform(0.2, 0.8, 3)
    b = rng.uniform(-0.3, 0.3, (3, 2))
    image = a[:, None, None] + b[:, :1, None] * yy / height + b[:, 1:, None] * xx / width
    cy, cx = rng.uniform(0.3, 0.7) * height, rng.uniform(0.3, 0.7) * width
    r = rng.uniform(0.2, 0.4) * min(width, height)
    disc = ((yy - cy) ** 2 + (xx - cx) ** 2) < r**2
    if hue >= 0:
        image[hue][disc] = 0.95
        image[[c for c in range(3) if c != hue]] *= np.where(disc, 0.3, 1.0)
    image += rng.normal(0, 0.02, image.shape)
    return np.rint(np.clip(image, 0, 1) * 255).astype(np.uint8).transpose(1, 2, 0)


def encoded(pixels: np.ndarray, fmt: str) -> bytes:
    """pixels [H, W, 3] uint8 as an image file: PNG, JPEG, WEBP, or RGBA (a PNG whose top-left
    quarter is transparent, over a colour that must never show through)."""
    buf = io.BytesIO()
    if fmt == "RGBA":
        h, w = pixels.shape[:2]
        alpha = np.full((h, w), 255, np.uint8)
        alpha[: h // 2, : w // 2] = 0
        rgb = pixels.copy()
        rgb[: h // 2, : w // 2] = (255, 0, 255)  # hidden under alpha 0
        Image.fromarray(np.dstack([rgb, alpha]), "RGBA").save(buf, format="PNG")
    else:
        Image.fromarray(pixels, "RGB").save(buf, format=fmt, **({"quality": 92} if fmt in ("JPEG", "WEBP") else {}))
    return buf.getvalue()


def write_folder(root) -> None:
    """CLASSES' images, cycling through SIZES and FORMATS, plus an empty file and a text file named .png."""
    rng = np.random.default_rng(0)
    for hue, (name, count) in enumerate(CLASSES.items()):
        folder = root / name
        folder.mkdir(parents=True)
        for i in range(count):
            w, h = SIZES[i % len(SIZES)]
            fmt = FORMATS[i % len(FORMATS)]
            suffix = {"JPEG": "jpg", "WEBP": "webp"}.get(fmt, "png")
            (folder / f"{i:03d}.{suffix}").write_bytes(encoded(picture(rng, w, h, 2 - hue), fmt))
    (root / "reds" / "empty.jpg").write_bytes(b"")
    (root / "greens" / "notes.png").write_text("not a picture, only a name that says so\n")


def train(tmp, name: str, *flags: str):
    """`python -m training --dataset folder` in this process (torch's one thread, as conftest sets),
    then `python -m export`: the run folder and the model repository."""
    run, repo = tmp / f"{name}-run", tmp / f"{name}-models"
    training_cli.main([
        "--dataset", "folder", "--data-dir", str(tmp / "data"), "--image-size", str(SIZE),
        "--cache-dir", str(tmp / "cache"), "--epochs", "60", "--warmup-epochs", "20", "--batch-size", "16",
        "--lr", "3e-3", "--latent-dim", "8", "--widths", "16,32", "--hidden", "64",
        "--test-fraction", TEST_FRACTION, "--iwae-k", "10", "--device", "cpu", "--seed", "0", "--out", str(run), *flags,
    ])  # fmt: skip
    assert export_cli.main(["--checkpoint", str(run / "best.pt"), "--out", str(repo), "--name", name]) == 0
    return run, repo


@pytest.fixture(scope="module")
def data_root(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("own-images")
    write_folder(tmp / "data")
    return tmp


@pytest.fixture(scope="module")
def photos(data_root):
    """The logistic-mixture model trained on the folder, exported as NAME."""
    return train(data_root, NAME, "--likelihood", "logistic-mixture", "--mixtures", str(K))


@pytest.fixture(scope="module")
def model(photos):
    model, cfg, _ = load_model(photos[0] / "best.pt")
    assert cfg.model.likelihood == "logistic-mixture" and cfg.model.mixtures == K
    assert cfg.model.image_shape == (3, SIZE, SIZE)
    return model.eval()


@pytest.fixture(scope="module")
def server(photos, tmp_path_factory):
    log = tmp_path_factory.mktemp("photos-server") / "server.log"
    proc = ServerProcess(photos[1], log, "--max-batch-delay-ms", "5")
    yield proc
    assert proc.terminate() == 0


@pytest.fixture(scope="module")
def client(server):
    with VaeClient(server.target) as c:
        yield c


@pytest.fixture(scope="module")
def files():
    """Files the model never saw, none of them at the model's size: a 37x23 photo-like JPEG first."""
    rng = np.random.default_rng(7)
    return [
        encoded(picture(rng, 37, 23, 0), "JPEG"),
        encoded(picture(rng, 23, 41, 1), "PNG"),
        encoded(picture(rng, 50, 50, 2), "WEBP"),
        encoded(picture(rng, 29, 18, -1), "RGBA"),
    ]


def prepared(data: list[bytes]) -> torch.Tensor:
    """What training does to a file (service.imaging.load_image, then /255): [N, C, H, W] float32."""
    return torch.from_numpy(np.stack([load_image(d, PREP) for d in data]).astype(np.float32) / np.float32(255.0))


def torch_reconstruction(model, x: torch.Tensor) -> np.ndarray:
    with torch.no_grad():
        mu, _ = model.encode(x)
        return model.mean_image(model.decode(mu)).numpy()


def test_metrics_name_the_classes_the_skipped_files_and_the_bits_per_dim(photos):
    run, _ = photos
    metrics = json.loads((run / "metrics.json").read_text())
    data, test = metrics["data"], metrics["test"]
    assert data["dataset"] == "folder" and data["image_shape"] == [3, SIZE, SIZE]
    assert data["classes"] == sorted(CLASSES) and data["class_counts"] == CLASSES
    assert sum(data["splits"].values()) == sum(CLASSES.values()) == data["images"]
    assert data["split_counts"] == data["splits"] and min(data["splits"].values()) > 0
    assert data["preprocessing"] == {"channels": 3, "size": [SIZE, SIZE], "fit": "crop", "background": "#ffffff"}
    skipped = {s["path"]: s["reason"] for s in data["skipped"]}
    assert set(skipped) == {"reds/empty.jpg", "greens/notes.png"}
    assert skipped["reds/empty.jpg"] == "empty file"
    assert skipped["greens/notes.png"].startswith("not an image")
    assert test["images"] == data["splits"]["test"] and test["iwae_k"] == 10
    for key in ("nll_bits_per_dim", "elbo_bits_per_dim", "psnr_db"):
        assert math.isfinite(test[key]), key
    assert 0 < test["nll_bits_per_dim"] < 8 and test["elbo_bits_per_dim"] > 0  # 8 bits/dim: a uniform guess
    dims = 3 * SIZE * SIZE
    # A discrete likelihood: bits/dim is the NLL over dims ln 2, nothing added.
    assert test["nll_bits_per_dim"] == pytest.approx(test["nll"] / (dims * LOG2), rel=1e-9)
    assert test["elbo_bits_per_dim"] == pytest.approx(-test["elbo"] / (dims * LOG2), rel=1e-9)
    assert test["psnr_db"] > 5
    # The collapse warning says so exactly when no latent unit is active.
    assert ("warnings" in metrics) == (test["active_units"] == 0)


def test_metrics_give_lossless_codecs_bits_per_dim_of_the_same_test_images(photos):
    test = json.loads((photos[0] / "metrics.json").read_text())["test"]
    assert "codecs" in test, f"no test.codecs in metrics.json (docs/training.md says folders get it): {sorted(test)}"
    codecs = test["codecs"]  # lossless PNG and WebP of the same test images, the figures bits/dim is read against
    assert codecs["images"] == test["images"]
    assert 0 < codecs["png_bits_per_dim"] < 8 * 2 and 0 < codecs["webp_bits_per_dim"] < 8 * 2


def test_model_json_carries_preprocessing_mixtures_and_classes(photos):
    folder = photos[1] / NAME / "1"
    info = json.loads((folder / "model.json").read_text())
    assert info["preprocessing"] == {"channels": 3, "size": [SIZE, SIZE], "fit": "crop", "background": "#ffffff"}
    assert (info["likelihood"], info["mixtures"], info["classes"]) == ("logistic-mixture", K, sorted(CLASSES))
    assert info["image_shape"] == [3, SIZE, SIZE] and info["dataset"] == "folder"
    assert info["graphs"]["decoder"]["outputs"] == {"params": [-1, PARAMS, SIZE, SIZE], "image": [-1, 3, SIZE, SIZE]}
    spec = read_manifest(folder)
    assert spec.preprocessing == PREP and spec.mixtures == K and spec.decoder_channels == PARAMS
    assert spec.interface["preprocessing"] == PREP.to_json() and spec.interface["mixtures"] == K


def test_model_info_shows_the_mixture_preprocessing_and_classes(client):
    info = client.info()
    assert (info.name, info.likelihood, info.mixtures, info.dataset) == (NAME, "logistic-mixture", K, "folder")
    assert list(info.image_shape) == [3, SIZE, SIZE] and list(info.classes) == sorted(CLASSES)
    p = info.preprocessing
    assert (p.channels, list(p.size), p.fit, p.background) == (3, [SIZE, SIZE], "crop", "#ffffff")


def test_reconstructing_a_jpeg_of_another_size_is_trainings_preprocessing_and_model(client, model, files):
    jpeg = files[0]
    assert Image.open(io.BytesIO(jpeg)).size == (37, 23)
    x = prepared([jpeg])
    served = client.reconstruct([jpeg])
    assert served.shape == (1, 3, SIZE, SIZE) and served.dtype == np.float32
    # onnxruntime against torch on the same pixels: float32 arithmetic of two runtimes, 1e-4 apart at most.
    np.testing.assert_allclose(served, torch_reconstruction(model, x), atol=1e-4, rtol=0)
    assert 0.0 <= served.min() and served.max() <= 1.0 and served.std() > 0.01
    # The same pixels sent as a uint8 tensor: the very same bytes back.
    as_tensor = client.reconstruct(np.stack([load_image(jpeg, PREP)]))
    assert as_tensor.tobytes() == served.tobytes()
    # A batch of files of every format, RGBA included, against torch image by image.
    batch = client.reconstruct(files)
    np.testing.assert_allclose(batch, torch_reconstruction(model, prepared(files)), atol=1e-4, rtol=0)


def test_encode_of_files_is_the_encoder_on_the_prepared_pixels(client, model, files):
    mu, sigma, _ = client.encode(files)
    with torch.no_grad():
        t_mu, t_logvar = model.encode(prepared(files))
    np.testing.assert_allclose(mu, t_mu.numpy(), atol=1e-4, rtol=0)
    np.testing.assert_allclose(sigma, torch.exp(0.5 * t_logvar).numpy(), atol=1e-4, rtol=1e-4)
    assert np.abs(mu[0] - mu[1]).max() > 1e-3  # different files, different codes: the pixels really came through


def test_files_of_sizes_that_once_crashed_the_crop_are_encoded_as_training_reads_them(client, model):
    """Sprites' everyday sizes whose crop box once left the image by float rounding (a server fault)."""
    rng = np.random.default_rng(11)
    odd = [encoded(picture(rng, w, h, i % 3), "PNG") for i, (w, h) in enumerate([(57, 49), (49, 52), (129, 98), (49, 49)])]
    mu, _, _ = client.encode(odd)
    with torch.no_grad():
        t_mu, _ = model.encode(prepared(odd))
    np.testing.assert_allclose(mu, t_mu.numpy(), atol=1e-4, rtol=0)


def test_score_of_files_is_the_iwae_and_elbo_of_training(client, model, files):
    k, seed, n = 500, 3, len(files)
    scores = client.score(files, k=k, seed=seed)
    x = prepared(files)
    dims = 3 * SIZE * SIZE
    np.testing.assert_allclose(scores["bits_per_dim"], -scores["log_likelihood"] / (dims * LOG2), rtol=1e-9, atol=0)
    np.testing.assert_allclose(scores["elbo"], -(scores["reconstruction"] + scores["kl"]), rtol=1e-9)
    assert (scores["log_likelihood"] >= scores["elbo"] - 1.0).all()  # IWAE is the tighter bound
    assert (scores["bits_per_dim"] > 0).all() and np.isfinite(scores["bits_per_dim"]).all()

    # The server's own draws (z = mu + eps sigma, eps from service.engine.normal) through torch's
    # losses: the same figures up to the two runtimes' float32 differences (relative 1e-4 of ~10^3 nats).
    with torch.no_grad():
        mu, logvar = model.encode(x)
        kl = kl_divergence(mu.double(), logvar.double()).numpy()
        eps = torch.from_numpy(normal(seed, (n, k, 8), np.float64))
        z = mu.double()[:, None] + eps * torch.exp(0.5 * logvar.double())[:, None]
        params = model.decode(z.reshape(n * k, 8).float())
        xs = x[:, None].expand(n, k, 3, SIZE, SIZE).reshape(n * k, 3, SIZE, SIZE)
        log_px = model.likelihood.log_prob(xs.double(), params.double()).reshape(n, k)
        log_pz = -0.5 * (math.log(2 * math.pi) + z**2).sum(-1)
        log_qz = -0.5 * (math.log(2 * math.pi) + logvar.double()[:, None] + eps**2).sum(-1)
        iwae = (torch.logsumexp(log_px + log_pz - log_qz, dim=1) - math.log(k)).numpy()
    np.testing.assert_allclose(scores["kl"], kl, rtol=1e-4, atol=1e-3)  # closed form
    np.testing.assert_allclose(scores["reconstruction"], -log_px.mean(dim=1).numpy(), rtol=1e-4)
    np.testing.assert_allclose(scores["log_likelihood"], iwae, rtol=1e-4)

    # training.evaluate's estimate with its own noise: two Monte Carlo estimates of the same bound,
    # held to 1% of the NLL per image: six seeds of iwae_nll moved it by at most 0.25% here (about
    # 10 nats of ~4000), while a server that read the mixture's channels in another order, or
    # prepared the files otherwise, is off by far more.
    with torch.no_grad():
        nll = iwae_nll(model, x, k=k).numpy()
    np.testing.assert_allclose(-scores["log_likelihood"], nll, rtol=0.01)


def test_seeded_samples_are_the_mixture_mean_of_the_decoded_noise(client, model):
    images = client.sample(12, seed=5)
    assert images.shape == (12, 3, SIZE, SIZE) and images.dtype == np.float32
    assert 0.0 <= images.min() and images.max() <= 1.0
    assert client.sample(12, seed=5).tobytes() == images.tobytes()
    np.testing.assert_allclose(images, expected_sample(model, 12, 5), atol=1e-4, rtol=0)
    pngs = client.sample(12, seed=5, format="png")
    assert len(pngs) == 12
    for png, image in zip(pngs, images):
        opened = Image.open(io.BytesIO(png))
        assert (opened.format, opened.mode, opened.size) == ("PNG", "RGB", (SIZE, SIZE))
        assert np.array_equal(np.asarray(opened).transpose(2, 0, 1), to_uint8(image))


def test_interpolating_between_files_starts_and_ends_at_their_codes(client, files):
    (mu_a,), _, _ = client.encode(files[:1])
    (mu_b,), _, _ = client.encode(files[2:3])
    images, latents = client.interpolate(files[0], files[2], steps=5)
    assert images.shape == (5, 3, SIZE, SIZE) and latents.shape == (5, 8)
    np.testing.assert_array_equal(latents[0], mu_a)
    np.testing.assert_array_equal(latents[-1], mu_b)
    np.testing.assert_allclose(latents[2], (mu_a + mu_b) / 2, atol=1e-6)
    np.testing.assert_allclose(images[[0, -1]], client.decode(np.stack([mu_a, mu_b])), atol=1e-6)


def call_error(call, request) -> grpc.RpcError:
    with pytest.raises(grpc.RpcError) as err:
        call(request, timeout=30)
    return err.value


def test_bad_files_are_refused_by_index_and_the_server_goes_on(server, client, model, files):
    truncated = files[0][: len(files[0]) // 2]
    text = b"just some text, sent as if it were a photo\n"
    with grpc.insecure_channel(server.target) as channel:
        stub = vae_pb2_grpc.VaeServiceStub(channel)
        for bad, kind in ((truncated, "truncated"), (text, "not an image"), (b"", "empty file")):
            for call, request in (
                (stub.Reconstruct, pb.ReconstructRequest(image_files=[files[1], bad])),
                (stub.Encode, pb.EncodeRequest(image_files=[files[1], bad, files[2]])),
                (stub.Score, pb.ScoreRequest(image_files=[files[1], bad], importance_samples=4)),
            ):
                err = call_error(call, request)
                assert err.code() == grpc.StatusCode.INVALID_ARGUMENT
                assert err.details().startswith(f"image_files[1]: {kind}"), err.details()
        err = call_error(stub.Interpolate, pb.InterpolateRequest(start_file=files[0], end_file=text, steps=3))
        assert err.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert err.details().startswith("end_file") and "not an image" in err.details(), err.details()
        both = pb.ReconstructRequest(images=from_array(np.stack([load_image(files[0], PREP)])), image_files=[files[0]])
        err = call_error(stub.Reconstruct, both)
        assert err.code() == grpc.StatusCode.INVALID_ARGUMENT and "not both" in err.details()
        # A small file that claims a huge image is refused from its header, before it is decoded.
        huge = io.BytesIO()
        Image.new("L", (8000, 6000)).save(huge, format="PNG")
        assert len(huge.getvalue()) < 200_000  # 48 million pixels in a small file
        err = call_error(stub.Reconstruct, pb.ReconstructRequest(image_files=[huge.getvalue()]))
        assert err.code() == grpc.StatusCode.INVALID_ARGUMENT and err.details().startswith("image_files[0]: too large")
    # Still serving, and the good files still give what they gave.
    expected = torch_reconstruction(model, prepared(files))
    np.testing.assert_allclose(client.reconstruct(files), expected, atol=1e-4, rtol=0)


def test_open_inference_decoder_gives_the_mixtures_parameters(server, photos, model):
    folder = photos[1] / NAME / "1"
    config = text_format.Parse((folder / "decoder.config.pbtxt").read_text(), TritonModelConfig())
    assert config.name == f"{NAME}_decoder" and [list(i.dims) for i in config.input] == [[8]]
    assert {o.name: list(o.dims) for o in config.output} == {"params": [PARAMS, SIZE, SIZE], "image": [3, SIZE, SIZE]}
    z = normal(9, (6, 8))
    with triton.InferenceServerClient(server.target) as oip:
        meta = oip.get_model_metadata(f"{NAME}_decoder", as_json=True)
        shape = ["-1", str(PARAMS), str(SIZE), str(SIZE)]
        assert [(t["name"], t["shape"]) for t in meta["outputs"]] == [("params", shape), ("image", ["-1", "3", str(SIZE), str(SIZE)])]
        enc = oip.get_model_metadata(f"{NAME}_encoder", as_json=True)
        assert [(t["name"], t["shape"]) for t in enc["inputs"]] == [("x", ["-1", "3", str(SIZE), str(SIZE)])]
        feed = triton.InferInput("z", list(z.shape), "FP32")
        feed.set_data_from_numpy(z)
        params = oip.infer(f"{NAME}_decoder", [feed]).as_numpy("params")
    assert params.shape == (6, PARAMS, SIZE, SIZE)
    with torch.no_grad():
        expected = model.decode(torch.from_numpy(z)).numpy()
    np.testing.assert_allclose(params, expected, atol=1e-4, rtol=0)


def test_client_cli_reconstructs_and_scores_an_image_file(server, client, files, tmp_path, capsys):
    jpeg, out = tmp_path / "photo.jpg", tmp_path / "r.png"
    jpeg.write_bytes(files[0])
    assert client_cli.main(["--target", server.target, "reconstruct", "--input", str(jpeg), "--out", str(out)]) == 0
    assert f"wrote {out}" in capsys.readouterr().out
    grid = Image.open(out)
    assert grid.mode == "RGB" and grid.size == (SIZE + 2, SIZE + 2)  # one cell, a white pixel around it
    cell = np.asarray(grid).transpose(2, 0, 1)[:, 1 : SIZE + 1, 1 : SIZE + 1]
    assert np.array_equal(cell, to_uint8(client.reconstruct([files[0]])[0]))
    assert (np.asarray(grid)[0] == 255).all()  # the border
    # score prints the per-image figures, bits/dim among them, as the Python client gets them.
    assert client_cli.main(["--target", server.target, "score", "--input", str(jpeg), "-k", "16", "--seed", "2"]) == 0
    printed = json.loads(capsys.readouterr().out)
    expected = client.score([files[0]], k=16, seed=2)
    assert printed["bits_per_dim"] == expected["bits_per_dim"].round(3).tolist() and printed["bits_per_dim"][0] > 0


def test_a_grey_padded_gaussian_model_trains_and_exports_from_the_same_folder(data_root, photos):
    run, repo = train(
        data_root, "grey", "--likelihood", "gaussian", "--channels", "1", "--fit", "pad", "--background", "#102030"
    )
    metrics = json.loads((run / "metrics.json").read_text())
    prep = {"channels": 1, "size": [SIZE, SIZE], "fit": "pad", "background": "#102030"}
    assert metrics["data"]["preprocessing"] == prep and metrics["data"]["image_shape"] == [1, SIZE, SIZE]
    assert metrics["data"]["class_counts"] == CLASSES and len(metrics["data"]["skipped"]) == 2
    assert math.isfinite(metrics["test"]["nll_bits_per_dim"])
    folder = repo / "grey" / "1"
    info = json.loads((folder / "model.json").read_text())
    assert info["preprocessing"] == prep and info["likelihood"] == "gaussian" and "mixtures" not in info
    assert info["image_shape"] == [1, SIZE, SIZE] and info["classes"] == sorted(CLASSES)
    assert info["graphs"]["decoder"]["outputs"] == {"mean": [-1, 1, SIZE, SIZE], "image": [-1, 1, SIZE, SIZE]}
    spec = read_manifest(folder)
    assert spec.preprocessing == Preprocessing(1, (SIZE, SIZE), "pad", (0x10, 0x20, 0x30))
    assert spec.decoder_channels == 1
    # Its own pixel cache beside the colour model's: one per preprocessing.
    assert len([p for p in (data_root / "cache").iterdir() if p.is_dir()]) == 2


def test_figures_are_drawn_for_a_test_split_of_fewer_than_32_images(photos, model, files, tmp_path):
    """A small folder has a small test split (about a tenth of its files at the default
    --test-fraction 0.1, so under 32 images for a folder of a few hundred): the run's figures must
    not need 32 of them (nor 12), or `python -m training` fails after its last epoch, before
    metrics.json is written."""
    history = json.loads((photos[0] / "metrics.json").read_text())["history"]
    paths = write_figures(model, prepared(files), history, tmp_path)
    assert {p.name for p in paths} >= {"samples.png", "reconstructions.png", "interpolation_linear.png"}
    assert all(p.is_file() for p in paths)
