"""The backfill curve of a gallery served through a query adapter (docs/adapter-serving.md).

While a collection moves from an old model to a new one behind a query adapter A (a
transformation new -> old), a new-model query q scores the backfilled items directly,
``cos(q, g_new)``, and the others through the adapter, ``c(cos(A(q), g_old))`` with ``c`` the
relation's score calibration (``compatkit.score_calibration``; identity without one), and the
index merges both groups into one top-k. That ranking is an inner product in a stacked space,

    query   [q̂, a·Â(q), b, 0]      new item [ĝ_new, 0, 0, 1]      old item [0, ĝ_old, 1, 0]

(hats: unit vectors; c(s) = a·s + b). Every stacked item has norm √2, so the cosine ranking
of the stacked vectors is the merged ranking, and the curve comes from the one metrics engine
(``compatkit.eval.curve.backfill_curve``) unchanged.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from compatkit.eval.curve import BackfillCurve, backfill_curve
from compatkit.eval.retrieval import as_features
from compatkit.score_calibration import ScoreCalibration


def _unit(x: Any, name: str) -> np.ndarray:
    """Checked features as float32 numpy with unit rows (a zero row is refused)."""
    arr = as_features(x, name).cpu().numpy().astype(np.float32)
    norms = np.linalg.norm(arr, axis=1, keepdims=True)
    zero = np.flatnonzero(norms[:, 0] == 0)
    if zero.size:
        raise ValueError(f"{name} row {int(zero[0])} is the zero vector; cosine scores need "
                         "non-zero features")
    return arr / norms


def _stack(*parts: np.ndarray | float) -> np.ndarray:
    """Concatenate column blocks; scalars become constant columns of the blocks' row count."""
    n = next(p.shape[0] for p in parts if isinstance(p, np.ndarray))
    cols = [p if isinstance(p, np.ndarray) else np.full((n, 1), p, dtype=np.float32)
            for p in parts]
    return np.concatenate(cols, axis=1).astype(np.float32)


def bridged_backfill_curve(
    query: Any,
    adapted_query: Any,
    query_labels: Any,
    old_gallery: Any,
    new_gallery: Any,
    gallery_labels: Any,
    order: Any,
    *,
    calibration: ScoreCalibration | None = None,
    old_query: Any = None,
    fractions: Sequence[float] | None = None,
    steps: int = 11,
    metrics: Sequence[str] = ("map", "cmc@1"),
    exclude_self: bool = False,
    top_k: int = 1,
    ordering: str | None = None,
) -> BackfillCurve:
    """Metrics, flips and AUCs of a gallery backfilled in ``order`` behind a query adapter.

    At fraction p the first ``⌊p·ng⌋`` items of ``order`` answer with their new vectors,
    scored by ``query``; the rest with their old vectors, scored by ``adapted_query`` and
    mapped by ``calibration`` — exactly the index's merged search. ``M(0)`` is the adapted
    cross-test M(A(new), old), ``M(1)`` the self-test M(new, new).

    Args:
        query: (nq, d_new) new-model query features.
        adapted_query: (nq, d_old) the same queries mapped by the adapter into the old space.
        old_gallery: (ng, d_old), new_gallery: (ng, d_new): the items under each model.
        calibration: the adapted group's score calibration, or None (raw cosines).
        old_query: (nq, d_old) old-model queries: flips are then counted against the old/old
            system (else against the previous step).
        Others as in ``compatkit.eval.curve.backfill_curve``.

    Raises:
        ValueError: mismatched rows or dimensions, zero or NaN rows, a bad order or fractions.
    """
    q = _unit(query, "query")
    aq = _unit(adapted_query, "adapted_query")
    go = _unit(old_gallery, "old_gallery")
    gn = _unit(new_gallery, "new_gallery")
    if aq.shape[0] != q.shape[0]:
        raise ValueError(f"adapted_query has {aq.shape[0]} rows but query {q.shape[0]}; row i "
                         "of each is the same query")
    if aq.shape[1] != go.shape[1]:
        raise ValueError(f"adapted_query has dimension {aq.shape[1]} but old_gallery "
                         f"{go.shape[1]}; the adapter maps queries into the old space")
    if gn.shape[0] != go.shape[0]:
        raise ValueError(f"new_gallery has {gn.shape[0]} rows but old_gallery {go.shape[0]}; "
                         "row i of each is the same item")
    if gn.shape[1] != q.shape[1]:
        raise ValueError(f"new_gallery has dimension {gn.shape[1]} but query {q.shape[1]}")
    scale, shift = (1.0, 0.0) if calibration is None else (calibration.scale, calibration.shift)
    d_new, d_old = q.shape[1], go.shape[1]
    stacked_query = _stack(q, scale * aq, shift, 0.0)
    stacked_new = _stack(gn, np.zeros((len(gn), d_old), np.float32), 0.0, 1.0)
    stacked_old = _stack(np.zeros((len(go), d_new), np.float32), go, 1.0, 0.0)
    stacked_old_query = None
    if old_query is not None:
        oq = _unit(old_query, "old_query")
        if oq.shape != (q.shape[0], d_old):
            raise ValueError(f"old_query must have shape {(q.shape[0], d_old)}, got {oq.shape}")
        stacked_old_query = _stack(np.zeros((len(oq), d_new), np.float32), oq, 0.0, 0.0)
    return backfill_curve(
        stacked_query, query_labels, stacked_old, stacked_new, gallery_labels, order,
        fractions=fractions, steps=steps, metrics=metrics, distance="cosine",
        exclude_self=exclude_self,
        reference="old_old" if old_query is not None else "previous_step",
        old_query=stacked_old_query, reference_gallery=stacked_old, top_k=top_k,
        ordering=ordering)
