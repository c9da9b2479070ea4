"""CIFAR-10 and CIFAR-100 from their official python pickles, or CIFAR-10 from a JPEG folder.

The pickles are read with an unpickler that only admits the numpy types they contain, so a
file that is not a CIFAR batch cannot run code. Class index = official label; for CIFAR-10 the
official names happen to be in sorted order, so the JPEG copy (sorted folder names) agrees.
"""

from __future__ import annotations

import io
import pickle
import tarfile
import zlib
from pathlib import Path
from typing import Any, Literal

import numpy as np

from compatkit.data.base import DATASETS, DatasetSource, DatasetSplits, ImageDataset
from compatkit.data.files import is_tar
from compatkit.data.imagefolder import read_image_folder
from compatkit.errors import DataRootError

CIFAR10_HELP = (
    "expected cifar-10-batches-py/ (data_batch_1..5, test_batch, batches.meta) or "
    "cifar-10-python.tar.gz, or the JPEG copy cifar10-jpg.tar.gz / cifar10-jpg/{train,test}/"
    "<class>/*.jpg"
)
CIFAR100_HELP = "expected cifar-100-python/ (train, test, meta) or cifar-100-python.tar.gz"

_ALLOWED_GLOBALS = {
    ("numpy.core.multiarray", "_reconstruct"),
    ("numpy._core.multiarray", "_reconstruct"),
    ("numpy.core.multiarray", "scalar"),
    ("numpy._core.multiarray", "scalar"),
    ("numpy.core.numeric", "_frombuffer"),
    ("numpy._core.numeric", "_frombuffer"),
    ("numpy", "ndarray"),
    ("numpy", "dtype"),
    ("_codecs", "encode"),
}


class _NumpyOnlyUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str) -> Any:
        if (module, name) not in _ALLOWED_GLOBALS:
            raise pickle.UnpicklingError(f"global {module}.{name} is not allowed in a CIFAR file")
        return super().find_class(module, name)


def _unpickle(data: bytes, where: str) -> dict[str, Any]:
    try:
        obj = _NumpyOnlyUnpickler(io.BytesIO(data), encoding="bytes").load()
    except (pickle.UnpicklingError, EOFError, ValueError, TypeError, AttributeError) as exc:
        raise DataRootError(f"{where}: not a CIFAR python pickle ({exc})") from exc
    if not isinstance(obj, dict):
        raise DataRootError(f"{where}: expected a pickled dict, got {type(obj).__name__}")
    return {k.decode() if isinstance(k, bytes) else str(k): v for k, v in obj.items()}


def _names(meta: dict[str, Any], key: str, where: str) -> tuple[str, ...]:
    if key not in meta:
        raise DataRootError(f"{where}: missing key {key!r} (keys: {sorted(meta)})")
    return tuple(n.decode() if isinstance(n, bytes) else str(n) for n in meta[key])


def _batch(batch: dict[str, Any], label_key: str, where: str) -> tuple[np.ndarray, np.ndarray]:
    if "data" not in batch or label_key not in batch:
        raise DataRootError(f"{where}: expected keys 'data' and {label_key!r}, got {sorted(batch)}")
    data = np.asarray(batch["data"])
    labels = np.asarray(batch[label_key], dtype=np.int64)
    if data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != 3 * 32 * 32:
        raise DataRootError(f"{where}: 'data' must be (N, 3072) uint8, got {data.shape} "
                            f"{data.dtype}")
    if labels.shape != (data.shape[0],):
        raise DataRootError(f"{where}: {label_key!r} has {labels.size} entries for "
                            f"{data.shape[0]} images")
    return data.reshape(-1, 3, 32, 32), labels


class _PickleFiles:
    """Reads named files from a folder or from the one folder inside a tar archive."""

    def __init__(self, path: Path, folder: str) -> None:
        self.path, self.folder = path, folder

    def read(self, names: list[str]) -> dict[str, bytes]:
        found: dict[str, bytes] = {}
        if self.path.is_dir():
            for n in names:
                if (self.path / n).is_file():
                    found[n] = (self.path / n).read_bytes()
        else:
            try:
                with tarfile.open(self.path, "r:*") as tf:
                    for member in tf:
                        name = Path(member.name).name
                        if member.isfile() and name in names and name not in found:
                            fh = tf.extractfile(member)
                            if fh is not None:
                                found[name] = fh.read()
            except (tarfile.TarError, zlib.error, EOFError, OSError) as exc:
                raise DataRootError(f"{self.path} is not a readable tar archive ({exc})") from exc
        missing = [n for n in names if n not in found]
        if missing:
            raise DataRootError(f"{self.path} lacks {', '.join(missing)} (in {self.folder}/)")
        return found


