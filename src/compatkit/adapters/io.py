"""Reading paired vectors: ``.npy``, ``.npz`` and compatkit features files, with their checks.

Row i of every file is the same item. A features file (``.safetensors``) brings its model
version, normalisation, labels and item ids; a ``.npz`` may hold ``features`` (or a single
array) and ``labels``; a ``.npy`` is the (N, d) matrix alone.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from compatkit.errors import CompatkitError


@dataclass(frozen=True)
class Vectors:
    """One model's vectors of N items, with what the file says about them.

    Shapes: features (N, d) float32; labels (N,) int64 or None; ids (N,) int64 or None.
    """

    features: np.ndarray
    labels: np.ndarray | None = None
    ids: np.ndarray | None = None
    version: str | None = None
    normalized: bool | None = None

    def __len__(self) -> int:
        return int(self.features.shape[0])

    @property
    def dim(self) -> int:
        """The embedding dimension d."""
        return int(self.features.shape[1])

    def rows(self, index: np.ndarray) -> Vectors:
        """The same vectors restricted to ``index`` (labels and ids follow)."""
        return Vectors(self.features[index],
                       None if self.labels is None else self.labels[index],
                       None if self.ids is None else self.ids[index],
                       self.version, self.normalized)


def load_vectors(path: str | Path, what: str = "vectors") -> Vectors:
    """Read one model's vectors from a ``.npy``, ``.npz`` or compatkit features file.

    Raises:
        CompatkitError: a missing or unreadable file, an unknown suffix, a ``.npz`` without a
            ``features`` array (when it holds several), or values that are not an (N, d) matrix.
    """
    path = Path(path)
    if not path.is_file():
        raise CompatkitError(f"{what} file {path} does not exist")
    suffix = path.suffix.lower()
    if suffix == ".safetensors":
        from compatkit.artifacts import load_features

        fs = load_features(path)
        return _checked(Vectors(fs.features, fs.labels, fs.ids, fs.manifest.model_version,
                                fs.manifest.normalized), path, what)
    if suffix not in (".npy", ".npz"):
        raise CompatkitError(f"{what} file {path}: expected .npy, .npz or a compatkit features "
                             f"file (.safetensors), got suffix {path.suffix!r}")
    try:
        loaded = np.load(path, allow_pickle=False)
    except (ValueError, OSError) as err:
        raise CompatkitError(f"cannot read {what} from {path}: {err}") from None
    if suffix == ".npy":
        return _checked(Vectors(loaded), path, what)
    with loaded:
        keys = list(loaded.keys())
        if "features" in keys:
            features = loaded["features"]
        elif len(keys) == 1:
            features = loaded[keys[0]]
        else:
            raise CompatkitError(f"{what} file {path} holds arrays {keys}; name the vectors "
                                 "'features' (and optionally 'labels', 'ids')")
        labels = loaded["labels"] if "labels" in keys else None
        ids = loaded["ids"] if "ids" in keys else None
    return _checked(Vectors(features, labels, ids), path, what)


def _checked(v: Vectors, path: Path, what: str) -> Vectors:
    feats = np.asarray(v.features)
    if feats.ndim != 2 or feats.shape[1] < 1 or not np.issubdtype(feats.dtype, np.number):
        raise CompatkitError(f"{what} in {path} must be a numeric (N, d) matrix, got shape "
                             f"{feats.shape} of {feats.dtype}")
    n = feats.shape[0]
    for name, arr in (("labels", v.labels), ("ids", v.ids)):
        if arr is not None and np.shape(arr) != (n,):
            raise CompatkitError(f"{what} in {path}: {name} must have shape ({n},), got "
                                 f"{np.shape(arr)}")
    return Vectors(feats.astype(np.float32, copy=False),
                   None if v.labels is None else np.asarray(v.labels).astype(np.int64),
                   None if v.ids is None else np.asarray(v.ids).astype(np.int64),
                   v.version, v.normalized)


def check_pairs(old: Vectors, new: Vectors, side: Vectors | None = None) -> None:
    """Check that ``old``, ``new`` (and ``side``) describe the same items row by row.

    Raises:
        CompatkitError: different numbers of rows, item ids or labels that disagree, or rows
            holding NaN or inf (their first indices are named).
    """
    parts = {"old": old, "new": new} | ({} if side is None else {"side": side})
    lengths = {name: len(v) for name, v in parts.items()}
    if len(set(lengths.values())) != 1:
        raise CompatkitError(f"pair files must have one row per item in the same order; got "
                             f"{', '.join(f'{k} {n} rows' for k, n in lengths.items())}")
    for name, v in parts.items():
        bad = np.flatnonzero(~np.isfinite(v.features).all(axis=1))
        if bad.size:
            raise CompatkitError(f"{name} vectors hold NaN or inf in {bad.size} rows (first: "
                                 f"{bad[:5].tolist()}); drop those items from every pair file")
    for field in ("ids", "labels"):
        known = {k: getattr(v, field) for k, v in parts.items() if getattr(v, field) is not None}
        names = list(known)
        for other in names[1:]:
            if not np.array_equal(known[names[0]], known[other]):
                row = int(np.flatnonzero(known[names[0]] != known[other])[0])
                raise CompatkitError(f"{names[0]} and {other} disagree on the {field} of row "
                                     f"{row}: rows must be the same items in the same order")
