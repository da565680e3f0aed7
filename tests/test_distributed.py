"""Data-parallel training under torchrun, for real: two (and four) gloo processes on this machine.

Each run is `torchrun -m tests.faults FAULT KWARGS TRAINING FLAGS...`: every rank installs one
fault of tests/faults.py (a function, named with its keyword arguments) and then calls `python -m
training`'s own main. A fault that stops a rank acts at a numbered call of the objective on one
rank, so every event a test waits for happens at a known step of the run, not at a moment on the
clock.

The equivalence the tests hold the runs to: two ranks with the global batch B give the weights one
process gets with batch B on the same data, within TOL. The design makes that exact up to float
rounding, not approximate: every rank draws the whole global batch's permutation, flips, dynamic
binarization and reparameterization noise from the same seeded generators one process uses, and
keeps its rows; each batch mean is a sum over the rank's rows scaled so that DDP's average over the
ranks is the mean over the whole batch, the uneven last batch included (1347 images: 21 batches of
64, then 3 images split 2 and 1); free bits' floors are decided on the whole batch's KL. What is
left is the order of float additions (two partial sums, then the all-reduce): on digits, 22 steps of
AdamW end within 5e-7 of the one-process weights (measured; TOL is 20 times that), while ranks that
step on their own gradients (DDP's sync off, the control) end 4e-2 away.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from tests import faults
from tests.helpers import documents

ROOT = Path(__file__).resolve().parent.parent
TORCHRUN = Path(sys.executable).with_name("torchrun")
TOL = 1e-5  # max |w_2 ranks - w_1 process| over every weight (see the module's docstring)

# digits: 1347 training images, so a batch of 64 makes 22 steps an epoch, the last one of 3 images.
STEPS = 22
MODEL = ["--latent-dim", "8", "--widths", "16,32", "--hidden", "64"]
# Flips and dynamic binarization draw from the data generator; free bits 0.02 nats sit among the
# per-dimension KLs of these first steps, so some dimensions are floored and others not.
FLAGS = ["--dataset", "digits", *MODEL, "--batch-size", "64", "--lr-schedule", "constant", "--hflip",
         "--free-bits", "0.02", "--iwae-k", "10", "--eval-images", "40", "--device", "cpu"]  # fmt: skip


# ---- the tests -----------------------------------------------------------------------------------


def torchrun(
    nproc: int, flags: list[str], fault: Callable[..., None] = faults.none, **kwargs: Any
) -> subprocess.CompletedProcess:
    """`torchrun --standalone` (a free port, so runs beside other jobs do not collide) of `python -m
    training FLAGS` in `nproc` ranks, each with `fault` (a function of tests/faults.py) installed
    with these keyword arguments."""
    cmd = [str(TORCHRUN), "--standalone", "--nproc-per-node", str(nproc), "-m", "tests.faults", fault.__name__,
           json.dumps(kwargs), *flags]  # fmt: skip
    return subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)


def weights(path: Path) -> dict:
    from training import checkpoint

    return checkpoint.load(path)["model"]


def distance(a: dict, b: dict) -> float:
    assert a.keys() == b.keys()
    return max((a[k] - b[k]).abs().max().item() for k in a)


@pytest.fixture(scope="module")
def one_process(tmp_path_factory):
    """The reference: the same flags in one process (in this one), 1 epoch, then resumed to 2.
    Returns the run directory after each epoch's last.pt (resuming is exact: tests/test_training.py)."""
    from training.__main__ import parse_args
    from training.train import Trainer

    runs = {}
    for epochs in (1, 2):
        out = tmp_path_factory.mktemp(f"one-process-{epochs}")
        if epochs == 2:
            shutil.copytree(runs[1], out, dirs_exist_ok=True)
        cfg, _, _ = parse_args([*FLAGS, "--epochs", str(epochs), "--out", str(out)])
        trainer = Trainer(cfg, out)
        if epochs == 2:
            trainer.resume()
        trainer.fit()
        runs[epochs] = out
    return runs


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory):
    """`torchrun --nproc-per-node 2 -m training FLAGS --epochs 1`, every rank listing what it writes."""
    out, record = tmp_path_factory.mktemp("two-ranks"), tmp_path_factory.mktemp("writes")
    flags = [*FLAGS, "--epochs", "1", "--out", str(out / "run")]
    done = torchrun(2, flags, faults.record_writes, record_dir=str(record))
    assert done.returncode == 0, done.stdout + done.stderr
    return out / "run", record, done


