"""ImageDataset / DatasetSplits validation, the registry front door, resizing and mean/std."""

from __future__ import annotations

import numpy as np
import pytest

from compatkit.data import (
    DATASETS,
    DatasetSplits,
    ImageDataset,
    dataset_mean_std,
    list_datasets,
    load_dataset,
    resize_images,
)
from compatkit.errors import DataRootError, UnknownNameError


def _ds(n: int = 4, c: int = 1, classes: int = 3) -> ImageDataset:
    images = np.arange(n * c * 2 * 2, dtype=np.uint8).reshape(n, c, 2, 2)
    return ImageDataset("toy", images, np.arange(n) % classes, tuple("abc"[:classes]))


def test_dataset_fields_and_label_dtype() -> None:
    ds = ImageDataset("toy", np.zeros((3, 1, 2, 2), np.uint8), np.array([0, 2, 1], np.int32),
                      ["x", "y", "z"])
    assert len(ds) == 3
    assert ds.num_classes == 3
    assert ds.image_shape == (1, 2, 2)
    assert ds.labels.dtype == np.int64
    assert ds.class_names == ("x", "y", "z")


@pytest.mark.parametrize(
    ("images", "labels", "names", "error", "match"),
    [
        (np.zeros((2, 1, 2, 2), np.float32), [0, 1], ("a", "b"), TypeError, "uint8"),
        (np.zeros((2, 2, 2), np.uint8), [0, 1], ("a", "b"), ValueError, "N, C, H, W"),
        (np.zeros((2, 1, 2, 2), np.uint8), [0], ("a", "b"), ValueError, r"shape \(2,\)"),
        (np.zeros((2, 1, 2, 2), np.uint8), [0, 2], ("a", "b"), ValueError, r"\[0, 2\)"),
        (np.zeros((2, 1, 2, 2), np.uint8), [-1, 0], ("a", "b"), ValueError, r"\[0, 2\)"),
        (np.zeros((2, 1, 2, 2), np.uint8), [0.0, 1.0], ("a", "b"), TypeError, "integers"),
        (np.zeros((2, 1, 2, 2), np.uint8), [0, 0], (), ValueError, "empty"),
        (np.zeros((2, 1, 2, 2), np.uint8), [0, 0], ("a", "a"), ValueError, "unique"),
    ],
)
def test_dataset_rejects_bad_input(images, labels, names, error, match) -> None:
    with pytest.raises(error, match=match):
        ImageDataset("toy", images, np.asarray(labels), names)


def test_subset_keeps_class_ids_and_order() -> None:
    ds = _ds(n=6)
    sub = ds.subset([5, 0, 3])
    assert sub.labels.tolist() == [2, 0, 0]
    assert sub.class_names == ds.class_names
    assert np.array_equal(sub.images[0], ds.images[5])
    with pytest.raises(ValueError, match=r"\[0, 6\)"):
        ds.subset([6])
    with pytest.raises(ValueError, match="1-D integer"):
        ds.subset(np.array([0.5]))


def test_splits_require_the_same_class_names() -> None:
    train = _ds(classes=3)
    other = ImageDataset("toy", train.images, train.labels, ("a", "b", "d"))
    with pytest.raises(ValueError, match="share class names"):
        DatasetSplits(train=train, test=other)
    assert DatasetSplits(train=train).test is None


def test_unknown_dataset_lists_known_names() -> None:
    with pytest.raises(UnknownNameError, match="cifar10") as info:
        load_dataset("cifar11")
    assert "synthetic" in str(info.value)


def test_unknown_option_and_bad_image_size() -> None:
    with pytest.raises(ValueError, match="num_classes, images_per_class, seed"):
        load_dataset("synthetic", num_class=10)
    with pytest.raises(ValueError, match="image_size"):
        load_dataset("synthetic", image_size=0)


def test_missing_root_raises_data_root_error() -> None:
    for name in ("cifar10", "cifar100", "mnist", "fashion_mnist", "omniglot", "imagefolder"):
        with pytest.raises(DataRootError, match="root"):
            load_dataset(name, None)


def test_list_datasets_has_every_loader_with_a_description() -> None:
    listed = dict(list_datasets())
    assert set(listed) == set(DATASETS.names())
    assert {"synthetic", "omniglot", "cifar10", "cifar100", "mnist", "fashion_mnist",
            "imagefolder"} <= set(listed)
    assert all(desc for desc in listed.values())


def test_mean_std_hand_computed() -> None:
    images = np.zeros((2, 2, 1, 2), np.uint8)
    images[:, 0] = 255  # channel 0 constant 1.0
    images[0, 1] = 0
    images[1, 1] = 255  # channel 1 half 0, half 1
    mean, std = dataset_mean_std(ImageDataset("t", images, np.zeros(2, np.int64), ("a",)))
    assert mean == pytest.approx((1.0, 0.5))
    assert std == pytest.approx((0.0, 0.5))


def test_resize_keeps_constant_images_and_shape() -> None:
    images = np.full((3, 2, 10, 14), 77, np.uint8)
    out = resize_images(images, 4)
    assert out.shape == (3, 2, 4, 4) and out.dtype == np.uint8
    assert (out == 77).all()


def test_resize_is_antialiased() -> None:
    # A one-pixel checkerboard averages to mid-grey when downsampled with antialiasing;
    # plain bilinear sampling would alias to stripes of 0/255.
    board = ((np.indices((16, 16)).sum(0) % 2) * 255).astype(np.uint8)[None, None]
    out = resize_images(board, 4)
    assert np.abs(out.astype(int) - 128).max() <= 2
