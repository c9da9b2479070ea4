"""The decoded-array cache: hits, misses when the source changes, corruption, atomic writes."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from compatkit.data import cache, imagefolder, load_dataset
from compatkit.data.base import DatasetSplits, ImageDataset


@pytest.fixture
def tree(tmp_path: Path) -> Path:
    root = tmp_path / "tree"
    for split, value in (("train", 10), ("test", 20)):
        for cls in ("a", "b"):
            path = root / split / cls / "0.png"
            path.parent.mkdir(parents=True)
            Image.new("L", (4, 4), value).save(path)
    return root


def _entries(cache_dir: Path) -> list[Path]:
    return sorted((cache_dir / "datasets").glob("*"))


def _count_builds(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    calls: list[int] = []
    original = imagefolder.read_image_folder

    def counting(*args, **kwargs):
        calls.append(1)
        return original(*args, **kwargs)

    monkeypatch.setattr(imagefolder, "read_image_folder", counting)
    return calls


def test_hit_after_first_load(tree: Path, tmp_path: Path, monkeypatch) -> None:
    builds = _count_builds(monkeypatch)
    first = load_dataset("imagefolder", tree, cache_dir=tmp_path / "c", image_size=None)
    second = load_dataset("imagefolder", tree, cache_dir=tmp_path / "c", image_size=None)
    assert len(builds) == 1
    assert np.array_equal(first.train.images, second.train.images)
    assert np.array_equal(first.test.labels, second.test.labels)
    assert second.train.class_names == ("a", "b")
    assert [p.suffix for p in _entries(tmp_path / "c")] == [".npz"]  # no temp file left


def test_miss_when_size_options_or_source_change(tree: Path, tmp_path: Path, monkeypatch) -> None:
    builds = _count_builds(monkeypatch)
    c = tmp_path / "c"
    load_dataset("imagefolder", tree, cache_dir=c, image_size=None)
    load_dataset("imagefolder", tree, cache_dir=c, image_size=2)
    load_dataset("imagefolder", tree, cache_dir=c, image_size=None, mode="RGB")
    assert len(builds) == 3
    target = tree / "train" / "a" / "0.png"
    Image.new("L", (4, 4), 99).save(target)
    os.utime(target, ns=(1, 1))  # a new mtime, whatever the clock resolution
    fresh = load_dataset("imagefolder", tree, cache_dir=c, image_size=None)
    assert len(builds) == 4
    assert fresh.train.images[0, 0, 0, 0] == 99


def test_uses_cache_dir_from_environment(tree: Path, _private_cache: Path) -> None:
    load_dataset("imagefolder", tree)
    assert len(_entries(_private_cache)) == 1
    assert cache.default_cache_dir() == _private_cache


def test_use_cache_false_writes_nothing(tree: Path, _private_cache: Path) -> None:
    load_dataset("imagefolder", tree, use_cache=False)
    assert not (_private_cache / "datasets").exists()


@pytest.mark.parametrize("damage", ["truncate", "garbage", "flip_byte"])
def test_corrupted_entry_is_rebuilt(tree: Path, tmp_path: Path, monkeypatch, damage: str) -> None:
    c = tmp_path / "c"
    good = load_dataset("imagefolder", tree, cache_dir=c, image_size=None)
    (entry,) = _entries(c)
    data = entry.read_bytes()
    if damage == "truncate":
        entry.write_bytes(data[: len(data) // 2])
    elif damage == "garbage":
        entry.write_bytes(b"\x00" * 64)
    else:  # flip one byte inside the first stored array's data: the zip CRC must catch it
        pos = data.index(b"\x93NUMPY") + 128 + 5  # past the 128-byte npy header
        entry.write_bytes(data[:pos] + bytes([data[pos] ^ 0xFF]) + data[pos + 1:])
    builds = _count_builds(monkeypatch)
    again = load_dataset("imagefolder", tree, cache_dir=c, image_size=None)
    assert len(builds) == 1
    assert np.array_equal(good.train.images, again.train.images)
    assert entry.read_bytes() == data  # rewritten whole


def test_entry_with_another_key_is_ignored(tmp_path: Path) -> None:
    ds = ImageDataset("x", np.zeros((1, 1, 2, 2), np.uint8), np.zeros(1, np.int64), ("a",))
    path = tmp_path / "e.npz"
    assert cache.write_cache(path, "key-1", DatasetSplits(train=ds))
    assert cache.read_cache(path, "key-2") is None
    loaded = cache.read_cache(path, "key-1")
    assert loaded is not None and loaded.test is None and loaded.train.name == "x"


def test_key_covers_file_identity(tmp_path: Path) -> None:
    f = tmp_path / "f.bin"
    f.write_bytes(b"abc")
    k1 = cache.cache_key("d", [f], image_size=32, options={})
    assert k1 == cache.cache_key("d", [f], image_size=32, options={})
    assert k1 != cache.cache_key("d", [f], image_size=16, options={})
    assert k1 != cache.cache_key("d", [f], image_size=32, options={"seed": 1})
    assert k1 != cache.cache_key("d", [f], image_size=32, options={}, version=2)
    f.write_bytes(b"abcd")
    assert k1 != cache.cache_key("d", [f], image_size=32, options={})


def test_explicit_default_option_hits_the_same_entry(tree: Path, tmp_path: Path,
                                                     monkeypatch) -> None:
    builds = _count_builds(monkeypatch)
    load_dataset("imagefolder", tree, cache_dir=tmp_path / "c")
    load_dataset("imagefolder", tree, cache_dir=tmp_path / "c", mode=None)
    assert len(builds) == 1
