"""The score calibration of a query adapter: mean/std matching of two score distributions."""

from __future__ import annotations

import numpy as np
import pytest

from compatkit.score_calibration import ScoreCalibration, fit_score_calibration


def test_fit_matches_the_moments_computed_by_hand():
    # unit rows, so cosines are plain dot products
    target = np.array([[1.0, 0.0], [0.0, 1.0], [0.6, 0.8]])
    mapped = np.array([[0.0, 1.0], [1.0, 0.0], [0.8, 0.6]])
    source = np.array([[1.0, 0.0], [0.6, 0.8], [0.0, 1.0]])
    # adapted mapped_i · target_j (i != j): 1, .8, 1, .6, .8, .6 -> mean .8, std sqrt(.16/6)
    # direct source_i · source_j (i != j): .6, 0, .6, .8, 0, .8 -> mean 2.8/6, std sqrt(.6933/6)
    cal = fit_score_calibration(mapped, target, source, tail=1.0)
    scale = np.sqrt(0.693333333 / 6) / np.sqrt(0.16 / 6)
    assert (cal.scale, cal.shift, cal.pairs) == (
        pytest.approx(scale, rel=1e-6), pytest.approx(2.8 / 6 - 0.8 * scale, abs=1e-6), 3)
    assert cal.scale == pytest.approx(2.08167, abs=1e-5)
    # the default tail keeps each row's best score: adapted 1, 1, .8 and direct .6, .8, .8,
    # two distributions of one spread whose means differ by 0.2
    top = fit_score_calibration(mapped, target, source)
    assert (top.scale, top.shift) == (pytest.approx(1.0, rel=1e-6), pytest.approx(-0.2, abs=1e-6))


def test_fit_maps_the_adapted_moments_onto_the_direct_ones():
    rng = np.random.default_rng(0)
    source = rng.standard_normal((40, 5))
    target = rng.standard_normal((40, 6))
    mapped = target + 0.5 * rng.standard_normal((40, 6))

    def top_per_row(a, b, k):  # the k best cosines of each row, the diagonal left out
        a = a / np.linalg.norm(a, axis=1, keepdims=True)
        b = b / np.linalg.norm(b, axis=1, keepdims=True)
        s = a @ b.T
        return np.concatenate([sorted(np.delete(row, i))[-k:] for i, row in enumerate(s)])

    adapted, direct = top_per_row(mapped, target, 4), top_per_row(source, source, 4)
    cal = fit_score_calibration(mapped, target, source)  # k = round(0.1 · 39) = 4
    moved = cal.apply(adapted)
    assert moved.mean() == pytest.approx(direct.mean(), abs=1e-5)
    assert moved.std() == pytest.approx(direct.std(), rel=1e-4)
    assert cal.scale == pytest.approx(direct.std() / adapted.std(), rel=1e-6)
    sub = fit_score_calibration(mapped, target, source, max_items=10, seed=1)
    assert sub.pairs == 10 and sub != cal
    assert ScoreCalibration.from_json(cal.to_json()) == cal


@pytest.mark.parametrize(("args", "message"), [
    ((np.ones((3, 2)), np.ones((4, 2)), np.ones((3, 2))),
     "the paired sample needs one row per item in each array, got 3 mapped, 4 target and 3 "
     "source rows"),
    ((np.ones((3, 2)), np.ones((3, 4)), np.ones((3, 2))),
     "mapped vectors have dimension 2 but target vectors 4"),
    ((np.eye(3), np.eye(3), np.eye(3)[[0, 0, 1]] * 0), "source vectors row 0 is the zero vector"),
    ((np.ones((3, 2)), np.ones((3, 2)), np.eye(3)), "the adapted scores of the paired sample "
                                                    "have no spread"),
    ((np.eye(3), np.eye(3), np.eye(3), 0.0), r"tail must be a fraction in \(0, 1\], got 0.0"),
])
def test_errors(args, message):
    with pytest.raises(ValueError, match=message):
        fit_score_calibration(*args[:3], **({"tail": args[3]} if len(args) > 3 else {}))
