"""Negative and positive flips between two retrieval systems (methods.md §3).

A query is correct under a system when a positive is among its top-k results (top-1 by
default). With a reference system R and a new system S:
``NFR = mean_q [R correct ∧ S wrong]``, ``PFR = mean_q [R wrong ∧ S correct]`` and
``NFI = #negative flips / #queries wrong under S`` (0 when S makes no mistake).
"""

from __future__ import annotations

from typing import Any, NamedTuple

import numpy as np

from compatkit.eval.ranking import check_exclude_self
from compatkit.eval.retrieval import (
    DEFAULT_QUERY_BLOCK,
    Distance,
    as_features,
    as_labels,
    check_distance,
    check_positive_int,
    knn,
)


class FlipRates(NamedTuple):
    """Flip statistics of a new system against a reference, each in [0, 1]."""

    nfr: float
    pfr: float
    nfi: float


def _as_bool(x: Any, name: str) -> np.ndarray:
    arr = np.asarray(x)
    if arr.ndim != 1:
        raise ValueError(f"{name} must be a 1-D per-query array, got shape {arr.shape}")
    if arr.dtype != np.bool_:
        if not np.isin(arr, (0, 1)).all():
            raise ValueError(f"{name} must hold booleans or 0/1 values, got {np.unique(arr)[:5]}")
        arr = arr.astype(bool)
    return arr


def flip_rates(ref_correct: Any, new_correct: Any) -> FlipRates:
    """NFR, PFR and NFI from per-query correctness of the reference and the new system.

    Shapes:
        ref_correct, new_correct: (nq,) bool or 0/1, the same queries in the same order.

    Raises:
        ValueError: lengths differ, no queries, or values other than booleans / 0 / 1.
    """
    ref = _as_bool(ref_correct, "ref_correct")
    new = _as_bool(new_correct, "new_correct")
    if ref.shape != new.shape:
        raise ValueError(
            f"ref_correct has {ref.size} queries but new_correct has {new.size}; "
            "they must describe the same queries"
        )
    if ref.size == 0:
        raise ValueError("flip rates need at least one query, got none")
    negative = int(np.sum(ref & ~new))
    positive = int(np.sum(~ref & new))
    wrong = int(np.sum(~new))
    return FlipRates(
        nfr=negative / ref.size,
        pfr=positive / ref.size,
        nfi=negative / wrong if wrong else 0.0,
    )


def top_k_correct(
    query: Any,
    query_labels: Any,
    gallery: Any,
    gallery_labels: Any,
    *,
    k: int = 1,
    distance: Distance = "cosine",
    exclude_self: bool = False,
    chunk_size: int = 4096,
    query_block: int = DEFAULT_QUERY_BLOCK,
) -> np.ndarray:
    """Per-query correctness: a positive among the top k (ties to the lower gallery index),
    from an exact :func:`knn`; agrees with the engine's ``cmc@k`` per query.

    Queries without any positive in the gallery are never correct.

    Shapes:
        returns: (nq,) bool.
    """
    k = check_positive_int(k, "k")
    check_distance(distance)
    q = as_features(query, "query")
    ql = as_labels(query_labels, q.shape[0], "query_labels")
    gl = as_labels(gallery_labels, np.shape(gallery)[0], "gallery_labels")
    check_exclude_self(exclude_self, ql, gl)
    nn = knn(
        q,
        gallery,
        k,
        distance=distance,
        exclude_self=exclude_self,
        chunk_size=chunk_size,
        query_block=query_block,
    ).indices
    gl_np, ql_np = gl.cpu().numpy(), ql.cpu().numpy()
    hit = (nn >= 0) & (gl_np[np.maximum(nn, 0)] == ql_np[:, None])
    return hit.any(axis=1)
