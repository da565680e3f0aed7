"""Loading a folder of your own images: first-time decode, the cached second start, and training
memory with a folder ten times larger, each printed beside its goal (issue "Your own images").

    python -m bench.loading --folder DIR [--image-size 32] [--json OUT] [--workdir TMP] [--steps 50]

1. First-time decode: images/s of `load_folder` into a fresh, empty cache against a bare Pillow
   decode of the same files (open, load, convert, Lanczos resize: the least work that gives the
   same output), one process per core and chunked as load_folder chunks, so that the ratio is
   load_folder's own overhead. Two runs of each, alternating (the machine drifts); the better of
   each is the figure, and every run is printed. Every file is read once before, so neither side
   pays the cold disk.
2. The cached second start: a fresh `python -c` that imports training.folder and calls load_folder
   on that cache; both the call's time and the process's wall time (interpreter and imports
   included), better of two, and how many files it decoded (0 means the cache served them all).
3. Training memory: DIR10 holds every image of DIR ten times under other names (hard links where
   the filesystem allows them, else copies; never written into DIR, which may be read-only). For
   DIR and DIR10, both decoded beforehand so that the measured run starts cached, a fresh process
   runs load_data, builds the Twemoji recipe's Trainer and takes --steps training steps through
   the code path train_epoch uses; its peak and current resident memory, and their 10x/1x ratio.

The pixels are the Twemoji recipe's: RGB, centre crop, transparency on white. It measures and
prints, never asserts. Everything it writes lies in a temporary folder under --workdir, removed
at the end.
"""

from __future__ import annotations

import json
import os
import platform
import shlex
import shutil
import subprocess
import sys
import tempfile
import time
import warnings
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any, TypeVar

import numpy as np
import PIL
from PIL import Image

from service import commands
from service.commands import Parser, existing_folder, writable_folder
from service.imaging import RESAMPLE, Preprocessing, parse_size
from training.folder import CHUNK, load_folder

REPO = Path(__file__).resolve().parents[1]
RUNS = 2  # runs of each timed figure; the better one is reported
T = TypeVar("T")

# The second start as a user's next run has it: a new interpreter, the imports, then the call.
CACHED_START = """
import json, sys, time
started = time.perf_counter()
from service.imaging import Preprocessing
from training.folder import load_folder
imported = time.perf_counter()
prep = Preprocessing.from_json(json.loads(sys.argv[3]))
folder = load_folder(sys.argv[1], prep, cache_dir=sys.argv[2], progress=False)
done = time.perf_counter()
print(json.dumps({"import_s": imported - started, "call_s": done - imported, "decoded": folder.decoded,
                  "reused": folder.reused}))
"""
TRAIN_CHILD = "import sys; from bench.loading import train_child; train_child(*sys.argv[1:])"


def figure(value: float | int, unit: str, goal: str | None = None) -> dict[str, Any]:
    """One figure for the JSON: its value, its unit and, where the issue set one, the goal."""
    return {"value": value, "unit": unit} | ({"goal": goal} if goal else {})


def timed(fn: Callable[[], T]) -> tuple[float, T]:
    started = time.perf_counter()
    result = fn()
    return time.perf_counter() - started, result


def child_json(argv: list[str]) -> tuple[float, dict[str, Any]]:
    """Run a fresh Python process in the repository; its wall time and the JSON of its last line.
    A failure stops the benchmark with the child's own error, which would otherwise be captured."""
    wall, done = timed(lambda: subprocess.run([sys.executable, *argv], cwd=REPO, capture_output=True, text=True))
    if done.returncode != 0:
        raise SystemExit(f"{shlex.join(argv[:2])}... failed ({done.returncode}):\n{done.stderr}")
    return wall, json.loads(done.stdout.strip().splitlines()[-1])


def files_under(root: Path) -> list[Path]:
    """Every non-hidden file below root outside hidden folders: what load_folder scans."""
    found = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = [d for d in dirnames if not d.startswith(".")]
        found += [Path(dirpath, name) for name in filenames if not name.startswith(".")]
    return sorted(found)


def bare_chunk(paths: list[str], size: tuple[int, int], mode: str) -> list[np.ndarray | None]:
    """A worker's task: the minimum Pillow work for an output of the same size and mode (None for a
    file Pillow cannot read). It does not composite transparency onto the background, as
    load_folder does, so on RGBA images the ratio counts that work against load_folder."""
    warnings.simplefilter("ignore")  # Pillow's advice on converting palette images with transparency
    out: list[np.ndarray | None] = []
    for path in paths:
        try:
            with Image.open(path) as image:
                image.load()
                out.append(np.asarray(image.convert(mode).resize((size[1], size[0]), RESAMPLE)))
        except Exception:  # not an image (a README): skipped, as load_folder skips it
            out.append(None)
    return out


