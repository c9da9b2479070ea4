"""Vector checks at the edge and the float32 BLOB encoding stored in SQLite."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np


def as_vectors(x: Any, dim: int, *, what: str = "vectors") -> np.ndarray:
    """Check and convert ``x`` to a C-contiguous float32 (n, dim) array.

    A 1-D input of length ``dim`` is one vector. Shapes: -> (n, dim) float32.

    Raises:
        ValueError: wrong shape or dimension, a NaN/inf value (or one beyond float32's range),
            or an all-zero row (each message
            names the first bad row and the expected dimension).
    """
    try:
        with np.errstate(over="ignore"):  # beyond float32's range becomes inf, refused below
            arr = np.asarray(x, dtype=np.float32)
    except (TypeError, ValueError):
        raise ValueError(f"{what} must be numbers, got {type(x).__name__}") from None
    if arr.ndim == 1:
        arr = arr[None, :]
    if arr.ndim != 2:
        raise ValueError(f"{what} must be (n, {dim}), got shape {arr.shape}")
    if arr.shape[1] != dim:
        raise ValueError(f"{what} have dimension {arr.shape[1]}, expected {dim}")
    finite = np.isfinite(arr).all(axis=1)
    if not finite.all():
        row = int(np.flatnonzero(~finite)[0])
        raise ValueError(f"{what} row {row} holds NaN or infinite values (float32 holds at most "
                         "±3.4e38)")
    zero = ~arr.any(axis=1)
    if zero.any():
        row = int(np.flatnonzero(zero)[0])
        raise ValueError(f"{what} row {row} is all zeros; a cosine score needs a non-zero vector")
    return np.ascontiguousarray(arr)


def l2_normalize(x: np.ndarray) -> np.ndarray:
    """Rows of ``x`` divided by their L2 norm (a float32 copy); the one normalisation of the
    index (queries, stored vectors, embedder outputs). Each row is first divided by its largest
    absolute value, so neither huge (up to float32's 3.4e38) nor tiny components overflow or
    underflow the norm. An all-zero row stays zero. Shapes: (n, d) -> (n, d).

    Raises:
        ValueError: a NaN or infinite value (it has no direction).
    """
    x = np.asarray(x, dtype=np.float32)
    if x.ndim != 2:
        raise ValueError(f"l2_normalize expects an (n, d) array, got shape {x.shape}")
    finite = np.isfinite(x).all(axis=1)
    if not finite.all():
        row = int(np.flatnonzero(~finite)[0])
        raise ValueError(f"row {row} holds NaN or infinite values; it cannot be normalised")
    if x.shape[1] == 0:
        return x.copy()
    scale = np.abs(x).max(axis=1, keepdims=True)
    scaled = x / np.where(scale > 0, scale, 1.0).astype(np.float32)  # each |value| <= 1
    norms = np.linalg.norm(scaled, axis=1, keepdims=True)  # in [1, sqrt(d)] unless all zero
    return (scaled / np.where(norms > 0, norms, 1.0).astype(np.float32)).astype(
        np.float32, copy=False)


def to_blob(vector: np.ndarray) -> bytes:
    """One float32 vector as little-endian bytes. Shapes: (d,) -> 4·d bytes."""
    return np.ascontiguousarray(vector, dtype="<f4").tobytes()


def from_blob(blob: bytes, dim: int) -> np.ndarray:
    """The float32 vector of a BLOB written by ``to_blob``.

    Raises:
        ValueError: the BLOB does not hold ``dim`` float32 values.
    """
    if len(blob) != 4 * dim:
        raise ValueError(f"stored vector has {len(blob)} bytes, expected {4 * dim} (dim {dim})")
    return np.frombuffer(blob, dtype="<f4").astype(np.float32)


def stack_blobs(blobs: Sequence[bytes], dim: int) -> np.ndarray:
    """Stack BLOBs of one dimension into an (n, dim) float32 array."""
    if not blobs:
        return np.zeros((0, dim), dtype=np.float32)
    joined = b"".join(blobs)
    if len(joined) != 4 * dim * len(blobs):
        raise ValueError(f"stored vectors do not all have dimension {dim}")
    return np.frombuffer(joined, dtype="<f4").reshape(len(blobs), dim).astype(np.float32)
