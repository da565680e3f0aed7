"""Datasets as in-memory float tensors in [0, 1], shaped [N, C, H, W].

Every dataset here is small enough to hold in memory, so batching is a permutation of indices
rather than a DataLoader with worker processes: faster on a 2-core machine, and trivially seeded.
"""

from __future__ import annotations

import gzip
import logging
import urllib.request
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

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
DATASETS = ("digits", "mnist", "fashion-mnist")
IDX_DTYPES = {0x08: np.uint8, 0x09: np.int8, 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}


@dataclass
class Split:
    """Images in [0, 1] and their labels."""

    images: torch.Tensor
    labels: torch.Tensor

    def __len__(self) -> int:
        return len(self.images)


@dataclass
class Dataset:
    name: str
    train: Split
    val: Split
    test: Split

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


def load_idx_dataset(name: str, data_dir: Path, download: bool = True) -> dict[str, np.ndarray]:
    """The four standard IDX arrays of MNIST or Fashion-MNIST, downloading missing ones if allowed."""
    arrays = {}
    for key, stem in IDX_FILES.items():
        path = _find_idx(data_dir, stem)
        if path is None and download:
            try:
                path = _download(name, data_dir, stem)
            except OSError as err:
                log.warning("download of %s failed: %s", stem, err)
        if path is None:
            wanted = ", ".join(f"{s}.gz" for s in IDX_FILES.values())
            raise FileNotFoundError(
                f"{name}: {stem}(.gz) not found in {data_dir.resolve()} and it could not be downloaded. "
                f"Put the four IDX files there ({wanted}) or pass --data-dir."
            )
        arrays[key] = read_idx(path)
    return arrays


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
    """Train/validation/test splits; the validation split is drawn from the training data with `seed`."""
    if name == "digits":
        images, labels = _digits()
        # digits ships no test split: hold out a fixed 300 images, the same for every run.
        order = np.random.default_rng(0).permutation(len(images))
        test_idx, train_idx = order[:300], order[300:]
        train_x, train_y, test_x, test_y = images[train_idx], labels[train_idx], images[test_idx], labels[test_idx]
    elif name in MIRRORS:
        arrays = load_idx_dataset(name, Path(data_dir or f"data/{name}"), download=download)
        train_x = arrays["train_images"].astype(np.float32) / 255.0
        test_x = arrays["test_images"].astype(np.float32) / 255.0
        train_y, test_y = arrays["train_labels"], arrays["test_labels"]
    else:
        raise ValueError(f"unknown dataset {name!r}; choose one of {', '.join(DATASETS)}")

    n_val = int(round(len(train_x) * val_fraction))
    order = torch.randperm(len(train_x), generator=torch.Generator().manual_seed(seed)).numpy()
    val_idx, fit_idx = order[:n_val], order[n_val:]
    return Dataset(
        name=name,
        train=_to_split(train_x[fit_idx], train_y[fit_idx]),
        val=_to_split(train_x[val_idx], train_y[val_idx]),
        test=_to_split(test_x, test_y),
    )


def binarize(x: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """Draw binary pixels with probability equal to the grey level (dynamic binarization)."""
    return torch.bernoulli(x, generator=generator)


def fixed_binarization(x: torch.Tensor, seed: int = 0) -> torch.Tensor:
    """Binarize once with a fixed seed, so every evaluation scores the same binary test images."""
    return binarize(x, torch.Generator().manual_seed(seed))
