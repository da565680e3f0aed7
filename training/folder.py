"""A folder of image files as a dataset: uint8 [M, C, H, W] pixels mapped from an on-disk cache.

numpy, Pillow and tqdm only (no torch), so the decoding worker processes start cheaply; the
caller wraps the arrays in tensors. Every file is decoded by service.imaging, the function the
server uses on the image files clients send, so training and serving see the same pixels.

The cache lives in one folder per (data folder, preprocessing, FORMAT) under the cache dir:
`index.json` names every file with its size, mtime_ns and either its row or why it was skipped,
and names the pixel file `pixels-<generation>.npy` that holds those rows. A new generation is
written under a temporary name and renamed into place before index.json is replaced (itself
written aside and renamed), so a reader sees either the old pair or the new one, never a mix; a
reader that loses the race to a deleted generation finds no cache and decodes again.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import json
import logging
import multiprocessing
import multiprocessing.context
from multiprocessing import forkserver
import os
import secrets
import time
from collections import Counter
from collections.abc import Iterator
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from tqdm import tqdm

from service.commands import UserError
from service.imaging import ImageError, Preprocessing, load_image

log = logging.getLogger(__name__)

FORMAT = 1  # bump when the cache's layout or decoding changes: caches of other formats are ignored
CHUNK = 64  # files per worker task: few enough round trips that IPC costs little
COPY_BYTES = 64 << 20  # rows copied at a time when a new generation is assembled
STALE_S = 3600  # leftovers of crashed or racing writers older than this are removed
SHOWN = 5  # bad files named in the warning; the rest are counted
KIND_WORDS = {"empty file": "empty", "not an image": "not images"}  # other kinds read well as they are


class FolderError(UserError, ValueError):
    """A folder that cannot be a data set: no image in it, or too few for every split."""


class BadFile(UserError, ImageError):
    """--strict: the first file that is no readable image, named; one line, as any mistake of the user's."""


@dataclass(frozen=True)
class _File:
    path: str  # relative to the root, posix
    size: int  # -1 where the file could not be stat'ed (a broken link): decoding then says why
    mtime_ns: int


@dataclass
class FolderData:
    """A decoded folder; rows sorted by split key, so every split is a contiguous slice."""

    root: Path
    prep: Preprocessing
    pixels: np.ndarray  # uint8 [M, C, H, W], copy-on-write map of the cache: writable, never written back
    keys: np.ndarray  # float64 [M], each row's split key in [0, 1), ascending
    labels: np.ndarray  # int64 [M], class index, or -1 when the folder has no classes
    paths: list[str]  # each row's path relative to root (posix)
    classes: list[str]  # sorted class names ([] when no classes)
    skipped: list[tuple[str, str]]  # (relative path, reason) of every bad file
    cache_dir: Path
    decoded: int  # files decoded this run (0 on a fully cached start)
    reused: int  # rows taken from the cache

    def split(self, test_fraction: float, val_fraction: float) -> dict[str, slice]:
        """test: u < test_fraction; val: test_fraction <= u < test + val; train: the rest."""
        if not (0 <= test_fraction <= 1 and 0 <= val_fraction <= 1 and test_fraction + val_fraction <= 1):
            raise ValueError(
                f"split fractions must lie in [0, 1] and sum to at most 1, got {test_fraction} and {val_fraction}"
            )
        t, v = np.searchsorted(self.keys, [test_fraction, test_fraction + val_fraction], side="left")
        return {"test": slice(0, int(t)), "val": slice(int(t), int(v)), "train": slice(int(v), len(self.keys))}

    def class_counts(self) -> dict[str, int]:
        counts = np.bincount(self.labels[self.labels >= 0], minlength=len(self.classes))
        return {name: int(n) for name, n in zip(self.classes, counts)}


def split_key(path: str) -> float:
    """u in [0, 1) from the relative path alone: the first 8 bytes of its sha256 as a big-endian
    integer over 2**64, kept to float64's 53 bits (rounded down, so u never reaches 1)."""
    digest = hashlib.sha256(path.encode("utf-8", "surrogateescape")).digest()
    return (int.from_bytes(digest[:8], "big") >> 11) / 2.0**53


