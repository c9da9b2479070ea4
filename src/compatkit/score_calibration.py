"""Score calibration for a gallery searched by two routes at once (docs/adapter-serving.md).

While a collection is backfilled behind a query adapter (a transformation ``new -> old``), a
new-model query scores the new items directly and the old items through the adapter. The two
groups' cosine scores live on different scales, so their merged top-k favours one group. A
``ScoreCalibration`` is an increasing affine map ``scale · s + shift`` of the adapted group's
scores onto the direct group's scale, fitted on a paired sample by matching the mean and
standard deviation of the two score distributions' upper tails: each sample query's top
``tail`` fraction of neighbours, the scores a top-k is made of. (Matching the whole
distributions instead, ``tail=1``, is dominated by far negatives and over-ranks the adapted
group early in the backfill; docs/RESULTS.md, "Serving through a query adapter".) Numpy
only: the server imports it without torch or the metrics engine; ``compatkit.eval.bridged``
measures what it buys.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np

#: Items of the paired sample used by the fit (a seeded subsample beyond): n² scores each.
MAX_FIT_ITEMS = 2000
#: The fewest paired items a fit accepts.
MIN_FIT_ITEMS = 3
#: The fraction of each sample query's other items whose scores the fit matches (its top).
DEFAULT_TAIL = 0.1


@dataclass(frozen=True)
class ScoreCalibration:
    """``scale · score + shift`` for the scores of an adapted route (``scale > 0``, so the
    order within the route is kept); ``pairs`` is the size of the sample it was fitted on."""

    scale: float
    shift: float
    pairs: int

    def __post_init__(self) -> None:
        if not (isinstance(self.scale, int | float) and math.isfinite(self.scale)
                and self.scale > 0):
            raise ValueError(f"calibration scale must be a finite number > 0, got {self.scale!r}")
        if not (isinstance(self.shift, int | float) and math.isfinite(self.shift)):
            raise ValueError(f"calibration shift must be a finite number, got {self.shift!r}")
        if isinstance(self.pairs, bool) or not isinstance(self.pairs, int) or self.pairs < 1:
            raise ValueError(f"calibration pairs must be a positive integer, got {self.pairs!r}")

    def apply(self, scores: np.ndarray) -> np.ndarray:
        """The calibrated scores (float32, same shape)."""
        return (np.asarray(scores, dtype=np.float32) * np.float32(self.scale)
                + np.float32(self.shift))

    def to_json(self) -> dict[str, Any]:
        """A JSON-ready dict (what the index stores with its relation)."""
        return {"scale": self.scale, "shift": self.shift, "pairs": self.pairs}

    @classmethod
    def from_json(cls, obj: Any) -> ScoreCalibration:
        """Rebuild from ``to_json``'s dict. Raises ValueError naming what is wrong."""
        if not isinstance(obj, dict) or set(obj) != {"scale", "shift", "pairs"}:
            raise ValueError(f"a score calibration is {{scale, shift, pairs}}, got {obj!r}")
        return cls(float(obj["scale"]), float(obj["shift"]), int(obj["pairs"]))


def _unit_rows(x: Any, name: str) -> np.ndarray:
    """``x`` as float32 (n, d) with unit rows. Raises ValueError for bad shapes/values."""
    arr = np.asarray(x)
    if arr.ndim != 2 or arr.shape[1] == 0:
        raise ValueError(f"{name} must be a 2-D (n, d) array, got shape {arr.shape}")
    if not np.issubdtype(arr.dtype, np.floating):
        raise TypeError(f"{name} must be floating point, got dtype {arr.dtype}")
    arr = arr.astype(np.float32)
    bad = np.flatnonzero(~np.isfinite(arr).all(axis=1))
    if bad.size:
        raise ValueError(f"{name} row {int(bad[0])} holds NaN or infinite values")
    norms = np.linalg.norm(arr, axis=1, keepdims=True)
    zero = np.flatnonzero(norms[:, 0] == 0)
    if zero.size:
        raise ValueError(f"{name} row {int(zero[0])} is the zero vector")
    return arr / norms


def _row_tops(scores: np.ndarray, k: int) -> np.ndarray:
    """The ``k`` highest off-diagonal scores of every row, flattened (float64)."""
    scores = scores.astype(np.float64)
    np.fill_diagonal(scores, -np.inf)
    return -np.partition(-scores, k - 1, axis=1)[:, :k].ravel()


def fit_score_calibration(
    mapped: Any, target: Any, source: Any, *, tail: float = DEFAULT_TAIL,
    max_items: int = MAX_FIT_ITEMS, seed: int = 0,
) -> ScoreCalibration:
    """Fit the calibration of an adapted route on a paired sample (row i = one item).

    The adapted route scores ``mapped_i · target_j`` (a source-model query mapped into the
    target space, against stored target vectors); the direct route ``source_i · source_j``
    (cosines, j ≠ i). For every sample query i, both routes' top ``max(1, round(tail·(n-1)))``
    scores are kept; the map sends the mean and standard deviation of the adapted ones onto
    those of the direct ones. Above ``max_items`` items a seeded subsample is used.

    Shapes: mapped (n, d_t), target (n, d_t), source (n, d_s).

    Raises:
        ValueError: mismatched rows or dimensions, fewer than 3 items, ``tail`` outside
            (0, 1], NaN/inf or zero rows, or scores with no spread.
    """
    if not (isinstance(tail, int | float) and 0 < tail <= 1):
        raise ValueError(f"tail must be a fraction in (0, 1], got {tail!r}")
    m = _unit_rows(mapped, "mapped vectors")
    t = _unit_rows(target, "target vectors")
    s = _unit_rows(source, "source vectors")
    if not len(m) == len(t) == len(s):
        raise ValueError(f"the paired sample needs one row per item in each array, got "
                         f"{len(m)} mapped, {len(t)} target and {len(s)} source rows")
    if m.shape[1] != t.shape[1]:
        raise ValueError(f"mapped vectors have dimension {m.shape[1]} but target vectors "
                         f"{t.shape[1]}; both live in the target space")
    if len(m) < MIN_FIT_ITEMS:
        raise ValueError(f"a score calibration needs at least {MIN_FIT_ITEMS} paired items, "
                         f"got {len(m)}")
    if len(m) > max_items:
        keep = np.sort(np.random.default_rng(seed).permutation(len(m))[:max_items])
        m, t, s = m[keep], t[keep], s[keep]
    k = max(1, round(tail * (len(m) - 1)))
    adapted, direct = _row_tops(m @ t.T, k), _row_tops(s @ s.T, k)
    spread = float(adapted.std())
    if not spread > 1e-12:
        raise ValueError("the adapted scores of the paired sample have no spread; a "
                         "calibration cannot be fitted")
    scale = float(direct.std()) / spread
    if not scale > 0:
        raise ValueError("the direct scores of the paired sample have no spread; a "
                         "calibration cannot be fitted")
    return ScoreCalibration(scale, float(direct.mean()) - scale * float(adapted.mean()), len(m))
