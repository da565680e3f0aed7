"""training.folder: real folders of image files (written here) as datasets, and their on-disk cache."""

import hashlib
import json
import logging
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from service.imaging import ImageError, Preprocessing
from training.folder import FolderData, default_cache_dir, load_folder, split_key

ROOT = Path(__file__).resolve().parent.parent
PREP = Preprocessing(size=(4, 4))  # the files below are 4x4: pixels come back exactly as written


def write_png(path: Path, colour: tuple[int, int, int], fmt: str = "PNG", **kwargs) -> tuple[int, int, int]:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (4, 4), colour).save(path, format=fmt, **kwargs)
    return colour


def colour_of(data: FolderData, rel: str) -> tuple[int, ...]:
    row = data.paths.index(rel)
    assert (data.pixels[row] == data.pixels[row][:, :1, :1]).all()  # one colour throughout
    return tuple(int(v) for v in data.pixels[row][:, 0, 0])


def load(root: Path, cache: Path, **kwargs) -> FolderData:
    return load_folder(root, PREP, cache_dir=cache, workers=1, progress=False, **kwargs)


def listing(root: Path) -> dict[str, tuple[int, int]]:
    return {str(p.relative_to(root)): (p.stat().st_size, p.stat().st_mtime_ns) for p in sorted(root.rglob("*"))}


@pytest.fixture
def cache(tmp_path) -> Path:
    return tmp_path / "cache"


def test_first_level_folders_are_classes_and_deeper_ones_belong_to_them(tmp_path, cache):
    root = tmp_path / "data"
    colours = {
        "dogs/a.png": write_png(root / "dogs/a.png", (1, 2, 3)),
        "cats/b.png": write_png(root / "cats/b.png", (4, 5, 6)),
        "cats/deep/er/c.png": write_png(root / "cats/deep/er/c.png", (7, 8, 9)),
    }
    (root / "birds").mkdir()
    (root / "birds/notes.txt").write_text("no image here")  # a folder without a readable image is no class
    data = load(root, cache)
    assert data.classes == ["cats", "dogs"]
    assert {p: data.classes[label] for p, label in zip(data.paths, data.labels)} == {
        "dogs/a.png": "dogs", "cats/b.png": "cats", "cats/deep/er/c.png": "cats"}  # fmt: skip
    assert data.class_counts() == {"cats": 2, "dogs": 1}
    assert {p: colour_of(data, p) for p in data.paths} == colours
    assert data.pixels.shape == (3, 3, 4, 4) and data.pixels.dtype == np.uint8 and data.labels.dtype == np.int64
    assert data.skipped == [("birds/notes.txt", "not an image: no image format recognised (13 bytes)")]


def test_an_image_in_the_root_means_no_classes(tmp_path, cache, caplog):
    root = tmp_path / "data"
    write_png(root / "top.png", (1, 1, 1))
    write_png(root / "sub/inner.png", (2, 2, 2))
    with caplog.at_level(logging.WARNING, logger="training.folder"):
        data = load(root, cache)
    assert data.classes == [] and data.labels.tolist() == [-1, -1] and data.class_counts() == {}
    assert "sit directly in the folder" in caplog.text and "top.png" in caplog.text


def test_formats_and_names_by_content_hidden_files_and_linked_folders_ignored(tmp_path, cache):
    root = tmp_path / "data"
    expected = {
        "UPPER.PNG": write_png(root / "UPPER.PNG", (10, 20, 30)),
        "no_extension": write_png(root / "no_extension", (40, 50, 60), fmt="BMP"),
        "with space é ü.png": write_png(root / "with space é ü.png", (70, 80, 90), fmt="TIFF"),
        "really a gif.jpg": write_png(root / "really a gif.jpg", (255, 0, 0), fmt="GIF"),
        "lossless.webp": write_png(root / "lossless.webp", (0, 255, 0), fmt="WEBP", lossless=True),
    }
    Image.new("RGB", (4, 4), (0, 0, 255)).save(root / "photo.JPEG", quality=100)
    write_png(root / ".hidden.png", (1, 1, 1))
    write_png(root / ".git/inside.png", (1, 1, 1))
    write_png(tmp_path / "elsewhere/linked.png", (1, 1, 1))
    os.symlink(tmp_path / "elsewhere", root / "link", target_is_directory=True)
    data = load(root, cache)
    assert sorted(data.paths) == sorted([*expected, "photo.JPEG"])
    assert {p: colour_of(data, p) for p in expected} == expected
    assert np.abs(data.pixels[data.paths.index("photo.JPEG")].astype(int) - [[[0]], [[0]], [[255]]]).max() <= 2
    assert data.skipped == []