def default_cache_dir() -> Path:
    """$VAE_CACHE_DIR, else $XDG_CACHE_HOME/vae-serve/folders, else ~/.cache/vae-serve/folders."""
    if os.environ.get("VAE_CACHE_DIR"):
        return Path(os.environ["VAE_CACHE_DIR"]).expanduser()
    base = Path(os.environ["XDG_CACHE_HOME"]) if os.environ.get("XDG_CACHE_HOME") else Path.home() / ".cache"
    return base / "vae-serve" / "folders"


def load_folder(
    root: str | os.PathLike, prep: Preprocessing, cache_dir: str | os.PathLike | None = None, strict: bool = False,
    workers: int | None = None, progress: bool = True,
) -> FolderData:  # fmt: skip
    """Every image under `root` as the model's pixels, decoding only what the cache lacks.

    Bad files are skipped and logged (strict: the first raises ImageError naming it). Raises
    FileNotFoundError for a missing folder, FolderError for one without a readable image, and
    PreprocessingBug, naming the file, where the project's own code fails on one."""
    root = _check_root(root)
    folder = _cache_folder(root, prep, cache_dir)
    files = _scan(root)
    if not files:
        raise FolderError(f"{root}: no files, so no image to read")
    cache = _read_cache(folder, prep)
    reused = {f.path: cache.entries[f.path] for f in files if cache and _unchanged(cache.entries.get(f.path), f)}
    if strict:
        _raise_first_bad(root, [(p, e["skip"]) for p, e in sorted(reused.items()) if "skip" in e])
    todo = [f for f in files if f.path not in reused]
    scratch_path = folder / f"tmp-scratch-{secrets.token_hex(8)}.npy"
    try:
        scratch, reasons = _decode(root, [f.path for f in todo], prep, scratch_path, strict, workers, progress)
        entries = _entries(files, reused, todo, reasons)
        _check_readable(root, entries)
        if cache and not todo and len(cache.entries) == len(files):
            pixels = cache.pixels
        else:
            pixels = _write(folder, root, prep, entries, cache, scratch)
    finally:
        scratch_path.unlink(missing_ok=True)
    reused_rows = sum(1 for e in reused.values() if "row" in e)
    return _folder_data(root, prep, folder, len(files), entries, pixels, decoded=len(todo), reused=reused_rows)


def _check_root(root: str | os.PathLike) -> Path:
    path = Path(root).expanduser()
    if not path.exists():
        raise FileNotFoundError(f"no such folder: {path}")
    if not path.is_dir():
        raise NotADirectoryError(f"not a folder: {path}")
    return path.resolve()


def _cache_folder(root: Path, prep: Preprocessing, cache_dir: str | os.PathLike | None) -> Path:
    """One folder per (resolved root, preprocessing, FORMAT), never inside the data (which may be read-only)."""
    ident = json.dumps({"format": FORMAT, "root": str(root), "prep": prep.to_json()}, sort_keys=True)
    base = Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir()
    folder = base.resolve() / hashlib.sha256(ident.encode("utf-8", "surrogateescape")).hexdigest()[:32]
    if folder.is_relative_to(root):
        raise FolderError(f"the cache ({folder}) must not lie inside the data folder {root}: pass another --cache-dir")
    return folder


def _scan(root: Path) -> list[_File]:
    """Every non-hidden file below root, sorted by relative path; symlinked folders are not followed."""
    files = []
    for dirpath, dirnames, filenames in os.walk(root, onerror=_unlistable):
        dirnames[:] = [d for d in dirnames if not d.startswith(".")]
        prefix = Path(os.path.relpath(dirpath, root)).as_posix()
        for name in filenames:
            if not name.startswith("."):
                files.append(_stat(os.path.join(dirpath, name), name if prefix == "." else f"{prefix}/{name}"))
    return sorted(files, key=lambda f: f.path)


def _unlistable(error: OSError) -> None:
    log.warning("cannot list %s: %s", error.filename, error.strerror)


