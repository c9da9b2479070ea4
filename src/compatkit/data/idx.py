"""MNIST and Fashion-MNIST from their IDX files (raw or .gz), train and official test split.

IDX: a 4-byte magic (two zero bytes, a type code, the number of dimensions), then one
big-endian uint32 per dimension, then the values in row-major order. Only unsigned bytes
(type 0x08) occur in these datasets.
"""

from __future__ import annotations

import gzip
import zlib
from pathlib import Path

import numpy as np

from compatkit.data.base import DATASETS, DatasetSource, DatasetSplits, ImageDataset
from compatkit.errors import DataRootError

IDX_FILES = {
    "train_images": "train-images-idx3-ubyte",
    "train_labels": "train-labels-idx1-ubyte",
    "test_images": "t10k-images-idx3-ubyte",
    "test_labels": "t10k-labels-idx1-ubyte",
}
MNIST_CLASSES = tuple(str(d) for d in range(10))
FASHION_MNIST_CLASSES = (
    "T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
    "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot",
)
_UBYTE = 0x08


def read_idx(path: Path) -> np.ndarray:
    """Read one IDX file of unsigned bytes (gzip-compressed when its name ends in .gz).

    Raises:
        DataRootError: a bad magic number, a type other than ubyte, or a size mismatch.
    """
    try:
        raw = gzip.decompress(path.read_bytes()) if path.suffix == ".gz" else path.read_bytes()
    except (OSError, EOFError, zlib.error) as exc:
        raise DataRootError(f"{path}: cannot read IDX file ({exc})") from exc
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0:
        raise DataRootError(f"{path}: not an IDX file (magic {raw[:4].hex() or 'missing'}, "
                            "expected 0000 then type and dimension bytes)")
    if raw[2] != _UBYTE:
        raise DataRootError(f"{path}: IDX type 0x{raw[2]:02x}, expected 0x08 (unsigned byte)")
    ndim = raw[3]
    header = 4 + 4 * ndim
    if ndim == 0 or len(raw) < header:
        raise DataRootError(f"{path}: truncated IDX header ({ndim} dimensions)")
    shape = tuple(int(d) for d in np.frombuffer(raw, dtype=">u4", count=ndim, offset=4))
    expected = int(np.prod(shape))
    if len(raw) - header != expected:
        raise DataRootError(f"{path}: IDX header says shape {shape} ({expected} bytes) but the "
                            f"file holds {len(raw) - header} bytes of data")
    return np.frombuffer(raw, dtype=np.uint8, offset=header).reshape(shape).copy()


def write_idx(path: Path, array: np.ndarray) -> Path:
    """Write ``array`` (unsigned bytes, any shape) as one IDX file, gzip-compressed when the
    name ends in .gz; the inverse of :func:`read_idx`."""
    array = np.asarray(array)
    if array.dtype != np.uint8 or not 1 <= array.ndim <= 255:
        raise ValueError(f"IDX holds uint8 arrays of 1 to 255 dimensions, got dtype "
                         f"{array.dtype} with {array.ndim} dimensions")
    header = bytes([0, 0, _UBYTE, array.ndim]) + np.asarray(array.shape, dtype=">u4").tobytes()
    data = header + np.ascontiguousarray(array).tobytes()
    path = Path(path)
    path.write_bytes(gzip.compress(data) if path.suffix == ".gz" else data)
    return path


def _find_idx(root: Path | None, dataset: str, subfolder: str) -> dict[str, Path]:
    expected = ", ".join(f"{f}[.gz]" for f in IDX_FILES.values())
    if root is None:
        raise DataRootError(f"dataset {dataset!r} needs a root holding {expected}")
    for folder in (root, root / "raw", root / subfolder / "raw"):
        found: dict[str, Path] = {}
        for key, stem in IDX_FILES.items():
            for candidate in (folder / stem, folder / f"{stem}.gz"):
                if candidate.is_file():
                    found[key] = candidate
                    break
        if len(found) == len(IDX_FILES):
            return found
    raise DataRootError(f"{dataset} root {root} does not hold the IDX files {expected} "
                        f"(looked in {root}, {root / 'raw'} and {root / subfolder / 'raw'})")


def _read_split(files: dict[str, Path], split: str, name: str,
                classes: tuple[str, ...]) -> ImageDataset:
    images = read_idx(files[f"{split}_images"])
    labels = read_idx(files[f"{split}_labels"])
    if images.ndim != 3 or labels.ndim != 1 or labels.shape[0] != images.shape[0]:
        raise DataRootError(f"{files[f'{split}_images']}: expected (N, H, W) images and (N,) "
                            f"labels, got {images.shape} and {labels.shape}")
    try:
        return ImageDataset(name, images[:, None], labels.astype(np.int64), classes)
    except ValueError as exc:
        raise DataRootError(f"{files[f'{split}_labels']}: {exc}") from exc


def _idx_source(root: Path | None, name: str, subfolder: str,
                classes: tuple[str, ...]) -> DatasetSource:
    files = _find_idx(root, name, subfolder)

    def build(image_size: int | None) -> DatasetSplits:
        return DatasetSplits(train=_read_split(files, "train", name, classes),
                             test=_read_split(files, "test", name, classes))

    return DatasetSource(build=build, files=tuple(files.values()))


@DATASETS.register("mnist")
def mnist(root: Path | None) -> DatasetSource:
    """MNIST digits (10 classes, 60k train + 10k test, 28 px gray) from IDX files."""
    return _idx_source(root, "mnist", "MNIST", MNIST_CLASSES)


@DATASETS.register("fashion_mnist")
def fashion_mnist(root: Path | None) -> DatasetSource:
    """Fashion-MNIST (10 classes, 60k train + 10k test, 28 px gray) from IDX files."""
    return _idx_source(root, "fashion_mnist", "FashionMNIST", FASHION_MNIST_CLASSES)
