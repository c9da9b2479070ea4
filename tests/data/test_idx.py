"""MNIST / Fashion-MNIST IDX reader on tiny files the tests write (raw and gzip)."""

from __future__ import annotations

import gzip
import struct
from pathlib import Path

import numpy as np
import pytest

from compatkit.data import load_dataset
from compatkit.data.idx import FASHION_MNIST_CLASSES, read_idx, write_idx
from compatkit.errors import DataRootError


def _idx_bytes(arr: np.ndarray) -> bytes:
    header = struct.pack(">BBBB", 0, 0, 0x08, arr.ndim) + struct.pack(f">{arr.ndim}I", *arr.shape)
    return header + arr.astype(np.uint8).tobytes()


def _write(folder: Path, name: str, arr: np.ndarray, gz: bool) -> None:
    data = _idx_bytes(arr)
    if gz:
        (folder / f"{name}.gz").write_bytes(gzip.compress(data))
    else:
        (folder / name).write_bytes(data)


def _write_set(folder: Path, *, gz: bool) -> tuple[np.ndarray, np.ndarray]:
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    train = rng.integers(0, 256, (5, 28, 28), dtype=np.uint8)
    test = rng.integers(0, 256, (3, 28, 28), dtype=np.uint8)
    _write(folder, "train-images-idx3-ubyte", train, gz)
    _write(folder, "train-labels-idx1-ubyte", np.array([0, 9, 3, 3, 1]), gz)
    _write(folder, "t10k-images-idx3-ubyte", test, gz)
    _write(folder, "t10k-labels-idx1-ubyte", np.array([7, 2, 0]), gz)
    return train, test


@pytest.mark.parametrize("gz", [False, True])
def test_mnist_idx(tmp_path: Path, gz: bool) -> None:
    train, test = _write_set(tmp_path, gz=gz)
    splits = load_dataset("mnist", tmp_path, image_size=None)
    assert splits.train.images.shape == (5, 1, 28, 28)
    assert np.array_equal(splits.train.images[:, 0], train)
    assert np.array_equal(splits.test.images[:, 0], test)
    assert splits.train.labels.tolist() == [0, 9, 3, 3, 1]
    assert splits.test.labels.tolist() == [7, 2, 0]
    assert splits.train.class_names == tuple("0123456789")


def test_fashion_mnist_in_torchvision_raw_folder(tmp_path: Path) -> None:
    _write_set(tmp_path / "FashionMNIST" / "raw", gz=True)
    splits = load_dataset("fashion_mnist", tmp_path, image_size=32)
    assert splits.train.class_names == FASHION_MNIST_CLASSES
    assert splits.train.class_names[9] == "Ankle boot"
    assert splits.train.images.shape == (5, 1, 32, 32)


def test_read_idx_header(tmp_path: Path) -> None:
    path = tmp_path / "x"
    path.write_bytes(_idx_bytes(np.arange(6).reshape(2, 3)))
    assert read_idx(path).tolist() == [[0, 1, 2], [3, 4, 5]]


@pytest.mark.parametrize(
    ("payload", "match"),
    [
        (b"\x01\x02\x08\x01", "not an IDX file"),
        (b"\x00\x00\x0d\x01\x00\x00\x00\x01abcd", "type 0x0d"),
        (_idx_bytes(np.arange(6).reshape(2, 3))[:-1], r"shape \(2, 3\)"),
        (b"\x00\x00\x08\x03\x00", "truncated"),
    ],
)
def test_malformed_idx(tmp_path: Path, payload: bytes, match: str) -> None:
    path = tmp_path / "bad"
    path.write_bytes(payload)
    with pytest.raises(DataRootError, match=match):
        read_idx(path)


def test_missing_and_mismatched_files(tmp_path: Path) -> None:
    with pytest.raises(DataRootError, match="train-images-idx3-ubyte"):
        load_dataset("mnist", tmp_path)
    _write_set(tmp_path, gz=False)
    _write(tmp_path, "t10k-labels-idx1-ubyte", np.array([1]), gz=False)
    with pytest.raises(DataRootError, match="labels"):
        load_dataset("mnist", tmp_path)
    (tmp_path / "corrupt").mkdir()
    _write_set(tmp_path / "corrupt", gz=True)
    (tmp_path / "corrupt" / "train-images-idx3-ubyte.gz").write_bytes(b"\x1f\x8bnot gzip")
    with pytest.raises(DataRootError, match="cannot read"):
        load_dataset("mnist", tmp_path / "corrupt")


@pytest.mark.parametrize("gz", [False, True])
def test_write_idx_matches_the_format_and_round_trips(tmp_path: Path, gz: bool) -> None:
    arr = np.random.default_rng(1).integers(0, 256, (4, 3, 5), dtype=np.uint8)
    path = write_idx(tmp_path / ("a.gz" if gz else "a"), arr)
    raw = gzip.decompress(path.read_bytes()) if gz else path.read_bytes()
    assert raw == _idx_bytes(arr)
    np.testing.assert_array_equal(read_idx(path), arr)


def test_write_idx_refuses_other_dtypes(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="uint8"):
        write_idx(tmp_path / "a", np.zeros((2, 2), dtype=np.float32))
