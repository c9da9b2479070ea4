"""Paired vectors for adapters, read with the one vectors-file reader, and their checks.

Row i of every file is the same item. Files are what ``compatkit.artifacts.load_vectors_file``
reads: a features file (``.safetensors``: model version, normalisation, labels, item ids), a
``.npy`` (the (N, d) matrix alone) or a ``.npz`` (``vectors``, optional ``ids``, ``metadata``
JSON objects per row, ``version``). Class labels come from each row's metadata ``label``.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from compatkit.errors import CompatkitError


@dataclass(frozen=True)
class Vectors:
    """One model's vectors of N items, with what the file says about them.

    Shapes: features (N, d) float32; labels (N,) int64 or None; ids (N,) str or None.
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
    """Read one model's vectors with ``compatkit.artifacts.load_vectors_file``; labels are the
    rows' metadata ``label`` when every row has one.

    Raises:
        CompatkitError: a missing or unreadable file, an unknown format, or values that are not
            an (N, d) matrix.
    """
    from compatkit.artifacts import load_vectors_file

    try:
        vf = load_vectors_file(path)
    except CompatkitError as err:
        raise CompatkitError(f"{what}: {err}") from None
    labels = None
    if vf.metadata and all("label" in m for m in vf.metadata):
        labels = np.array([int(m["label"]) for m in vf.metadata], dtype=np.int64)
    return Vectors(np.asarray(vf.vectors, dtype=np.float32), labels,
                   None if vf.ids is None else np.array(vf.ids, dtype=str), vf.version,
                   None if vf.manifest is None else vf.manifest.normalized)


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
