"""Export on a real (small) trained model: layout, versions, parity, model.json, Triton configs."""

import hashlib
import json
import subprocess
import sys

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from google.protobuf import text_format
from tritonclient.grpc.model_config_pb2 import ModelConfig

from export.onnx_files import OPSET
from export.repository import publish
from service.manifest import version_numbers
from export.triton import layout
from export.verify import ParityError, verify_parity
from training.checkpoint import load_model
from training.model import VAE


@pytest.fixture(scope="module")
def checkpoint_path(trained):
    return trained / "best.pt"


@pytest.fixture(scope="module")
def published(tmp_path_factory, checkpoint_path):
    """The CLI, as a user runs it, exporting twice into one repository."""
    repo = tmp_path_factory.mktemp("models")
    for _ in range(2):
        cmd = [sys.executable, "-m", "export", "--checkpoint", str(checkpoint_path), "--out", str(repo), "--name", "digits"]
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
        assert done.returncode == 0, done.stderr
        assert "published" in done.stdout
    return repo


def test_layout_and_version_numbering(published):
    model_dir = published / "digits"
    assert version_numbers(model_dir) == [1, 2]
    assert (model_dir / "1").stat().st_mode & 0o055 == 0o055  # readable by a server running as another user
    assert sorted(p.name for p in model_dir.iterdir()) == ["1", "2"]  # no staging folder left behind
    for v in ("1", "2"):
        assert {p.name for p in (model_dir / v).iterdir()} == {
            "encoder.onnx", "decoder.onnx", "model.json", "encoder.config.pbtxt", "decoder.config.pbtxt",
        }  # fmt: skip


def test_model_json(published):
    info = json.loads((published / "digits" / "2" / "model.json").read_text())
    assert info["name"] == "digits" and info["version"] == 2
    assert info["latent_dim"] == 8 and info["image_shape"] == [1, 8, 8]
    assert info["likelihood"] == "bernoulli" and info["dataset"] == "digits"
    assert info["metrics"] == {"elbo": -27.0, "nll": 26.0}
    assert info["opset"] == OPSET >= 17
    assert set(info["exporters"]) == {"torch", "onnx", "onnxruntime"}
    for role in ("encoder", "decoder"):
        data = (published / "digits" / "2" / f"{role}.onnx").read_bytes()
        assert info["graphs"][role]["sha256"] == hashlib.sha256(data).hexdigest()
    assert info["graphs"]["decoder"]["outputs"] == {"logits": [-1, 1, 8, 8], "image": [-1, 1, 8, 8]}
    assert all(v <= 1e-4 for v in info["parity_max_abs_diff"].values())


def test_graphs_are_valid_and_describe_themselves(published):
    for role in ("encoder", "decoder"):
        graph = onnx.load(str(published / "digits" / "1" / f"{role}.onnx"))
        onnx.checker.check_model(graph, full_check=True)
        meta = {p.key: p.value for p in graph.metadata_props}
        assert meta["role"] == role and meta["latent_dim"] == "8" and meta["likelihood"] == "bernoulli"
        assert "VAE" in graph.doc_string
        assert graph.graph.input[0].type.tensor_type.shape.dim[0].dim_param  # a named, dynamic batch axis


@pytest.mark.parametrize("n", [1, 3, 64, 300])
def test_dynamic_batch_matches_torch(published, checkpoint_path, n):
    model, _, _ = load_model(checkpoint_path)
    enc = ort.InferenceSession(str(published / "digits" / "1" / "encoder.onnx"), providers=["CPUExecutionProvider"])
    dec = ort.InferenceSession(str(published / "digits" / "1" / "decoder.onnx"), providers=["CPUExecutionProvider"])
    x = np.random.default_rng(n).random((n, 1, 8, 8), dtype=np.float32)
    mu, logvar = enc.run(None, {"x": x})
    logits = dec.run(None, {"z": mu})[0]
    with torch.no_grad():
        t_mu, t_logvar = model.encode(torch.from_numpy(x))
        t_logits = model.decode(t_mu)
    assert mu.shape == logvar.shape == (n, 8) and logits.shape == (n, 1, 8, 8)
    np.testing.assert_allclose(mu, t_mu.numpy(), atol=1e-4)
    np.testing.assert_allclose(logits, t_logits.numpy(), atol=1e-4)


