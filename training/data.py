"""Datasets as tensors shaped [N, C, H, W]: the bundled sets as float in [0, 1], a folder of images
(`training.folder`) as uint8 mapped from its on-disk cache and converted per batch (`Split.batch`).

Batching is a permutation of indices rather than a DataLoader with worker processes: faster on a
2-core machine, and trivially seeded. A folder's uint8 rows stay on disk until a batch reads them,
so a folder ten times larger costs disk, not ten times the memory.
"""

from __future__ import annotations

import gzip
import logging
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from service.commands import UserError
from service.imaging import Preprocessing, on_black, parse_color

log = logging.getLogger(__name__)

IDX_FILES = {
    "train_images": "train-images-idx3-ubyte",
    "train_labels": "train-labels-idx1-ubyte",
    "test_images": "t10k-images-idx3-ubyte",
    "test_labels": "t10k-labels-idx1-ubyte",
}
MIRRORS = {
    "mnist": "https://ossci-datasets.s3.amazonaws.com/mnist/",
    "fashion-mnist": "http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/",
}
DATASETS = ("digits", "mnist", "fashion-mnist", "folder")
BUNDLED_SHAPES = {"digits": (1, 8, 8), "mnist": (1, 28, 28), "fashion-mnist": (1, 28, 28)}
IDX_DTYPES = {0x08: np.uint8, 0x09: np.int8, 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}


def to_unit(x: torch.Tensor) -> torch.Tensor:
    """Pixels as float32 in [0, 1]: uint8 divided by 255, float as it is."""
    return x.float().div_(255.0) if x.dtype == torch.uint8 else x


@dataclass
class Split:
    """Images (float32 in [0, 1], or uint8 0..255 for a folder) and their labels (-1: no classes)."""

    images: torch.Tensor
    labels: torch.Tensor

    def __len__(self) -> int:
        return len(self.images)

    def batch(self, idx: torch.Tensor | slice) -> torch.Tensor:
        """The rows `idx` as float32 in [0, 1]: only these rows are read and converted."""
        return to_unit(self.images[idx])

    def unit(self) -> torch.Tensor:
        """Every image as float32 in [0, 1] (for the small validation and test splits)."""
        return to_unit(self.images)


@dataclass
class Dataset:
    name: str
    train: Split
    val: Split
    test: Split
    preprocessing: Preprocessing  # what an image file goes through to become one of these images
    classes: list[str] = field(default_factory=list)  # class names by label; [] when unlabelled
    info: dict[str, Any] = field(default_factory=dict)  # a folder's counts, skipped files and cache, for metrics.json

    @property
    def image_shape(self) -> tuple[int, int, int]:
        c, h, w = self.train.images.shape[1:]
        return int(c), int(h), int(w)


def read_idx(path: Path) -> np.ndarray:
    """Read one IDX file (gzipped or not): magic 0x0000TTDD, D big-endian int32 dims, then data."""
    raw = path.read_bytes()
    if raw[:2] == b"\x1f\x8b":
        raw = gzip.decompress(raw)
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0:
        raise ValueError(f"{path}: not an IDX file (bad magic {raw[:4].hex()})")
    type_code, ndim = raw[2], raw[3]
    if type_code not in IDX_DTYPES:
        raise ValueError(f"{path}: unknown IDX element type 0x{type_code:02x}")
    header = 4 + 4 * ndim
    dims = tuple(int(d) for d in np.frombuffer(raw[4:header], dtype=">i4"))
    dtype = np.dtype(IDX_DTYPES[type_code])
    expected = int(np.prod(dims)) * dtype.itemsize
    if len(raw) - header != expected:
        raise ValueError(f"{path}: header says {dims} ({expected} bytes), file holds {len(raw) - header}")
    return np.frombuffer(raw, dtype=dtype, offset=header).reshape(dims)


def _find_idx(data_dir: Path, stem: str) -> Path | None:
    for candidate in (data_dir / stem, data_dir / f"{stem}.gz"):
        if candidate.exists():
            return candidate
    return None


