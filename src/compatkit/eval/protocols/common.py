"""Helpers shared by the benchmark protocols: file checks and ragged id lists."""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from compatkit.errors import DataRootError

PathLike = str | os.PathLike


def require_file(path: PathLike, what: str) -> Path:
    """Return ``path`` as a ``Path`` if it is an existing file.

    Raises:
        DataRootError: the file is missing (or is a directory); the message names ``what``.
    """
    p = Path(path)
    if p.is_dir():
        raise DataRootError(f"{what} {p} is a directory; expected the file itself")
    if not p.is_file():
        raise DataRootError(f"{what} not found: {p}")
    return p


@dataclass(frozen=True)
class Ragged:
    """Variable-length rows stored as offsets plus one flat array (FAISS ``lims`` style).

    Shapes:
        offsets: (n + 1,) int64, non-decreasing, ``offsets[0] == 0``.
        values: (offsets[-1],) flat row contents; row ``i`` is ``values[offsets[i]:offsets[i+1]]``.
    """

    offsets: np.ndarray
    values: np.ndarray

    @classmethod
    def from_rows(cls, rows: Sequence[Sequence[object]], *, dtype: type | str) -> Ragged:
        """Pack a list of rows into offsets plus a flat array of ``dtype``."""
        lengths = np.fromiter((len(r) for r in rows), dtype=np.int64, count=len(rows))
        offsets = np.zeros(len(rows) + 1, dtype=np.int64)
        np.cumsum(lengths, out=offsets[1:])
        flat = [v for r in rows for v in r]
        values = np.asarray(flat, dtype=dtype) if flat else np.zeros(0, dtype=dtype)
        return cls(offsets, values)

    def __len__(self) -> int:
        return int(self.offsets.shape[0] - 1)

    def row(self, i: int) -> np.ndarray:
        """Contents of row ``i`` (a view)."""
        return self.values[self.offsets[i] : self.offsets[i + 1]]

    def lengths(self) -> np.ndarray:
        """(n,) int64 length of each row."""
        return np.diff(self.offsets)

    def select(self, rows: np.ndarray) -> Ragged:
        """The rows at integer positions ``rows``, in that order."""
        rows = np.asarray(rows, dtype=np.int64)
        lengths = self.lengths()[rows]
        offsets = np.zeros(rows.shape[0] + 1, dtype=np.int64)
        np.cumsum(lengths, out=offsets[1:])
        parts = [self.row(int(i)) for i in rows]
        values = np.concatenate(parts) if parts else self.values[:0].copy()
        return Ragged(offsets, values)
