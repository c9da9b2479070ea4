"""Held-out evaluation of adapters: retained fraction, flips, neighbour overlap, pair budget."""

from __future__ import annotations

import numpy as np
import pytest

from compatkit.adapters import (
    FitOptions,
    evaluate_adapter,
    fit_adapter,
    neighbour_overlap,
    pair_budget,
    retained_fraction,
)
from compatkit.errors import CompatkitError
from compatkit.eval import flip_rates, retrieval_metrics, top_k_correct


def test_retained_fraction_by_hand():
    assert retained_fraction(0.5, 0.3, 0.7) == pytest.approx(0.5)
    assert retained_fraction(0.3, 0.3, 0.7) == 0
    assert retained_fraction(0.8, 0.3, 0.7) == pytest.approx(1.25)
    assert retained_fraction(0.5, 0.4, 0.4) is None


def test_neighbour_overlap_by_hand():
    def at(*degrees: float) -> np.ndarray:
        rad = np.radians(degrees)
        return np.stack([np.cos(rad), np.sin(rad)], axis=1)

    x = at(0, 10, 21, 100)  # cosine 1-NN, self excluded: 1, 0, 1, 2
    y = at(0, 10, 40, 22)  # 1, 0, 3, 1: rows 0 and 1 agree with x, rows 2 and 3 do not
    assert neighbour_overlap(x, x, x, x, k=1) == 1.0
    assert neighbour_overlap(x, x, y, y, k=1) == pytest.approx(0.5)
    assert neighbour_overlap(x, x, y, y, k=3) == pytest.approx(1.0)


@pytest.fixture()
def clusters():
    """New vectors of 20 classes in 8-d; old vectors a lossy linear image of them in 4-d."""
    rng = np.random.default_rng(0)
    labels = np.repeat(np.arange(20), 8)
    new = rng.normal(size=(20, 8))[labels] + 0.6 * rng.normal(size=(160, 8))
    old = new @ rng.normal(size=(8, 4))
    return old, new, labels


def test_exact_query_adapter_keeps_old_old(clusters):
    old, new, labels = clusters
    fitted = fit_adapter(old, new, "linear", "new-to-old", options=FitOptions(ridge=0))
    report = evaluate_adapter(fitted.module, old, new, "new-to-old", labels=labels,
                              metrics=["map"])
    oo = retrieval_metrics(old, labels, old, labels, metrics=["map"], exclude_self=True)["map"]
    nn = retrieval_metrics(new, labels, new, labels, metrics=["map"], exclude_self=True)["map"]
    assert nn > oo + 0.05  # the upgrade gains something
    assert report.old_old["map"] == pytest.approx(oo) and report.new_new["map"] == pytest.approx(nn)
    assert report.adapted["map"] == pytest.approx(oo, abs=1e-4)
    assert report.retained["map"] == pytest.approx(0, abs=1e-3)
    assert report.nfr == 0
    assert report.overlap_at_k == pytest.approx(neighbour_overlap(old, old, new, new, k=10),
                                                abs=0.01)


def test_exact_gallery_adapter_keeps_the_whole_upgrade(clusters):
    old, _, labels = clusters
    new_small = old @ np.diag([1.0, 3.0, 0.2, 1.0]) + 1.0  # an affine, non-isometric image
    fitted = fit_adapter(old, new_small, "linear", "old-to-new", options=FitOptions(ridge=0))
    report = evaluate_adapter(fitted.module, old, new_small, "old-to-new", labels=labels)
    assert report.adapted == pytest.approx(report.new_new, abs=1e-4)
    assert report.retained["map"] == pytest.approx(1, abs=1e-3)
    assert report.overlap_at_k == pytest.approx(1.0, abs=0.01)
    ref = top_k_correct(old, labels, old, labels, exclude_self=True)
    got = top_k_correct(new_small, labels, new_small, labels, exclude_self=True)
    assert report.nfr == pytest.approx(flip_rates(ref, got).nfr, abs=0.01)


def test_evaluation_needs_labels_and_matching_dimensions(clusters):
    old, new, labels = clusters
    fitted = fit_adapter(old, new, "linear", "new-to-old")
    with pytest.raises(CompatkitError, match="need class labels"):
        evaluate_adapter(fitted.module, old, new, "new-to-old")
    with pytest.raises(CompatkitError, match="maps 8-d to 4-d vectors"):
        evaluate_adapter(fitted.module, old, new, "old-to-new", labels=labels)


def test_pair_budget_rows(clusters):
    old, new, labels = clusters
    rows = pair_budget(old[:120], new[:120], old[120:], new[120:], ["linear", "procrustes"],
                       "new-to-old", budgets=[5, 50, 10_000], labels=labels[120:],
                       options=FitOptions(ridge=0))
    assert [(r.kind, r.requested, r.pairs) for r in rows] == [
        ("linear", 5, 5), ("linear", 50, 50), ("linear", 10_000, 120),
        ("procrustes", 5, 5), ("procrustes", 50, 50), ("procrustes", 10_000, 120)]
    assert rows[0].error is not None and "needs at least 9 pairs" in rows[0].error
    assert rows[3].error is None  # procrustes 8-d -> 4-d needs only 4 pairs
    assert rows[2].error is None and rows[2].retained["map"] == pytest.approx(0, abs=1e-3)
    assert all(r.fit_seconds is not None for r in rows if r.error is None)