def _download(name: str, data_dir: Path, stem: str) -> Path:
    url = MIRRORS[name] + f"{stem}.gz"
    target = data_dir / f"{stem}.gz"
    data_dir.mkdir(parents=True, exist_ok=True)
    log.info("downloading %s", url)
    with urllib.request.urlopen(url, timeout=30) as response:  # noqa: S310 - fixed https mirror
        payload = response.read()
    tmp = target.with_suffix(".part")
    tmp.write_bytes(payload)
    tmp.rename(target)
    return target


def idx_folder(name: str, data_dir: str | Path | None) -> Path:
    """Where a bundled set's IDX files are looked for: --data-dir, else data/NAME."""
    return Path(data_dir or f"data/{name}")


class MissingData(UserError, FileNotFoundError):
    """A bundled set's files are not where the run looks, and could not be downloaded."""


def check_idx(name: str, data_dir: Path) -> None:
    """MissingData, saying where to put them, unless `data_dir` holds the set's four IDX files."""
    missing = [stem for stem in IDX_FILES.values() if _find_idx(data_dir, stem) is None]
    if missing:
        wanted = ", ".join(f"{s}.gz" for s in IDX_FILES.values())
        raise MissingData(
            f"{name}: {missing[0]}(.gz) not found in {data_dir.resolve()} and it could not be downloaded. "
            f"Put the four IDX files there ({wanted}) or pass --data-dir."
        )


def load_idx_dataset(name: str, data_dir: Path, download: bool = True) -> dict[str, np.ndarray]:
    """The four standard IDX arrays of MNIST or Fashion-MNIST, downloading missing ones if allowed."""
    for stem in IDX_FILES.values():
        if download and _find_idx(data_dir, stem) is None:
            try:
                _download(name, data_dir, stem)
            except OSError as err:
                log.warning("download of %s failed: %s", stem, err)
    check_idx(name, data_dir)
    return {key: read_idx(_find_idx(data_dir, stem)) for key, stem in IDX_FILES.items()}  # type: ignore[arg-type]


def _digits() -> tuple[np.ndarray, np.ndarray]:
    from sklearn.datasets import load_digits

    bunch = load_digits()
    return (bunch.images / 16.0).astype(np.float32), bunch.target.astype(np.int64)


def _to_split(images: np.ndarray, labels: np.ndarray) -> Split:
    x = torch.from_numpy(np.ascontiguousarray(images, dtype=np.float32))
    if x.dim() == 3:
        x = x.unsqueeze(1)
    return Split(x, torch.from_numpy(np.asarray(labels, dtype=np.int64)))


def load_dataset(
    name: str, data_dir: Path | None = None, val_fraction: float = 0.1, seed: int = 0, download: bool = True
) -> Dataset:
    """A bundled set's train/validation/test splits; the validation split is drawn from the training
    data with `seed`. Their pixels are white ink on black: image files sent to such a model are
    prepared by `service.imaging.on_black`."""
    if name == "digits":
        images, labels = _digits()
        # digits ships no test split: hold out a fixed 300 images, the same for every run.
        order = np.random.default_rng(0).permutation(len(images))
        test_idx, train_idx = order[:300], order[300:]
        train_x, train_y, test_x, test_y = images[train_idx], labels[train_idx], images[test_idx], labels[test_idx]
    elif name in MIRRORS:
        arrays = load_idx_dataset(name, idx_folder(name, data_dir), download=download)
        train_x = arrays["train_images"].astype(np.float32) / 255.0
        test_x = arrays["test_images"].astype(np.float32) / 255.0
        train_y, test_y = arrays["train_labels"], arrays["test_labels"]
    else:
        if name == "folder":
            raise ValueError("a folder of images is read by load_folder_dataset (or load_data), not load_dataset")
        raise ValueError(f"unknown dataset {name!r}; choose one of {', '.join(DATASETS)}")

    n_val = int(round(len(train_x) * val_fraction))
    order = torch.randperm(len(train_x), generator=torch.Generator().manual_seed(seed)).numpy()
    val_idx, fit_idx = order[:n_val], order[n_val:]
    h, w = train_x.shape[-2:]
    return Dataset(
        name=name,
        train=_to_split(train_x[fit_idx], train_y[fit_idx]),
        val=_to_split(train_x[val_idx], train_y[val_idx]),
        test=_to_split(test_x, test_y),
        preprocessing=on_black((1, int(h), int(w))),
        classes=[str(c) for c in range(10)],
    )


