"""Backfilling curves: AUCs (case 11), mixed-gallery flips (case 12), fast curve == re-ranking."""

import json

import numpy as np
import pytest

from compatkit.eval import curve as curve_module
from compatkit.eval import ranking, retrieval
from compatkit.eval.curve import (
    BackfillCurve,
    auc_mean,
    auc_trapezoid,
    backfill_curve,
    mixed_gallery,
    walk_segments,
)
from compatkit.eval.flips import flip_rates, top_k_correct
from compatkit.eval.metrics import retrieval_metrics
from compatkit.eval.testing import tied_features

Q = np.array([[1.0, 0.0]], np.float32)
OLD = np.array([[0.8, 0.6], [0.0, 1.0]], np.float32)
NEW = np.array([[1.0, 0.0], [0.9, 0.436]], np.float32)
QL, GL = np.array([0]), np.array([0, 1])


def test_case11_auc_trapezoid_and_mean():
    p, m = [0, 0.25, 0.5, 0.75, 1], [0.45, 0.50, 0.54, 0.57, 0.60]
    assert auc_trapezoid(p, m) == pytest.approx(0.53375, abs=1e-12)
    assert auc_mean(m) == pytest.approx(0.532, abs=1e-12)
    with pytest.raises(ValueError):
        auc_trapezoid([0, 1], [0.5])


@pytest.mark.parametrize(("order", "top1_correct"), [([1, 0], [1, 0, 1]), ([0, 1], [1, 1, 1])])
def test_case12_mixed_gallery_flip(order, top1_correct):
    curve = backfill_curve(
        Q, QL, OLD, NEW, GL, order, fractions=[0, 0.5, 1], metrics=["cmc@1"], old_query=Q
    )
    assert curve.metrics["cmc@1"] == [float(c) for c in top1_correct]
    assert curve.nfr == [float(1 - c) for c in top1_correct]  # old/old top-1 is correct
    assert curve.pfr == [0.0, 0.0, 0.0]


def test_case12_all_four_backfill_states_by_reranking():
    def top1(backfilled):
        g = OLD.copy()
        g[list(backfilled)] = NEW[list(backfilled)]
        return int(np.argmax((Q / np.linalg.norm(Q)) @ (g / np.linalg.norm(g, axis=1)[:, None]).T))

    assert [top1(b) for b in [(), (1,), (0,), (0, 1)]] == [0, 1, 0, 0]


