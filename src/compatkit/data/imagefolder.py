"""Image-folder datasets: ``<root>/{train,test}/<class>/<img>`` or ``<root>/<class>/<img>``.

The root may be a folder or a .tar/.tar.gz of one; a single wrapping folder (as in most
archives) is skipped. Class index = position of the class folder name in sorted order.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

import numpy as np

from compatkit.data.base import DATASETS, DatasetSource, DatasetSplits, ImageDataset
from compatkit.data.files import decode_image, is_tar, iter_image_files, stack_images
from compatkit.errors import DataRootError

LAYOUT_HELP = (
    "expected a folder or .tar/.tar.gz holding <root>/train/<class>/<image> (and optionally "
    "<root>/test/<class>/<image>), or <root>/<class>/<image>"
)
SPLIT_NAMES = ("train", "test")


def read_image_folder(
    path: Path,
    *,
    name: str,
    mode: Literal["L", "RGB"] | None = None,
    size: int | None = None,
    require_split: bool = False,
) -> DatasetSplits:
    """Decode an image-folder tree (folder or tar) into train and optional test splits.

    Args:
        mode: "L" or "RGB" to force the channels; None keeps gray when every image is gray.
        size: resize every image to ``size × size`` while decoding; None keeps native sizes.
        require_split: refuse the ``<root>/<class>/<img>`` layout (no train/test folders).

    Raises:
        DataRootError: no images, a layout other than the two above, or an unreadable file.
    """
    decoded: list[tuple[tuple[str, ...], np.ndarray]] = []
    for rel, data in iter_image_files(path):
        decoded.append((rel.parts, decode_image(data, mode=mode, size=size, where=f"{path}/{rel}")))
    if not decoded:
        raise DataRootError(f"{path} holds no image files; {LAYOUT_HELP}")

    parts = [p for p, _ in decoded]
    strip = 0
    while all(len(p) - strip >= 3 for p in parts) and len({p[strip] for p in parts}) == 1:
        strip += 1
    depths = {len(p) - strip for p in parts}
    tops = sorted({p[strip] for p in parts})
    if depths == {3} and set(tops) <= set(SPLIT_NAMES) and "train" in tops:
        split_of = [p[strip] for p in parts]
        class_of = [p[strip + 1] for p in parts]
    elif depths == {2} and not require_split:
        split_of = ["train"] * len(parts)
        class_of = [p[strip] for p in parts]
    else:
        prefix = "/".join(parts[0][:strip]) or "."
        raise DataRootError(f"{path}: unexpected layout under {prefix!r} (top-level entries "
                            f"{tops[:5]}, depths {sorted(depths)}); {LAYOUT_HELP}"
                            + (" with train/ and test/ folders" if require_split else ""))

    class_names = tuple(sorted(set(class_of)))
    class_index = {c: i for i, c in enumerate(class_names)}
    splits: dict[str, ImageDataset] = {}
    for split in SPLIT_NAMES:
        rows = sorted((parts[i], i) for i in range(len(parts)) if split_of[i] == split)
        if not rows:
            continue
        order = [i for _, i in rows]
        images = stack_images([decoded[i][1] for i in order], where=f"{path} ({split})")
        labels = np.array([class_index[class_of[i]] for i in order], dtype=np.int64)
        splits[split] = ImageDataset(name, images, labels, class_names)
    if "test" in splits and splits["test"].images.shape[1:] != splits["train"].images.shape[1:]:
        channels = max(splits["train"].images.shape[1], splits["test"].images.shape[1])
        for split, ds in splits.items():
            if ds.images.shape[1] != channels:
                splits[split] = ImageDataset(name, np.repeat(ds.images, channels, axis=1),
                                             ds.labels, class_names)
    return DatasetSplits(train=splits["train"], test=splits.get("test"))


def check_tree_root(root: Path | None, dataset: str) -> Path:
    """The root as a Path if it is an existing folder or tar archive, else DataRootError."""
    if root is None:
        raise DataRootError(f"dataset {dataset!r} needs a root; {LAYOUT_HELP}")
    if not (root.is_dir() or (root.is_file() and is_tar(root))):
        raise DataRootError(f"{dataset} root {root} is not an existing folder or .tar/.tar.gz "
                            f"archive; {LAYOUT_HELP}")
    return root


@DATASETS.register("imagefolder")
def imagefolder(root: Path | None, *, mode: Literal["L", "RGB"] | None = None) -> DatasetSource:
    """Any image-folder tree or .tar.gz: {train,test}/<class>/<img> or <class>/<img>."""
    if mode not in (None, "L", "RGB"):
        raise ValueError(f"imagefolder mode must be 'L', 'RGB' or None, got {mode!r}")
    path = check_tree_root(root, "imagefolder")

    def build(image_size: int | None) -> DatasetSplits:
        return read_image_folder(path, name="imagefolder", mode=mode, size=image_size)

    return DatasetSource(build=build, files=(path,))