def test_two_ranks_step_as_one_process_and_unsynchronised_ranks_do_not(two_ranks, one_process, tmp_path):
    run, _, _ = two_ranks
    synced = distance(weights(run / "last.pt"), weights(one_process[1] / "last.pt"))
    assert synced < TOL, f"two ranks end {synced:.2e} from one process"
    # The control: the same run with DDP's gradient sync off fails the same comparison.
    done = torchrun(2, [*FLAGS, "--epochs", "1", "--out", str(tmp_path / "unsynced")], faults.unsynced)
    assert done.returncode == 0, done.stdout + done.stderr
    unsynced = distance(weights(tmp_path / "unsynced" / "last.pt"), weights(one_process[1] / "last.pt"))
    assert unsynced > 100 * TOL, f"unsynchronised ranks end only {unsynced:.2e} from one process"


def test_only_rank_0_logs_and_writes_and_metrics_record_the_world(two_ranks):
    run, record, done = two_ranks
    writes = {rank: json.loads((record / f"writes-rank{rank}.json").read_text()) for rank in (0, 1)}
    assert writes[1] == [], "rank 1 wrote files"
    assert {"best.pt", "last.pt", "samples.png", "loss_curves.png"} <= set(writes[0])
    assert {p.name for p in run.iterdir()} == set(writes[0]) | {"metrics.json"}
    logged = done.stdout + done.stderr
    assert "[rank 0/2] epoch 1/1" in logged and "[rank 1/2]" not in logged
    metrics = json.loads((run / "metrics.json").read_text())
    assert (metrics["world_size"], metrics["backend"]) == (2, "gloo")
    assert metrics["history"][0]["world_size"] == 2 and metrics["history"][0]["images_per_second"] > 0
    assert metrics["config"]["batch_size"] == 64  # the global batch, as given


def test_sigterm_to_rank_1_stops_every_rank_at_a_step_and_the_run_resumes_on_one_process(one_process, tmp_path):
    from training import checkpoint
    from training.__main__ import parse_args
    from training.train import Trainer

    # Rank 1 is sent SIGTERM during step index 4 of epoch 2 (its objective's call STEPS + 5).
    out = tmp_path / "run"
    done = torchrun(2, [*FLAGS, "--epochs", "2", "--out", str(out)], faults.sigterm_at, rank=1, call=STEPS + 5)
    logged = done.stdout + done.stderr
    assert done.returncode != 0, logged
    assert "[rank 1/2] stopped by SIGTERM in epoch 2 after step 5" in logged
    assert "[rank 0/2] stopped by SIGTERM in epoch 2 after step 5" in logged  # the same step on every rank
    state = checkpoint.load(out / "last.pt")  # written by rank 0, which was not signalled
    assert state["epoch"] == 1 and state["partial"]["step"] == 5 and state["partial"]["seen"] == 5 * 64
    # Resumed on one process, the run ends where one process's run ends.
    cfg, _, _ = parse_args([*FLAGS, "--epochs", "2", "--out", str(out)])
    trainer = Trainer(cfg, out)
    trainer.resume()
    trainer.fit()
    assert distance(trainer.model.state_dict(), weights(one_process[2] / "last.pt")) < TOL
    reference = history(one_process[2])
    assert [h["train"]["loss"] for h in trainer.history] == pytest.approx([h["train"]["loss"] for h in reference], rel=1e-6)