def bad_files(root: Path) -> None:
    (root / "empty.png").write_bytes(b"")
    noise = root / "noise.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (32, 32, 3), dtype=np.uint8)).save(noise)
    (root / "truncated.png").write_bytes(noise.read_bytes()[:1500])
    noise.unlink()
    (root / "fake.png").write_text("this is text, named like a picture")


def test_bad_files_are_skipped_with_their_reasons_and_named_in_a_warning(tmp_path, cache, caplog):
    root = tmp_path / "data"
    write_png(root / "good.png", (9, 9, 9))
    bad_files(root)
    with caplog.at_level(logging.WARNING, logger="training.folder"):
        data = load(root, cache)
    assert data.paths == ["good.png"] and colour_of(data, "good.png") == (9, 9, 9)
    reasons = dict(data.skipped)
    assert sorted(reasons) == ["empty.png", "fake.png", "truncated.png"]
    assert reasons["empty.png"] == "empty file"
    assert reasons["fake.png"].startswith("not an image") and reasons["truncated.png"].startswith("truncated")
    assert "skipped 3 of 4 files" in caplog.text and "empty.png (empty file)" in caplog.text
    again = load(root, cache)  # the reasons come from the cache, unchanged
    assert again.decoded == 0 and again.skipped == data.skipped


def test_the_warning_names_five_and_counts_the_rest(tmp_path, cache, caplog):
    root = tmp_path / "data"
    write_png(root / "good.png", (9, 9, 9))
    for i in range(8):
        (root / f"bad{i}.png").write_bytes(b"")
    with caplog.at_level(logging.WARNING, logger="training.folder"):
        load(root, cache)
    assert "bad4.png (empty file) and 3 more" in caplog.text and "bad5.png" not in caplog.text


def test_strict_raises_on_the_first_bad_file_with_its_path(tmp_path, cache):
    root = tmp_path / "data"
    write_png(root / "good.png", (9, 9, 9))
    bad_files(root)
    with pytest.raises(ImageError, match=f"^{re.escape(str(root / 'empty.png'))}: empty file$"):
        load(root, cache, strict=True)
    load(root, cache)  # cached with its skip reasons ...
    with pytest.raises(ImageError, match="empty.png: empty file"):  # ... which strict still refuses
        load(root, cache, strict=True)


def test_folders_without_a_readable_image_fail_at_once_saying_what_they_hold(tmp_path, cache):
    with pytest.raises(FileNotFoundError, match="missing"):
        load(tmp_path / "missing", cache)
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / ".DS_Store").write_bytes(b"x")
    with pytest.raises(ValueError, match=f"^{re.escape(str(empty))}: no files"):
        load(empty, cache)
    bad = tmp_path / "bad"
    bad.mkdir()
    bad_files(bad)
    (bad / "more.png").write_bytes(b"")
    found = "4 files, none a readable image: 2 empty, 1 not images, 1 truncated"
    with pytest.raises(ValueError, match=f"^{re.escape(str(bad))}: {found}$"):
        load(bad, cache)
    with pytest.raises(NotADirectoryError):
        load(bad / "more.png", cache)