def load_folder_dataset(
    data_dir: Path, prep: Preprocessing, val_fraction: float = 0.1, test_fraction: float = 0.1,
    cache_dir: str | Path | None = None, strict: bool = False,
) -> Dataset:  # fmt: skip
    """A folder of image files (`training.folder`): splits from a hash of each file's relative path,
    uint8 pixels mapped from the decoded cache, one contiguous slice per split."""
    from training.folder import FolderError, load_folder

    folder = load_folder(data_dir, prep, cache_dir=cache_dir, strict=strict)
    slices = folder.split(test_fraction, val_fraction)
    splits = {
        name: Split(torch.from_numpy(folder.pixels[s]), torch.from_numpy(np.asarray(folder.labels[s], dtype=np.int64)))
        for name, s in slices.items()
    }  # fmt: skip
    # Validation picks the best checkpoint and the test split is what the run reports: none may be empty.
    flags = {"train": "smaller --val-fraction and --test-fraction", "val": "larger --val-fraction", "test": "larger --test-fraction"}
    for name, split in splits.items():
        if len(split) == 0:
            raise FolderError(
                f"{data_dir}: the {name} split is empty ({len(folder.paths)} images, --val-fraction {val_fraction:g}, "
                f"--test-fraction {test_fraction:g}); a folder this small needs a {flags[name]}"
            )
    info = {
        "folder": str(folder.root), "images": len(folder.paths), "classes": folder.classes,
        "class_counts": folder.class_counts(), "split_counts": {k: len(v) for k, v in splits.items()},
        "skipped": [{"path": path, "reason": reason} for path, reason in folder.skipped],
        "cache": str(folder.cache_dir), "decoded": folder.decoded, "reused": folder.reused,
    }  # fmt: skip
    return Dataset(
        name="folder", train=splits["train"], val=splits["val"], test=splits["test"], preprocessing=prep,
        classes=list(folder.classes), info=info,
    )  # fmt: skip


def shape_of(cfg: Any) -> tuple[int, int, int]:
    """The [C, H, W] of a run's images, from its flags alone (before any data is read)."""
    if cfg.dataset == "folder":
        return (cfg.channels, *cfg.image_size)
    return BUNDLED_SHAPES[cfg.dataset]


def preprocessing(cfg: Any) -> Preprocessing:
    """What an image file goes through to become one of a run's images, from its TrainConfig: a
    folder's pixel options, or a bundled set's (`on_black`). Export writes it into model.json, and
    the service applies it to files it receives."""
    if cfg.dataset == "folder":
        return Preprocessing(cfg.channels, tuple(cfg.image_size), cfg.fit, parse_color(cfg.background))
    return on_black(cfg.model.image_shape)


def load_data(cfg: Any) -> Dataset:
    """The dataset a TrainConfig names: a bundled set, or a folder prepared with its pixel options."""
    if cfg.dataset != "folder":
        return load_dataset(cfg.dataset, Path(cfg.data_dir) if cfg.data_dir else None, cfg.val_fraction, cfg.seed, cfg.download)
    return load_folder_dataset(
        Path(cfg.data_dir), preprocessing(cfg), cfg.val_fraction, cfg.test_fraction, cfg.cache_dir, cfg.strict
    )


def binarize(x: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """Draw binary pixels with probability equal to the grey level (dynamic binarization)."""
    return torch.bernoulli(x, generator=generator)


def fixed_binarization(x: torch.Tensor, seed: int = 0) -> torch.Tensor:
    """Binarize once with a fixed seed, so every evaluation scores the same binary test images."""
    return binarize(x, torch.Generator().manual_seed(seed))