def test_sigterm_stops_one_process_at_a_step_and_resuming_continues_it_exactly(one_process, tmp_path, monkeypatch):
    """The same stop without torchrun: the SIGTERM handler lives only while fit() runs, and the
    step-level last.pt resumes to the very weights of the run that was never stopped."""
    from training import train
    from training.__main__ import parse_args

    cfg, _, _ = parse_args([*FLAGS, "--epochs", "2", "--out", str(tmp_path)])
    objective, calls = train.objective, []

    def signalling(*a, **k):
        calls.append(1)
        if len(calls) == STEPS + 3:  # during step index 2 of epoch 2
            os.kill(os.getpid(), signal.SIGTERM)
        return objective(*a, **k)

    monkeypatch.setattr(train, "objective", signalling)
    before = signal.getsignal(signal.SIGTERM)
    with pytest.raises(train.Stopped) as stopped:
        train.Trainer(cfg, tmp_path).fit()
    assert (stopped.value.epoch, stopped.value.step) == (1, 3) and signal.getsignal(signal.SIGTERM) is before
    monkeypatch.setattr(train, "objective", objective)
    cfg, _, _ = parse_args([*FLAGS, "--epochs", "2", "--out", str(tmp_path)])
    resumed = train.Trainer(cfg, tmp_path)
    resumed.resume()
    resumed.fit()
    assert distance(resumed.model.state_dict(), weights(one_process[2] / "last.pt")) == 0.0
    reference = history(one_process[2])
    assert [(h["train"], h["val"]) for h in resumed.history] == [(h["train"], h["val"]) for h in reference]


def history(run: Path) -> list[dict]:
    """The epochs' records the run's last.pt holds."""
    from training import checkpoint

    return checkpoint.load(run / "last.pt")["history"]


def test_a_killed_rank_ends_the_job_with_an_error_naming_it_and_leaves_the_last_checkpoint(tmp_path):
    from training import checkpoint

    out = tmp_path / "run"
    done = torchrun(2, [*FLAGS, "--epochs", "2", "--out", str(out)], faults.killed_at, rank=1, call=STEPS + 5)
    logged = done.stdout + done.stderr
    assert done.returncode != 0, logged
    assert "Signal 9 (SIGKILL) received by PID" in logged and "rank      : 1 (local_rank: 1)" in logged
    assert "[rank 0/2] training failed: another rank stopped answering" in logged, logged  # whole: pytest cuts the repr
    assert checkpoint.load(out / "last.pt")["epoch"] == 1  # epoch 1's, whole


