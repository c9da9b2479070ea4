"""From a data config to this run's training side and the held-out test set."""

from __future__ import annotations

import numpy as np

from compatkit.train.config import DataConfig
from compatkit.train.prepare import cap_per_class, evaluation_images, prepare_data

TINY = {"name": "synthetic", "options": {"num_classes": 200, "images_per_class": 5},
        "image_size": 8, "test_class_ratio": 0.25}


def test_cap_per_class_is_seeded_and_bounded():
    labels = np.array([0] * 5 + [1] * 2 + [2] * 4)
    kept = cap_per_class(labels, 3, seed=1)
    assert np.array_equal(np.bincount(labels[kept]), [3, 2, 3])
    assert np.array_equal(kept, cap_per_class(labels, 3, seed=1))
    assert np.all(np.diff(kept) > 0)


def test_old_and_new_sides_share_the_test_set_and_split_consistently():
    old = prepare_data(DataConfig(**TINY, side="old", scenario="open_class"))
    new = prepare_data(DataConfig(**TINY, side="new", scenario="open_class"))
    assert np.array_equal(old.test.labels, new.test.labels)
    test_classes = set(np.unique(old.test.labels))
    assert len(test_classes) == 50
    assert not test_classes & set(old.class_ids) and not test_classes & set(new.class_ids)
    assert not set(old.class_ids) & set(new.class_ids)  # open-class: disjoint
    assert len(old.class_ids) == int(0.3 * 150) and len(new.class_ids) == 150 - 45
    # classifier rows index class_ids
    assert np.array_equal(np.asarray(new.class_ids)[new.labels], new.train.labels)
    assert old.manifest["split"] == new.manifest["split"]
    assert old.mean == new.mean and old.std == new.std


def test_train_per_class_caps_the_pool_only():
    capped = prepare_data(DataConfig(**TINY, train_per_class=2))
    assert np.bincount(capped.train.labels).max() == 2
    assert len(capped.test) == 50 * 5
    assert len(evaluation_images(DataConfig(**TINY), "test")) == 50 * 5
    assert len(evaluation_images(DataConfig(**TINY), "all")) == 200 * 5
