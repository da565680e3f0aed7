"""Data-parallel training under torchrun, for real: two (and four) gloo processes on this machine.

Each run is `torchrun -m tests.test_distributed HOOKS RECORD_DIR TRAINING FLAGS...`: this module,
run as the entry point, installs the test's hooks (`install_hooks`) in every rank and then calls
`python -m training`'s own main. A hook acts at a numbered call of the objective on one rank, so
every event a test waits for happens at a known step of the run, not at a moment on the clock.

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
from pathlib import Path

import pytest

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


# ---- the entry point torchrun starts: hooks, then python -m training ------------------------------


def install_hooks(spec: str, record_dir: Path | None) -> None:
    """HOOKS is a comma-separated list of:
    unsynced          the ranks step on their own gradients (DDP's sync switched off): the control
    record            each rank lists what it writes (checkpoints, figures) in record_dir
    signal:R:N:SIG    rank R sends itself SIG at its N-th call of the objective (1-based)
    hang:R:N          rank R stops answering at its N-th call (a stuck rank: torchrun sees it alive)"""
    from training import checkpoint, train

    rank = int(os.environ.get("RANK", "0"))
    for hook in filter(None, spec.split(",")):
        name, *args = hook.split(":")
        if name == "unsynced":
            init = train.Trainer.__init__

            def unsynced_init(self, *a, _init=init, **k):
                _init(self, *a, **k)
                self.net.require_backward_grad_sync = False  # what DDP.no_sync() sets, for every step

            train.Trainer.__init__ = unsynced_init
        elif name == "record":
            writes: list[str] = []
            save, figures = checkpoint.save, train.write_figures

            def recording_save(path, *a, _save=save, **k):
                writes.append(Path(path).name)
                return _save(path, *a, **k)

            def recording_figures(*a, _figures=figures, **k):
                written = _figures(*a, **k)
                writes.extend(p.name for p in written)
                return written

            checkpoint.save, train.write_figures = recording_save, recording_figures
            import atexit

            atexit.register(lambda: (record_dir / f"writes-rank{rank}.json").write_text(json.dumps(writes)))
        elif name in ("signal", "hang"):
            target, call = int(args[0]), int(args[1])
            if target != rank:
                continue
            objective, calls = train.objective, [0]

            def hooked(*a, _objective=objective, _calls=calls, _name=name, _args=args, _call=call, **k):
                _calls[0] += 1
                if _calls[0] == _call:
                    if _name == "signal":
                        os.kill(os.getpid(), getattr(signal, _args[2]))
                    else:  # stuck outside any collective; torchrun's SIGTERM still ends it
                        signal.signal(signal.SIGTERM, signal.SIG_DFL)
                        import threading

                        threading.Event().wait()
                return _objective(*a, **k)

            train.objective = hooked
        else:
            raise SystemExit(f"unknown hook {hook!r}")


# ---- the tests -----------------------------------------------------------------------------------


def torchrun(nproc: int, hooks: str, record: Path | None, *flags: str) -> subprocess.CompletedProcess:
    """`torchrun --standalone` (a free port, so runs beside other jobs do not collide) with this module's hooks."""
    cmd = [str(TORCHRUN), "--standalone", "--nproc-per-node", str(nproc), "-m", "tests.test_distributed", hooks,
           str(record) if record else "-", *flags]  # fmt: skip
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
    done = torchrun(2, "record", record, *FLAGS, "--epochs", "1", "--out", str(out / "run"))
    assert done.returncode == 0, done.stdout + done.stderr
    return out / "run", record, done


def test_two_ranks_step_as_one_process_and_unsynchronised_ranks_do_not(two_ranks, one_process, tmp_path):
    run, _, _ = two_ranks
    synced = distance(weights(run / "last.pt"), weights(one_process[1] / "last.pt"))
    assert synced < TOL, f"two ranks end {synced:.2e} from one process"
    # The control: the same run with DDP's gradient sync off fails the same comparison.
    done = torchrun(2, "unsynced", None, *FLAGS, "--epochs", "1", "--out", str(tmp_path / "unsynced"))
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
    done = torchrun(2, f"signal:1:{STEPS + 5}:SIGTERM", None, *FLAGS, "--epochs", "2", "--out", str(out))
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
    reference = checkpoint.load(one_process[2] / "last.pt")["history"]
    assert [h["train"]["loss"] for h in trainer.history] == pytest.approx([h["train"]["loss"] for h in reference], rel=1e-6)


def test_a_killed_rank_ends_the_job_with_an_error_naming_it_and_leaves_the_last_checkpoint(tmp_path):
    from training import checkpoint

    out = tmp_path / "run"
    done = torchrun(2, f"signal:1:{STEPS + 5}:SIGKILL", None, *FLAGS, "--epochs", "2", "--out", str(out))
    logged = done.stdout + done.stderr
    assert done.returncode != 0, logged
    assert "Signal 9 (SIGKILL) received by PID" in logged and "rank      : 1 (local_rank: 1)" in logged
    assert "[rank 0/2] training failed: another rank stopped answering" in logged
    assert checkpoint.load(out / "last.pt")["epoch"] == 1  # epoch 1's, whole


def test_a_hung_rank_ends_the_job_after_the_collective_timeout(tmp_path):
    # Rank 1 stops answering at step 5 while alive, which torchrun cannot see: rank 0's next
    # collective gives up after --dist-timeout and the run ends with that error.
    done = torchrun(2, "hang:1:5", None, *FLAGS, "--epochs", "1", "--dist-timeout", "3", "--out", str(tmp_path / "run"))
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
    done = torchrun(4, "", None, *FLAGS, "--epochs", "2", "--resume", "--out", str(run))
    assert done.returncode == 0, done.stdout + done.stderr
    assert distance(weights(run / "last.pt"), weights(one_process[2] / "last.pt")) < TOL
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["world_size"] == 4 and [h["world_size"] for h in metrics["history"]] == [2, 4]
    # The test figures, split over 4 ranks (IWAE noise skipped to each rank's images), are one process's.
    model, cfg, _ = load_model(run / "best.pt")
    x = prepare_eval_images(load_dataset("digits").test.unit(), cfg.model.likelihood, cfg.eval_images)
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




if __name__ == "__main__":
    hooks, record, *training_argv = sys.argv[1:]
    install_hooks(hooks, Path(record) if record != "-" else None)
    from training.__main__ import main

    main(training_argv)
    sys.exit(0)
