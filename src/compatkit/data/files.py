"""Reading image files from a folder, a zip or a tar archive without extracting it."""

from __future__ import annotations

import io
import tarfile
import zipfile
import zlib
from collections.abc import Iterator
from pathlib import Path, PurePosixPath

import numpy as np
from PIL import Image, UnidentifiedImageError

from compatkit.errors import DataRootError

IMAGE_EXTENSIONS = frozenset(
    {".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".ppm", ".pgm", ".pbm", ".tif", ".tiff"}
)
TAR_SUFFIXES = (".tar", ".tar.gz", ".tgz")
#: PIL modes decoded as one channel when no mode is forced.
GRAY_MODES = frozenset({"1", "L", "LA", "I", "I;16", "F", "P;L"})


def is_tar(path: Path) -> bool:
    """Whether ``path`` names a tar archive by its suffix (.tar, .tar.gz, .tgz)."""
    return path.name.endswith(TAR_SUFFIXES)


def _is_hidden(rel: PurePosixPath) -> bool:
    return any(part.startswith(".") or part == "__MACOSX" for part in rel.parts)


def iter_image_files(path: Path) -> Iterator[tuple[PurePosixPath, bytes]]:
    """(path inside ``path``, file bytes) of every image file in a folder, zip or tar archive.

    Hidden files and folders (``.*``, ``__MACOSX``) are skipped. Order is the storage order.

    Raises:
        DataRootError: the archive is unreadable or truncated.
    """
    def wanted(rel: PurePosixPath) -> bool:
        return rel.suffix.lower() in IMAGE_EXTENSIONS and not _is_hidden(rel)

    try:
        if path.is_dir():
            for file in sorted(path.rglob("*")):
                rel = PurePosixPath(file.relative_to(path).as_posix())
                if file.is_file() and wanted(rel):
                    yield rel, file.read_bytes()
        elif path.suffix == ".zip":
            with zipfile.ZipFile(path) as zf:
                for info in zf.infolist():
                    rel = PurePosixPath(info.filename)
                    if not info.is_dir() and wanted(rel):
                        yield rel, zf.read(info)
        elif is_tar(path):
            with tarfile.open(path, "r:*") as tf:
                for member in tf:
                    name = member.name
                    while name.startswith("./"):
                        name = name[2:]
                    rel = PurePosixPath(name)
                    if member.isfile() and wanted(rel):
                        fh = tf.extractfile(member)
                        if fh is not None:
                            yield rel, fh.read()
        else:
            raise DataRootError(f"{path} is neither a folder nor a .zip/.tar/.tar.gz archive")
    except (tarfile.TarError, zipfile.BadZipFile, zlib.error, EOFError) as exc:
        raise DataRootError(f"{path} is not a readable archive ({exc})") from exc


def decode_image(data: bytes, *, mode: str | None = None, where: str = "image",
                 size: int | None = None) -> np.ndarray:
    """Decode one image file to (H, W, C) uint8, as ``mode`` ("L", "RGB") or its own channels.

    With ``size``, the image is resized (antialiased, PIL bilinear) to ``size × size``.

    Raises:
        DataRootError: the bytes are not a readable image.
    """
    try:
        with Image.open(io.BytesIO(data)) as img:
            target = mode or ("L" if img.mode in GRAY_MODES else "RGB")
            if img.mode == "I;16":  # 16-bit gray: scale to 8 bits instead of clipping
                wide = np.asarray(img, dtype=np.float64) / 257.0
                img = Image.fromarray(wide.round().astype(np.uint8))
            converted = img.convert(target)
            if size is not None and converted.size != (size, size):
                converted = converted.resize((size, size), Image.Resampling.BILINEAR)
            arr = np.asarray(converted, dtype=np.uint8)
    except (OSError, UnidentifiedImageError, ValueError) as exc:
        raise DataRootError(f"{where}: not a readable image ({exc})") from exc
    return arr[:, :, None] if arr.ndim == 2 else arr


def stack_images(images: list[np.ndarray], *, where: str) -> np.ndarray:
    """Stack (H, W, C) uint8 images into (N, C, H, W); one-channel images join RGB ones as gray.

    Raises:
        DataRootError: the images differ in height or width (pass an image size).
    """
    if not images:
        return np.zeros((0, 1, 1, 1), dtype=np.uint8)
    sizes = {im.shape[:2] for im in images}
    if len(sizes) > 1:
        raise DataRootError(f"{where}: images differ in size ({sorted(sizes)[:3]} ...); "
                            "load with an image_size to resize them to one square")
    channels = max(im.shape[2] for im in images)
    h, w = images[0].shape[:2]
    out = np.empty((len(images), channels, h, w), dtype=np.uint8)
    for i, im in enumerate(images):
        out[i] = im.transpose(2, 0, 1)  # a 1-channel image broadcasts to every channel
    return out
