"""The adapter-bridged backfill curve equals ranking the index's merged scores by hand."""

from __future__ import annotations

import numpy as np
import pytest

from compatkit.eval import retrieval_metrics
from compatkit.eval.bridged import bridged_backfill_curve
from compatkit.ordering import backfill_count
from compatkit.score_calibration import ScoreCalibration

N, D_NEW, D_OLD = 14, 5, 7
FRACTIONS = (0.0, 0.25, 0.5, 0.75, 1.0)


def unit(x: np.ndarray) -> np.ndarray:
    return x / np.linalg.norm(x, axis=1, keepdims=True)


@pytest.fixture()
def data():
    rng = np.random.default_rng(4)
    labels = np.arange(N) % 4
    centres_new, centres_old = rng.standard_normal((4, D_NEW)), rng.standard_normal((4, D_OLD))
    new = (centres_new[labels] + 0.9 * rng.standard_normal((N, D_NEW))).astype(np.float32)
    old = (centres_old[labels] + 0.9 * rng.standard_normal((N, D_OLD))).astype(np.float32)
    adapted = (old + 0.8 * rng.standard_normal((N, D_OLD))).astype(np.float32)
    return {"new": new, "old": old, "adapted": adapted, "labels": labels,
            "order": rng.permutation(N)}


def hand_curve(d, calibration):
    """mAP and top-1 per fraction: merged scores ranked by hand, leave-one-out."""
    scale, shift = (1.0, 0.0) if calibration is None else (calibration.scale, calibration.shift)
    direct = unit(d["new"]) @ unit(d["new"]).T
    bridged = scale * (unit(d["adapted"]) @ unit(d["old"]).T) + shift
    maps, top1 = [], []
    for f in FRACTIONS:
        is_new = np.zeros(N, dtype=bool)
        is_new[d["order"][:backfill_count(N, f)]] = True
        scores = np.where(is_new[None, :], direct, bridged)
        aps, hits = [], []
        for i in range(N):
            others = [j for j in range(N) if j != i]
            ranked = sorted(others, key=lambda j: (-scores[i, j], j))
            rel = np.array([d["labels"][j] == d["labels"][i] for j in ranked])
            precision = np.cumsum(rel) / np.arange(1, len(rel) + 1)
            aps.append(float(precision[rel].mean()))
            hits.append(bool(rel[0]))
        maps.append(float(np.mean(aps)))
        top1.append(float(np.mean(hits)))
    return maps, top1


@pytest.mark.parametrize("calibration", [None, ScoreCalibration(2.5, -0.7, 10),
                                         ScoreCalibration(0.4, 0.3, 10)])
def test_the_curve_equals_the_merged_ranking_by_hand(data, calibration):
    curve = bridged_backfill_curve(
        data["new"], data["adapted"], data["labels"], data["old"], data["new"], data["labels"],
        data["order"], calibration=calibration, fractions=FRACTIONS, exclude_self=True)
    maps, top1 = hand_curve(data, calibration)
    np.testing.assert_allclose(curve.metrics["map"], maps, atol=1e-6)
    np.testing.assert_allclose(curve.metrics["cmc@1"], top1, atol=1e-6)


def test_the_calibration_changes_the_mixed_points_only(data):
    plain, shifted = (bridged_backfill_curve(
        data["new"], data["adapted"], data["labels"], data["old"], data["new"], data["labels"],
        data["order"], calibration=cal, fractions=FRACTIONS, exclude_self=True)
        for cal in (None, ScoreCalibration(1.0, 0.5, 10)))
    assert plain.metrics["map"][0] == pytest.approx(shifted.metrics["map"][0], abs=1e-6)
    assert plain.metrics["map"][-1] == pytest.approx(shifted.metrics["map"][-1], abs=1e-6)
    assert plain.metrics["map"][1:-1] != pytest.approx(shifted.metrics["map"][1:-1], abs=1e-6)


def test_end_points_are_the_adapted_cross_test_and_the_self_test(data):
    curve = bridged_backfill_curve(
        data["new"], data["adapted"], data["labels"], data["old"], data["new"], data["labels"],
        data["order"], calibration=ScoreCalibration(3.0, 1.0, 10), old_query=data["old"],
        fractions=FRACTIONS, metrics=["map"], exclude_self=True)
    cross = retrieval_metrics(data["adapted"], data["labels"], data["old"], data["labels"],
                              metrics=["map"], exclude_self=True)["map"]
    self_test = retrieval_metrics(data["new"], data["labels"], data["new"], data["labels"],
                                  metrics=["map"], exclude_self=True)["map"]
    assert curve.metrics["map"][0] == pytest.approx(cross, abs=1e-6)
    assert curve.metrics["map"][-1] == pytest.approx(self_test, abs=1e-6)
    assert curve.reference == "old_old"


@pytest.mark.parametrize(("change", "message"), [
    ({"adapted": np.ones((N - 1, D_OLD), np.float32)},
     "adapted_query has 13 rows but query 14; row i of each is the same query"),
    ({"adapted": np.ones((N, D_NEW), np.float32)},
     "adapted_query has dimension 5 but old_gallery 7; the adapter maps queries into the old "
     "space"),
    ({"old": np.ones((N - 2, D_OLD), np.float32)},
     "new_gallery has 14 rows but old_gallery 12; row i of each is the same item"),
    ({"adapted": np.zeros((N, D_OLD), np.float32)}, "adapted_query row 0 is the zero vector"),
])
def test_errors(data, change, message):
    d = {**data, **change}
    with pytest.raises(ValueError, match=message):
        bridged_backfill_curve(d["new"], d["adapted"], d["labels"], d["old"], d["new"],
                               d["labels"], d["order"], fractions=FRACTIONS)