def bare_decode(paths: list[Path], prep: Preprocessing) -> int:
    """Decode every file in one process per core, CHUNK files per task like load_folder, into one
    array; returns how many were images."""
    mode = "L" if prep.channels == 1 else "RGB"
    pixels = np.empty((len(paths), *prep.size, *([] if prep.channels == 1 else [3])), dtype=np.uint8)
    chunks = [[str(p) for p in paths[i : i + CHUNK]] for i in range(0, len(paths), CHUNK)]
    n = 0
    with ProcessPoolExecutor(os.cpu_count()) as pool:
        for chunk in pool.map(bare_chunk, chunks, [prep.size] * len(chunks), [mode] * len(chunks)):
            for array in chunk:
                if array is not None:
                    pixels[n] = array
                    n += 1
    return n


def first_decode(root: Path, prep: Preprocessing, work: Path) -> tuple[dict[str, Any], Path, list[str]]:
    """load_folder into a fresh cache against the bare decode, alternating, RUNS each. Returns the
    figures, the last cache (for the second start) and the images' relative paths."""
    paths = files_under(root)
    for p in paths:  # into the page cache, so that the first run does not pay the disk alone
        p.read_bytes()
    bare_s, folder_s, images = [], [], 0
    for _ in range(RUNS):
        seconds, images = timed(lambda: bare_decode(paths, prep))
        bare_s.append(seconds)
        cache = Path(tempfile.mkdtemp(prefix="decode-", dir=work))
        seconds, folder = timed(lambda: load_folder(root, prep, cache_dir=cache, progress=False))
        folder_s.append(seconds)
    n = len(folder.paths)
    if n != images:
        print(f"  note: load_folder read {n} images, bare Pillow {images}", flush=True)
    best_folder, best_bare = n / min(folder_s), images / min(bare_s)
    return {
        "files": len(paths), "images": n, "processes": os.cpu_count(), "runs": RUNS,
        "load_folder": figure(round(best_folder, 1), "images/s"),
        "bare_pillow": figure(round(best_bare, 1), "images/s"),
        "ratio": figure(round(best_folder / best_bare, 3), "load_folder/bare", ">= 0.8"),
        "load_folder_runs": figure([round(n / s, 1) for s in folder_s], "images/s"),
        "bare_pillow_runs": figure([round(images / s, 1) for s in bare_s], "images/s"),
    }, cache, folder.paths  # fmt: skip


def cached_start(root: Path, prep: Preprocessing, cache: Path) -> dict[str, Any]:
    """A fresh process on a full cache, RUNS times; the better wall time, with that run's figures."""
    runs = []
    for _ in range(RUNS):
        runs.append(child_json(["-c", CACHED_START, str(root), str(cache), json.dumps(prep.to_json())]))
    wall, best = min(runs, key=lambda r: r[0])
    return {
        "process_wall": figure(round(wall, 3), "s", "< 2"),
        "load_folder_call": figure(round(best["call_s"], 3), "s"),
        "imports": figure(round(best["import_s"], 3), "s"),
        "decoded": figure(best["decoded"], "files", "0"),
        "reused": figure(best["reused"], "images"),
        "process_wall_runs": figure([round(w, 3) for w, _ in runs], "s"),
    }


def make_tenfold(root: Path, images: list[str], dest: Path) -> str:
    """Every image ten times, `cls/name.copyK.ext`, hard-linked where the filesystem allows, else copied."""
    link: Callable[[Path, Path], Any] = os.link
    for rel in images:
        source = root / rel
        for k in range(10):
            target = dest / Path(rel).with_name(f"{Path(rel).stem}.copy{k}{Path(rel).suffix}")
            target.parent.mkdir(parents=True, exist_ok=True)
            try:
                link(source, target)
            except OSError:  # another filesystem, or protected_hardlinks on files of another owner
                link = shutil.copyfile
                link(source, target)
    return "hard links" if link is os.link else "copies"


def dir_mib(path: Path) -> float:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file()) / 2**20


def proc_status_mib(*keys: str) -> dict[str, float]:
    """Fields of /proc/self/status (Linux), in MiB."""
    fields = dict(line.split(":", 1) for line in Path("/proc/self/status").read_text().splitlines())
    return {key: int(fields[key].split()[0]) / 1024 for key in keys}


