"""Omniglot: the official zips' layout, the Greek/Latin de-duplication, inversion, clear errors."""

from __future__ import annotations

import io
import zipfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from compatkit.data import load_dataset
from compatkit.errors import DataRootError

from .conftest import SHARED_DATA

OMNIGLOT = SHARED_DATA / "omniglot"


def _png(dot: tuple[int, int]) -> bytes:
    """A 6x6 1-bit drawing: white paper with one black pixel at ``dot`` (row, col)."""
    img = Image.new("1", (6, 6), 1)
    img.putpixel((dot[1], dot[0]), 0)
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


def _write_zip(path: Path, subset: str, drawings: dict[str, tuple[int, int]]) -> None:
    with zipfile.ZipFile(path, "w") as zf:
        for rel, dot in drawings.items():
            zf.writestr(f"{subset}/{rel}", _png(dot))


@pytest.fixture
def fake_root(tmp_path: Path) -> Path:
    _write_zip(tmp_path / "images_background_small1.zip", "images_background_small1", {
        "Zeta/character02/0001_01.png": (0, 0),
        "Zeta/character02/0001_02.png": (1, 1),
        "Greek/character01/0002_01.png": (2, 2),
        "Greek/character01/0002_02.png": (3, 3),
    })
    _write_zip(tmp_path / "images_background_small2.zip", "images_background_small2", {
        "Greek/character01/0002_01.png": (2, 2),  # same path as in small1: counted once
        "Greek/character01/0002_02.png": (3, 3),
        "Alpha/character01/0003_01.png": (4, 4),
        "Alpha/character01/0003_02.png": (5, 5),
    })
    return tmp_path


def test_union_dedupes_and_sorts_classes(fake_root: Path) -> None:
    splits = load_dataset("omniglot", fake_root, image_size=None)
    ds = splits.train
    assert splits.test is None
    assert ds.class_names == ("Alpha/character01", "Greek/character01", "Zeta/character02")
    assert ds.labels.tolist() == [0, 0, 1, 1, 2, 2]
    assert ds.images.shape == (6, 1, 6, 6)


def test_strokes_are_bright_on_dark(fake_root: Path) -> None:
    ds = load_dataset("omniglot", fake_root, image_size=None).train
    # Image 0 is Alpha/character01/0003_01 with its single stroke pixel at (4, 4).
    expected = np.zeros((6, 6), np.uint8)
    expected[4, 4] = 255
    assert np.array_equal(ds.images[0, 0], expected)


def test_extracted_folder_works_like_the_zip(fake_root: Path) -> None:
    with zipfile.ZipFile(fake_root / "images_background_small1.zip") as zf:
        zf.extractall(fake_root / "extracted")
    (fake_root / "images_background_small1.zip").unlink()
    (fake_root / "extracted" / "images_background_small1").rename(
        fake_root / "images_background_small1")
    ds = load_dataset("omniglot", fake_root, image_size=None).train
    assert len(ds) == 6 and ds.num_classes == 3


def test_missing_zip_is_named(fake_root: Path) -> None:
    (fake_root / "images_background_small2.zip").unlink()
    with pytest.raises(DataRootError, match=r"images_background_small2.*zips"):
        load_dataset("omniglot", fake_root)
    with pytest.raises(DataRootError, match="not a folder"):
        load_dataset("omniglot", fake_root / "nowhere")


def test_wrong_layout_and_corrupt_zip(tmp_path: Path) -> None:
    _write_zip(tmp_path / "images_background_small1.zip", "images_background_small1",
               {"Zeta/0001_01.png": (0, 0)})
    (tmp_path / "images_background_small2.zip").write_bytes(b"not a zip")
    with pytest.raises(DataRootError, match="characterNN"):
        load_dataset("omniglot", tmp_path)
    (tmp_path / "images_background_small1.zip").unlink()
    _write_zip(tmp_path / "images_background_small1.zip", "images_background_small1",
               {"Zeta/character01/0001_01.png": (0, 0)})
    with pytest.raises(DataRootError, match="not a readable archive"):
        load_dataset("omniglot", tmp_path)


@pytest.mark.skipif(not (OMNIGLOT / "images_background_small1.zip").is_file(),
                    reason=f"official Omniglot zips not found under {OMNIGLOT}")
def test_official_omniglot_union(tmp_path: Path) -> None:
    ds = load_dataset("omniglot", OMNIGLOT, cache_dir=tmp_path).train
    assert len(ds) == 4840
    assert ds.num_classes == 242
    assert np.array_equal(np.bincount(ds.labels, minlength=242), np.full(242, 20))
    assert ds.images.shape == (4840, 1, 32, 32)
    assert "Greek/character01" in ds.class_names and "Latin/character26" in ds.class_names
    assert ds.images.mean() < 60  # inverted: mostly dark background
