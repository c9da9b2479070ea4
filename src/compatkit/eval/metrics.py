"""Exact retrieval metrics of query features against gallery features: the public API of the
metrics engine.

Metric names are those of :data:`compatkit.eval.metric_specs.METRICS`: ``map``, ``map@r``,
``map@k`` (e.g. ``map@100``), ``cmc@k`` (alias ``recall@k``), ``precision@k``. Every metric
averages over the queries that have at least one positive in the gallery. The counting is
``compatkit.eval.ranking``'s one chunked walk over the gallery.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from compatkit.eval.metric_specs import METRICS, parse_metrics
from compatkit.eval.ranking import iter_positive_ranks, prepare_inputs
from compatkit.eval.retrieval import DEFAULT_QUERY_BLOCK, Distance, check_positive_int

__all__ = ["METRICS", "per_query_metrics", "retrieval_metrics"]


def per_query_metrics(
    query: Any,
    query_labels: Any,
    gallery: Any,
    gallery_labels: Any,
    *,
    metrics: Sequence[str] = ("map", "cmc@1"),
    distance: Distance = "cosine",
    exclude_self: bool = False,
    chunk_size: int = 4096,
    query_block: int = DEFAULT_QUERY_BLOCK,
) -> dict[str, np.ndarray]:
    """Per-query values of each metric; NaN for queries without a positive in the gallery.

    Shapes:
        returns: {metric name: (nq,) float64}, in the order of ``metrics``.

    Raises:
        ValueError: as :func:`retrieval_metrics`.
    """
    specs = parse_metrics(metrics)
    chunk_size = check_positive_int(chunk_size, "chunk_size")
    query_block = check_positive_int(query_block, "query_block")
    inputs = prepare_inputs(
        query, query_labels, gallery, gallery_labels, distance=distance, exclude_self=exclude_self
    )
    nq = inputs.query_labels.numel()
    out = {s.name: np.full(nq, np.nan) for s in specs}
    for qidx, stats in iter_positive_ranks(
        inputs, exclude_self=exclude_self, chunk_size=chunk_size, query_block=query_block
    ):
        idx = qidx.cpu().numpy()
        for spec in specs:
            out[spec.name][idx] = spec.per_query(stats).cpu().numpy()
    return out


def retrieval_metrics(
    query: Any,
    query_labels: Any,
    gallery: Any,
    gallery_labels: Any,
    *,
    metrics: Sequence[str] = ("map", "cmc@1"),
    distance: Distance = "cosine",
    exclude_self: bool = False,
    chunk_size: int = 4096,
    query_block: int = DEFAULT_QUERY_BLOCK,
) -> dict[str, float]:
    """Exact retrieval metrics of ``query`` against ``gallery``.

    Args:
        query: (nq, d) float features.            query_labels: (nq,) int class ids.
        gallery: (ng, d) float features.          gallery_labels: (ng,) int class ids.
        metrics: names from :data:`METRICS`, e.g. ``("map", "cmc@1", "map@100")``.
        distance: ``"cosine"`` or ``"l2"`` (negative squared distance as the score).
        exclude_self: query i and gallery i are the same item; skip that pair.
            Requires nq == ng and equal labels.
        chunk_size: gallery rows scored at once; extra memory is about
            query_block × chunk_size floats, never nq × ng.
        query_block: queries scored at once.

    Returns:
        {metric name as given: value in [0, 1]}, in the order of ``metrics``; each is the mean
        over the queries that have at least one positive.

    Raises:
        ValueError: dimension mismatch, NaN/inf features, labels whose length differs from
            their features, an unknown metric (the known ones listed), exclude_self with
            different sets, or no query with a positive in the gallery.
    """
    specs = parse_metrics(metrics)
    chunk_size = check_positive_int(chunk_size, "chunk_size")
    query_block = check_positive_int(query_block, "query_block")
    inputs = prepare_inputs(
        query, query_labels, gallery, gallery_labels, distance=distance, exclude_self=exclude_self
    )
    sums = dict.fromkeys((s.name for s in specs), 0.0)
    counted = 0
    for _, stats in iter_positive_ranks(
        inputs, exclude_self=exclude_self, chunk_size=chunk_size, query_block=query_block
    ):
        valid = stats.num_positives > 0
        counted += int(valid.sum())
        for spec in specs:
            sums[spec.name] += float(spec.per_query(stats)[valid].sum())
    if counted == 0:
        raise ValueError(
            "no query has a positive (same-label) item in the gallery"
            + (" once self-matches are excluded" if exclude_self else "")
            + "; retrieval metrics are undefined"
        )
    return {name: total / counted for name, total in sums.items()}
