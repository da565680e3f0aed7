"""Many models behind one endpoint, on the real server: routing by name and version, models added
and removed while it runs, version policies, interface checks, per-model settings, model control
and its admin token, and ONNX Runtime's threads shared by all models."""

import json
import os
import re
import shutil
from pathlib import Path

import grpc
import numpy as np
import pytest

from service.api.vae.v1 import vae_pb2 as pb
from service.client import VaeClient
from service.repository import RepositoryError, ServingConfig, VersionPolicy, read_serving_config
from tests.conftest import ServerProcess, expected_sample, wait_for
from tests.helpers import Load, metric, scrape, train


@pytest.fixture(scope="module")
def models(tmp_path_factory, trained, digits):
    """Three real models: the session's digits model, another of the same shape trained with another
    seed, and a narrow one (4 latents: another interface)."""
    from training.checkpoint import load_model

    first, first_cfg, _ = load_model(trained / "best.pt")
    other = train(digits, tmp_path_factory.mktemp("other"))
    narrow = train(digits, tmp_path_factory.mktemp("narrow"), latent_dim=4, epochs=1)
    return {"digits": (first.eval(), first_cfg), "other": other, "narrow": narrow}


@pytest.fixture
def repo(tmp_path, models):
    """digits v1 and other v1."""
    from export.repository import publish

    repo = tmp_path / "models"
    for name in ("digits", "other"):
        publish(*models[name], repo, name)
    return repo


def states(client: VaeClient) -> dict[tuple[str, int], tuple[str, str]]:
    return {(m.name, m.version): (pb.ModelState.Name(m.state), m.reason) for m in client.models().models}


def code_of(call) -> tuple[grpc.StatusCode, str]:
    with pytest.raises(grpc.RpcError) as err:
        call()
    return err.value.code(), err.value.details()


def test_each_model_answers_with_its_own_weights(repo, models, tmp_path):
    proc = ServerProcess(repo, tmp_path / "two.log")
    try:
        for name in ("digits", "other"):
            with VaeClient(proc.target, model=name) as client:
                images = client.sample(3, seed=11)
                assert client.answered_by == (name, 1)
                np.testing.assert_allclose(images, expected_sample(models[name][0], 3, 11), atol=1e-5)
                assert client.info().name == name
        with VaeClient(proc.target, model="digits") as a, VaeClient(proc.target, model="other") as b:
            assert not np.array_equal(a.sample(3, seed=11), b.sample(3, seed=11))
            assert code_of(lambda: VaeClient(proc.target, model="nope").sample(1)) == (
                grpc.StatusCode.NOT_FOUND, "model 'nope' not found; this server has: digits, other"
            )  # fmt: skip
            code, details = code_of(lambda: VaeClient(proc.target, model="digits", version=7).sample(1))
            assert code == grpc.StatusCode.NOT_FOUND and "no version 7; it has [1]" in details
            code, details = code_of(lambda: VaeClient(proc.target).sample(1))  # two models, no default
            assert code == grpc.StatusCode.NOT_FOUND and "no default model: name one of digits, other" in details
            listing = a.models()
            assert states(a) == {("digits", 1): ("MODEL_STATE_READY", ""), ("other", 1): ("MODEL_STATE_READY", "")}
            assert listing.default_model == ""
        text = scrape(proc)
        for name in ("digits", "other"):
            assert metric(text, "vae_requests_total", rpc="Sample", code="OK", model=name) >= 2
            assert metric(text, "vae_model_state", model=name, version="1", state="READY") == 1
            assert metric(text, "vae_batch_rows_count", model=name, version="1", graph="decoder") >= 2
        assert metric(text, "vae_requests_total", rpc="Sample", code="NOT_FOUND", model="") == 3  # no made-up names
    finally:
        assert proc.terminate() == 0
    # With --default-model, an empty name is that model.
    proc = ServerProcess(repo, tmp_path / "default.log", "--default-model", "other")
    try:
        with VaeClient(proc.target) as client:
            np.testing.assert_allclose(client.sample(3, seed=11), expected_sample(models["other"][0], 3, 11), atol=1e-5)
            assert client.answered_by == ("other", 1) and client.models().default_model == "other"
    finally:
        assert proc.terminate() == 0