class NoisyVAE(VAE):
    """A deliberately broken model: its graph draws ONNX Runtime's random numbers, not torch's."""

    def decode(self, z, y=None):
        out = super().decode(z, y)
        return out + torch.rand_like(out)


def test_parity_failure_publishes_nothing(tmp_path, checkpoint_path):
    model, cfg, _ = load_model(checkpoint_path)
    broken = NoisyVAE(cfg.model)
    broken.load_state_dict(model.state_dict())
    with pytest.raises(ParityError, match=r"decoder.logits .*") as err:
        publish(broken.eval(), cfg, tmp_path, "broken")
    assert "0.0001" in str(err.value)
    assert list((tmp_path / "broken").iterdir()) == []  # no version, no staging folder


def test_parity_check_passes_on_the_real_model(published, checkpoint_path):
    model, _, _ = load_model(checkpoint_path)
    diffs = verify_parity(model, published / "digits" / "1")
    assert set(diffs) == {"encoder.mu", "encoder.logvar", "decoder.logits", "decoder.image"}


def test_triton_configs_parse_as_text_protobuf(published, tmp_path):
    """Parsed with Triton's own ModelConfig (tritonclient ships it), as Triton parses them: an unknown
    or misspelt field fails."""
    for role, (inp, dims) in {"encoder": ("x", [1, 8, 8]), "decoder": ("z", [8])}.items():
        config = text_format.Parse((published / "digits" / "1" / f"{role}.config.pbtxt").read_text(), ModelConfig())
        assert config.name == f"digits_{role}" and config.platform == "onnxruntime_onnx"
        assert config.max_batch_size == 256 and config.HasField("dynamic_batching")
        assert config.default_model_filename == f"{role}.onnx"
        assert config.input[0].name == inp and list(config.input[0].dims) == dims

    made = layout(published / "digits", tmp_path / "triton")
    assert [p.name for p in made] == ["digits_encoder", "digits_decoder"]
    assert (tmp_path / "triton" / "digits_decoder" / "2" / "decoder.onnx").stat().st_ino == (
        published / "digits" / "2" / "decoder.onnx"
    ).stat().st_ino


