"""The IDX reader and the datasets, on small files the tests write themselves."""

import gzip

import numpy as np
import pytest
import torch

from training.data import IDX_FILES, binarize, fixed_binarization, load_dataset, read_idx
from tests.idx import write_idx, write_tiny_mnist


def test_read_idx_round_trips_gzipped_and_plain(tmp_path):
    images = np.arange(2 * 3 * 4, dtype=np.uint8).reshape(2, 3, 4)
    write_idx(tmp_path / "a-idx3-ubyte", images)
    write_idx(tmp_path / "b-idx3-ubyte.gz", images)
    assert np.array_equal(read_idx(tmp_path / "a-idx3-ubyte"), images)
    assert np.array_equal(read_idx(tmp_path / "b-idx3-ubyte.gz"), images)
    labels = np.array([5, 0, 4], dtype=np.uint8)
    write_idx(tmp_path / "l-idx1-ubyte", labels)
    assert read_idx(tmp_path / "l-idx1-ubyte").tolist() == [5, 0, 4]


def test_read_idx_rejects_bad_magic_and_truncation(tmp_path):
    (tmp_path / "bad").write_bytes(b"\x01\x02\x08\x01" + b"\x00" * 8)
    with pytest.raises(ValueError, match="bad magic"):
        read_idx(tmp_path / "bad")
    write_idx(tmp_path / "ok", np.zeros((4, 2, 2), dtype=np.uint8))
    (tmp_path / "short").write_bytes((tmp_path / "ok").read_bytes()[:-3])
    with pytest.raises(ValueError, match="header says"):
        read_idx(tmp_path / "short")


def test_mnist_from_idx_files(tmp_path):
    write_tiny_mnist(tmp_path, n_train=40, n_test=10)
    data = load_dataset("mnist", tmp_path, val_fraction=0.25, seed=0, download=False)
    assert data.image_shape == (1, 28, 28)
    assert (len(data.train), len(data.val), len(data.test)) == (30, 10, 10)
    assert 0.0 <= data.train.images.min() and data.train.images.max() <= 1.0
    assert data.train.images.dtype == torch.float32


def test_missing_files_offline_say_where_to_put_them(tmp_path):
    with pytest.raises(FileNotFoundError, match=str(tmp_path)) as err:
        load_dataset("fashion-mnist", tmp_path, download=False)
    assert "train-images-idx3-ubyte.gz" in str(err.value)


def test_split_is_seeded():
    a, b, c = (load_dataset("digits", seed=s) for s in (1, 1, 2))
    assert torch.equal(a.val.images, b.val.images)
    assert not torch.equal(a.val.images, c.val.images)
    assert torch.equal(a.test.images, c.test.images)  # the test split never moves
    assert a.image_shape == (1, 8, 8)


def test_binarization():
    x = torch.full((1000, 1, 4, 4), 0.3)
    b = binarize(x, torch.Generator().manual_seed(0))
    assert set(b.unique().tolist()) <= {0.0, 1.0}
    assert b.mean().item() == pytest.approx(0.3, abs=0.02)
    assert torch.equal(fixed_binarization(x), fixed_binarization(x))


def test_gzip_magic_detected_not_extension(tmp_path):
    images = np.ones((1, 2, 2), dtype=np.uint8)
    write_idx(tmp_path / "plain", images)
    (tmp_path / "zipped").write_bytes(gzip.compress((tmp_path / "plain").read_bytes()))
    assert np.array_equal(read_idx(tmp_path / "zipped"), images)
    assert set(IDX_FILES) == {"train_images", "train_labels", "test_images", "test_labels"}