def test_a_second_load_decodes_nothing_and_changes_are_picked_up(tmp_path, cache):
    root = tmp_path / "data"
    for i in range(6):
        write_png(root / f"c{i % 2}/img{i}.bmp", (i, i, i), fmt="BMP")  # sizes never differ
    first = load(root, cache)
    assert (first.decoded, first.reused, len(first.paths)) == (6, 0, 6)
    second = load(root, cache)
    assert (second.decoded, second.reused) == (0, 6)
    assert second.paths == first.paths and np.array_equal(second.pixels, first.pixels)
    assert isinstance(second.pixels, np.memmap)
    second.pixels[0] = 99  # copy-on-write: writable, never written back
    assert not (load(root, cache).pixels[0] == 99).any()

    changed = root / "c0/img2.bmp"
    stat = changed.stat()
    write_png(changed, (200, 100, 50), fmt="BMP")
    assert changed.stat().st_size == stat.st_size  # only the time tells
    os.utime(changed, ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))
    write_png(root / "c1/new.png", (7, 7, 7))
    (root / "c1/img5.bmp").unlink()
    third = load(root, cache)
    assert (third.decoded, third.reused, len(third.paths)) == (2, 4, 6)
    assert colour_of(third, "c0/img2.bmp") == (200, 100, 50) and colour_of(third, "c1/new.png") == (7, 7, 7)
    assert "c1/img5.bmp" not in third.paths
    assert all(colour_of(third, f"c{i % 2}/img{i}.bmp") == (i, i, i) for i in (0, 1, 3, 4))
    assert sorted(p.name for p in third.cache_dir.iterdir()) == ["index.json", json.loads(
        (third.cache_dir / "index.json").read_text())["pixels"]]  # the old generation and every temp file are gone
    assert load(root, cache).decoded == 0


def test_splits_are_contiguous_slices_by_path_hash_and_stable_when_files_are_added(tmp_path, cache):
    root = tmp_path / "data"
    for i in range(40):
        write_png(root / f"img{i:02d}.png", (i, i, i))
    data = load(root, cache)
    assert np.all(np.diff(data.keys) > 0) and 0 <= data.keys[0] and data.keys[-1] < 1
    digest = hashlib.sha256(b"img07.png").digest()
    assert split_key("img07.png") == pytest.approx(int.from_bytes(digest[:8], "big") / 2**64, abs=1e-15)
    assert data.keys.tolist() == [split_key(p) for p in data.paths]

    def splits_of(d: FolderData) -> dict[str, str]:
        s = d.split(0.2, 0.3)
        assert s["test"].start == 0 and s["test"].stop == s["val"].start and s["val"].stop == s["train"].start
        assert s["train"].stop == len(d.paths)
        assert (d.keys[s["test"]] < 0.2).all() and (d.keys[s["train"]] >= 0.5).all()
        assert ((d.keys[s["val"]] >= 0.2) & (d.keys[s["val"]] < 0.5)).all()
        return {p: name for name, sl in s.items() for p in d.paths[sl]}

    before = splits_of(data)
    assert len(set(before.values())) == 3  # 40 files land in every split
    for i in range(40, 70):
        write_png(root / f"img{i:02d}.png", (i, i, i))
    after = splits_of(load(root, cache))
    assert {p: after[p] for p in before} == before
    assert data.split(0, 0)["train"] == slice(0, 40) and data.split(1, 0)["test"] == slice(0, 40)
    with pytest.raises(ValueError, match="fractions"):
        data.split(0.7, 0.5)


def test_the_data_folder_is_never_written(tmp_path, cache):
    root = tmp_path / "data"
    write_png(root / "a/x.png", (1, 2, 3))
    (root / "a/bad.png").write_bytes(b"")
    before = listing(root)
    os.chmod(root / "a", 0o555)
    os.chmod(root, 0o555)
    try:
        data = load(root, cache)
        load(root, cache)
    finally:
        os.chmod(root, 0o755)
        os.chmod(root / "a", 0o755)
    assert listing(root) == before
    assert data.cache_dir.parent == cache.resolve() and (data.cache_dir / "index.json").exists()
    with pytest.raises(ValueError, match="must not lie inside the data folder"):
        load(root, root / ".cache")


def test_each_preprocessing_has_its_own_cache(tmp_path, cache):
    root = tmp_path / "data"
    write_png(root / "x.png", (10, 20, 30))
    colour = load(root, cache)
    grey = load_folder(root, Preprocessing(channels=1, size=(2, 2)), cache_dir=cache, workers=1, progress=False)
    assert grey.cache_dir != colour.cache_dir and grey.decoded == 1
    assert grey.pixels.shape == (1, 1, 2, 2) and (grey.pixels == 18).all()  # 601 luma of (10, 20, 30)


