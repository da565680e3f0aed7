"""service.models in-process, on a real repository with real ONNX Runtime engines: the life-cycle
corners a server process makes hard to reach on cue (rollbacks, failed reloads, a folder removed
and put back during a drain, cancelled model control, broken per-model files)."""

import asyncio
import json
import shutil
from pathlib import Path

import pytest

from service.engine import BatchSettings, RequestLimits
from service.metrics import Metrics
from service.models import READY, UNAVAILABLE, UNLOADING, LoadFailed, Models, ModelUnavailable
from service.repository import VersionPolicy
from service.runtime import RuntimeOptions


def table(repo: Path, **kwargs) -> Models:
    return Models(repo, RuntimeOptions("cpu", 1), BatchSettings(max_batch_rows=8), RequestLimits(max_request_rows=8), Metrics(), **kwargs)


def state(models: Models, name: str, version: int) -> tuple[str, str]:
    entry = models.table[name][version]
    return entry.state, entry.reason


def copy_version(repo: Path, name: str, source: int, target: int) -> None:
    """Another version with the same graphs: model.json's version rewritten, the hashes still hold."""
    shutil.copytree(repo / name / str(source), repo / name / str(target))
    info = json.loads((repo / name / str(target) / "model.json").read_text())
    (repo / name / str(target) / "model.json").write_text(json.dumps(info | {"version": target}))


def sample(metrics: Metrics, family: str, **labels: str) -> float:
    return metrics.registry.get_sample_value(family, labels) or 0.0


@pytest.fixture
def repo(model_repo, tmp_path):
    shutil.copytree(model_repo, tmp_path / "models")
    return tmp_path / "models"


async def until(predicate) -> None:
    """Let the loop run until `predicate()` holds (retirements and loads are tasks)."""
    for _ in range(10_000):
        if predicate():
            return
        await asyncio.sleep(0.01)
    raise AssertionError("condition not reached")


def test_a_removed_newest_version_hands_back_to_the_older_one(repo):
    async def scenario() -> None:
        models = table(repo)
        copy_version(repo, "digits", 1, 2)
        await models.sync()
        assert models.resolve("digits", 0).spec.version == 2 and state(models, "digits", 1)[0] == UNAVAILABLE
        shutil.rmtree(repo / "digits" / "2")  # a rollback
        await models.sync()
        assert models.resolve("digits", 0).spec.version == 1  # loaded before v2 left: never without a route
        await until(lambda: 2 not in models.table["digits"])
        await models.close()

    asyncio.run(scenario())


def test_a_pinned_version_that_fails_is_not_reloaded_on_every_poll(repo):
    async def scenario() -> None:
        models = table(repo)
        await models.sync()
        copy_version(repo, "digits", 1, 2)
        (repo / "digits" / "2" / "decoder.onnx").write_bytes(b"torn")
        with pytest.raises(LoadFailed, match="sha256"):
            await models.load("digits", 2)
        for _ in range(3):
            await models.sync()
        assert sample(models.metrics, "vae_model_reloads_total", result="refused", model="digits") == 1
        assert models.resolve("digits", 0).spec.version == 1
        await models.close()

    asyncio.run(scenario())


def test_a_failed_reload_keeps_the_version_serving(repo):
    async def scenario() -> None:
        models = table(repo)
        await models.sync()
        (repo / "digits" / "serving.json").write_text(json.dumps({"max_batch_rows": 4}))
        with open(repo / "digits" / "1" / "decoder.onnx", "ab") as f:
            f.write(b"changed in place")  # the reload with the new settings cannot pass the hash check
        with pytest.raises(LoadFailed, match=r"sha256.*\(serving: v1\)"):
            await models.load("digits")
        assert state(models, "digits", 1) == (READY, "") and models.resolve("digits", 1).batch.max_batch_rows == 8
        await models.sync()  # and the next poll leaves it serving too
        assert state(models, "digits", 1) == (READY, "")
        await models.close()

    asyncio.run(scenario())


def test_a_folder_put_back_during_its_drain_serves_again_with_its_metrics(repo, tmp_path):
    async def scenario() -> None:
        models = table(repo)
        await models.sync()
        engine = models.resolve("digits", 0)
        engine.active_calls += 1  # a call in flight, as service.dataplane.Call holds one
        shutil.move(repo / "digits", tmp_path / "away")
        await models.sync()
        await models.sync()  # a second poll during the drain: still draining, still in the table
        assert state(models, "digits", 1)[0] == UNLOADING
        with pytest.raises(ModelUnavailable, match="UNLOADING"):
            models.resolve("digits", 0)
        shutil.move(tmp_path / "away", repo / "digits")
        await models.sync()
        assert state(models, "digits", 1) == (READY, "") and models.resolve("digits", 0) is not engine
        engine.active_calls -= 1  # the old call ends: its engine closes, the new one is untouched
        await until(lambda: models.table["digits"][1].retiring.done())
        labels = {"model": "digits", "version": "1"}
        assert sample(models.metrics, "vae_model_state", state=READY, **labels) == 1
        assert sample(models.metrics, "vae_model_info", name="digits", version="1", provider="CPUExecutionProvider") == 1
        assert models.metrics.registry.get_sample_value("vae_queue_rows", {**labels, "graph": "decoder"}) == 0
        await models.close()

    asyncio.run(scenario())