def test_a_hung_rank_ends_the_job_after_the_collective_timeout(tmp_path):
    """Rank 1 stops answering at step 5 while alive, which torchrun cannot see: rank 0's next
    collective gives up after --dist-timeout and the run ends with that error. The data is a
    folder of images (each node's local rank 0 decodes it before the node's other ranks read it)."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(0)
    for i in range(60):
        (tmp_path / "images" / f"class{i % 2}").mkdir(parents=True, exist_ok=True)
        pixels = (rng.random((12, 12, 3)) * 255).astype(np.uint8)
        Image.fromarray(pixels).save(tmp_path / "images" / f"class{i % 2}" / f"{i}.png")
    folder = ["--dataset", "folder", "--data-dir", str(tmp_path / "images"), "--image-size", "8", "--cache-dir",
              str(tmp_path / "cache"), "--likelihood", "logistic-mixture", "--batch-size", "8"]  # fmt: skip
    done = torchrun(2, [*MODEL, *folder, "--epochs", "1", "--dist-timeout", "3", "--device", "cpu", "--out",
                        str(tmp_path / "run")], faults.hang_at, rank=1, call=5)  # fmt: skip
    logged = done.stdout + done.stderr
    assert done.returncode != 0, logged
    assert "[rank 0/2] training failed: another rank stopped answering" in logged and "Timed out" in logged
    assert "--dist-timeout (3 s)" in logged


def test_torchrun_run_resumes_on_four_ranks_then_exports_and_serves(two_ranks, one_process, tmp_path):
    """The whole path: the 2-rank run above resumed on 4 ranks to epoch 2 (the weights one process
    reaches, and the test figures one process computes), exported, served, sampled."""
    import numpy as np
    import torch

    from service.client import VaeClient
    from training.checkpoint import load_model
    from training.evaluate import evaluate, prepare_eval_images
    from training.data import load_dataset
    from tests.conftest import ServerProcess, expected_sample

    run = tmp_path / "run"
    shutil.copytree(two_ranks[0], run)
    done = torchrun(4, [*FLAGS, "--epochs", "2", "--resume", "--out", str(run)])
    assert done.returncode == 0, done.stdout + done.stderr
    assert distance(weights(run / "last.pt"), weights(one_process[2] / "last.pt")) < TOL
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["world_size"] == 4 and [h["world_size"] for h in metrics["history"]] == [2, 4]
    # The test figures, split over 4 ranks (IWAE noise skipped to each rank's images), are one process's.
    model, cfg, _ = load_model(run / "best.pt")
    x = prepare_eval_images(load_dataset("digits").test.unit(), model.likelihood, cfg.eval_images)
    alone = evaluate(model, x, cfg.iwae_k)
    for key in ("nll", "elbo", "kl", "psnr_db", "active_units"):
        assert metrics["test"][key] == pytest.approx(alone[key], rel=1e-5), key

    repo = tmp_path / "models"
    exported = subprocess.run([sys.executable, "-m", "export", "--checkpoint", str(run / "best.pt"), "--out", str(repo),
                               "--name", "digits-ddp"], cwd=ROOT, capture_output=True, text=True, timeout=300)  # fmt: skip
    assert exported.returncode == 0, exported.stdout + exported.stderr
    server = ServerProcess(repo, tmp_path / "server.log", "--max-batch-delay-ms", "5")
    try:
        with VaeClient(server.target) as client:
            images = client.sample(4, seed=3)
        np.testing.assert_allclose(images, expected_sample(model, 4, 3), atol=1e-5)
    finally:
        assert server.terminate() == 0
    assert torch.isfinite(torch.as_tensor(images)).all()




# ---- the PyTorchJob (deploy/training) against the image and the flag parsers ---------------------

TRAINING_DEPLOY = ROOT / "deploy" / "training"
JOBS = ["pytorchjob.yaml", "pytorchjob-gpu.yaml"]


def image_facts() -> dict:
    """What deploy/training/Dockerfile sets up: user, entry point, env, where it copies what."""
    import re

    text = (TRAINING_DEPLOY / "Dockerfile").read_text()
    return {
        "uid": int(re.search(r"^ARG UID=(\d+)$", text, re.M)[1]),
        "user": re.search(r"^USER (\S+)$", text, re.M)[1],
        "entrypoint": json.loads(re.search(r"^ENTRYPOINT (\[.*\])$", text, re.M)[1]),
        "env": dict(re.findall(r"\b([A-Z_]+)=(\S+)", re.search(r"^ENV (.*?)(?=^\S)", text, re.M | re.S)[1])),
        "copies": {dst: src for src, dst in re.findall(r"^COPY (\S+) (\S+)$", text, re.M)},
    }


def operator_env(job: dict, replica: str) -> dict[str, str]:
    """What the training operator adds to a pod of `replica` (its envvar.go, v1.7+): the Master's
    Service as MASTER_ADDR and MASTER_PORT, and torchrun's PET_ variables."""
    specs = job["spec"]["pytorchReplicaSpecs"]
    (port,) = [p["containerPort"] for p in specs["Master"]["template"]["spec"]["containers"][0]["ports"]
               if p["name"] == "pytorchjob-port"]  # fmt: skip
    return {"MASTER_ADDR": f"{job['metadata']['name']}-master-0", "MASTER_PORT": str(port),
            "PET_NNODES": str(sum(r["replicas"] for r in specs.values())), "PET_NPROC_PER_NODE": job["spec"]["nprocPerNode"],
            "PET_NODE_RANK": "0" if replica == "Master" else "1"}  # fmt: skip


def expanded(args: list[str], env: dict[str, str]) -> list[str]:
    """$(VAR) in a container's args, as the kubelet expands them from the container's environment."""
    import re

    return [re.sub(r"\$\((\w+)\)", lambda m: env[m[1]], a) for a in args]


def mounts(pod: dict, container: dict) -> dict[str, dict]:
    """Mount path -> (the volume, the mount) of a container."""
    volumes = {v["name"]: v for v in pod["volumes"]}
    return {m["mountPath"]: {"volume": volumes[m["name"]], "mount": m} for m in container["volumeMounts"]}


def access(claims: dict[str, dict], mounted: dict) -> list[str]:
    """The access modes of the claim behind a mount (from `mounts`)."""
    return claims[mounted["volume"]["persistentVolumeClaim"]["claimName"]]["spec"]["accessModes"]


