"""The one metrics engine: exact chunked retrieval metrics, compatibility, backfilling, flips."""

from compatkit.eval.retrieval import KnnResult, check_features, check_labels, knn

__all__ = ["KnnResult", "check_features", "check_labels", "knn"]
