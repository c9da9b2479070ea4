"""CIFAR-10/100 readers on tiny files in the official pickle format and the JPEG folder layout."""

from __future__ import annotations

import io
import os
import pickle
import tarfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from compatkit.data import load_dataset
from compatkit.errors import DataRootError

CIFAR10_NAMES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse",
                 "ship", "truck"]


def _pickle(obj: object, path: Path, protocol: int = 2) -> None:
    path.write_bytes(pickle.dumps(obj, protocol=protocol))


def _batch(labels: list[int], seed: int, label_key: bytes = b"labels") -> dict:
    data = np.random.default_rng(seed).integers(0, 256, (len(labels), 3072), dtype=np.uint8)
    return {b"batch_label": b"batch", label_key: labels, b"data": data,
            b"filenames": [f"img{i}.png".encode() for i in range(len(labels))]}


def _write_cifar10_pickles(folder: Path, protocol: int = 2) -> dict[str, dict]:
    folder.mkdir(parents=True)
    batches = {f"data_batch_{i}": _batch([i, (i + 3) % 10], seed=i) for i in range(1, 6)}
    batches["test_batch"] = _batch([9, 0, 4], seed=9)
    for name, batch in batches.items():
        _pickle(batch, folder / name, protocol)
    _pickle({b"num_cases_per_batch": 2, b"label_names": [n.encode() for n in CIFAR10_NAMES],
             b"num_vis": 3072}, folder / "batches.meta", protocol)
    return batches


def _tar(source: Path, archive: Path) -> Path:
    with tarfile.open(archive, "w:gz") as tf:
        tf.add(source, arcname=source.name)
    return archive


@pytest.mark.parametrize("protocol", [2, pickle.HIGHEST_PROTOCOL])
def test_cifar10_pickles_folder(tmp_path: Path, protocol: int) -> None:
    batches = _write_cifar10_pickles(tmp_path / "cifar-10-batches-py", protocol)
    splits = load_dataset("cifar10", tmp_path, image_size=None)
    assert splits.train.class_names == tuple(CIFAR10_NAMES)
    assert splits.train.labels.tolist() == [1, 4, 2, 5, 3, 6, 4, 7, 5, 8]
    assert splits.test.labels.tolist() == [9, 0, 4]
    assert splits.train.images.shape == (10, 3, 32, 32)
    # Row layout: 1024 red, 1024 green, 1024 blue values, each a row-major 32x32 plane.
    row = batches["data_batch_1"][b"data"][1]
    assert np.array_equal(splits.train.images[1, 1], row[1024:2048].reshape(32, 32))


def test_cifar10_pickles_tar_gz_equals_folder(tmp_path: Path) -> None:
    _write_cifar10_pickles(tmp_path / "src" / "cifar-10-batches-py")
    folder = load_dataset("cifar10", tmp_path / "src", image_size=None)
    root = tmp_path / "root"
    root.mkdir()
    _tar(tmp_path / "src" / "cifar-10-batches-py", root / "cifar-10-python.tar.gz")
    archived = load_dataset("cifar10", root, image_size=None)
    assert np.array_equal(folder.train.images, archived.train.images)
    assert np.array_equal(folder.test.labels, archived.test.labels)


def _jpeg(color: tuple[int, int, int]) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (32, 32), color).save(buf, format="JPEG", quality=95)
    return buf.getvalue()


def _color(k: int) -> tuple[int, int, int]:
    return (20 * k, 250 - 20 * k, 100)


def _write_jpg_tree(base: Path, classes: list[str], per_split: dict[str, int]) -> None:
    for split, count in per_split.items():
        for k, cls in enumerate(classes):
            folder = base / split / cls
            folder.mkdir(parents=True)
            for n in range(count):
                (folder / f"{n:04d}.jpg").write_bytes(_jpeg(_color(k)))


def test_cifar10_jpg_tar_gz(tmp_path: Path) -> None:
    classes = ["truck", "cat", "airplane"]  # written unsorted: index must follow sorted names
    _write_jpg_tree(tmp_path / "src" / "cifar10-jpg", classes, {"train": 2, "test": 1})
    root = tmp_path / "root"
    root.mkdir()
    _tar(tmp_path / "src" / "cifar10-jpg", root / "cifar10-jpg.tar.gz")
    splits = load_dataset("cifar10", root)
    assert splits.train.class_names == ("airplane", "cat", "truck")
    assert splits.train.labels.tolist() == [0, 0, 1, 1, 2, 2]
    assert splits.test.labels.tolist() == [0, 1, 2]
    assert splits.train.images.shape == (6, 3, 32, 32)
    for img, label in zip(splits.train.images, splits.train.labels, strict=True):
        color = _color(classes.index(splits.train.class_names[label]))
        assert np.abs(img.mean(axis=(1, 2)) - color).max() < 3  # JPEG is lossy


