"""Synthetic glyphs: determinism, shapes, and real variation within and across classes."""

from __future__ import annotations

import numpy as np
import pytest

from compatkit.data import load_dataset
from compatkit.data.synthetic import make_synthetic


@pytest.fixture(scope="module")
def small():
    return make_synthetic(30, 12, seed=3)


def test_default_dataset_shape_and_labels() -> None:
    splits = load_dataset("synthetic", image_size=8)  # default counts, rendered small for speed
    ds = splits.train
    assert splits.test is None
    assert ds.images.shape == (300 * 40, 1, 8, 8) and ds.images.dtype == np.uint8
    assert ds.num_classes == 300
    assert np.array_equal(np.bincount(ds.labels), np.full(300, 40))
    assert ds.class_names[0] == "glyph000" and ds.class_names[-1] == "glyph299"


def test_deterministic_under_a_seed(small) -> None:
    again = make_synthetic(30, 12, seed=3)
    assert np.array_equal(small.images, again.images)
    assert np.array_equal(small.labels, again.labels)
    other = make_synthetic(30, 12, seed=4)
    assert not np.array_equal(small.images, other.images)


def test_options_and_image_size_through_load_dataset() -> None:
    ds = load_dataset("synthetic", image_size=20, num_classes=200, images_per_class=2,
                      seed=1).train
    assert ds.images.shape == (400, 1, 20, 20)
    assert ds.num_classes == 200
    native = load_dataset("synthetic", image_size=None, num_classes=5, images_per_class=2).train
    assert native.images.shape == (10, 1, 32, 32)


def test_bad_options_are_named() -> None:
    with pytest.raises(ValueError, match="num_classes"):
        load_dataset("synthetic", num_classes=1)
    with pytest.raises(ValueError, match="images_per_class"):
        load_dataset("synthetic", images_per_class=0)
    with pytest.raises(ValueError, match="seed"):
        load_dataset("synthetic", seed=-1)
    with pytest.raises(ValueError, match="no root"):
        load_dataset("synthetic", "/some/root")


def test_images_have_ink_on_a_dark_background(small) -> None:
    x = small.images.astype(np.float64)
    border = np.concatenate([x[:, 0, 0], x[:, 0, -1]], axis=1).mean()
    assert border < 60  # background plus noise stays dark
    assert (x.reshape(len(x), -1).max(1) > 150).all()  # every image has bright strokes


def test_images_of_a_class_differ(small) -> None:
    x = small.images.reshape(len(small), -1).astype(np.float64)
    for cls in range(5):
        members = x[small.labels == cls]
        assert len({m.tobytes() for m in members}) == len(members)
        # Real pose and shape variation, not only noise: pairs differ by more than noise alone.
        diff = np.abs(members[:, None] - members[None]).mean(-1)
        assert diff[np.triu_indices(len(members), 1)].min() > 8.0


def test_classes_are_separable_but_not_trivially(small) -> None:
    x = small.images.reshape(len(small), -1).astype(np.float64) / 255.0
    x -= x.mean(1, keepdims=True)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    sim = x @ x.T
    same = small.labels[:, None] == small.labels[None]
    off = ~np.eye(len(x), dtype=bool)
    assert sim[same & off].mean() > sim[~same].mean() + 0.15
    np.fill_diagonal(sim, -np.inf)
    nn_acc = (small.labels[sim.argmax(1)] == small.labels).mean()
    # Chance is 1/30: pixel-space 1-NN must be far above it, but pose variation keeps
    # raw pixels from solving the task.
    assert 0.3 < nn_acc < 0.95