def train_child(root: str, cache: str, prep_json: str, steps: str, out: str) -> None:
    """Run in a fresh process: load_data on the cached folder, the Twemoji recipe's Trainer, `steps`
    steps of train_epoch's body (Split.batch, objective, backward, step: the rows read and converted
    as training reads them), then its memory as JSON. Steps, not epochs, so that both folders do the
    same work; a full epoch of DIR10 would also map every page of its cache (file-backed RSS)."""
    import resource

    import torch

    from training.config import ModelConfig, TrainConfig
    from training.data import load_data
    from training.train import Trainer, objective

    torch.set_num_threads(1)
    prep = Preprocessing.from_json(json.loads(prep_json))
    model = ModelConfig(likelihood="logistic-mixture", mixtures=5, widths=(64, 128), latent_dim=64, hidden=512)
    cfg = TrainConfig(
        dataset="folder", data_dir=root, image_size=prep.size, channels=prep.channels, fit=prep.fit,
        background=prep.to_json()["background"], cache_dir=cache, batch_size=64, lr=2e-3, device="cpu", model=model,
    )  # fmt: skip
    load_s, data = timed(lambda: load_data(cfg))
    trainer = Trainer(cfg, Path(out), data)
    trainer.model.train()
    batches: list[torch.Tensor] = []
    while len(batches) < int(steps):  # epoch after epoch, as fit draws them, so both folders take `steps` steps
        batches += torch.randperm(len(data.train), generator=trainer.data_gen).split(cfg.batch_size)
    batches = batches[: int(steps)]
    started = time.perf_counter()
    for idx in batches:
        x = data.train.batch(idx).to(trainer.device)
        loss, _ = objective(trainer.model, x, cfg, cfg.beta, trainer.feature_net)
        trainer.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        trainer.optimizer.step()
    step_s = (time.perf_counter() - started) / len(batches)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux
    rss = proc_status_mib("VmRSS", "RssAnon", "RssFile")
    print(json.dumps({
        "images": data.info["images"], "train_images": len(data.train), "val_images": len(data.val),
        "decoded": figure(data.info["decoded"], "files", "0"), "steps": len(batches),
        "load_data": figure(round(load_s, 3), "s"), "step": figure(round(step_s, 4), "s"),
        "peak_rss": figure(round(peak, 1), "MiB"), "rss": figure(round(rss["VmRSS"], 1), "MiB"),
        "rss_anon": figure(round(rss["RssAnon"], 1), "MiB"), "rss_file": figure(round(rss["RssFile"], 1), "MiB"),
        "cache_on_disk": figure(round(dir_mib(Path(data.info["cache"])), 2), "MiB"),
    }))  # fmt: skip


def training_memory(root: Path, prep: Preprocessing, images: list[str], steps: int, work: Path) -> dict[str, Any]:
    """DIR and DIR10, each decoded here first, then measured in a fresh process each."""
    ten = work / f"{root.name}-x10"
    how = make_tenfold(root, images, ten)
    cache = work / "cache"
    load_folder(root, prep, cache_dir=cache, progress=False)
    decode10_s, folder10 = timed(lambda: load_folder(ten, prep, cache_dir=cache, progress=False))
    print(f"  {ten.name}: {len(folder10.paths)} images ({how}), first decode {len(folder10.paths) / decode10_s:.1f} "
          f"images/s", flush=True)  # fmt: skip
    runs = {}
    for name, folder in (("1x", root), ("10x", ten)):
        argv = ["-c", TRAIN_CHILD, str(folder), str(cache), json.dumps(prep.to_json()), str(steps), str(work / name)]
        runs[name] = child_json(argv)[1]
    one, ten = runs["1x"], runs["10x"]
    return {
        "tenfold_files": how, "torch_threads": 1, "batch_size": 64,
        "tenfold_first_decode": figure(round(len(folder10.paths) / decode10_s, 1), "images/s"),
        **runs,
        "peak_rss_ratio": figure(round(ten["peak_rss"]["value"] / one["peak_rss"]["value"], 3), "10x/1x", "< 1.2"),
        "rss_ratio": figure(round(ten["rss"]["value"] / one["rss"]["value"], 3), "10x/1x"),
    }  # fmt: skip


def git_commit() -> dict[str, Any]:
    def git(*args: str) -> str:
        return subprocess.run(["git", *args], cwd=REPO, capture_output=True, text=True).stdout.strip()

    return {"commit": git("rev-parse", "--short", "HEAD") or None,
            "dirty": bool(git("status", "--porcelain", "--untracked-files=no"))}  # fmt: skip


