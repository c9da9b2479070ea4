"""Image datasets as uint8 arrays, the dataset registry and ``load_dataset``.

A loader registered in ``DATASETS`` checks its root and returns a ``DatasetSource``: the files
that identify the data (for the cache key) and a function that decodes them. ``load_dataset``
adds the cache and the resize, so every loader stays a small decoder of one format.
"""

from __future__ import annotations

import inspect
import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from compatkit.registry import Registry

logger = logging.getLogger(__name__)

#: Images resized at once by ``resize_images`` (bounds the float32 working copy).
RESIZE_CHUNK = 1024


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


def load_dataset(
    name: str,
    root: str | Path | None = None,
    *,
    image_size: int | None = 32,
    cache_dir: str | Path | None = None,
    use_cache: bool = True,
    **options: Any,
) -> DatasetSplits:
    """Load a registered dataset as uint8 arrays, resized to ``image_size``² (None: native).

    Decoded arrays are cached under ``cache_dir`` (default ``$COMPATKIT_CACHE_DIR`` or
    ``~/.cache/compatkit``), keyed by name, source files, size and options.

    Raises:
        UnknownNameError: ``name`` is not registered (the known names are listed).
        DataRootError: the root is missing or does not hold the expected files.
        ValueError: a bad ``image_size`` or an option the loader does not take.
    """
    from compatkit.data import cache  # late import: cache imports this module

    loader = DATASETS.get(name)
    if image_size is not None and (isinstance(image_size, bool) or not isinstance(image_size, int)
                                   or image_size <= 0):
        raise ValueError(f"image_size must be a positive int or None, got {image_size!r}")
    resolved = _resolve_options(name, loader, options)
    root_path = Path(root).expanduser() if root is not None else None
    source = loader(root_path, **options)

    entry: Path | None = None
    key = ""
    if use_cache and source.cacheable:
        key = cache.cache_key(name, source.files, image_size=image_size, options=resolved,
                              version=source.version)
        entry = cache.cache_path(key, name=name, cache_dir=cache_dir)
        cached = cache.read_cache(entry, key)
        if cached is not None:
            logger.info("dataset %s: loaded from cache %s", name, entry)
            return cached

    started = time.perf_counter()
    splits = source.build(image_size)
    if image_size is not None:
        splits = DatasetSplits(
            train=_resized(splits.train, image_size),
            test=None if splits.test is None else _resized(splits.test, image_size),
        )
    logger.info("dataset %s: decoded %d train / %s test images in %.1f s", name,
                len(splits.train), "no" if splits.test is None else len(splits.test),
                time.perf_counter() - started)
    if entry is not None:
        cache.write_cache(entry, key, splits)
    return splits


def _resolve_options(name: str, loader: Callable[..., DatasetSource],
                     options: dict[str, Any]) -> dict[str, Any]:
    """The loader's keyword defaults updated with ``options``; unknown options raise."""
    params = inspect.signature(loader).parameters.values()
    keywords = {p.name: p.default for p in params if p.kind is inspect.Parameter.KEYWORD_ONLY}
    unknown = sorted(set(options) - set(keywords))
    if unknown and not any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params):
        raise ValueError(f"dataset {name!r} takes no option(s) {', '.join(unknown)}; "
                         f"its options are: {', '.join(keywords) or 'none'}")
    resolved = {k: v for k, v in keywords.items() if v is not inspect.Parameter.empty}
    resolved.update(options)
    return resolved


def _resized(ds: ImageDataset, size: int) -> ImageDataset:
    if ds.images.shape[2:] == (size, size):
        return ds
    return ImageDataset(ds.name, resize_images(ds.images, size), ds.labels, ds.class_names)


def resize_images(images: np.ndarray, size: int) -> np.ndarray:
    """Antialiased bilinear resize of uint8 images to ``size × size``, in chunks.

    Shapes:
        images: (N, C, H, W) uint8 → (N, C, size, size) uint8.
    """
    if images.ndim != 4 or images.dtype != np.uint8:
        raise ValueError(f"resize_images expects (N, C, H, W) uint8, got {images.shape} "
                         f"{images.dtype}")
    n, c = images.shape[:2]
    out = np.empty((n, c, size, size), dtype=np.uint8)
    for start in range(0, n, RESIZE_CHUNK):
        chunk = torch.from_numpy(images[start:start + RESIZE_CHUNK]).float()
        resized = F.interpolate(chunk, size=(size, size), mode="bilinear", align_corners=False,
                                antialias=True)
        out[start:start + RESIZE_CHUNK] = resized.round_().clamp_(0, 255).to(torch.uint8).numpy()
    return out


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
