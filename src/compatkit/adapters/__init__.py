"""Adapters from paired vectors: upgrade between any two embedding models without images.

Given the embeddings of the same items under an old and a new model, fit a map (``procrustes``,
``linear``, ``lowrank``, ``mlp`` or ``fct``) in either direction, save it as a transformation
artifact, and measure on held-out items how much of the upgrade it keeps (docs/adapters.md).
"""

from compatkit.adapters.evaluate import (
    AdapterReport,
    BudgetRow,
    evaluate_adapter,
    neighbour_overlap,
    pair_budget,
    retained_fraction,
)
from compatkit.adapters.fit import DIRECTIONS, FittedAdapter, fit_adapter, save_adapter
from compatkit.adapters.io import Vectors, check_pairs, load_vectors
from compatkit.adapters.kinds import KINDS, FitOptions, NotEnoughPairsError, kind_summaries

__all__ = [
    "DIRECTIONS",
    "KINDS",
    "AdapterReport",
    "BudgetRow",
    "FitOptions",
    "FittedAdapter",
    "NotEnoughPairsError",
    "Vectors",
    "check_pairs",
    "evaluate_adapter",
    "fit_adapter",
    "kind_summaries",
    "load_vectors",
    "neighbour_overlap",
    "pair_budget",
    "retained_fraction",
    "save_adapter",
]
