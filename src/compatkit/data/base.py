"""Image datasets as uint8 arrays and the dataset registry.

A loader registered in ``DATASETS`` checks its root and returns a ``DatasetSource``: the files
that identify the data (for the cache key) and a function that decodes them.
``compatkit.data.loading.load_dataset`` adds the cache and the resize, so every loader stays a
small decoder of one format.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from compatkit.registry import Registry


@dataclass(frozen=True, eq=False)
class ImageDataset:
    """Images and integer class labels of one split, held in memory.

    Shapes:
        images: (N, C, H, W) uint8.
        labels: (N,) int64 in ``[0, len(class_names))``; any integer dtype is converted.

    Raises:
        TypeError: images are not uint8 or labels are not integers.
        ValueError: wrong dimensions, lengths that differ, or labels out of range.
    """

    name: str
    images: np.ndarray
    labels: np.ndarray
    class_names: tuple[str, ...]

    def __post_init__(self) -> None:
        images, labels = self.images, np.asarray(self.labels)
        if not isinstance(images, np.ndarray) or images.dtype != np.uint8:
            dtype = getattr(images, "dtype", type(images).__name__)
            raise TypeError(f"dataset {self.name!r}: images must be a uint8 numpy array, "
                            f"got {dtype}")
        if images.ndim != 4 or images.shape[1] < 1:
            raise ValueError(f"dataset {self.name!r}: images must have shape (N, C, H, W) with "
                             f"C >= 1, got {images.shape}")
        if labels.ndim != 1 or labels.shape[0] != images.shape[0]:
            raise ValueError(f"dataset {self.name!r}: labels must have shape ({images.shape[0]},) "
                             f"to match the images, got {labels.shape}")
        if labels.size and not np.issubdtype(labels.dtype, np.integer):
            raise TypeError(f"dataset {self.name!r}: labels must be integers, got {labels.dtype}")
        names = tuple(str(n) for n in self.class_names)
        if not names:
            raise ValueError(f"dataset {self.name!r}: class_names must not be empty")
        if len(set(names)) != len(names):
            raise ValueError(f"dataset {self.name!r}: class_names must be unique")
        labels = labels.astype(np.int64, copy=False)
        if labels.size and (labels.min() < 0 or labels.max() >= len(names)):
            raise ValueError(f"dataset {self.name!r}: labels must lie in [0, {len(names)}), "
                             f"got range [{labels.min()}, {labels.max()}]")
        object.__setattr__(self, "labels", labels)
        object.__setattr__(self, "class_names", names)

    def __len__(self) -> int:
        return int(self.images.shape[0])

    @property
    def num_classes(self) -> int:
        """Size of the class-id space (``len(class_names)``), not the classes present."""
        return len(self.class_names)

    @property
    def image_shape(self) -> tuple[int, int, int]:
        """(C, H, W) of every image."""
        _, c, h, w = self.images.shape
        return (int(c), int(h), int(w))

    def subset(self, indices: Sequence[int] | np.ndarray) -> ImageDataset:
        """The images at ``indices`` (in that order), keeping the class ids and names.

        Raises:
            ValueError: indices that are not 1-D integers within ``[0, len(self))``.
        """
        idx = np.asarray(indices)
        if idx.ndim != 1 or (idx.size and not np.issubdtype(idx.dtype, np.integer)):
            raise ValueError(f"subset indices must be a 1-D integer array, got shape {idx.shape} "
                             f"dtype {idx.dtype}")
        idx = idx.astype(np.int64, copy=False)
        if idx.size and (idx.min() < 0 or idx.max() >= len(self)):
            raise ValueError(f"subset indices must lie in [0, {len(self)}), got range "
                             f"[{idx.min()}, {idx.max()}]")
        return ImageDataset(self.name, self.images[idx], self.labels[idx], self.class_names)


@dataclass(frozen=True, eq=False)
class DatasetSplits:
    """The training split and the official test split (``None`` where the format has none).

    Raises:
        ValueError: the test split uses other class names than the training split.
    """

    train: ImageDataset
    test: ImageDataset | None = None

    def __post_init__(self) -> None:
        if self.test is not None and self.test.class_names != self.train.class_names:
            raise ValueError(f"dataset {self.train.name!r}: train and test splits must share "
                             f"class names ({self.train.num_classes} vs {self.test.num_classes})")


@dataclass(frozen=True)
class DatasetSource:
    """What a registered loader returns once its root checks out.

    Args:
        build: decodes the data; called with the requested square size (or ``None``). It may
            return images at their native size: ``load_dataset`` resizes what does not match.
        files: files whose (path, size, mtime) identify the data for the cache key.
        version: bump when the decoding changes, so old cache entries are not reused.
        cacheable: whether ``load_dataset`` may cache the decoded arrays.
    """

    build: Callable[[int | None], DatasetSplits]
    files: tuple[Path, ...] = field(default_factory=tuple)
    version: int = 1
    cacheable: bool = True


#: Loader functions ``(root: Path | None, **options) -> DatasetSource``; first docstring line
#: is the one-line description listed by ``compatkit datasets``.
DATASETS: Registry[Callable[..., DatasetSource]] = Registry("dataset")


def list_datasets() -> list[tuple[str, str]]:
    """(name, one-line description) of every registered dataset, sorted by name."""
    return DATASETS.describe()


def dataset_mean_std(ds: ImageDataset) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Per-channel mean and standard deviation of the pixels, in [0, 1] units.

    Returns:
        (mean, std), each a tuple of C floats, as ``augment.normalize`` expects.

    Raises:
        ValueError: the dataset is empty.
    """
    if len(ds) == 0:
        raise ValueError(f"dataset {ds.name!r} is empty: no mean/std to compute")
    c = ds.images.shape[1]
    total = np.zeros(c, dtype=np.float64)
    total_sq = np.zeros(c, dtype=np.float64)
    for start in range(0, len(ds), 4096):
        chunk = ds.images[start:start + 4096].astype(np.float64) / 255.0
        total += chunk.sum(axis=(0, 2, 3))
        total_sq += np.square(chunk).sum(axis=(0, 2, 3))
    count = len(ds) * ds.images.shape[2] * ds.images.shape[3]
    mean = total / count
    std = np.sqrt(np.maximum(total_sq / count - mean**2, 0.0))
    return tuple(float(m) for m in mean), tuple(float(s) for s in std)
