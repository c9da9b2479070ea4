"""Old/new split scenarios (reference methods.md §4.3, test cases 31 and 32) and hold-outs."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from compatkit.data.splits import (
    SCENARIOS,
    class_holdout_split,
    make_split,
    write_manifest,
)

# Classes 0..4 with 1, 2, 3, 4 and 10 images, interleaved so index order matters.
SIZES = {0: 1, 1: 2, 2: 3, 3: 4, 4: 10}


@pytest.fixture(scope="module")
def labels() -> np.ndarray:
    y = np.concatenate([np.full(n, c) for c, n in SIZES.items()])
    return np.random.RandomState(0).permutation(y)


def test_case_31_split_by_class_gldv2_size() -> None:
    y = np.arange(81_313)
    open_split = make_split(y, "open_class")
    assert open_split.old_classes.size == 24_393
    assert open_split.old_indices.size == 24_393
    assert np.intersect1d(open_split.old_indices, open_split.new_indices).size == 0
    assert open_split.old_indices.size + open_split.new_indices.size == y.size
    ext = make_split(y, "extended_class")
    assert np.array_equal(ext.old_indices, open_split.old_indices)
    assert np.isin(ext.old_indices, ext.new_indices).all()
    assert ext.new_indices.size == y.size
    again = make_split(y, "open_class")
    assert again.manifest()["sha256"] == open_split.manifest()["sha256"]
    assert make_split(y, "open_class", seed=667).manifest()["sha256"] != again.checksum()


def test_split_by_class_follows_the_seeded_shuffle() -> None:
    y = np.repeat(np.array([3, 8, 11, 20, 42, 50, 61, 70, 85, 99]), 2)  # 10 classes, 2 images
    split = make_split(y, "open_class", old_ratio=0.3, seed=666)
    expected = np.sort(np.random.RandomState(666).permutation(np.unique(y))[:3])
    assert split.old_classes.tolist() == expected.tolist()
    assert np.array_equal(split.old_indices, np.flatnonzero(np.isin(y, expected)))
    assert np.intersect1d(split.old_classes, split.new_classes).size == 0


def test_case_32_split_by_data(labels: np.ndarray) -> None:
    split = make_split(labels, "open_data", old_ratio=0.3, seed=666)
    old_per_class = np.bincount(labels[split.old_indices], minlength=5)
    # n = 1 → 1 (in both), n = 2, 3 → exactly 1, n = 4 → int(1.2) = 1, n = 10 → 3.
    assert old_per_class.tolist() == [1, 1, 1, 1, 3]
    assert np.union1d(split.old_indices, split.new_indices).size == labels.size
    shared = np.intersect1d(split.old_indices, split.new_indices)
    assert shared.tolist() == np.flatnonzero(labels == 0).tolist()  # only the singleton
    for cls in (1, 2):  # n = 2, 3: the first image (lowest index) is the old one
        members = np.flatnonzero(labels == cls)
        assert np.intersect1d(split.old_indices, members).tolist() == [members[0]]
    members = np.flatnonzero(labels == 4)
    drawn = members[np.random.RandomState(666 + 4).choice(10, 3, replace=False)]
    assert np.intersect1d(split.old_indices, members).tolist() == sorted(drawn.tolist())


def test_extended_data_new_set_is_everything(labels: np.ndarray) -> None:
    ext = make_split(labels, "extended_data")
    opn = make_split(labels, "open_data")
    assert np.array_equal(ext.old_indices, opn.old_indices)
    assert np.array_equal(ext.new_indices, np.arange(labels.size))
    assert ext.new_classes.size == opn.new_classes.size == 5


@pytest.mark.parametrize("scenario", SCENARIOS)
def test_every_scenario_is_sorted_int64_and_reproducible(labels: np.ndarray, scenario) -> None:
    split = make_split(labels, scenario, old_ratio=0.4, seed=3)
    for arr in (split.old_indices, split.new_indices):
        assert arr.dtype == np.int64
        assert np.all(np.diff(arr) > 0)
    assert split.indices("old") is split.old_indices
    assert split.indices("new") is split.new_indices
    m = split.manifest()
    assert m == make_split(labels, scenario, old_ratio=0.4, seed=3).manifest()
    assert m["scenario"] == scenario and m["seed"] == 3 and m["old_ratio"] == 0.4
    assert m["num_images"] == labels.size and m["num_classes"] == 5
    assert m["old"]["images"] == split.old_indices.size
    assert m["new"]["classes"] == np.unique(labels[split.new_indices]).size
    assert len(m["sha256"]) == 64
    json.dumps(m)  # plain JSON types only


def test_manifest_counts_by_hand(labels: np.ndarray) -> None:
    m = make_split(labels, "open_data").manifest()
    assert m["old"] == {"images": 7, "classes": 5}
    assert m["new"] == {"images": 20 - 7 + 1, "classes": 5}


def test_bad_arguments_are_named(labels: np.ndarray) -> None:
    with pytest.raises(ValueError, match="extended_data, extended_class"):
        make_split(labels, "open_classes")
    with pytest.raises(ValueError, match="old_ratio"):
        make_split(labels, "open_class", old_ratio=1.0)
    with pytest.raises(ValueError, match="non-negative"):
        make_split(np.array([0, -1]), "open_class")
    with pytest.raises(ValueError, match="integer"):
        make_split(np.array([0.0, 1.0]), "open_class")
    with pytest.raises(ValueError, match="seed"):
        make_split(labels, "open_class", seed=-2)
    with pytest.raises(ValueError, match="'old' or 'new'"):
        make_split(labels, "open_class").indices("both")


def test_class_holdout_split() -> None:
    y = np.repeat(np.arange(20), 3)
    train, test = class_holdout_split(y, test_ratio=0.25, seed=1)
    assert np.unique(y[test]).size == 5
    assert np.intersect1d(np.unique(y[train]), np.unique(y[test])).size == 0
    assert np.array_equal(np.sort(np.concatenate([train, test])), np.arange(y.size))
    again = class_holdout_split(y, test_ratio=0.25, seed=1)
    assert np.array_equal(again.test_indices, test)
    assert not np.array_equal(class_holdout_split(y, test_ratio=0.25, seed=2).test_indices, test)
    none_held = class_holdout_split(y, test_ratio=0.0)
    assert none_held.test_indices.size == 0 and none_held.train_indices.size == y.size
    with pytest.raises(ValueError, match="holds out no class"):
        class_holdout_split(y, test_ratio=0.01)
    with pytest.raises(ValueError, match="test_ratio"):
        class_holdout_split(y, test_ratio=1.0)


def test_write_manifest_round_trip(tmp_path: Path, labels: np.ndarray) -> None:
    m = make_split(labels, "extended_class").manifest()
    path = write_manifest(tmp_path / "runs" / "split.json", m)
    assert json.loads(path.read_text()) == m
    assert [p.name for p in path.parent.iterdir()] == ["split.json"]
