"""Every command of the project answers its user's mistakes as a user reads them: one line on
stderr saying what is wrong, exit 2 for what is known before work starts, 1 for a run that failed
once started, and never a traceback; VAE_TRACEBACK=1 brings the traceback back, for bug reports.
Each case runs the real command as a user would, in a subprocess."""

from __future__ import annotations

import importlib
import os
import shutil
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from service import commands
from tests.conftest import ROOT


def command(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", *args], cwd=ROOT, capture_output=True, text=True, timeout=300,
                          env=os.environ | (env or {}))  # fmt: skip


def one_line(done: subprocess.CompletedProcess, code: int, *words: str) -> str:
    """The error line, once exit code, line count and words are checked."""
    lines = done.stderr.strip().splitlines()
    assert done.returncode == code, done.stderr
    assert "Traceback" not in done.stderr and len(lines) == 1, done.stderr
    for word in words:
        assert word in lines[0], lines[0]
    return lines[0]


@pytest.fixture(scope="module")
def files(tmp_path_factory, trained) -> dict[str, Path]:
    """Things users pass by mistake: a text file, a torch file of someone else's, a cut checkpoint,
    one from an unknown format, a folder of two images, an empty folder, a path under a file."""
    tmp = tmp_path_factory.mktemp("mistakes")
    (tmp / "notes.pt").write_text("not a checkpoint\n")
    torch.save({"weights": torch.zeros(3)}, tmp / "foreign.pt")
    whole = (trained / "best.pt").read_bytes()
    (tmp / "cut.pt").write_bytes(whole[: len(whole) // 3])
    state = torch.load(trained / "best.pt", weights_only=True)
    torch.save(state | {"format": 99}, tmp / "future.pt")
    torch.save(state | {"model": {"encoder.weight": torch.zeros(1)}}, tmp / "other-layout.pt")
    (tmp / "two").mkdir()
    for i in range(2):
        Image.fromarray(np.full((9, 9, 3), 40 * i, np.uint8)).save(tmp / "two" / f"{i}.png")
    (tmp / "empty").mkdir()
    (tmp / "one-bad").mkdir()
    Image.fromarray(np.zeros((9, 9, 3), np.uint8)).save(tmp / "one-bad" / "good.png")
    (tmp / "one-bad" / "bad.png").write_bytes(b"")
    (tmp / "a-file").write_text("x")
    shutil.copytree(trained, tmp / "run")  # resumed below: the session's run stays as it is
    return {p.stem: p for p in tmp.iterdir()} | {"under-a-file": tmp / "a-file" / "out"}


CASES = {
    # name: (argv with {placeholders}, exit code, words the line must hold)
    "training: no such folder": (
        ["training", "--dataset", "folder", "--data-dir", "/no/such/folder", "--image-size", "8", "--out", "{tmp}/r"],
        2, ["--data-dir /no/such/folder: no such folder"]),
    "training: a folder too small to split": (
        ["training", "--dataset", "folder", "--data-dir", "{two}", "--image-size", "8", "--cache-dir", "{tmp}/c",
         "--out", "{tmp}/r"], 1, ["split is empty", "--val-fraction"]),
    "training: no images at all": (
        ["training", "--dataset", "folder", "--data-dir", "{empty}", "--image-size", "8", "--cache-dir", "{tmp}/c",
         "--out", "{tmp}/r"], 1, ["no files, so no image to read"]),
    "training: --strict on a folder with a bad file": (
        ["training", "--dataset", "folder", "--data-dir", "{one-bad}", "--image-size", "8", "--strict",
         "--cache-dir", "{tmp}/c", "--out", "{tmp}/r"], 1, ["one-bad/bad.png: empty file"]),
    "training: a cache inside the data folder": (
        ["training", "--dataset", "folder", "--data-dir", "{two}", "--image-size", "8", "--cache-dir", "{two}/cache",
         "--out", "{tmp}/r"], 1, ["must not lie inside the data folder"]),
    "training: mnist not there, no download": (
        ["training", "--dataset", "mnist", "--data-dir", "{empty}", "--no-download", "--out", "{tmp}/r"],
        2, ["mnist: train-images-idx3-ubyte(.gz) not found", "Put the four IDX files there"]),
    "training: an output folder it cannot write": (
        ["training", "--dataset", "digits", "--out", "{under-a-file}"], 2, ["--out", "cannot write there"]),
    "training: no such classifier": (
        ["training", "--dataset", "digits", "--out", "{tmp}/r", "--classifier", "/no/such.pt"],
        2, ["--classifier: cannot read /no/such.pt: No such file"]),
    "training: a checkpoint given as classifier": (
        ["training", "--dataset", "digits", "--out", "{tmp}/r", "--classifier", "{run}/best.pt"],
        2, ["--classifier", "is not a classifier of this project", "python -m training.features"]),
    "training: flags that contradict": (
        ["training", "--dataset", "digits", "--out", "{tmp}/r", "--image-size", "32"], 2, ["--image-size is for --dataset folder"]),
    "training: resume with other model flags": (
        ["training", "--dataset", "digits", "--out", "{run}", "--resume", "--latent-dim", "3"],
        2, ["--resume", "other flags than these"]),
    "training.features: no such folder": (
        ["training.features", "--dataset", "folder", "--data-dir", "/no/such", "--image-size", "8", "--out", "{tmp}/f"],
        2, ["--data-dir /no/such: no such folder"]),
    "training.evaluate: no such checkpoint": (
        ["training.evaluate", "--checkpoint", "/no/such.pt"], 2, ["cannot read /no/such.pt: No such file"]),
    "training.evaluate: not a checkpoint": (
        ["training.evaluate", "--checkpoint", "{notes}"], 2, ["is not a checkpoint of this project"]),
    "training.compare: not a run": (["training.compare", "--runs", "{empty}", "--out", "{tmp}/c.png"], 2, ["no ", "best.pt"]),
    "export: no such checkpoint": (
        ["export", "--checkpoint", "/no/such.pt", "--out", "{tmp}/m", "--name", "a"], 2, ["cannot read /no/such.pt"]),
    "export: not a checkpoint": (
        ["export", "--checkpoint", "{notes}", "--out", "{tmp}/m", "--name", "a"],
        2, ["is not a checkpoint of this project", "torch cannot read it"]),
    "export: someone else's torch file": (
        ["export", "--checkpoint", "{foreign}", "--out", "{tmp}/m", "--name", "a"], 2, ["it holds no format, config, model"]),
    "export: a cut checkpoint": (
        ["export", "--checkpoint", "{cut}", "--out", "{tmp}/m", "--name", "a"], 2, ["torch cannot read it"]),
    "export: a checkpoint of a newer format": (
        ["export", "--checkpoint", "{future}", "--out", "{tmp}/m", "--name", "a"], 2, ["checkpoint format 99"]),
    "export: weights this version cannot rebuild": (
        ["export", "--checkpoint", "{other-layout}", "--out", "{tmp}/m", "--name", "a"], 2, ["cannot rebuild"]),
    "export: a model name that is no folder name": (
        ["export", "--checkpoint", "{run}/best.pt", "--out", "{tmp}/m", "--name", "a/b"], 2, ["cannot name a model"]),
    "export: an output folder it cannot write": (
        ["export", "--checkpoint", "{run}/best.pt", "--out", "{under-a-file}", "--name", "a"], 2, ["cannot write there"]),
    "export.triton: not a model folder": (["export.triton", "{empty}", "{tmp}/t"], 2, ["holds no version folders"]),
    "export.triton: no such folder": (["export.triton", "/no/such", "{tmp}/t"], 2, ["model_dir /no/such: no such folder"]),
    "bench: no such repository": (
        ["bench", "--model-repo", "/no/such", "--json", "{tmp}/b.json"], 2, ["--model-repo", "/no/such"]),
    "bench: a repository without a model": (
        ["bench", "--model-repo", "{empty}", "--json", "{tmp}/b.json"], 2, ["expected exactly one model"]),
    "bench.ab: no such commit": (
        ["bench.ab", "--base", "no-such-ref", "--model-repo", "{empty}", "--json", "{tmp}/b.json"],
        2, ["--base no-such-ref: not a commit"]),
    "bench.loading: no such folder": (["bench.loading", "--folder", "/no/such"], 2, ["--folder /no/such: no such folder"]),
    "bench.memory: a repository without a model": (
        ["bench.memory", "--model-repo", "{empty}"], 2, ["expected exactly one model"]),
    "service.client: an unknown command": (["service.client", "nonsense"], 2, ["invalid choice"]),
}  # fmt: skip


@pytest.fixture(scope="module")
def answers(files, tmp_path_factory) -> dict[str, subprocess.CompletedProcess]:
    """Every case's command, run four at a time: each is a process that imports torch, and most of
    their time is that import."""

    def run(case: str) -> subprocess.CompletedProcess:
        argv = CASES[case][0]
        names = {name: str(path) for name, path in files.items()} | {"tmp": str(tmp_path_factory.mktemp("case"))}
        return command(*(a.format(**names) for a in argv))

    with ThreadPoolExecutor(4) as pool:
        return dict(zip(CASES, pool.map(run, CASES)))


@pytest.mark.parametrize("case", CASES)
def test_a_mistake_gets_one_line_and_its_exit_code(case, answers):
    argv, code, words = CASES[case]
    line = one_line(answers[case], code, *words)
    assert line.startswith(f"python -m {argv[0]}: error: "), line


def test_nothing_is_written_by_a_run_refused_before_it_starts(files, tmp_path):
    """The classifier is checked before the data is read or a step is trained: no run folder content."""
    done = command("training", "--dataset", "digits", "--out", str(tmp_path / "run"), "--classifier", str(files["notes"]))
    one_line(done, 2, "is not a classifier")
    assert list((tmp_path / "run").iterdir()) == []


@pytest.mark.parametrize("target, first", [
    ("train-mnist-hvae-long", "make train-mnist-hvae's run"), ("train-mnist-hvae-longer", "make train-mnist-hvae-long's run"),
])  # fmt: skip
def test_a_continued_recipe_without_the_run_it_continues_says_so_first(target, first, tmp_path):
    """A recipe that resumes another's run stops on its first line, before it installs or trains anything
    (it would otherwise train a classifier and then fail)."""
    done = subprocess.run(["make", "--no-print-directory", target, f"RUNS={tmp_path / 'runs'}", f"VENV={tmp_path / 'venv'}"],
                          cwd=ROOT, capture_output=True, text=True, timeout=60)  # fmt: skip
    assert done.returncode == 2, done.stderr
    assert first in done.stderr.splitlines()[0] and "Traceback" not in done.stderr, done.stderr
    assert list(tmp_path.iterdir()) == []


def test_vae_traceback_shows_the_traceback_for_reporting_bugs(files, tmp_path):
    done = command("export", "--checkpoint", str(files["notes"]), "--out", str(tmp_path), "--name", "a",
                   env={"VAE_TRACEBACK": "1"})  # fmt: skip
    assert done.returncode != 0 and "Traceback" in done.stderr and "CheckpointError" in done.stderr


def test_a_bug_still_shows_its_traceback():
    """Only a user's mistake is one line: any other exception out of a command is a bug and keeps its traceback."""
    code = "from service.commands import run\ndef main():\n    {}['missing']\nrun(main, 'python -m x')\n"
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert done.returncode == 1 and "Traceback" in done.stderr and "KeyError: 'missing'" in done.stderr


@pytest.mark.parametrize("module", ["training.evaluate", "training.curves", "bench.memory", "bench.http_echo"])
def test_help_says_what_a_command_does_in_whole_sentences(module):
    """--help's description is the module docstring's first paragraph, not its first line, which
    can stop mid-sentence."""
    done = command(module, "--help", env={"COLUMNS": "1000"})  # argparse's wrapping aside
    assert done.returncode == 0, done.stderr
    description = done.stdout.split("\n\n")[1].strip()
    assert description == commands.summary(importlib.import_module(module).__doc__) and description.endswith(".")