def test_a_cache_whose_pixels_are_gone_or_wrong_is_rebuilt(tmp_path, cache):
    """What a reader sees if a writer replaced the generation it was about to open, or a damaged cache."""
    root = tmp_path / "data"
    write_png(root / "x.png", (10, 20, 30))
    data = load(root, cache)
    index = data.cache_dir / "index.json"
    (data.cache_dir / json.loads(index.read_text())["pixels"]).unlink()
    assert load(root, cache).decoded == 1
    entry = json.loads(index.read_text())
    np.save(data.cache_dir / entry["pixels"], np.zeros((5, 3, 4, 4), np.uint8))
    rebuilt = load(root, cache)
    assert rebuilt.decoded == 1 and colour_of(rebuilt, "x.png") == (10, 20, 30)
    index.write_text("{not json")
    assert load(root, cache).decoded == 1


def test_processes_loading_one_folder_at_once_all_succeed(tmp_path, cache):
    """Two cold loads race to write the cache: each gets whole pixels, and the cache they leave is whole."""
    root = tmp_path / "data"
    for i in range(100):
        write_png(root / f"img{i:02d}.png", (i, i, i))
    code = ("import sys; from service.imaging import Preprocessing; from training.folder import load_folder; "
            "d = load_folder(sys.argv[1], Preprocessing(size=(4, 4)), cache_dir=sys.argv[2], workers=1, "
            "progress=False); print(int(d.pixels.astype(int).sum()), len(d.paths))")  # fmt: skip
    procs = [subprocess.Popen([sys.executable, "-c", code, root, cache], cwd=ROOT, stdout=subprocess.PIPE, text=True)
             for _ in range(2)]  # fmt: skip
    outputs = [p.communicate(timeout=60)[0].split() for p in procs]
    assert [p.returncode for p in procs] == [0, 0]
    assert outputs == [[str(3 * 16 * sum(range(100))), "100"]] * 2
    data = load(root, cache)
    assert data.decoded == 0 and all(colour_of(data, f"img{i:02d}.png") == (i, i, i) for i in range(100))


def test_a_process_pool_decodes_the_same_pixels(tmp_path):
    root = tmp_path / "data"
    for i in range(70):  # two chunks of 64: two workers
        write_png(root / f"img{i:02d}.png", (i, 2 * i, 3 * i))
    (root / "bad.png").write_bytes(b"")
    pooled = load_folder(root, PREP, cache_dir=tmp_path / "pool", workers=2, progress=False)
    serial = load(root, tmp_path / "serial")
    assert pooled.paths == serial.paths and np.array_equal(pooled.pixels, serial.pixels)
    assert pooled.skipped == [("bad.png", "empty file")] and pooled.decoded == 71
    assert all(colour_of(pooled, f"img{i:02d}.png") == (i, 2 * i, 3 * i) for i in range(70))


def test_the_default_cache_dir(monkeypatch, tmp_path):
    monkeypatch.delenv("VAE_CACHE_DIR", raising=False)
    monkeypatch.delenv("XDG_CACHE_HOME", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert default_cache_dir() == tmp_path / "home/.cache/vae-serve/folders"
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert default_cache_dir() == tmp_path / "xdg/vae-serve/folders"
    monkeypatch.setenv("VAE_CACHE_DIR", str(tmp_path / "vae"))
    assert default_cache_dir() == tmp_path / "vae"
    write_png(tmp_path / "data/x.png", (1, 1, 1))
    data = load_folder(tmp_path / "data", PREP, workers=1, progress=False)
    assert data.cache_dir.parent == (tmp_path / "vae").resolve()


def test_folder_imports_no_torch():
    code = "import sys, training.folder; print(sorted(m for m in sys.modules if m.split('.')[0] in ('torch', 'grpc')))"
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True)
    assert done.stdout.strip() == "[]"