def _stat(full: str, rel: str) -> _File:
    try:
        st = os.stat(full)
    except OSError:
        return _File(rel, -1, -1)
    return _File(rel, st.st_size, st.st_mtime_ns)


@dataclass
class _Cache:
    entries: dict[str, dict[str, Any]]  # path -> {"size", "mtime_ns", and "row" or "skip"}
    pixels: np.ndarray
    generation: str  # the pixel file's name


def _read_cache(folder: Path, prep: Preprocessing) -> _Cache | None:
    """The cache as last written, or None where there is none usable (missing, another format,
    or a generation a concurrent writer has just replaced)."""
    try:
        index = json.loads((folder / "index.json").read_text())
        if index.get("format") != FORMAT:
            return None
        pixels = np.load(folder / index["pixels"], mmap_mode="c")
    except FileNotFoundError:
        return None
    except (OSError, ValueError, KeyError, TypeError) as e:
        log.warning("ignoring the unreadable cache in %s: %s", folder, e)
        return None
    if pixels.dtype != np.uint8 or pixels.shape != (index["rows"], prep.channels, *prep.size):
        log.warning("ignoring the cache in %s: its pixels do not match its index", folder)
        return None
    return _Cache({e["path"]: e for e in index["files"]}, pixels, index["pixels"])


def _unchanged(entry: dict[str, Any] | None, f: _File) -> bool:
    return entry is not None and entry["size"] == f.size and entry["mtime_ns"] == f.mtime_ns


def _raise_first_bad(root: Path, bad: list[tuple[str, str]]) -> None:
    if bad:
        path, reason = bad[0]
        raise BadFile(f"{root / path}: {reason}")


def _decode(
    root: Path, paths: list[str], prep: Preprocessing, scratch_path: Path, strict: bool, workers: int | None,
    progress: bool,
) -> tuple[np.ndarray | None, dict[str, str]]:  # fmt: skip
    """Decode `paths` into rows of a scratch file (row i for paths[i]); return it and each bad file's reason."""
    if not paths:
        return None, {}
    scratch_path.parent.mkdir(parents=True, exist_ok=True)
    shape = (len(paths), prep.channels, *prep.size)
    scratch = np.lib.format.open_memmap(scratch_path, mode="w+", dtype=np.uint8, shape=shape)
    reasons: dict[str, str] = {}
    chunks = [paths[i : i + CHUNK] for i in range(0, len(paths), CHUNK)]
    bar = tqdm(total=len(paths), desc=f"decoding {root.name}", unit="file", disable=None if progress else True)
    with bar, contextlib.closing(_chunk_results(root, chunks, prep, workers)) as results:
        for chunk, decoded in results:
            for i, item in enumerate(decoded, chunk * CHUNK):
                if isinstance(item, str):
                    reasons[paths[i]] = item
                    if strict:
                        _raise_first_bad(root, [(paths[i], item)])
                else:
                    scratch[i] = item
            bar.update(len(decoded))
    return scratch, reasons


def _chunk_results(
    root: Path, chunks: list[list[str]], prep: Preprocessing, workers: int | None
) -> Iterator[tuple[int, list[np.ndarray | str]]]:
    """(chunk index, its results), in no set order: in this process for one worker (or one chunk),
    else in a process pool on every core. Until the first worker takes a chunk (a third of a second
    when the process server must start first, see `start_workers`), this process decodes chunks
    from the back of the queue. Closing the generator early (strict mode) cancels what is queued."""
    task = functools.partial(_decode_chunk, str(root), prep=prep)
    n = min(workers or _cpu_count(), len(chunks))
    if n <= 1:
        yield from enumerate(map(task, chunks))
        return
    pool = ProcessPoolExecutor(max_workers=n, mp_context=start_workers())
    try:
        futures = [pool.submit(task, chunk) for chunk in chunks]
        stolen = len(chunks)
        # Until the first worker takes a chunk (not the whole run: the workers alone fill the cores).
        while stolen > 0 and not (futures[0].running() or futures[0].done()) and futures[stolen - 1].cancel():
            stolen -= 1
            yield stolen, task(chunks[stolen])
        for i in range(stolen):
            yield i, futures[i].result()
    finally:
        pool.shutdown(wait=True, cancel_futures=True)