def show(label: str, f: dict[str, Any], fmt: str = "") -> None:
    """One printed line: the figure, its unit, and the goal beside it where there is one."""
    value = f"{f['value']:{fmt}}" if not isinstance(f["value"], list) else ", ".join(f"{v:{fmt}}" for v in f["value"])
    goal = f"   goal {f['goal']}" if "goal" in f else ""
    print(f"  {label:<44}{value:>14} {f['unit']}{goal}", flush=True)


def build_parser() -> Parser:
    """The command's parser: a pure reading of the flags (the docs' commands are checked with it)."""
    parser = Parser(prog="python -m bench.loading", description=commands.summary(__doc__))
    parser.add_argument("--folder", type=Path, required=True, help="a folder of images (read only, never written)")
    parser.add_argument("--image-size", type=parse_size, default=(32, 32), help="N or HxW (default 32)")
    parser.add_argument("--json", type=Path, help="write every figure here")
    parser.add_argument("--workdir", type=Path, help="where the temporary folder goes (default: the system's)")
    parser.add_argument("--steps", type=int, default=50, help="training steps per memory run (default 50)")
    return parser


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    root = existing_folder(args.folder.expanduser(), "--folder").resolve()
    prep = Preprocessing(channels=3, size=args.image_size, fit="crop", background=(255, 255, 255))
    if args.workdir:
        writable_folder(args.workdir, "--workdir")
    if args.json:
        writable_folder(args.json.parent, "--json")
    work = Path(tempfile.mkdtemp(prefix="bench-loading-", dir=args.workdir))
    command = shlex.join([Path(sys.executable).name, "-m", "bench.loading", *(sys.argv[1:] if argv is None else argv)])
    report: dict[str, Any] = {
        "command": command, "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), **git_commit(),
        "machine": {"cpu_count": os.cpu_count(), "platform": platform.platform(), "python": platform.python_version(),
                    "pillow": PIL.__version__},
        "folder": str(root), "preprocessing": prep.to_json(),
    }  # fmt: skip
    print(f"{root}: {os.cpu_count()} cores, {prep.size[0]}x{prep.size[1]} RGB; working in {work}", flush=True)
    try:
        decode, cache, images = first_decode(root, prep, work)
        print(f"first-time decode, {decode['images']} images, {decode['processes']} processes "
              f"(runs alternating; the better of {RUNS} each):")  # fmt: skip
        show("load_folder, fresh cache", decode["load_folder"], ".1f")
        show("bare Pillow (open, load, convert, resize)", decode["bare_pillow"], ".1f")
        show("ratio", decode["ratio"], ".3f")
        show("  load_folder, each run", decode["load_folder_runs"], ".1f")
        show("  bare Pillow, each run", decode["bare_pillow_runs"], ".1f")

        start = cached_start(root, prep, cache)
        print(f"cached second start, a fresh process (the better of {RUNS}):")
        show("process wall time, imports included", start["process_wall"], ".3f")
        show("load_folder call", start["load_folder_call"], ".3f")
        show("imports", start["imports"], ".3f")
        show("decoded", start["decoded"], "d")
        show("  process wall time, each run", start["process_wall_runs"], ".3f")

        print(f"training memory, {args.steps} steps, batch 64, 1 torch thread, a fresh process each:")
        memory = training_memory(root, prep, images, args.steps, work)
        for name in ("1x", "10x"):
            m = memory[name]
            print(f"  {name}: {m['images']} images ({m['train_images']} train, {m['val_images']} val), decoded "
                  f"{m['decoded']['value']}, load_data {m['load_data']['value']:.3f} s, {m['steps']} steps at "
                  f"{m['step']['value']:.3f} s")  # fmt: skip
            show(f"{name} peak RSS", m["peak_rss"], ".1f")
            show(f"{name} RSS after the steps (anon + file)", m["rss"], ".1f")
            print(f"  {'':<44}{'':>14} ({m['rss_anon']['value']:.1f} anon + {m['rss_file']['value']:.1f} file)")
            show(f"{name} cache on disk", m["cache_on_disk"], ".2f")
        show("peak RSS 10x / 1x", memory["peak_rss_ratio"], ".3f")
        show("RSS after the steps 10x / 1x", memory["rss_ratio"], ".3f")
        report |= {"first_decode": decode, "cached_start": start, "training_memory": memory}
    finally:
        shutil.rmtree(work, ignore_errors=True)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(report, indent=2) + "\n")
        print(f"wrote {args.json}")


if __name__ == "__main__":
    commands.run(main, "python -m bench.loading")
