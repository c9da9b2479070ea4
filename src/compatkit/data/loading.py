"""``load_dataset``: a registered loader's source, plus the decoded-array cache and the resize."""

from __future__ import annotations

import inspect
import logging
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from compatkit.data.base import DATASETS, DatasetSource, DatasetSplits, ImageDataset
from compatkit.data.cache import cache_key, cache_path, read_cache, write_cache

logger = logging.getLogger(__name__)

#: Images resized at once by ``resize_images`` (bounds the float32 working copy).
RESIZE_CHUNK = 1024


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
        key = cache_key(name, source.files, image_size=image_size, options=resolved,
                        version=source.version)
        entry = cache_path(key, name=name, cache_dir=cache_dir)
        cached = read_cache(entry, key)
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
        write_cache(entry, key, splits)
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
