"""Fashion-MNIST loading (dit_jax.data): shapes, padding, labels, idx parsing, the missing-files error.

The data tests need the Debian package (`apt-get install -y dataset-fashion-mnist`) or
DIT_JAX_DATA pointing at the four idx files; without them they skip and say so.
"""

from __future__ import annotations

import gzip
import struct

import numpy as np
import pytest

from dit_jax import data
from dit_jax.data import CLASS_NAMES, load_fashion_mnist, read_idx


needs_files = pytest.mark.skipif(
    not (data.available("train") and data.available("test")),
    reason="Fashion-MNIST idx files not found: `apt-get install -y dataset-fashion-mnist` or set DIT_JAX_DATA",
)


@pytest.fixture(scope="module")
def test_split():
    return load_fashion_mnist("test")


@needs_files
def test_test_split_shapes_padding_and_balance(test_split):
    images, labels = test_split
    assert images.shape == (10_000, 32, 32, 1) and images.dtype == np.uint8
    assert labels.shape == (10_000,) and labels.dtype == np.int32
    border = np.ones((32, 32), bool)
    border[2:30, 2:30] = False
    assert images[:, border].max() == 0, "the 2 px border must be zero padding"
    assert images[:, 2:30, 2:30].max() == 255  # the original pixels are inside it
    assert set(np.unique(labels)) == set(range(10))
    np.testing.assert_array_equal(np.bincount(labels), [1000] * 10)


@needs_files
def test_train_split_shapes_and_balance():
    images, labels = load_fashion_mnist("train")
    assert images.shape == (60_000, 32, 32, 1) and images.dtype == np.uint8
    np.testing.assert_array_equal(np.bincount(labels, minlength=10), [6000] * 10)
    assert images[:, :2].max() == 0 and images[:, :, -2:].max() == 0


def test_env_var_root_is_used(monkeypatch, tmp_path):
    monkeypatch.setenv(data.DATA_ENV_VAR, str(tmp_path))
    with pytest.raises(FileNotFoundError, match=str(tmp_path)):
        load_fashion_mnist("test")


def test_class_names():
    assert len(CLASS_NAMES) == 10
    assert CLASS_NAMES[0] == "T-shirt/top" and CLASS_NAMES[7] == "sneaker" and CLASS_NAMES[9] == "ankle boot"


def test_missing_files_error_says_where_and_how(tmp_path):
    bogus = tmp_path / "nowhere"
    with pytest.raises(FileNotFoundError) as err:
        load_fashion_mnist("train", root=bogus)
    message = str(err.value)
    assert str(bogus) in message
    assert "train-images-idx3-ubyte" in message and "train-labels-idx1-ubyte" in message
    assert "apt-get install dataset-fashion-mnist" in message and "DIT_JAX_DATA" in message


def test_unknown_split():
    with pytest.raises(ValueError, match="unknown split"):
        load_fashion_mnist("validation")


def _write_idx(path, array: np.ndarray, gz: bool) -> None:
    header = bytes([0, 0, 0x08, array.ndim]) + struct.pack(f">{array.ndim}I", *array.shape)
    opener = gzip.open if gz else open
    with opener(path, "wb") as f:
        f.write(header + array.astype(np.uint8).tobytes())


@pytest.mark.parametrize("gz", [True, False])
def test_reads_plain_and_gzipped_idx(tmp_path, gz):
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (5, 28, 28), dtype=np.uint8)
    labels = np.array([0, 3, 9, 1, 1], np.uint8)
    suffix = ".gz" if gz else ""
    _write_idx(tmp_path / f"t10k-images-idx3-ubyte{suffix}", images, gz)
    _write_idx(tmp_path / f"t10k-labels-idx1-ubyte{suffix}", labels, gz)
    got_images, got_labels = load_fashion_mnist("test", root=tmp_path)
    np.testing.assert_array_equal(got_images[:, 2:30, 2:30, 0], images)
    np.testing.assert_array_equal(got_labels, labels)


def test_truncated_idx_is_rejected(tmp_path):
    path = tmp_path / "x-idx1-ubyte"
    _write_idx(path, np.arange(10, dtype=np.uint8), gz=False)
    path.write_bytes(path.read_bytes()[:-1])
    with pytest.raises(ValueError, match="header says shape"):
        read_idx(path)
