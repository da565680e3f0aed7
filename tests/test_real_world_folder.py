"""A folder as users have them, written here: animated and palette GIFs with transparency, sprites of
everyday odd sizes, 1-pixel-wide and very wide images, EXIF-rotated JPEGs, 16-bit and grey-alpha
PNGs, CMYK, and a few broken files. `python -m training` reads it whole and trains; bad files are
skipped and named, and a fault of the project's own preprocessing names the file it met."""

from __future__ import annotations

import io
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import service.imaging
from service.imaging import Preprocessing
from training.folder import PreprocessingBug, load_folder

ROOT = Path(__file__).resolve().parent.parent
ORIENTATION = 0x0112
# Sizes of real sprites that once crashed the crop at 32x32 (float rounding in its box), and the extremes.
ODD_SIZES = [(57, 49), (49, 52), (58, 49), (129, 98), (49, 49), (1, 300), (300, 1), (2000, 3), (3, 1500), (1, 1)]


def rng_pixels(rng: np.random.Generator, w: int, h: int, channels: int = 3) -> np.ndarray:
    return rng.integers(0, 256, (h, w, channels) if channels > 1 else (h, w), dtype=np.uint8)


def animated_gif(rng: np.random.Generator, w: int, h: int) -> bytes:
    """Three palette frames, index 0 transparent in each."""
    frames = []
    for _ in range(3):
        frame = Image.fromarray(rng_pixels(rng, w, h)).quantize(16)
        frame.info["transparency"] = 0
        frames.append(frame)
    buf = io.BytesIO()
    frames[0].save(buf, format="GIF", save_all=True, append_images=frames[1:], transparency=0, duration=80, loop=0)
    return buf.getvalue()


def saved(image: Image.Image, fmt: str, **options) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format=fmt, **options)
    return buf.getvalue()


def write_real_world(root: Path) -> dict[str, str]:
    """The folder, in two classes; returns the bad files with the kind of reason each must get."""
    rng = np.random.default_rng(0)
    sprites, photos = root / "sprites", root / "photos"
    sprites.mkdir(parents=True)
    photos.mkdir()
    for i, (w, h) in enumerate(ODD_SIZES):
        (sprites / f"odd-{w}x{h}.gif").write_bytes(animated_gif(rng, w, h))
        palette = Image.fromarray(rng_pixels(rng, w, h)).quantize(8)
        (sprites / f"palette-{w}x{h}.gif").write_bytes(saved(palette, "GIF", transparency=3))
        (photos / f"rgba-{w}x{h}.png").write_bytes(saved(Image.fromarray(rng_pixels(rng, w, h, 4), "RGBA"), "PNG"))
    for orientation in (3, 6, 8):
        image = Image.fromarray(rng_pixels(rng, 64, 40))
        exif = Image.Exif()
        exif[ORIENTATION] = orientation
        (photos / f"exif-{orientation}.jpg").write_bytes(saved(image, "JPEG", exif=exif.tobytes(), quality=90))
    deep = rng.integers(0, 65536, (45, 70), dtype=np.uint16)
    (photos / "grey16.png").write_bytes(saved(Image.fromarray(deep), "PNG"))
    (photos / "grey-alpha.png").write_bytes(saved(Image.fromarray(rng_pixels(rng, 33, 21, 2), "LA"), "PNG"))
    (photos / "cmyk.jpg").write_bytes(saved(Image.fromarray(rng_pixels(rng, 50, 37, 4), "CMYK"), "JPEG"))
    (photos / "one-bit.png").write_bytes(saved(Image.fromarray(rng_pixels(rng, 31, 17, 1)).convert("1"), "PNG"))
    bad = {"photos/empty.jpg": "empty file", "sprites/notes.gif": "not an image", "photos/cut.png": "truncated"}
    (photos / "empty.jpg").write_bytes(b"")
    (sprites / "notes.gif").write_text("a text file with an image's name\n")
    whole = saved(Image.fromarray(rng_pixels(rng, 64, 64)), "PNG")
    (photos / "cut.png").write_bytes(whole[: len(whole) // 2])
    return bad


@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> tuple[Path, dict[str, str]]:
    root = tmp_path_factory.mktemp("real-world") / "data"
    return root, write_real_world(root)


@pytest.mark.parametrize("fit", ["crop", "pad"])
@pytest.mark.parametrize("size", [(32, 32), (24, 40)])
def test_every_readable_file_is_read_at_any_size_and_the_bad_ones_are_named(folder, tmp_path, fit, size):
    root, bad = folder
    data = load_folder(root, Preprocessing(size=size, fit=fit), cache_dir=tmp_path, workers=2, progress=False)
    files = sorted(str(p.relative_to(root)) for p in root.rglob("*") if p.is_file())
    assert sorted(data.paths) == sorted(set(files) - set(bad))
    assert {path: reason.split(":")[0] for path, reason in data.skipped} == bad
    assert data.pixels.shape == (len(files) - len(bad), 3, *size)


def test_training_reads_the_folder_and_names_its_bad_files_in_metrics(folder, tmp_path):
    root, bad = folder
    out = tmp_path / "run"
    done = subprocess.run(
        [sys.executable, "-m", "training", "--dataset", "folder", "--data-dir", str(root), "--image-size", "32",
         "--cache-dir", str(tmp_path / "cache"), "--epochs", "1", "--batch-size", "8", "--latent-dim", "4",
         "--widths", "8,16", "--hidden", "32", "--iwae-k", "2", "--test-fraction", "0.3", "--device", "cpu",
         "--out", str(out)],
        cwd=ROOT, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    skipped = json.loads((out / "metrics.json").read_text())["data"]["skipped"]
    assert {s["path"]: s["reason"].split(":")[0] for s in skipped} == bad
    assert all(path in done.stderr for path in bad)  # named in the log too

    strict = subprocess.run(
        [sys.executable, "-m", "training", "--dataset", "folder", "--data-dir", str(root), "--image-size", "32",
         "--cache-dir", str(tmp_path / "cache"), "--strict", "--out", str(tmp_path / "strict")],
        cwd=ROOT, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert strict.returncode != 0 and str(root / "photos/cut.png") in strict.stderr


def test_a_fault_in_the_projects_own_preprocessing_names_the_file_and_is_no_bad_file(folder, tmp_path, monkeypatch):
    """Were the geometry ever wrong again, the run must say which file met it, and not skip it as unreadable."""
    root, _ = folder

    def broken(image: Image.Image, prep: Preprocessing) -> Image.Image:
        if image.size == (57, 49):
            raise ValueError("box offset can't be negative")
        return fit(image, prep)

    fit = service.imaging._fit
    monkeypatch.setattr(service.imaging, "_fit", broken)
    with pytest.raises(PreprocessingBug, match=r"-57x49\.(png|gif): preprocessing failed with ValueError: box offset") as err:
        load_folder(root, Preprocessing(size=(32, 32)), cache_dir=tmp_path, workers=1, progress=False)
    assert "a bug in the project" in str(err.value) and isinstance(err.value.__cause__, ValueError)
