"""Image-folder datasets: both layouts, folders and tar.gz, channel modes and clear errors."""

from __future__ import annotations

import tarfile
from pathlib import Path

import pytest
from PIL import Image

from compatkit.data import load_dataset
from compatkit.errors import DataRootError


def _save(path: Path, value: int, *, mode: str = "L", size: tuple[int, int] = (8, 8)) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    color = value if mode == "L" else (value, 255 - value, 7)
    Image.new(mode, size, color).save(path)  # PNG: lossless


def test_split_layout_folder(tmp_path: Path) -> None:
    _save(tmp_path / "train" / "dog" / "b.png", 10)
    _save(tmp_path / "train" / "dog" / "a.png", 20)
    _save(tmp_path / "train" / "cat" / "z.png", 30)
    _save(tmp_path / "test" / "cat" / "q.png", 40)
    splits = load_dataset("imagefolder", tmp_path, image_size=None)
    assert splits.train.class_names == ("cat", "dog")
    assert splits.train.labels.tolist() == [0, 1, 1]
    # Sorted by path: cat/z, dog/a, dog/b.
    assert splits.train.images[:, 0, 0, 0].tolist() == [30, 20, 10]
    assert splits.train.images.shape == (3, 1, 8, 8)
    assert splits.test.labels.tolist() == [0]
    assert splits.test.images[0, 0, 0, 0] == 40


def test_class_layout_in_tar_gz_with_wrapper_folder(tmp_path: Path) -> None:
    src = tmp_path / "mydata"
    _save(src / "b" / "1.png", 50, mode="RGB")
    _save(src / "a" / "1.png", 60, mode="RGB")
    (src / "a" / "notes.txt").write_text("not an image")
    (src / ".hidden").mkdir()
    _save(src / ".hidden" / "x.png", 1)
    archive = tmp_path / "mydata.tar.gz"
    with tarfile.open(archive, "w:gz") as tf:
        tf.add(src, arcname="mydata")
    splits = load_dataset("imagefolder", archive, image_size=4)
    assert splits.test is None
    assert splits.train.class_names == ("a", "b")
    assert splits.train.images.shape == (2, 3, 4, 4)
    assert splits.train.images[0, :, 0, 0].tolist() == [60, 195, 7]


def test_gray_images_join_rgb_ones_and_modes(tmp_path: Path) -> None:
    _save(tmp_path / "a" / "1.png", 100, mode="L")
    _save(tmp_path / "b" / "1.png", 100, mode="RGB")
    auto = load_dataset("imagefolder", tmp_path, image_size=None).train
    assert auto.images.shape == (2, 3, 8, 8)
    assert auto.images[0, :, 0, 0].tolist() == [100, 100, 100]
    gray = load_dataset("imagefolder", tmp_path, image_size=None, mode="L").train
    assert gray.images.shape == (2, 1, 8, 8)
    with pytest.raises(ValueError, match="mode"):
        load_dataset("imagefolder", tmp_path, mode="CMYK")


def test_sizes_must_agree_without_image_size(tmp_path: Path) -> None:
    _save(tmp_path / "a" / "1.png", 1, size=(8, 8))
    _save(tmp_path / "a" / "2.png", 1, size=(9, 7))
    with pytest.raises(DataRootError, match="image_size"):
        load_dataset("imagefolder", tmp_path, image_size=None)
    ds = load_dataset("imagefolder", tmp_path, image_size=6).train
    assert ds.images.shape == (2, 1, 6, 6)


def test_layout_errors(tmp_path: Path) -> None:
    with pytest.raises(DataRootError, match="not an existing folder"):
        load_dataset("imagefolder", tmp_path / "missing")
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(DataRootError, match="no image files"):
        load_dataset("imagefolder", empty)
    mixed = tmp_path / "mixed"
    _save(mixed / "a" / "1.png", 1)
    _save(mixed / "loose.png", 1)
    with pytest.raises(DataRootError, match="unexpected layout"):
        load_dataset("imagefolder", mixed)
    splits = tmp_path / "splits"
    _save(splits / "train" / "a" / "1.png", 1)
    _save(splits / "val" / "a" / "1.png", 1)
    with pytest.raises(DataRootError, match=r"'train', 'val'"):
        load_dataset("imagefolder", splits)
    broken = tmp_path / "broken"
    (broken / "a").mkdir(parents=True)
    (broken / "a" / "1.jpg").write_bytes(b"garbage")
    with pytest.raises(DataRootError, match="not a readable image"):
        load_dataset("imagefolder", broken)