def test_a_model_copied_in_is_served_and_a_removed_one_drains(repo, models, tmp_path):
    """A third model is served without a restart and without one failed call on the other two; when
    its folder is removed, its calls in flight finish and then it is unloaded."""
    proc = ServerProcess(repo, tmp_path / "add.log", "--watch-seconds", "0.1")
    loads = {name: Load(proc.target, pb.SampleRequest(num_samples=2, seed=3, model_name=name), 4) for name in ("digits", "other")}
    try:
        with VaeClient(proc.target) as client:
            wait_for(lambda: all(len(load.calls) >= 20 for load in loads.values()))
            shutil.copytree(repo / "other", repo / "third")  # a plain copy, seen half-way through or not
            wait_for(lambda: states(client).get(("third", 1), ("",))[0] == "MODEL_STATE_READY")
            with VaeClient(proc.target, model="third") as third:
                np.testing.assert_allclose(third.sample(3, seed=11), expected_sample(models["other"][0], 3, 11), atol=1e-5)
                assert third.answered_by == ("third", 1)
            counts = {name: len(load.calls) for name, load in loads.items()}
            wait_for(lambda: all(len(load.calls) >= counts[name] + 20 for name, load in loads.items()))

            leaving = Load(proc.target, pb.SampleRequest(num_samples=2, seed=3, model_name="third"), 4)
            wait_for(lambda: len(leaving.calls) >= 20)
            shutil.rmtree(repo / "third")
            wait_for(lambda: ("third", 1) not in states(client))
            wait_for(lambda: sum(code != "OK" for _, code, _ in leaving.calls) >= 4)
            leaving.stop()
            for codes in leaving.callers():  # served until it left, then refused: never an error
                first_refused = next((i for i, c in enumerate(codes) if c != "OK"), len(codes))
                assert set(codes[first_refused:]) <= {"NOT_FOUND", "UNAVAILABLE"}, codes
                assert set(codes[:first_refused]) <= {"OK"}
        for name, load in loads.items():
            codes = load.stop()
            assert set(codes) == {"OK"}, (name, codes)
            assert len({data for _, _, data in load.calls}) == 1  # one model, one answer throughout
        text = scrape(proc)
        assert metric(text, "vae_model_state", model="third") == 0  # its series left with it
        assert metric(text, "vae_model_reloads_total", model="third", result="loaded") >= 1
    finally:
        assert proc.terminate() == 0
    log = proc.log.read_text()
    assert "model loaded: third v1" in log and "retired v1 of third" in log


def test_version_policy_and_interface_changes(repo, models, tmp_path):
    from export.repository import publish

    publish(*models["other"], repo, "digits")  # digits v2: the other weights, the same interface
    proc = ServerProcess(repo, tmp_path / "policy.log", "--version-policy", "all", "--watch-seconds", "0.1")
    try:
        with VaeClient(proc.target, model="digits", version=1) as v1, VaeClient(proc.target, model="digits") as newest:
            np.testing.assert_allclose(v1.sample(3, seed=11), expected_sample(models["digits"][0], 3, 11), atol=1e-5)
            np.testing.assert_allclose(newest.sample(3, seed=11), expected_sample(models["other"][0], 3, 11), atol=1e-5)
            assert (v1.answered_by, newest.answered_by) == (("digits", 1), ("digits", 2))

            publish(*models["narrow"], repo, "digits")  # v3: 4 latents where v2 has 8
            wait_for(lambda: metric(scrape(proc), "vae_model_reloads_total", model="digits", result="refused") == 1)
            state, reason = states(newest)[("digits", 3)]
            assert state == "MODEL_STATE_UNAVAILABLE" and "changes the interface of v2 (latent_dim 8 -> 4)" in reason
            assert newest.info().version == 2

            (repo / "digits" / "serving.json").write_text(json.dumps({"allow_interface_change": True}))
            with VaeClient(proc.target) as admin:  # auth is off: model control is open
                listing = admin.load("digits")  # tries the refused version again, now allowed
            assert {(m.version, m.state) for m in listing.models} == {(v, pb.MODEL_STATE_READY) for v in (1, 2, 3)}
            assert newest.info().latent_dim == 4 and VaeClient(proc.target, model="digits", version=2).info().latent_dim == 8
            assert newest.decode(np.zeros((2, 4), np.float32)).shape == (2, 1, 8, 8)
            code, details = code_of(lambda: newest.decode(np.zeros((2, 8), np.float32)))
            assert code == grpc.StatusCode.INVALID_ARGUMENT and "latents" in details
    finally:
        assert proc.terminate() == 0
    assert "model update refused, still serving v2 of digits" in proc.log.read_text()


