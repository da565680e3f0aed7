"""Writers for small IDX files, so tests never need the real MNIST."""

import gzip
from pathlib import Path

import numpy as np

from training.data import IDX_FILES


def write_idx(path: Path, array: np.ndarray) -> None:
    assert array.dtype == np.uint8
    header = bytes([0, 0, 0x08, array.ndim]) + np.array(array.shape, dtype=">i4").tobytes()
    payload = header + array.tobytes()
    path.write_bytes(gzip.compress(payload) if path.suffix == ".gz" else payload)


def write_tiny_mnist(folder: Path, n_train: int, n_test: int, seed: int = 0) -> None:
    """Blurry random strokes in 28x28 uint8, with labels, under the standard four file names."""
    rng = np.random.default_rng(seed)
    for split, n in (("train", n_train), ("test", n_test)):
        images = (rng.random((n, 28, 28)) ** 4 * 255).astype(np.uint8)
        write_idx(folder / f"{IDX_FILES[split + '_images']}.gz", images)
        write_idx(folder / f"{IDX_FILES[split + '_labels']}.gz", rng.integers(0, 10, n).astype(np.uint8))
