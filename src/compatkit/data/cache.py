"""Cache of decoded datasets as uncompressed ``.npz`` files outside the repository.

The key is a sha256 of the dataset name, the identity (path, size, mtime) of every source file,
the image size, the loader options and the loader's format version. Writes go to a temporary
file that is renamed into place, so a reader never sees half a file; an entry that fails to
read (truncated, bad CRC, wrong key) is ignored and rebuilt.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import tempfile
import zipfile
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import numpy as np

from compatkit.data.base import DatasetSplits, ImageDataset

logger = logging.getLogger(__name__)

CACHE_ENV = "COMPATKIT_CACHE_DIR"
#: Bump when the file layout below changes.
CACHE_FORMAT = 1


def default_cache_dir() -> Path:
    """``$COMPATKIT_CACHE_DIR`` if set, else ``~/.cache/compatkit``."""
    env = os.environ.get(CACHE_ENV)
    return Path(env).expanduser() if env else Path.home() / ".cache" / "compatkit"


def file_identity(paths: Iterable[Path]) -> list[tuple[str, int, int]]:
    """(absolute path, size, mtime in ns) of each file; a folder contributes every file in it."""
    ident: list[tuple[str, int, int]] = []
    for path in paths:
        path = Path(path).resolve()
        files = sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]
        for f in files:
            st = f.stat()
            ident.append((str(f), int(st.st_size), int(st.st_mtime_ns)))
    return ident


def cache_key(
    name: str,
    files: Iterable[Path],
    *,
    image_size: int | None,
    options: dict[str, Any],
    version: int = 1,
) -> str:
    """Hex sha256 naming one decoded dataset (see the module docstring for what it covers)."""
    payload = {
        "format": CACHE_FORMAT,
        "name": name,
        "version": version,
        "files": file_identity(files),
        "image_size": image_size,
        "options": options,
    }
    text = json.dumps(payload, sort_keys=True, default=repr)
    return hashlib.sha256(text.encode()).hexdigest()


def cache_path(key: str, *, name: str, cache_dir: str | Path | None = None) -> Path:
    """Where the entry for ``key`` lives: ``<cache_dir>/datasets/<name>-<key[:20]>.npz``."""
    root = Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir()
    return root / "datasets" / f"{name}-{key[:20]}.npz"


def write_cache(path: Path, key: str, splits: DatasetSplits) -> bool:
    """Write ``splits`` atomically to ``path``; returns False (and logs) if it cannot."""
    arrays: dict[str, np.ndarray] = {
        "train_images": splits.train.images,
        "train_labels": splits.train.labels,
    }
    if splits.test is not None:
        arrays["test_images"] = splits.test.images
        arrays["test_labels"] = splits.test.labels
    meta = {
        "key": key,
        "train_name": splits.train.name,
        "test_name": None if splits.test is None else splits.test.name,
        "class_names": list(splits.train.class_names),
    }
    arrays["meta"] = np.frombuffer(json.dumps(meta).encode(), dtype=np.uint8)
    tmp_name = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp_name = tempfile.mkstemp(prefix=path.name, suffix=".tmp", dir=path.parent)
        with os.fdopen(fd, "wb") as fh:
            np.savez(fh, **arrays)
        os.replace(tmp_name, path)
        tmp_name = None
    except OSError as exc:
        logger.warning("could not write dataset cache %s: %s", path, exc)
        return False
    finally:
        if tmp_name is not None and os.path.exists(tmp_name):
            os.unlink(tmp_name)
    logger.info("wrote dataset cache %s", path)
    return True


def read_cache(path: Path, key: str) -> DatasetSplits | None:
    """The splits stored at ``path`` under ``key``; None when absent, corrupted or stale."""
    if not path.is_file():
        return None
    try:
        with np.load(path, allow_pickle=False) as data:
            meta = json.loads(data["meta"].tobytes().decode())
            if meta.get("key") != key:
                logger.warning("dataset cache %s holds another key; rebuilding", path)
                return None
            names = tuple(meta["class_names"])
            train = ImageDataset(meta["train_name"], data["train_images"], data["train_labels"],
                                 names)
            test = None
            if meta["test_name"] is not None:
                test = ImageDataset(meta["test_name"], data["test_images"], data["test_labels"],
                                    names)
            return DatasetSplits(train=train, test=test)
    except (OSError, ValueError, KeyError, TypeError, EOFError, zipfile.BadZipFile) as exc:
        logger.warning("dataset cache %s is unreadable (%s); rebuilding", path, exc)
        return None