def test_latest_policy_swaps_and_unloads_the_old_version(repo, models, tmp_path):
    """latest:1 (the default) serves only the newest: a new version is loaded beside the old one,
    then the old one is retired and shown as outside the policy."""
    from export.repository import publish

    proc = ServerProcess(repo, tmp_path / "latest.log", "--watch-seconds", "0.1", "--models", "digits")
    try:
        with VaeClient(proc.target) as client:
            assert set(states(client)) == {("digits", 1)}  # --models: other is not served
            publish(*models["other"], repo, "digits")
            wait_for(lambda: states(client).get(("digits", 1)) == ("MODEL_STATE_UNAVAILABLE", "not in the version policy latest:1"))
            assert client.info().version == 2 and client.answered_by is None  # info names itself in its fields
            code, details = code_of(lambda: VaeClient(proc.target, version=1).sample(1))
            assert code == grpc.StatusCode.UNAVAILABLE and "not in the version policy" in details
            with VaeClient(proc.target, model="other") as other:
                assert code_of(lambda: other.sample(1))[0] == grpc.StatusCode.NOT_FOUND
                other.load("other")  # LoadModel adds a model --models left out
                assert other.sample(1).shape == (1, 1, 8, 8)
    finally:
        assert proc.terminate() == 0


def test_serving_json_sets_batching_per_model(repo, tmp_path):
    (repo / "other" / "serving.json").write_text(
        json.dumps({"max_batch_rows": 4, "max_batch_delay_ms": 0, "warmup_batch_sizes": [3]})
    )
    proc = ServerProcess(repo, tmp_path / "serving.log", "--watch-seconds", "0.1")
    try:
        with VaeClient(proc.target, model="other") as other, VaeClient(proc.target, model="digits") as digits:
            assert (other.info().max_batch_rows, digits.info().max_batch_rows) == (4, 256)
            other.sample(16, seed=1)
            text = scrape(proc)
            labels = dict(model="other", version="1", graph="decoder")
            assert metric(text, "vae_batch_rows_sum", **labels) == 16
            assert metric(text, "vae_batch_rows_bucket", le="4.0", **labels) == metric(text, "vae_batch_rows_count", **labels) >= 4
            # A broken serving.json is reported, and the loaded version keeps serving as it was.
            (repo / "other" / "serving.json").write_text(json.dumps({"max_batch_rows": -1}))
            wait_for(lambda: "max_batch_rows must be a positive number" in proc.log.read_text())
            assert other.sample(2).shape == (2, 1, 8, 8) and other.info().max_batch_rows == 4
    finally:
        assert proc.terminate() == 0


