"""From a ``DataConfig`` to the images a run trains on and the held-out retrieval test set.

The evaluation set is the dataset's official test split, or (for open-set datasets without
one) a seeded hold-out of whole classes. The rest is split into old/new training sets by the
configured scenario (reference methods.md §4.3); a run trains on one side.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from compatkit.data import (
    ImageDataset,
    class_holdout_split,
    dataset_mean_std,
    load_dataset,
    make_split,
)
from compatkit.train.config import DataConfig


@dataclass(frozen=True)
class PreparedData:
    """The training images of this run's side, the retrieval test set and their provenance.

    ``labels`` are classifier rows: ``class_ids[labels[i]]`` is image i's global class id.
    """

    train: ImageDataset
    labels: np.ndarray
    class_ids: tuple[int, ...]
    test: ImageDataset
    mean: tuple[float, ...]
    std: tuple[float, ...]
    manifest: dict[str, Any]


def prepare_data(cfg: DataConfig) -> PreparedData:
    """Load, hold out the test set, split old/new and pick this run's side."""
    pool, test, holdout = _pool_and_test(cfg)
    if cfg.train_per_class is not None:
        pool = pool.subset(cap_per_class(pool.labels, cfg.train_per_class, seed=cfg.split_seed))
    split = make_split(pool.labels, cfg.scenario, old_ratio=cfg.old_ratio, seed=cfg.split_seed)
    indices = split.old_indices if cfg.side == "old" else split.new_indices
    train = pool.subset(indices)
    class_ids = tuple(int(c) for c in np.unique(train.labels))
    row = {c: i for i, c in enumerate(class_ids)}
    labels = np.fromiter((row[int(c)] for c in train.labels), dtype=np.int64, count=len(train))
    mean, std = dataset_mean_std(pool)
    manifest = {
        "dataset": cfg.name,
        "image_size": cfg.image_size,
        "options": dict(cfg.options),
        "side": cfg.side,
        "train_per_class": cfg.train_per_class,
        "split": split.manifest(),
        "holdout": holdout,
        "train_images": len(train),
        "train_classes": len(class_ids),
        "test_images": len(test),
        "test_classes": len(np.unique(test.labels)),
    }
    return PreparedData(train, labels, class_ids, test, tuple(mean), tuple(std), manifest)


def cap_per_class(labels: np.ndarray, cap: int, *, seed: int) -> np.ndarray:
    """Sorted indices keeping at most ``cap`` images of every class, drawn with ``seed``."""
    rng = np.random.RandomState(seed)
    keep = []
    for c in np.unique(labels):
        idx = np.flatnonzero(labels == c)
        keep.append(idx if len(idx) <= cap else np.sort(rng.choice(idx, cap, replace=False)))
    return np.sort(np.concatenate(keep))


def evaluation_images(cfg: DataConfig, part: str = "test") -> ImageDataset:
    """The images a model is evaluated or embedded on, reconstructed from its data config.

    ``part``: ``"test"`` = the held-out retrieval set, ``"train"`` = the whole training pool
    (both sides of the old/new split), ``"all"`` = every image of the dataset.
    """
    if part not in ("test", "train", "all"):
        raise ValueError(f"part must be 'test', 'train' or 'all', got {part!r}")
    if part == "all":
        splits = load_dataset(cfg.name, cfg.root, image_size=cfg.image_size, **cfg.options)
        pool, test = splits.train, splits.test
        if test is None:
            return pool
        return ImageDataset(
            name=pool.name, images=np.concatenate([pool.images, test.images]),
            labels=np.concatenate([pool.labels, test.labels]), class_names=pool.class_names,
        )
    pool, test, _ = _pool_and_test(cfg)
    return test if part == "test" else pool


def _pool_and_test(cfg: DataConfig) -> tuple[ImageDataset, ImageDataset, dict[str, Any]]:
    """The training pool, the retrieval test set and how the test set was chosen."""
    splits = load_dataset(cfg.name, cfg.root, image_size=cfg.image_size, **cfg.options)
    pool, test = splits.train, splits.test
    if test is not None:
        return pool, test, {"kind": "official_test_split"}
    train_idx, test_idx = class_holdout_split(
        pool.labels, test_ratio=cfg.test_class_ratio, seed=cfg.split_seed
    )
    holdout = {"kind": "class_holdout", "test_class_ratio": cfg.test_class_ratio,
               "seed": cfg.split_seed}
    return pool.subset(train_idx), pool.subset(test_idx), holdout
