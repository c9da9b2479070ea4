"""Brute-force references for the chunked engine (dense numpy, small inputs only).

These compute every metric the slow, obvious way from the full (nq, ng) score matrix, so the
tests can compare the engine against them; :func:`check_ref_knn_with_ties` compares two top-k
tables while accepting any order among tied scores (FAISS's ``check_ref_knn_with_draws``).
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from typing import Any

import numpy as np

from compatkit.eval.metric_specs import parse_metrics
from compatkit.eval.retrieval import Distance, pairwise_scores


def sklearn_style_average_precision(relevant: np.ndarray, scores: np.ndarray) -> float:
    """AP as ``sklearn.metrics.average_precision_score``: thresholds at the distinct scores
    (descending), AP = Σ (R_t − R_{t−1}) · P_t; NaN when there is no positive.

    Shapes:
        relevant: (n,) bool.  scores: (n,) float.
    """
    relevant = np.asarray(relevant, dtype=bool)
    m = int(relevant.sum())
    if m == 0:
        return float("nan")
    order = np.argsort(-scores, kind="stable")
    s, rel = scores[order], relevant[order]
    # last position of each distinct score value = one threshold
    last = np.r_[np.flatnonzero(np.diff(s) != 0), s.size - 1]
    tps = np.cumsum(rel)[last]
    fps = (last + 1) - tps
    precision = tps / (tps + fps)
    recall = tps / m
    return float(np.sum(np.diff(np.r_[0.0, recall]) * precision))


def ranked_relevance(row_scores: np.ndarray, relevant: np.ndarray) -> np.ndarray:
    """Relevance of the items in ranked order: score descending, ties by lower index."""
    order = np.lexsort((np.arange(row_scores.size), -row_scores.astype(np.float64)))
    return relevant[order]


def reference_metrics(
    query: Any,
    query_labels: Any,
    gallery: Any,
    gallery_labels: Any,
    *,
    metrics: Sequence[str] = ("map", "cmc@1"),
    distance: Distance = "cosine",
    exclude_self: bool = False,
    per_query: bool = False,
) -> dict[str, Any]:
    """Every metric of :data:`compatkit.eval.metric_specs.METRICS`, computed densely per query.

    Returns:
        {name: mean over queries with a positive}, or {name: (nq,) array with NaN for
        queries without positives} when ``per_query``.
    """
    specs = parse_metrics(metrics)
    scores = pairwise_scores(query, gallery, distance=distance)
    ql, gl = np.asarray(query_labels), np.asarray(gallery_labels)
    nq, ng = scores.shape
    out = {s.name: np.full(nq, np.nan) for s in specs}
    for i in range(nq):
        keep = np.ones(ng, dtype=bool)
        if exclude_self:
            keep[i] = False
        row, rel_all = scores[i][keep], (gl == ql[i])[keep]
        m = int(rel_all.sum())
        if m == 0:
            continue
        rel = ranked_relevance(row, rel_all)
        hits = np.cumsum(rel)
        prec = hits / np.arange(1, rel.size + 1)
        for spec in specs:
            base, k = spec.name.split("@")[0], spec.k
            if spec.name == "map":
                value = sklearn_style_average_precision(rel_all, row)
            elif spec.name == "map@r":
                value = float(np.sum(prec[:m] * rel[:m]) / m)
            elif base == "map":
                value = float(np.sum(prec[:k] * rel[:k]) / min(m, k))
            elif base in ("cmc", "recall"):
                value = float(rel[:k].any())
            elif base == "precision":
                value = float(rel[:k].sum() / k)
            else:  # a metric added to METRICS without a reference here
                raise ValueError(f"reference_metrics has no reference for metric {spec.name!r}")
            out[spec.name][i] = value
    if per_query:
        return out
    return {name: float(np.nanmean(v)) for name, v in out.items()}


def check_ref_knn_with_ties(
    ref_scores: np.ndarray,
    ref_indices: np.ndarray,
    new_scores: np.ndarray,
    new_indices: np.ndarray,
    *,
    rtol: float = 1e-5,
    atol: float = 1e-6,
) -> None:
    """Assert that two top-k tables agree up to the order (and choice) of tied neighbours.

    Scores must match row by row; indices must match exactly where scores are distinct, and
    among a run of equal scores the index sets must match, except at the last run of a row,
    which may be cut off by k (any subset of the tied items is then accepted).

    Raises:
        AssertionError: the first row that differs, with both rows.
    """
    ref_scores, new_scores = np.asarray(ref_scores), np.asarray(new_scores)
    ref_indices, new_indices = np.asarray(ref_indices), np.asarray(new_indices)
    if ref_scores.shape != new_scores.shape or ref_indices.shape != new_indices.shape:
        raise AssertionError(
            f"shapes differ: scores {ref_scores.shape} vs {new_scores.shape}, "
            f"indices {ref_indices.shape} vs {new_indices.shape}"
        )
    np.testing.assert_allclose(new_scores, ref_scores, rtol=rtol, atol=atol)
    for i in range(ref_scores.shape[0]):
        s = ref_scores[i]
        bounds = np.r_[
            0, np.flatnonzero(~np.isclose(s[1:], s[:-1], rtol=rtol, atol=atol)) + 1, s.size
        ]
        for j, (a, b) in enumerate(itertools.pairwise(bounds)):
            ref_set, new_set = set(ref_indices[i, a:b]), set(new_indices[i, a:b])
            last_run = j == len(bounds) - 2
            if ref_set != new_set and not last_run:
                raise AssertionError(
                    f"row {i}: neighbours differ at ranks {a}..{b - 1}: "
                    f"{ref_indices[i].tolist()} vs {new_indices[i].tolist()}"
                )


def tied_features(rng: np.random.Generator, n: int, d: int) -> np.ndarray:
    """Features with many exactly tied scores under both distances, whatever the GEMM kernel.

    Each row has 1 or 4 non-zero entries of one magnitude (1 or 2) and random signs, so every
    norm is a power of two: normalised coordinates, dot products and squared distances are all
    exact in float32, and ties do not depend on the BLAS kernel's summation order.

    Shapes:
        returns: (n, d) float32.
    """
    x = np.zeros((n, d), dtype=np.float32)
    for row in x:
        count = 4 if d >= 4 and rng.random() < 0.5 else 1
        cols = rng.choice(d, size=count, replace=False)
        row[cols] = rng.choice([-1.0, 1.0], size=count) * rng.choice([1.0, 2.0])
    return x