def start_workers() -> multiprocessing.context.BaseContext:
    """The context decoding pools start their processes from, its process server started now.

    forkserver, not fork: the caller may hold torch's threads, and forking a threaded process can
    deadlock. Its server imports this module (numpy, Pillow) once and every worker forks from it
    ready to decode, so only the server's own start costs time (a third of a second): call this
    early (training does, before importing torch) and a later pool starts in milliseconds."""
    if "forkserver" not in multiprocessing.get_all_start_methods():
        return multiprocessing.get_context("spawn")
    context = multiprocessing.get_context("forkserver")
    context.set_forkserver_preload([__name__])
    forkserver.ensure_running()
    return context


def _cpu_count() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def _decode_chunk(root: str, paths: list[str], prep: Preprocessing) -> list[np.ndarray | str]:
    """A worker's task (top level, so spawned processes can import it): pixels or why not, per file."""
    return [_decode_file(os.path.join(root, p), prep) for p in paths]


class PreprocessingBug(RuntimeError):
    """The project's own preprocessing failed on a file that Pillow read: a bug to report, not a bad
    file, so it ends the run naming the file (its traceback is chained) rather than being skipped."""


def _decode_file(path: str, prep: Preprocessing) -> np.ndarray | str:
    try:
        return load_image(path, prep)
    except ImageError as e:
        return str(e)
    except OSError as e:  # vanished, unreadable, a broken link
        return f"unreadable: {e.strerror or e}"
    except MemoryError:
        raise
    except Exception as e:
        raise PreprocessingBug(
            f"{path}: preprocessing failed with {type(e).__name__}: {e}. This is a bug in the project, not in the "
            "file: please report it with this file and this traceback"
        ) from e


def _entries(
    files: list[_File], reused: dict[str, dict[str, Any]], todo: list[_File], reasons: dict[str, str]
) -> list[dict[str, Any]]:
    """The new index's entry per file: cached ones carry "row" (old row), decoded ones "new"
    (scratch row) until written, bad ones "skip"."""
    scratch_row = {f.path: i for i, f in enumerate(todo)}
    entries = []
    for f in files:
        entry = {"path": f.path, "size": f.size, "mtime_ns": f.mtime_ns}
        if f.path in reused:
            entry |= {k: v for k, v in reused[f.path].items() if k in ("row", "skip")}
        elif f.path in reasons:
            entry["skip"] = reasons[f.path]
        else:
            entry["new"] = scratch_row[f.path]
        entries.append(entry)
    return entries


def _check_readable(root: Path, entries: list[dict[str, Any]]) -> None:
    """Fail at once on a folder without one readable image, saying what it holds instead."""
    if all("skip" in e for e in entries):
        kinds = Counter(e["skip"].split(":")[0] for e in entries)
        found = ", ".join(f"{n} {KIND_WORDS.get(kind, kind)}" for kind, n in kinds.most_common())
        raise FolderError(f"{root}: {len(entries)} files, none a readable image: {found}")


