"""How much of an upgrade an adapter keeps, measured on held-out items with ``compatkit.eval``.

Leave-one-out retrieval on the held-out items (every item a query against the others):

- adapted: M(new, A(old)) for ``old-to-new`` (new queries, adapted gallery) or M(A(new), old)
  for ``new-to-old`` (adapted queries, stored old gallery);
- old/old and new/new, the references without and with a full re-embed;
- retained fraction = (adapted − old/old) / (new/new − old/old): 1 keeps the whole gain of the
  upgrade, 0 none of it (None when new/new equals old/old);
- negative flips of the adapted system against old/old (top-1), and the mean top-k neighbour
  overlap of the adapted search with the new/new search.

``pair_budget`` fits each kind on growing nested samples of the pairs and reports the retained
fraction at each size, so a user knows how many items to re-embed before switching.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
from torch import nn

from compatkit.adapters.fit import as_vectors, check_direction, fit_adapter
from compatkit.adapters.io import Vectors, check_pairs
from compatkit.adapters.kinds import FitOptions, NotEnoughPairsError
from compatkit.errors import CompatkitError
from compatkit.eval import flip_rates, knn, retrieval_metrics, top_k_correct, update_gain
from compatkit.feature_upgrade import apply_transformation

DEFAULT_METRICS: tuple[str, ...] = ("map", "cmc@1")
DEFAULT_BUDGETS: tuple[int, ...] = (100, 1_000, 10_000)


def retained_fraction(adapted: float, old_old: float, new_new: float) -> float | None:
    """(adapted − old/old) / (new/new − old/old), ``compatkit.eval.update_gain`` with new/new
    as the paragon; None when the upgrade gains nothing."""
    if new_new == old_old:
        return None
    return update_gain(old_old, adapted, new_new)


def neighbour_overlap(query_a: np.ndarray, gallery_a: np.ndarray, query_b: np.ndarray,
                      gallery_b: np.ndarray, k: int = 10) -> float:
    """Mean fraction of the k leave-one-out neighbours that search a and search b share.

    Shapes: query_x (n, d_x), gallery_x (n, d_x), the same n items in every array.
    """
    a = knn(query_a, gallery_a, k, exclude_self=True).indices
    b = knn(query_b, gallery_b, k, exclude_self=True).indices
    shared = ((a[:, :, None] == b[:, None, :]) & (a[:, :, None] >= 0)).any(axis=2).sum(axis=1)
    return float(np.mean(shared / k))


@dataclass(frozen=True)
class AdapterReport:
    """Held-out quality of one adapter; each metric dict is {metric name: value}."""

    direction: str
    items: int
    adapted: dict[str, float]
    old_old: dict[str, float]
    new_new: dict[str, float]
    retained: dict[str, float | None]
    nfr: float
    overlap_at_k: float
    k: int

    def to_json(self) -> dict[str, Any]:
        """JSON-ready dict of every field."""
        return {"direction": self.direction, "items": self.items, "adapted": self.adapted,
                "old_old": self.old_old, "new_new": self.new_new, "retained": self.retained,
                "nfr": self.nfr, f"overlap@{self.k}": self.overlap_at_k}


def evaluate_adapter(
    module: nn.Module, old: Vectors | np.ndarray, new: Vectors | np.ndarray, direction: str, *,
    labels: np.ndarray | None = None, side: Vectors | np.ndarray | None = None,
    metrics: Sequence[str] = DEFAULT_METRICS, k: int = 10,
) -> AdapterReport:
    """Leave-one-out quality of ``module`` on held-out items embedded by both models.

    Args:
        module: the adapter (a transformation module) in ``direction``.
        old, new: (n, d_old), (n, d_new) vectors of the same held-out items.
        direction: ``old-to-new`` or ``new-to-old``.
        labels: (n,) class ids; default the labels carried by ``old`` or ``new``.
        side: (n, d_side) side-information, for an adapter with a side input.
        metrics: names of the ``compatkit.eval`` engine.  k: neighbours compared with new/new.

    Raises:
        CompatkitError: misaligned items, missing labels, or vectors whose dimension is not the
            adapter's.  ValueError: as ``compatkit.eval.retrieval_metrics``.
    """
    check_direction(direction)
    old_v, new_v = as_vectors(old, "old"), as_vectors(new, "new")
    side_v = None if side is None else as_vectors(side, "side")
    check_pairs(old_v, new_v, side_v)
    labels = _labels(labels, old_v, new_v)
    source, target = (old_v, new_v) if direction == "old-to-new" else (new_v, old_v)
    if source.dim != module.d_in or target.dim != module.d_out:
        raise CompatkitError(f"the adapter maps {module.d_in}-d to {module.d_out}-d vectors "
                             f"({direction}), but the held-out source vectors are {source.dim}-d "
                             f"and the target ones {target.dim}-d")
    mapped = apply_transformation(module, source.features,
                                  None if side_v is None else side_v.features)
    o, n = old_v.features, new_v.features
    query, gallery = (n, mapped) if direction == "old-to-new" else (mapped, o)

    def m(q: np.ndarray, g: np.ndarray) -> dict[str, float]:
        return retrieval_metrics(q, labels, g, labels, metrics=list(metrics), exclude_self=True)

    adapted, old_old, new_new = m(query, gallery), m(o, o), m(n, n)
    ref = top_k_correct(o, labels, o, labels, exclude_self=True)
    got = top_k_correct(query, labels, gallery, labels, exclude_self=True)
    return AdapterReport(
        direction=direction, items=len(labels), adapted=adapted, old_old=old_old,
        new_new=new_new,
        retained={name: retained_fraction(adapted[name], old_old[name], new_new[name])
                  for name in adapted},
        nfr=flip_rates(ref, got).nfr,
        overlap_at_k=neighbour_overlap(query, gallery, n, n, k=min(k, len(labels) - 1)),
        k=k,
    )


def _labels(labels: np.ndarray | None, *sets: Vectors) -> np.ndarray:
    if labels is not None:
        arr = np.asarray(labels)
        if arr.shape != (len(sets[0]),):
            raise CompatkitError(f"labels must have shape ({len(sets[0])},), got {arr.shape}")
        return arr.astype(np.int64)
    for v in sets:
        if v.labels is not None:
            return v.labels
    raise CompatkitError("the held-out items need class labels: pass --labels (a .npy of "
                         "(n,) class ids), or use features files or .npz files whose metadata "
                         "has a 'label' per row")


@dataclass(frozen=True)
class BudgetRow:
    """One (kind, pair count) point of the budget curve; ``error`` when the kind could not fit."""

    kind: str
    requested: int
    pairs: int
    retained: dict[str, float | None]
    adapted: dict[str, float]
    fit_seconds: float | None
    error: str | None = None


def pair_budget(
    train_old: Vectors | np.ndarray, train_new: Vectors | np.ndarray,
    test_old: Vectors | np.ndarray, test_new: Vectors | np.ndarray, kinds: Sequence[str],
    direction: str, *, budgets: Sequence[int] = DEFAULT_BUDGETS,
    labels: np.ndarray | None = None, train_side: Vectors | np.ndarray | None = None,
    test_side: Vectors | np.ndarray | None = None, metrics: Sequence[str] = DEFAULT_METRICS,
    options: FitOptions | None = None,
) -> list[BudgetRow]:
    """The retained fraction of each kind fitted on the first 100, 1,000, 10,000 … pairs of a
    seeded permutation of the training pairs (all of them when fewer), on held-out items.

    A kind that needs more pairs than a budget gives a row with ``error`` set.
    """
    options = options or FitOptions()
    if not budgets or min(budgets) < 1:
        raise CompatkitError(f"budgets must be positive pair counts, got {list(budgets)}")
    tr_old, tr_new = as_vectors(train_old, "old"), as_vectors(train_new, "new")
    tr_side = None if train_side is None else as_vectors(train_side, "side")
    check_pairs(tr_old, tr_new, tr_side)
    perm = np.random.default_rng(options.seed).permutation(len(tr_old))
    rows = []
    for kind in kinds:
        seen: set[int] = set()
        for requested in sorted(budgets):
            n = min(requested, len(tr_old))
            if n in seen:
                continue
            seen.add(n)
            idx = np.sort(perm[:n])
            side = None if tr_side is None else tr_side.rows(idx)
            try:
                fitted = fit_adapter(tr_old.rows(idx), tr_new.rows(idx), kind, direction,
                                     side=side, options=options)
            except NotEnoughPairsError as err:
                rows.append(BudgetRow(kind, requested, n, {}, {}, None, str(err)))
                continue
            report = evaluate_adapter(fitted.module, test_old, test_new, direction,
                                      labels=labels, side=test_side, metrics=metrics)
            rows.append(BudgetRow(kind, requested, n, report.retained, report.adapted,
                                  fitted.seconds))
    return rows
