"""Backfilling orders: which gallery items get re-embedded first (methods.md §3,
fct-fastfill-peers.md §2.3). Shared by the lab (``compatkit.eval``'s backfill curve) and the
index's upgrade jobs; numpy only, so the server imports it without torch or the metrics engine.

Every ordering returns a permutation of ``range(ng)``; the backfill set at fraction p is its
first ``⌊p·ng⌋`` items, so the sets are prefix-closed. Score-based orders sort descending and
break ties by the lower gallery index, so they are deterministic.

============  ===============================================================  ==============
name          order                                                             needs new
============  ===============================================================  ==============
random        seeded random permutation                                         no
uncertainty   descending uncertainty of softmax(W_o · old / T): ``entropy``    no
              (RACT), ``least_confidence`` (1 − max p) or ``margin``
              (1 − (p₁ − p₂))
sigma         descending predicted σ (FastFill)                                 no
oracle        descending ‖new − old‖ (analysis only)                            yes
given         an explicit permutation (array or .npy / .txt file)               no
============  ===============================================================  ==============
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, Literal

import numpy as np

from compatkit.registry import Registry

UncertaintyKind = Literal["entropy", "least_confidence", "margin"]
UNCERTAINTY_KINDS: tuple[str, ...] = ("entropy", "least_confidence", "margin")

OrderingFn = Callable[..., np.ndarray]

#: Ordering name → function ``(n_gallery, *, <its inputs>) -> permutation``.
ORDERINGS: Registry[OrderingFn] = Registry("backfill ordering")


def _check_features(x: Any, name: str) -> np.ndarray:
    """Validate a feature matrix and return it as float32 numpy (as ``compatkit.eval`` does).

    Raises:
        TypeError: ``x`` is not floating point.
        ValueError: ``x`` is not 2-D, has no columns, or holds NaN/inf (the first bad row named).
    """
    arr = np.asarray(x)
    if arr.ndim != 2:
        raise ValueError(f"{name} must be a 2-D (n, d) feature array, got shape {arr.shape}")
    if not np.issubdtype(arr.dtype, np.floating):
        raise TypeError(f"{name} must be a floating-point array, got dtype {arr.dtype}")
    if arr.shape[1] == 0:
        raise ValueError(f"{name} must have at least one feature column, got shape {arr.shape}")
    arr = np.ascontiguousarray(arr, dtype=np.float32)
    finite_rows = np.isfinite(arr).all(axis=1)
    if not finite_rows.all():
        bad_rows = np.flatnonzero(~finite_rows)
        row = int(bad_rows[0])
        raise ValueError(
            f"{name} holds non-finite values (NaN or inf) in {bad_rows.size} row(s), "
            f"first at row {row}: {arr[row][~np.isfinite(arr[row])][:3].tolist()}"
        )
    return arr


def _check_n(n: int) -> int:
    if isinstance(n, bool) or not isinstance(n, (int, np.integer)) or n < 0:
        raise ValueError(f"the gallery size must be a non-negative integer, got {n!r}")
    return int(n)


def descending_order(scores: Any, name: str = "scores") -> np.ndarray:
    """Permutation sorting ``scores`` descending, ties by lower index.

    Raises:
        ValueError: not 1-D or non-finite values.
    """
    s = np.asarray(scores, dtype=np.float64)
    if s.ndim != 1:
        raise ValueError(f"{name} must be 1-D (one score per gallery item), got shape {s.shape}")
    if not np.isfinite(s).all():
        raise ValueError(
            f"{name} holds non-finite values at index {np.flatnonzero(~np.isfinite(s))[0]}"
        )
    return np.argsort(-s, kind="stable").astype(np.int64)


def _check_len(arr: np.ndarray, n: int, name: str) -> None:
    if arr.shape[0] != n:
        raise ValueError(f"{name} has {arr.shape[0]} rows but the gallery has {n} items")


@ORDERINGS.register("random")
def random_order(n: int, *, seed: int = 0) -> np.ndarray:
    """Seeded uniformly random permutation (the baseline)."""
    n = _check_n(n)
    return np.random.default_rng(seed).permutation(n).astype(np.int64)


def uncertainty_scores(
    old_features: Any,
    classifier: Any,
    *,
    temperature: float = 1.0,
    kind: UncertaintyKind = "entropy",
) -> np.ndarray:
    """Uncertainty of each stored old feature under the old classifier, higher = less sure.

    ``p = softmax(W_o · f / T)`` with features used as stored; ``entropy`` = −Σ p log p,
    ``least_confidence`` = 1 − max p, ``margin`` = 1 − (p₁ − p₂) (p₂ = 0 with one class).

    Shapes:
        old_features: (ng, d).  classifier: (C, d) old classifier rows.  returns: (ng,).

    Raises:
        ValueError: shape mismatch, non-positive temperature or unknown kind.
    """
    feats = _check_features(old_features, "old_features").astype(np.float64)
    w = _check_features(classifier, "classifier").astype(np.float64)
    if w.shape[1] != feats.shape[1]:
        raise ValueError(
            f"dimension mismatch: old_features has shape {feats.shape} and classifier has "
            f"shape {w.shape}; the classifier needs one (C, d) row per class"
        )
    if not temperature > 0 or not math.isfinite(temperature):
        raise ValueError(f"temperature must be a positive number, got {temperature!r}")
    if kind not in UNCERTAINTY_KINDS:
        raise ValueError(f"unknown uncertainty kind {kind!r}; expected one of {UNCERTAINTY_KINDS}")
    logits = feats @ w.T / temperature
    logits -= logits.max(axis=1, keepdims=True)
    log_p = logits - np.log(np.exp(logits).sum(axis=1, keepdims=True))
    p = np.exp(log_p)
    if kind == "entropy":
        return -(p * log_p).sum(axis=1)
    top = np.sort(p, axis=1)[:, ::-1]
    if kind == "least_confidence":
        return 1.0 - top[:, 0]
    second = top[:, 1] if top.shape[1] > 1 else np.zeros(top.shape[0])
    return 1.0 - (top[:, 0] - second)


@ORDERINGS.register("uncertainty")
def uncertainty_order(
    n: int,
    *,
    old_features: Any,
    classifier: Any,
    temperature: float = 1.0,
    kind: UncertaintyKind = "entropy",
) -> np.ndarray:
    """Most uncertain old features first (RACT): descending :func:`uncertainty_scores`."""
    n = _check_n(n)
    u = uncertainty_scores(old_features, classifier, temperature=temperature, kind=kind)
    _check_len(u, n, "old_features")
    return descending_order(u, "uncertainty")


@ORDERINGS.register("sigma")
def sigma_order(n: int, *, sigma: Any) -> np.ndarray:
    """Largest predicted σ first (FastFill); (ng, k) σ vectors are averaged over k."""
    n = _check_n(n)
    s = np.asarray(sigma, dtype=np.float64)
    if s.ndim == 2:
        s = s.mean(axis=1)
    if s.ndim != 1:
        raise ValueError(f"sigma must have shape (ng,) or (ng, k), got {np.shape(sigma)}")
    _check_len(s, n, "sigma")
    return descending_order(s, "sigma")


@ORDERINGS.register("oracle")
def oracle_order(n: int, *, new_features: Any, old_features: Any) -> np.ndarray:
    """Largest ‖new − old‖ first; needs the new features, so for analysis only."""
    n = _check_n(n)
    new = _check_features(new_features, "new_features").astype(np.float64)
    old = _check_features(old_features, "old_features").astype(np.float64)
    if new.shape != old.shape:
        raise ValueError(
            f"new_features has shape {new.shape} but old_features has {old.shape}; the oracle "
            "order compares each item's two features"
        )
    _check_len(new, n, "new_features")
    return descending_order(np.linalg.norm(new - old, axis=1), "distance")


def load_order(path: str | os.PathLike[str]) -> np.ndarray:
    """Read an order from a ``.npy`` file or a text file with one index per line."""
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"order file {str(p)!r} does not exist")
    if p.suffix == ".npy":
        return np.load(p, allow_pickle=False)
    return np.loadtxt(p, dtype=np.int64, ndmin=1)


@ORDERINGS.register("given")
def given_order(n: int, *, order: Any) -> np.ndarray:
    """An explicit order (array or file path), checked to be a permutation of range(n)."""
    n = _check_n(n)
    arr = load_order(order) if isinstance(order, (str, os.PathLike)) else np.asarray(order)
    return check_permutation(arr, n)


def check_permutation(order: Any, n: int) -> np.ndarray:
    """Return ``order`` as int64 if it is a permutation of ``range(n)``.

    Raises:
        ValueError: wrong shape, non-integers, out-of-range or repeated indices.
    """
    arr = np.asarray(order)
    if arr.ndim != 1 or arr.shape[0] != n:
        raise ValueError(
            f"order must be a permutation of {n} gallery indices, got shape {arr.shape}"
        )
    if arr.size and not np.issubdtype(arr.dtype, np.integer):
        raise ValueError(f"order must hold integer gallery indices, got dtype {arr.dtype}")
    arr = arr.astype(np.int64)
    if arr.size and (arr.min() < 0 or arr.max() >= n):
        bad = arr[(arr < 0) | (arr >= n)][0]
        raise ValueError(f"order holds index {bad}, outside 0..{n - 1}")
    counts = np.bincount(arr, minlength=n)
    if (counts != 1).any():
        raise ValueError(
            f"order is not a permutation: index {int(np.flatnonzero(counts > 1)[0])} repeats"
        )
    return arr


def backfill_order(name: str, n: int, **inputs: Any) -> np.ndarray:
    """The permutation of ordering ``name`` (see :data:`ORDERINGS`) for a gallery of ``n``.

    Raises:
        UnknownNameError: unknown ordering (the known ones listed).
        TypeError: an input the ordering does not take, or a missing one.
    """
    fn = ORDERINGS.get(name)
    try:
        return fn(n, **inputs)
    except TypeError as exc:
        if "argument" in str(exc):
            raise TypeError(f"backfill ordering {name!r}: {exc}") from None
        raise


def backfill_count(n: int, fraction: float) -> int:
    """``⌊p·n⌋`` items backfilled at fraction p (a 1e-9 slack absorbs float error, 0.29·100)."""
    if not 0.0 <= fraction <= 1.0:
        raise ValueError(f"backfill fraction must be in [0, 1], got {fraction!r}")
    return min(n, math.floor(fraction * n + 1e-9))


def backfill_set(order: Sequence[int] | np.ndarray, fraction: float) -> np.ndarray:
    """Gallery indices backfilled at ``fraction``: the first ``⌊p·ng⌋`` of ``order``."""
    arr = np.asarray(order, dtype=np.int64)
    return arr[: backfill_count(arr.size, fraction)]
