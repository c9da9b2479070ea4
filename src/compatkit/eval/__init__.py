"""The one metrics engine: exact chunked retrieval metrics, compatibility, backfill curves, flips.

Arrays in, numbers out: features and labels go in, nothing here embeds images. Plots live in
``compatkit.eval.plots`` (needs the ``plots`` extra); dataset protocols (GLDv2, ROxford/RParis,
TAR@FAR) in ``compatkit.eval.protocols``. Backfill orderings live in ``compatkit.ordering``
(shared with the index, numpy only).
"""

from compatkit.eval.bridged import bridged_backfill_curve
from compatkit.eval.compat import (
    CompatibilityMatrix,
    EmbeddingSet,
    average_compatibility,
    average_multimodel_accuracy,
    compatibility_matrix,
    is_compatible,
    update_gain,
)
from compatkit.eval.curve import (
    BackfillCurve,
    auc_mean,
    auc_trapezoid,
    backfill_curve,
    mixed_gallery,
)
from compatkit.eval.flips import FlipRates, flip_rates, top_k_correct
from compatkit.eval.metric_specs import METRICS
from compatkit.eval.metrics import per_query_metrics, retrieval_metrics
from compatkit.eval.retrieval import (
    KnnResult,
    check_features,
    check_labels,
    knn,
    pairwise_scores,
)

__all__ = [
    "METRICS",
    "BackfillCurve",
    "CompatibilityMatrix",
    "EmbeddingSet",
    "FlipRates",
    "KnnResult",
    "auc_mean",
    "auc_trapezoid",
    "average_compatibility",
    "average_multimodel_accuracy",
    "backfill_curve",
    "bridged_backfill_curve",
    "check_features",
    "check_labels",
    "compatibility_matrix",
    "flip_rates",
    "is_compatible",
    "knn",
    "mixed_gallery",
    "pairwise_scores",
    "per_query_metrics",
    "retrieval_metrics",
    "top_k_correct",
    "update_gain",
]