def test_cifar10_jpg_folder_and_resize(tmp_path: Path) -> None:
    _write_jpg_tree(tmp_path / "cifar10-jpg", ["a", "b"], {"train": 1, "test": 1})
    splits = load_dataset("cifar10", tmp_path, image_size=16)
    assert splits.train.images.shape == (2, 3, 16, 16)
    assert splits.test.images.shape == (2, 3, 16, 16)


def test_cifar10_jpg_without_test_folder_is_rejected(tmp_path: Path) -> None:
    _write_jpg_tree(tmp_path / "cifar10-jpg", ["a", "b"], {"train": 1})
    (tmp_path / "cifar10-jpg" / "stray").mkdir()
    (tmp_path / "cifar10-jpg" / "stray" / "x.jpg").write_bytes(_jpeg((0, 0, 0)))
    with pytest.raises(DataRootError, match="train/ and test/"):
        load_dataset("cifar10", tmp_path)


def _write_cifar100(folder: Path) -> None:
    folder.mkdir(parents=True)
    for name, fine, coarse in (("train", [0, 5, 99, 5], [0, 1, 19, 1]), ("test", [99, 0], [19, 0])):
        batch = _batch(fine, seed=len(fine), label_key=b"fine_labels")
        batch[b"coarse_labels"] = coarse
        _pickle(batch, folder / name)
    _pickle({b"fine_label_names": [f"fine{i:02d}".encode() for i in range(100)],
             b"coarse_label_names": [f"coarse{i:02d}".encode() for i in range(20)]},
            folder / "meta")


def test_cifar100_fine_and_coarse(tmp_path: Path) -> None:
    _write_cifar100(tmp_path / "cifar-100-python")
    fine = load_dataset("cifar100", tmp_path, image_size=None)
    assert fine.train.num_classes == 100
    assert fine.train.labels.tolist() == [0, 5, 99, 5]
    assert fine.test.labels.tolist() == [99, 0]
    assert fine.train.class_names[99] == "fine99"
    coarse = load_dataset("cifar100", tmp_path, image_size=None, labels="coarse")
    assert coarse.train.num_classes == 20
    assert coarse.train.labels.tolist() == [0, 1, 19, 1]
    with pytest.raises(ValueError, match="'fine' or 'coarse'"):
        load_dataset("cifar100", tmp_path, labels="medium")


def test_cifar100_tar_gz(tmp_path: Path) -> None:
    _write_cifar100(tmp_path / "src" / "cifar-100-python")
    root = tmp_path / "root"
    root.mkdir()
    _tar(tmp_path / "src" / "cifar-100-python", root / "cifar-100-python.tar.gz")
    splits = load_dataset("cifar100", root, image_size=None)
    assert len(splits.train) == 4 and len(splits.test) == 2


def test_missing_and_malformed_files(tmp_path: Path) -> None:
    with pytest.raises(DataRootError, match="does not exist"):
        load_dataset("cifar10", tmp_path / "nope")
    with pytest.raises(DataRootError, match=r"none of the expected files.*cifar-10-batches-py"):
        load_dataset("cifar10", tmp_path)
    with pytest.raises(DataRootError, match="cifar-100-python"):
        load_dataset("cifar100", tmp_path)

    folder = tmp_path / "cifar-10-batches-py"
    _write_cifar10_pickles(folder)
    os.remove(folder / "data_batch_3")
    with pytest.raises(DataRootError, match="lacks data_batch_3"):
        load_dataset("cifar10", tmp_path)

    bad = _batch([0, 1], seed=0)
    bad[b"data"] = bad[b"data"][:, :100]
    _pickle(bad, folder / "data_batch_3")
    with pytest.raises(DataRootError, match=r"\(N, 3072\) uint8"):
        load_dataset("cifar10", tmp_path)

    _pickle({b"data": np.zeros((1, 3072), np.uint8), b"labels": [10]}, folder / "data_batch_3")
    with pytest.raises(DataRootError, match=r"\[0, 10\)"):
        load_dataset("cifar10", tmp_path)


class _Exploit:
    def __reduce__(self):
        return (os.system, ("echo pwned",))


def test_pickle_with_foreign_globals_is_refused(tmp_path: Path) -> None:
    folder = tmp_path / "cifar-100-python"
    _write_cifar100(folder)
    _pickle({b"data": _Exploit()}, folder / "train")
    with pytest.raises(DataRootError, match="not allowed"):
        load_dataset("cifar100", tmp_path)