@pytest.mark.parametrize("manifest", JOBS)
def test_pytorchjob_runs_the_training_cli_on_a_folder_and_exports_into_the_model_repository(manifest):
    from torch.distributed.run import get_args_parser

    from training.__main__ import parse_args

    (job,) = documents(TRAINING_DEPLOY / manifest)
    assert (job["apiVersion"], job["kind"]) == ("kubeflow.org/v1", "PyTorchJob")
    specs = job["spec"]["pytorchReplicaSpecs"]
    assert set(specs) == {"Master", "Worker"} and specs["Master"]["replicas"] == 1
    image = image_facts()
    (models_claim,) = documents(ROOT / "deploy" / "k8s" / "models-pvc.yaml")
    claims = {d["metadata"]["name"]: d for d in documents(TRAINING_DEPLOY / "pvcs.yaml")}
    nproc = int(job["spec"]["nprocPerNode"])
    world = nproc * sum(r["replicas"] for r in specs.values())
    runs = {}
    for replica, spec in specs.items():
        pod = spec["template"]["spec"]
        (c,) = pod["containers"]
        assert c["name"] == "pytorch"  # the container the operator gives the rendezvous variables to
        assert c["image"].startswith("localhost/vae-train:") and spec["restartPolicy"] == "OnFailure"
        args = c["args"]
        if replica == "Master":  # train-then-export.sh NAME TORCHRUN_ARGS...: a script the image holds
            assert c["command"] == ["/opt/vae/train-then-export.sh"] and c["command"][0] in image["copies"]
            name, args = args[0], args[1:]
        else:  # the image's entry point, torchrun, takes the args
            assert "command" not in c and image["entrypoint"] == ["torchrun"]
        # torchrun's own parser: one node per pod, the rendezvous the operator describes.
        operator_variables = {"$(PET_NNODES)", "$(PET_NPROC_PER_NODE)", "$(PET_NODE_RANK)", "$(MASTER_ADDR)", "$(MASTER_PORT)"}
        assert operator_variables <= set(args)
        launch = get_args_parser().parse_args(expanded(args, operator_env(job, replica)))
        assert launch.module and launch.training_script == "training" and launch.rdzv_backend == "static"
        assert int(launch.nproc_per_node) * int(launch.nnodes) == world
        # The training flags: python -m training's own parser.
        cfg, out, resume = parse_args(launch.training_script_args)
        runs[replica] = launch.training_script_args
        where = mounts(pod, c)
        assert cfg.dataset == "folder" and resume
        data = where[cfg.data_dir]
        assert data["mount"]["readOnly"] and access(claims, data) == ["ReadOnlyMany"]
        assert "emptyDir" in where[cfg.cache_dir]["volume"]
        assert cfg.batch_size >= world  # the global batch, split over every rank
        gpus = c["resources"]["limits"].get("nvidia.com/gpu", 0)
        assert (cfg.device, gpus) == (("cuda", nproc) if manifest.endswith("-gpu.yaml") else ("cpu", 0))
        if gpus:
            assert where["/dev/shm"]["volume"]["emptyDir"]["medium"] == "Memory"
        security = pod["securityContext"]
        assert security["runAsNonRoot"] and security["runAsUser"] == image["uid"] != 0 and image["user"] == "${UID}:${UID}"
        if replica == "Master":  # rank 0 lives here: the run directory and the model repository
            runs_mount = where[str(out.parent)]
            assert access(claims, runs_mount) == ["ReadWriteOnce"]
            env = image["env"] | {e["name"]: e["value"] for e in c.get("env", [])}
            repo = where[env["VAE_MODEL_REPO"]]
            assert repo["volume"]["persistentVolumeClaim"]["claimName"] == models_claim["metadata"]["name"]
            assert not repo["mount"].get("readOnly") and name == out.name
            assert "ReadWriteMany" in models_claim["spec"]["accessModes"]  # this pod writes where every replica reads
        else:  # the other ranks never touch the run directory
            assert str(out.parent) not in where
    assert runs["Master"] == runs["Worker"], "every rank must run the same training flags"