def _order(entries: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Readable entries sorted by split key (then path), the order of the rows."""
    return sorted((e for e in entries if "skip" not in e), key=lambda e: (split_key(e["path"]), e["path"]))


def _write(
    folder: Path, root: Path, prep: Preprocessing, entries: list[dict[str, Any]], cache: _Cache | None,
    scratch: np.ndarray | None,
) -> np.ndarray:  # fmt: skip
    """A new generation: rows from the old pixels and the scratch file in split-key order, then
    the index naming it; the entries get their final rows. Returns the new pixels, mapped."""
    folder.mkdir(parents=True, exist_ok=True)
    rows = _order(entries)
    generation = f"pixels-{secrets.token_hex(8)}.npy"
    tmp = folder / f"tmp-{generation}"
    out = np.lib.format.open_memmap(tmp, mode="w+", dtype=np.uint8, shape=(len(rows), prep.channels, *prep.size))
    old = np.array([e.get("row", -1) for e in rows], dtype=np.int64)
    new = np.array([e.get("new", -1) for e in rows], dtype=np.int64)
    step = max(1, COPY_BYTES // max(1, out[0].nbytes))
    for s in range(0, len(rows), step):
        block, from_old = out[s : s + step], old[s : s + step] >= 0
        if from_old.any():
            block[from_old] = cache.pixels[old[s : s + step][from_old]]
        if (~from_old).any():
            block[~from_old] = scratch[new[s : s + step][~from_old]]
    out.flush()
    del out
    _fsync(tmp)
    os.replace(tmp, folder / generation)
    for i, e in enumerate(rows):
        e.pop("new", None)
        e["row"] = i
    index = {"format": FORMAT, "root": str(root), "preprocessing": prep.to_json(), "pixels": generation,
             "rows": len(rows), "files": entries}  # fmt: skip
    _write_atomic(folder / "index.json", json.dumps(index, separators=(",", ":")).encode())
    _tidy(folder, keep={"index.json", generation}, previous=cache.generation if cache else None)
    return np.load(folder / generation, mmap_mode="c")


def _fsync(path: Path) -> None:
    with open(path, "rb+") as f:
        os.fsync(f.fileno())


def _write_atomic(path: Path, data: bytes) -> None:
    tmp = path.with_name(f"tmp-{secrets.token_hex(8)}-{path.name}")
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _tidy(folder: Path, keep: set[str], previous: str | None) -> None:
    """Remove the generation this run replaced, and leftovers (temp files of crashed writers,
    generations orphaned by racing ones) old enough that no live writer or reader can want them."""
    cutoff = time.time() - STALE_S
    for entry in os.scandir(folder):
        if entry.name in keep:
            continue
        with contextlib.suppress(OSError):  # gone already, or held open where that forbids deletion
            if entry.name == previous or entry.stat().st_mtime < cutoff:
                os.unlink(entry.path)


def _folder_data(
    root: Path, prep: Preprocessing, folder: Path, n_files: int, entries: list[dict[str, Any]], pixels: np.ndarray,
    decoded: int, reused: int,
) -> FolderData:  # fmt: skip
    rows = sorted((e for e in entries if "skip" not in e), key=lambda e: e["row"])
    paths = [e["path"] for e in rows]
    skipped = [(e["path"], e["skip"]) for e in entries if "skip" in e]
    if skipped:
        log.warning("%s: skipped %d of %d files, not readable images: %s", root, len(skipped), n_files, _names(skipped))
    classes, labels = _labels(root, paths)
    return FolderData(
        root=root, prep=prep, pixels=pixels, keys=np.array([split_key(p) for p in paths], dtype=np.float64),
        labels=labels, paths=paths, classes=classes, skipped=skipped, cache_dir=folder, decoded=decoded,
        reused=reused,
    )  # fmt: skip


def _names(skipped: list[tuple[str, str]]) -> str:
    shown = ", ".join(f"{path} ({reason})" for path, reason in skipped[:SHOWN])
    return shown + (f" and {len(skipped) - SHOWN} more" if len(skipped) > SHOWN else "")


def _labels(root: Path, paths: list[str]) -> tuple[list[str], np.ndarray]:
    """ImageFolder's rule: first-level sub-folders holding a readable image are the classes, in
    sorted order; an image directly in the root, or a single sub-folder, means no classes at all."""
    tops = [p.split("/", 1)[0] if "/" in p else None for p in paths]
    at_root = [p for p, t in zip(paths, tops) if t is None]
    if at_root:
        if len(at_root) < len(paths):
            log.warning("%s: %d images sit directly in the folder (such as %s), so its sub-folders are not "
                        "classes: no labels", root, len(at_root), at_root[0])  # fmt: skip
        return [], np.full(len(paths), -1, dtype=np.int64)
    classes = sorted(set(tops))
    if len(classes) < 2:  # DIR/images/*.jpg: one folder is a layout, not a class to tell apart
        return [], np.full(len(paths), -1, dtype=np.int64)
    index = {name: i for i, name in enumerate(classes)}
    return classes, np.array([index[t] for t in tops], dtype=np.int64)