def test_a_cancelled_load_still_finishes(repo):
    async def scenario() -> None:
        models = table(repo, only={"digits"})
        await models.sync()
        shutil.copytree(repo / "digits", repo / "more")
        call = asyncio.ensure_future(models.load("more"))
        await until(lambda: "more" in models.table)  # the load began
        call.cancel()  # the caller's deadline passed
        await until(lambda: state(models, "more", 1)[0] == READY)
        assert len(models.engines()) == 2
        await models.close()

    asyncio.run(scenario())


def test_broken_files_of_one_model_stop_no_other(repo):
    async def scenario() -> None:
        shutil.copytree(repo / "digits", repo / "a")
        shutil.copytree(repo / "digits", repo / "b")
        (repo / "a" / "serving.json").write_text(json.dumps({"allow_interface_change": "no"}))
        info = json.loads((repo / "b" / "1" / "model.json").read_text())
        (repo / "b" / "1" / "model.json").write_text(json.dumps(info | {"graphs": []}))
        models = table(repo)
        refused = await models.sync()
        assert len(refused) == 2 and state(models, "digits", 1) == (READY, "")
        assert "allow_interface_change must be true or false" in state(models, "a", 1)[1]
        assert state(models, "b", 1)[0] == UNAVAILABLE and "'graphs' must map each graph" in state(models, "b", 1)[1]
        await models.sync()  # reported once, not on every poll
        assert sample(models.metrics, "vae_model_reloads_total", result="refused", model="a") == 1
        await models.close()

    asyncio.run(scenario())


def test_a_restart_keeps_a_models_interface(repo, models_narrow):
    """With nothing serving yet (a restart), a new version is compared with the next older one."""
    from export.repository import publish

    publish(*models_narrow, repo, "digits")  # v2: 4 latents where v1 has 8

    async def scenario() -> None:
        models = table(repo)
        refused = await models.sync()
        assert len(refused) == 1 and "v2 changes the interface of v1 (latent_dim 8 -> 4)" in refused[0]
        assert models.resolve("digits", 0).spec.version == 1
        await models.close()

    asyncio.run(scenario())


@pytest.fixture(scope="module")
def models_narrow(tmp_path_factory, digits):
    from tests.helpers import train

    return train(digits, tmp_path_factory.mktemp("narrow"), latent_dim=4, epochs=1)


def test_a_version_whose_graphs_disagree_with_its_model_json_fails_warm_up(repo):
    """With interface changes allowed, what model.json claims is still checked against what the
    graphs compute, at warm-up."""
    copy_version(repo, "digits", 1, 2)
    info = json.loads((repo / "digits" / "2" / "model.json").read_text())
    (repo / "digits" / "2" / "model.json").write_text(json.dumps(info | {"latent_dim": 9, "latent_groups": [[9]]}))
    (repo / "digits" / "serving.json").write_text(json.dumps({"allow_interface_change": True}))

    async def scenario() -> None:
        models = table(repo, policy=VersionPolicy("all"))
        refused = await models.sync()
        assert len(refused) == 1 and "digits v2" in refused[0] and "warm-up failed" in refused[0]
        assert state(models, "digits", 1) == (READY, "") and state(models, "digits", 2)[0] == UNAVAILABLE
        await models.close()

    asyncio.run(scenario())


def test_a_version_that_prepares_image_files_otherwise_is_another_interface(repo):
    """The preprocessing is part of the interface: the same graphs behind another background would
    give a client other answers for the same image files."""
    copy_version(repo, "digits", 1, 2)
    info = json.loads((repo / "digits" / "2" / "model.json").read_text())
    assert info["preprocessing"]["background"] == "#000000"  # the bundled sets are white on black
    (repo / "digits" / "2" / "model.json").write_text(json.dumps(info | {"preprocessing": info["preprocessing"] | {"background": "#ffffff"}}))

    async def scenario() -> None:
        models = table(repo, policy=VersionPolicy("all"))
        refused = await models.sync()
        assert len(refused) == 1 and "v2 changes the interface of v1 (preprocessing" in refused[0]
        assert "#ffffff" in refused[0] and state(models, "digits", 1) == (READY, "")
        await models.close()

    asyncio.run(scenario())


def test_a_model_json_whose_preprocessing_disagrees_with_its_graphs_is_refused(repo):
    copy_version(repo, "digits", 1, 2)
    info = json.loads((repo / "digits" / "2" / "model.json").read_text())
    (repo / "digits" / "2" / "model.json").write_text(json.dumps(info | {"preprocessing": info["preprocessing"] | {"size": [9, 9]}}))

    async def scenario() -> None:
        models = table(repo, policy=VersionPolicy("all"))
        refused = await models.sync()
        assert len(refused) == 1 and "preprocessing makes 1x9x9 images, the graphs take 1x8x8" in refused[0]
        await models.close()

    asyncio.run(scenario())