def _locate(root: Path | None, dataset: str, help_text: str,
            candidates: list[tuple[str, Path, bool]]) -> tuple[str, Path]:
    """The first candidate (kind, path) that is present, else DataRootError with the help."""
    if root is None:
        raise DataRootError(f"dataset {dataset!r} needs a root; {help_text}")
    if not root.exists():
        raise DataRootError(f"{dataset} root {root} does not exist; {help_text}")
    for kind, path, present in candidates:
        if present:
            return kind, path
    raise DataRootError(f"{dataset} root {root} holds none of the expected files; {help_text}")


def _read_pickles(files: _PickleFiles, *, name: str, train: list[str], test: str, meta: str,
                  label_key: str, names_key: str) -> DatasetSplits:
    raw = files.read([*train, test, meta])
    class_names = _names(_unpickle(raw[meta], f"{files.path}/{meta}"), names_key,
                         f"{files.path}/{meta}")

    def split(parts: list[str]) -> ImageDataset:
        arrays = [_batch(_unpickle(raw[p], f"{files.path}/{p}"), label_key, f"{files.path}/{p}")
                  for p in parts]
        images = np.ascontiguousarray(np.concatenate([a for a, _ in arrays]))
        labels = np.concatenate([b for _, b in arrays])
        try:
            return ImageDataset(name, images, labels, class_names)
        except ValueError as exc:
            raise DataRootError(f"{files.path}: {exc}") from exc

    return DatasetSplits(train=split(train), test=split([test]))


@DATASETS.register("cifar10")
def cifar10(root: Path | None) -> DatasetSource:
    """CIFAR-10 (10 classes, 50k train + 10k test, 32 px RGB): official pickles or JPEG copy."""
    r = root if root is not None else Path()
    kind, path = _locate(root, "cifar10", CIFAR10_HELP, [
        ("pickle", r, r.is_file() and r.name == "cifar-10-python.tar.gz"),
        ("jpg", r, r.is_file() and is_tar(r) and r.name != "cifar-10-python.tar.gz"),
        ("pickle", r, (r / "data_batch_1").is_file()),
        ("pickle", r / "cifar-10-batches-py", (r / "cifar-10-batches-py").is_dir()),
        ("pickle", r / "cifar-10-python.tar.gz", (r / "cifar-10-python.tar.gz").is_file()),
        ("jpg", r / "cifar10-jpg", (r / "cifar10-jpg").is_dir()),
        ("jpg", r / "cifar10-jpg.tar.gz", (r / "cifar10-jpg.tar.gz").is_file()),
    ])

    def build(image_size: int | None) -> DatasetSplits:
        if kind == "pickle":
            return _read_pickles(
                _PickleFiles(path, "cifar-10-batches-py"), name="cifar10",
                train=[f"data_batch_{i}" for i in range(1, 6)], test="test_batch",
                meta="batches.meta", label_key="labels", names_key="label_names")
        return read_image_folder(path, name="cifar10", mode="RGB", size=image_size,
                                 require_split=True)

    return DatasetSource(build=build, files=(path,), version=1)


@DATASETS.register("cifar100")
def cifar100(root: Path | None, *, labels: Literal["fine", "coarse"] = "fine") -> DatasetSource:
    """CIFAR-100 (100 fine classes, 50k train + 10k test, 32 px RGB): official pickles."""
    if labels not in ("fine", "coarse"):
        raise ValueError(f"cifar100 labels must be 'fine' or 'coarse', got {labels!r}")
    r = root if root is not None else Path()
    _, path = _locate(root, "cifar100", CIFAR100_HELP, [
        ("pickle", r, r.is_file() and is_tar(r)),
        ("pickle", r, (r / "meta").is_file() and (r / "train").is_file()),
        ("pickle", r / "cifar-100-python", (r / "cifar-100-python").is_dir()),
        ("pickle", r / "cifar-100-python.tar.gz", (r / "cifar-100-python.tar.gz").is_file()),
    ])

    def build(image_size: int | None) -> DatasetSplits:
        return _read_pickles(_PickleFiles(path, "cifar-100-python"), name="cifar100",
                             train=["train"], test="test", meta="meta",
                             label_key=f"{labels}_labels", names_key=f"{labels}_label_names")

    return DatasetSource(build=build, files=(path,), version=1)