def random_problem(seed, *, exclude_self=False, ties=False, ints=False):
    rng = np.random.default_rng(seed)
    ng, d = int(rng.integers(5, 45)), int(rng.integers(1, 5))

    def feats(n):
        return tied_features(rng, n, d) if ints else rng.normal(size=(n, d)).astype(np.float32)

    go, gn = feats(ng), feats(ng)
    if ties:
        gn[: ng // 2] = go[: ng // 2]
    gl = rng.integers(0, 4, ng)
    if exclude_self:
        return gn.copy(), gl, go, gn, gl, go.copy(), rng.permutation(ng)
    nq = int(rng.integers(1, 25))
    return feats(nq), rng.integers(0, 4, nq), go, gn, gl, feats(nq), rng.permutation(ng)


METRICS = ["map", "cmc@1", "cmc@3", "map@r", "map@5", "precision@2"]


def assert_curve_equals_reranking(problem, fractions, *, distance, exclude_self, **knobs):
    """Every point of the fast curve (metrics and flips against old/old) equals re-ranking the
    mixed gallery from scratch; a problem without any positive must be refused."""
    q, ql, go, gn, gl, oq, order = problem
    try:
        curve = backfill_curve(
            q, ql, go, gn, gl, order, fractions=fractions, metrics=METRICS, distance=distance,
            exclude_self=exclude_self, old_query=oq, **knobs,
        )
    except ValueError as exc:
        assert "no query has a positive" in str(exc)
        return
    ref = top_k_correct(oq, ql, go, gl, distance=distance, exclude_self=exclude_self)
    for step, f in enumerate(fractions):
        mixed = mixed_gallery(go, gn, order, f)
        want = retrieval_metrics(
            q, ql, mixed, gl, metrics=METRICS, distance=distance, exclude_self=exclude_self
        )
        for name in METRICS:
            assert curve.metrics[name][step] == pytest.approx(want[name], abs=1e-12), (step, name)
        now = top_k_correct(q, ql, mixed, gl, distance=distance, exclude_self=exclude_self)
        assert (curve.nfr[step], curve.pfr[step], curve.nfi[step]) == pytest.approx(
            flip_rates(ref, now)
        )


@pytest.mark.parametrize("seed", range(12))
def test_fast_curve_equals_reranking_from_scratch(seed):
    exclude_self, ties, ints = seed % 3 == 0, seed % 4 == 1, seed % 2 == 0
    problem = random_problem(seed, exclude_self=exclude_self, ties=ties, ints=ints)
    assert_curve_equals_reranking(
        problem, [0, 0.1, 0.3, 0.3, 0.5, 0.77, 1.0], distance=["cosine", "l2"][seed % 2],
        exclude_self=exclude_self, chunk_size=1 + seed, query_block=2 + seed,
    )


def test_end_points_are_cross_and_self_test_exactly():
    q, ql, go, gn, gl, oq, order = random_problem(7)
    curve = backfill_curve(
        q, ql, go, gn, gl, order, steps=21, metrics=["map", "cmc@1"], old_query=oq, chunk_size=8
    )
    cross = retrieval_metrics(q, ql, go, gl, metrics=["map", "cmc@1"], chunk_size=8)
    self_ = retrieval_metrics(q, ql, gn, gl, metrics=["map", "cmc@1"], chunk_size=8)
    assert len(curve.fractions) == 21 and curve.fractions[0] == 0 and curve.fractions[-1] == 1
    for name in ("map", "cmc@1"):
        assert curve.metrics[name][0] == cross[name]
        assert curve.metrics[name][-1] == self_[name]


def test_previous_step_reference_and_top_k():
    curve = backfill_curve(
        Q,
        QL,
        OLD,
        NEW,
        GL,
        [1, 0],
        fractions=[0, 0.5, 1],
        metrics=["cmc@1"],
        reference="previous_step",
    )
    assert curve.nfr == [0.0, 1.0, 0.0] and curve.pfr == [0.0, 0.0, 1.0]
    top2 = backfill_curve(
        Q, QL, OLD, NEW, GL, [1, 0], fractions=[0, 0.5, 1], metrics=["cmc@1"], old_query=Q, top_k=2
    )
    assert top2.nfr == [0.0, 0.0, 0.0]  # with only 2 items every query hits in its top 2


def test_summary_regression_and_json():
    curve = BackfillCurve(
        fractions=(0, 0.5, 1),
        counts=(0, 1, 2),
        metrics={"map": [0.5, 0.4, 0.7]},
        nfr=[0.0, 0.2, 0.1],
        pfr=[0.0, 0.0, 0.3],
        nfi=[0.0, 0.5, 0.2],
        reference="old_old",
        top_k=1,
        ordering="random",
    )
    assert curve.auc["map"]["trapezoid"] == pytest.approx(0.5 * (0.45 + 0.55))
    assert curve.auc["map"]["mean"] == pytest.approx(1.6 / 3)
    assert curve.regression["map"] == {
        "min_minus_start": pytest.approx(-0.1),
        "decreasing_steps": 1,
    }
    assert curve.regression["max_nfr"] == 0.2
    assert curve.regression["mean_nfr"] == pytest.approx(0.1)
    js = json.loads(json.dumps(curve.to_json()))
    assert js["ordering"] == "random" and js["counts"] == [0, 1, 2]


def test_errors():
    with pytest.raises(ValueError, match="needs old_query"):
        backfill_curve(Q, QL, OLD, NEW, GL, [0, 1])
    with pytest.raises(ValueError, match="non-decreasing"):
        backfill_curve(Q, QL, OLD, NEW, GL, [0, 1], fractions=[0, 1, 0.5], old_query=Q)
    with pytest.raises(ValueError, match="at least 2"):
        backfill_curve(Q, QL, OLD, NEW, GL, [0, 1], fractions=[0.5], old_query=Q)
    with pytest.raises(ValueError, match="lie in"):
        backfill_curve(Q, QL, OLD, NEW, GL, [0, 1], fractions=[0, 2], old_query=Q)
    with pytest.raises(ValueError, match="one shape"):
        backfill_curve(Q, QL, OLD, NEW[:1], GL, [0, 1], old_query=Q)
    with pytest.raises(ValueError, match="repeats"):
        backfill_curve(Q, QL, OLD, NEW, GL, [0, 0], old_query=Q)
    with pytest.raises(ValueError, match="reference"):
        backfill_curve(Q, QL, OLD, NEW, GL, [0, 1], reference="old")
    with pytest.raises(ValueError, match="dimension mismatch"):
        backfill_curve(np.ones((1, 3), np.float32), QL, OLD, NEW, GL, [0, 1], old_query=Q)


def test_reference_gallery_defines_the_old_old_system_for_transformed_starts():
    """Flips are measured against old/old even when the curve starts from transformed-old."""
    from compatkit.eval import backfill_curve, flip_rates
    from compatkit.eval.flips import top_k_correct

    rng = np.random.default_rng(3)
    labels = np.repeat(np.arange(10), 4)
    old = rng.normal(size=(40, 6)).astype(np.float32)
    transformed = rng.normal(size=(40, 6)).astype(np.float32)
    new = rng.normal(size=(40, 6)).astype(np.float32)
    order = np.arange(40)
    curve = backfill_curve(new, labels, transformed, new, labels, order, steps=3,
                           metrics=["cmc@1"], exclude_self=True, old_query=old,
                           reference_gallery=old)
    ref = top_k_correct(old, labels, old, labels, exclude_self=True)
    start = top_k_correct(new, labels, transformed, labels, exclude_self=True)
    assert curve.nfr[0] == pytest.approx(flip_rates(ref, start).nfr)


def test_walk_segments_split_at_switch_steps_and_chunks():
    # counts: positions < counts[s] are new at step s, so p switches at #{s: counts[s] <= p}
    pieces = walk_segments([0, 3, 3, 7], 10, 2)
    assert pieces == [(0, 2, 1), (2, 3, 1), (3, 5, 3), (5, 7, 3), (7, 9, 4), (9, 10, 4)]
    assert walk_segments([0, 10], 10, 4) == [(0, 4, 1), (4, 8, 1), (8, 10, 1)]


@pytest.mark.parametrize("numpy_on_cpu", [True, False])
@pytest.mark.parametrize("seed", [0, 1, 5])
def test_partial_fractions_tiny_tiles_equal_reranking(monkeypatch, numpy_on_cpu, seed):
    """Fractions that start above 0 (items new at every step) and stop below 1 (items never
    new), many tiles, few buckets (items tied with targets, several targets per bucket), both
    compute paths: every point still equals re-ranking the mixed gallery from scratch."""
    monkeypatch.setattr(retrieval, "NUMPY_ON_CPU", numpy_on_cpu)
    monkeypatch.setattr(ranking, "TILE_ROWS", 2)
    monkeypatch.setattr(curve_module, "CURVE_BUCKETS_PER_ROW", 2)
    exclude_self = seed == 5
    problem = random_problem(seed + 40, exclude_self=exclude_self, ties=True, ints=True)
    assert_curve_equals_reranking(
        problem, [0.2, 0.35, 0.6, 0.9], distance="l2" if seed % 2 else "cosine",
        exclude_self=exclude_self, chunk_size=4,
    )
