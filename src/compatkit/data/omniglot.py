"""Omniglot handwritten characters from the official zips (or their extracted folders).

The default is the union of ``images_background_small1`` and ``images_background_small2``:
Greek and Latin sit in both with identical paths and are counted once, giving 242 classes ×
20 drawings = 4,840 images. A class is ``<Alphabet>/characterNN``; classes are sorted by name.
Images are inverted so that strokes are bright on a dark background (1 channel, 105 px).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np

from compatkit.data.base import DATASETS, DatasetSource, DatasetSplits, ImageDataset
from compatkit.data.files import decode_image, iter_image_files, stack_images
from compatkit.errors import DataRootError

DEFAULT_SUBSETS = ("images_background_small1", "images_background_small2")


def _subset_paths(root: Path | None, subsets: Sequence[str]) -> tuple[Path, ...]:
    wanted = ", ".join(f"{s}.zip" for s in subsets)
    help_text = (f"expected the official Omniglot zips {wanted} (github.com/brendenlake/omniglot, "
                 "python/) or their extracted folders")
    if root is None:
        raise DataRootError(f"dataset 'omniglot' needs a root; {help_text}")
    if not root.is_dir():
        raise DataRootError(f"omniglot root {root} is not a folder; {help_text}")
    paths, missing = [], []
    for subset in subsets:
        folder, archive = root / subset, root / f"{subset}.zip"
        if folder.is_dir():
            paths.append(folder)
        elif archive.is_file():
            paths.append(archive)
        else:
            missing.append(subset)
    if missing:
        raise DataRootError(f"omniglot root {root} lacks {', '.join(missing)} "
                            f"(neither .zip nor folder); {help_text}")
    return tuple(paths)


def read_omniglot(paths: Sequence[Path]) -> ImageDataset:
    """Decode and merge Omniglot subsets; a drawing present in several subsets is kept once.

    Raises:
        DataRootError: a file outside ``<Alphabet>/characterNN/<drawing>.png`` or no images.
    """
    drawings: dict[tuple[str, str, str], np.ndarray] = {}
    for path in paths:
        for rel, data in iter_image_files(path):
            parts = rel.parts[-3:]
            if len(parts) != 3 or not parts[1].startswith("character"):
                raise DataRootError(f"{path}/{rel}: expected <Alphabet>/characterNN/<drawing>.png")
            key = (parts[0], parts[1], parts[2])
            if key not in drawings:
                drawings[key] = decode_image(data, mode="L", where=f"{path}/{rel}")
    if not drawings:
        raise DataRootError(f"no Omniglot drawings found in {', '.join(map(str, paths))}")
    keys = sorted(drawings)
    class_names = tuple(sorted({f"{a}/{c}" for a, c, _ in keys}))
    index = {name: i for i, name in enumerate(class_names)}
    images = 255 - stack_images([drawings[k] for k in keys], where="omniglot")
    labels = np.array([index[f"{a}/{c}"] for a, c, _ in keys], dtype=np.int64)
    return ImageDataset("omniglot", images, labels, class_names)


@DATASETS.register("omniglot")
def omniglot(root: Path | None, *, subsets: Sequence[str] = DEFAULT_SUBSETS) -> DatasetSource:
    """Omniglot background-small union (242 classes × 20 drawings, 105 px, bright strokes)."""
    if isinstance(subsets, str) or not subsets:
        raise ValueError(f"omniglot subsets must be a non-empty list of names, got {subsets!r}")
    paths = _subset_paths(root, list(subsets))

    def build(image_size: int | None) -> DatasetSplits:
        return DatasetSplits(train=read_omniglot(paths), test=None)

    return DatasetSource(build=build, files=paths)