def test_training_kustomization_lists_the_claims_and_the_job():
    (kustomization,) = documents(TRAINING_DEPLOY / "kustomization.yaml")
    assert kustomization["resources"] == ["pvcs.yaml", "pytorchjob.yaml"]
    assert all((TRAINING_DEPLOY / r).is_file() for r in kustomization["resources"])
    # The image's own ignore file admits every file its Dockerfile copies.
    admitted = [line[1:].rstrip("/") for line in (TRAINING_DEPLOY / "Dockerfile.dockerignore").read_text().splitlines()
                if line.startswith("!")]  # fmt: skip
    for src in image_facts()["copies"].values():
        assert src.rstrip("/") in admitted, src


@pytest.fixture
def fake_launchers(tmp_path):
    """A torchrun and a python that record their arguments (and torchrun any SIGTERM) and signal
    when torchrun has started; FAKE_TORCHRUN=wait keeps it running until it is signalled."""
    bin_dir, record = tmp_path / "bin", tmp_path / "record"
    bin_dir.mkdir()
    record.mkdir()
    (bin_dir / "torchrun").write_text(
        '#!/bin/sh\nprintf "%s\\n" "$@" > "$RECORD/torchrun.args"\n'
        'trap \'echo TERM > "$RECORD/torchrun.signal"; exit 143\' TERM\n'
        'touch "$RECORD/torchrun.started"\n'
        '[ "$FAKE_TORCHRUN" = wait ] || exit 0\n'
        'sleep 600 & wait $!\n'
    )  # fmt: skip
    (bin_dir / "python").write_text('#!/bin/sh\nprintf "%s\\n" "$@" > "$RECORD/python.args"\n')
    for tool in ("torchrun", "python"):
        (bin_dir / tool).chmod(0o755)
    return {"PATH": f"{bin_dir}:{os.environ['PATH']}", "RECORD": str(record)}, record


def master_args() -> tuple[list[str], dict[str, str]]:
    (job,) = documents(TRAINING_DEPLOY / "pytorchjob.yaml")
    (c,) = job["spec"]["pytorchReplicaSpecs"]["Master"]["template"]["spec"]["containers"]
    return expanded(c["args"], operator_env(job, "Master")), {e["name"]: e["value"] for e in c["env"]}


def test_train_then_export_runs_torchrun_then_the_export_cli_with_the_run_s_best_checkpoint(fake_launchers, monkeypatch):
    import export.__main__ as export_cli

    env, record = fake_launchers
    args, container_env = master_args()
    done = subprocess.run([str(TRAINING_DEPLOY / "train-then-export.sh"), *args], env=os.environ | env | container_env,
                          capture_output=True, text=True, timeout=60)  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert (record / "torchrun.args").read_text().splitlines() == args[1:]
    export_argv = (record / "python.args").read_text().splitlines()
    assert export_argv[:2] == ["-m", "export"]
    assert export_argv[2:] == ["--checkpoint", "/runs/products/best.pt", "--out", "/models", "--name", "products"]

    # The export's own parser takes them: it reaches loading the checkpoint.
    class Parsed(Exception):
        pass

    def parsed(path):
        raise Parsed(path)

    monkeypatch.setattr(export_cli, "load_model", parsed)
    with pytest.raises(Parsed) as reached:
        export_cli.main(export_argv[2:])
    assert str(reached.value) == "/runs/products/best.pt"


def test_train_then_export_passes_sigterm_to_torchrun_and_exports_nothing(fake_launchers):
    from tests.conftest import wait_for

    env, record = fake_launchers
    args, container_env = master_args()
    proc = subprocess.Popen([str(TRAINING_DEPLOY / "train-then-export.sh"), *args],
                            env=os.environ | env | container_env | {"FAKE_TORCHRUN": "wait"})  # fmt: skip
    try:
        wait_for(lambda: (record / "torchrun.started").exists())
        proc.send_signal(signal.SIGTERM)  # as the kubelet signals a pod's PID 1
        assert proc.wait(timeout=60) == 143
    finally:
        proc.kill()
    assert (record / "torchrun.signal").read_text().strip() == "TERM"
    assert not (record / "python.args").exists()