@pytest.mark.parametrize(
    "precision, limit, size, atol, quantized_op",
    [("fp16", 3e-2, 0.75, 1e-2, None), ("int8", 0.5, 0.75, 0.13, "DynamicQuantizeLinear")],
)  # size: of decoder.onnx's (smaller weights, plus the graph); atol: on served pixels
def test_reduced_precision_decoder_is_exported_verified_and_served(
    tmp_path, checkpoint_path, model_repo, precision, limit, size, atol, quantized_op
):  # fmt: skip
    from tests.conftest import ROOT, ServerProcess, expected_sample

    model, cfg, _ = load_model(checkpoint_path)
    folder = publish(model, cfg, tmp_path / "models", "digits", precisions=(precision,))
    role = f"decoder_{precision}"
    info = json.loads((folder / "model.json").read_text())
    data = (folder / f"{role}.onnx").read_bytes()
    assert info["graphs"][role]["sha256"] == hashlib.sha256(data).hexdigest()
    assert 0 < info["parity_max_abs_diff"][f"{role}.logits"] <= limit  # really another precision, within its limit
    session = ort.InferenceSession(str(folder / f"{role}.onnx"), providers=["CPUExecutionProvider"])
    assert session.get_inputs()[0].type == session.get_outputs()[0].type == "tensor(float)"  # float32 at the edges
    assert len(data) < size * (folder / "decoder.onnx").stat().st_size
    if quantized_op:
        assert quantized_op in {node.op_type for node in onnx.load(str(folder / f"{role}.onnx")).graph.node}

    from service.client import VaeClient

    server = ServerProcess(tmp_path / "models", tmp_path / f"{precision}.log", "--decoder-precision", precision)
    try:
        with VaeClient(server.target) as client:
            images = client.sample(16, seed=4)
        np.testing.assert_allclose(images, expected_sample(model, 16, 4), atol=atol)
    finally:
        assert server.terminate() == 0
    refused = subprocess.run(
        [sys.executable, "-m", "service", "--model-repo", str(model_repo), "--port", "0", "--metrics-port", "0", "--http-port", "0",
         "--decoder-precision", precision], cwd=ROOT, capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert refused.returncode == 2 and f"no {role}.onnx" in refused.stderr


def test_models_the_service_cannot_serve_are_not_exported(tmp_path):
    # An autoencoder is no generative model; a flow-prior VAE is exported (tests/test_flow_serving.py).
    from training.config import ModelConfig, TrainConfig

    cfg = TrainConfig(model=ModelConfig(image_shape=(1, 8, 8), latent_dim=4, hidden=16, kind="ae"))
    with pytest.raises(ValueError, match="autoencoder is not exported"):
        publish(VAE(cfg.model), cfg, tmp_path / "models", "m")
    assert not (tmp_path / "models").exists()  # nothing published, not even the model's folder


@pytest.mark.parametrize("size", [32, 64])
def test_colour_logistic_mixture_models_export_with_parity_and_their_preprocessing(tmp_path, size):
    """32x32 and 64x64 RGB with the default stages (down to 4x4) and a 3-component mixture: the
    graphs agree with PyTorch, the decoder gives K (1 + 2C) channels, model.json carries the
    preprocessing and the mixture, and the Triton config declares the decoder's shape."""
    from training.config import ModelConfig as VaeConfig
    from training.config import TrainConfig

    mcfg = VaeConfig(image_shape=(3, size, size), latent_dim=8, hidden=32, likelihood="logistic-mixture", mixtures=3)
    assert len(mcfg.stage_widths) == {32: 3, 64: 4}[size]  # 32 -> 4 and 64 -> 4 pixels across
    cfg = TrainConfig(dataset="folder", data_dir=str(tmp_path), image_size=(size, size), fit="pad", background="#102030", model=mcfg)
    torch.manual_seed(0)
    folder = publish(VAE(mcfg), cfg, tmp_path / "models", "emoji", classes=["a", "b"])
    info = json.loads((folder / "model.json").read_text())
    assert info["likelihood"] == "logistic-mixture" and info["mixtures"] == 3 and info["classes"] == ["a", "b"]
    assert info["preprocessing"] == {"channels": 3, "size": [size, size], "fit": "pad", "background": "#102030"}
    assert info["graphs"]["decoder"]["outputs"] == {"params": [-1, 21, size, size], "image": [-1, 3, size, size]}
    assert max(info["parity_max_abs_diff"].values()) < 1e-4
    config = text_format.Parse((folder / "decoder.config.pbtxt").read_text(), ModelConfig())
    assert [list(o.dims) for o in config.output] == [[21, size, size], [3, size, size]]


def test_a_version_whose_decoder_gives_no_image_still_serves(model_repo, trained, tmp_path):
    """Versions exported before the decoder gave the image (parameters alone) keep serving: the
    server makes their images from the parameters, as it did."""
    import shutil

    from service.client import VaeClient
    from tests.conftest import ServerProcess, expected_sample

    folder = tmp_path / "repo" / "digits" / "1"
    shutil.copytree(model_repo / "digits" / "1", folder)
    graph = onnx.load(folder / "decoder.onnx")
    kept = [o for o in graph.graph.output if o.name != "image"]
    del graph.graph.output[:]
    graph.graph.output.extend(kept)
    onnx.save(graph, folder / "decoder.onnx")
    info = json.loads((folder / "model.json").read_text())
    info["graphs"]["decoder"]["sha256"] = hashlib.sha256((folder / "decoder.onnx").read_bytes()).hexdigest()
    del info["graphs"]["decoder"]["outputs"]["image"]
    (folder / "model.json").write_text(json.dumps(info))
    assert [o.name for o in ort.InferenceSession(str(folder / "decoder.onnx")).get_outputs()] == ["logits"]
    model, _, _ = load_model(trained / "best.pt")
    server = ServerProcess(tmp_path / "repo", tmp_path / "server.log")
    try:
        with VaeClient(server.target) as client:
            np.testing.assert_allclose(client.sample(5, seed=3), expected_sample(model, 5, seed=3), atol=1e-5)
    finally:
        assert server.terminate() == 0