def test_model_control_needs_an_admin_token(repo, tmp_path):
    (tmp_path / "tokens").write_text("inference-token\n")
    (tmp_path / "admin").write_text("admin-token\n")
    proc = ServerProcess(
        repo, tmp_path / "admin.log", "--auth-token-file", str(tmp_path / "tokens"), "--admin-token-file", str(tmp_path / "admin")
    )
    try:
        with VaeClient(proc.target, token="inference-token", model="other") as user, VaeClient(
            proc.target, token="admin-token", model="other"
        ) as admin:
            assert len(user.models().models) == 2  # listing is inference's to see
            code, details = code_of(lambda: user.unload("other"))
            assert code == grpc.StatusCode.PERMISSION_DENIED and "needs an admin token" in details
            assert code_of(lambda: VaeClient(proc.target, model="other").unload("other"))[0] == grpc.StatusCode.UNAUTHENTICATED
            assert user.sample(1).shape == (1, 1, 8, 8)  # nothing was unloaded
            listing = admin.unload("other")  # returns once the version is closed
            assert [(m.version, m.state, m.reason) for m in listing.models] == [(1, pb.MODEL_STATE_UNAVAILABLE, "unloaded by UnloadModel")]
            code, details = code_of(lambda: user.sample(1))
            assert code == grpc.StatusCode.UNAVAILABLE and "unloaded by UnloadModel" in details
            assert code_of(lambda: admin.load("nope"))[0] == grpc.StatusCode.NOT_FOUND
            admin.load("other")
            assert user.sample(1).shape == (1, 1, 8, 8) and admin.sample(1).shape == (1, 1, 8, 8)
        text = scrape(proc)
        assert metric(text, "vae_rejections_total", reason="permission_denied") == 1
        assert metric(text, "vae_rejections_total", reason="unauthenticated") == 1
    finally:
        assert proc.terminate() == 0


def test_threads_do_not_multiply_with_models(repo, tmp_path):
    """Every model's sessions share ONNX Runtime's one global pool: four models start the threads
    of one. (Pools per session would add 2 graphs x 2 threads per model at --intra-op-threads 3.)"""
    for copy in ("a", "b"):
        shutil.copytree(repo / "other", repo / copy)
    single = tmp_path / "single"
    shutil.copytree(repo / "other", single / "other")

    def threads(folder: Path, log: str) -> int:
        proc = ServerProcess(folder, tmp_path / log, "--intra-op-threads", "3")
        try:
            return len(os.listdir(f"/proc/{proc.proc.pid}/task"))
        finally:
            assert proc.terminate() == 0

    one, four = threads(single, "one.log"), threads(repo, "four.log")
    assert four - one < 4, (one, four)
    assert "the process's shared pool of 3 intra-op threads" in (tmp_path / "four.log").read_text()


def test_version_policies_and_serving_files_parse():
    assert VersionPolicy.parse("latest:2").select([1, 3, 4, 7]) == [4, 7]
    assert VersionPolicy.parse("latest").select([1, 3]) == [3]
    assert VersionPolicy.parse("all").select([3, 1]) == [1, 3]
    assert VersionPolicy.parse("specific:5,3").select([1, 3, 4]) == [3]
    assert str(VersionPolicy.parse("specific:5,3")) == "specific:3,5"
    for bad in ("latest:0", "newest", "specific:", "specific:a", "all:2", "specific:0"):
        with pytest.raises(ValueError, match="version policy"):
            VersionPolicy.parse(bad)


def test_serving_json_is_checked(tmp_path):
    assert read_serving_config(tmp_path) == ServingConfig()  # none: the flags
    cases = {
        '{"max_batch_rows": 0}': "max_batch_rows must be a positive number",
        '{"max_batch_delay_ms": -1}': "max_batch_delay_ms must be a non-negative number",
        '{"batch_rows": 8}': "unknown settings ['batch_rows']",
        '{"version_policy": "newest"}': "version policy 'newest'",
        '{"version_policy": 2}': "version_policy must be a string",
        '{"allow_interface_change": "false"}': "allow_interface_change must be true or false",
        '{"warmup_batch_sizes": [0]}': "warmup_batch_sizes must be positive",
        '{"background_share": 0}': "background_share must be a positive number",
        '{"background_share": 2}': "background_share must be in (0, 1], got 2.0",
        "[1]": "expected a JSON object",
        "{": "unreadable",
    }
    for text, message in cases.items():
        (tmp_path / "serving.json").write_text(text)
        with pytest.raises(RepositoryError, match=re.escape(message)):
            read_serving_config(tmp_path)
    (tmp_path / "serving.json").write_text('{"max_batch_rows": 8, "version_policy": "all", "allow_interface_change": true, "background_share": 0.5}')
    assert read_serving_config(tmp_path) == ServingConfig(
        max_batch_rows=8, version_policy=VersionPolicy("all"), allow_interface_change=True, background_share=0.5
    )
