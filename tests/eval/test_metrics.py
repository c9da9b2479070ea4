"""The chunked metrics engine against hand-computed values, sklearn and the dense reference."""

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from sklearn.metrics import average_precision_score

from compatkit.errors import UnknownNameError
from compatkit.eval import ranking, retrieval
from compatkit.eval.metric_specs import METRICS, parse_metric
from compatkit.eval.metrics import per_query_metrics, retrieval_metrics
from compatkit.eval.retrieval import knn, pairwise_scores
from compatkit.eval.testing import (
    reference_metrics,
    sklearn_style_average_precision,
    tied_features,
)


def from_scores(scores):
    """Features whose cosine scores order items exactly as ``scores`` (one-hot gallery)."""
    q = np.asarray(scores, dtype=np.float32)
    return q, np.eye(q.shape[1], dtype=np.float32)


def ranking_problem(rankings, positives, all_ids):
    """Queries ranking ``all_ids`` as given (unlisted ids after, in id order) with positives."""
    ids = list(all_ids)
    n = len(ids)
    scores = np.zeros((len(rankings), n), dtype=np.float32)
    for r, ranked in enumerate(rankings):
        rest = [i for i in ids if i not in ranked]
        for pos, item in enumerate(list(ranked) + rest):
            scores[r, ids.index(item)] = n - pos
    q, g = from_scores(scores)
    q_labels = np.arange(len(rankings))
    g_labels = np.full(n, 1000)
    for r, pos in enumerate(positives):
        for item in pos:
            g_labels[ids.index(item)] = r
    return q, q_labels, g, g_labels


def test_case1_gldv2_ap_at_100_hand_ranking():
    q, ql, g, gl = ranking_problem([[3, 2, 1, 5, 6]], [{3, 1}], [1, 2, 3, 5, 6])
    out = retrieval_metrics(q, ql, g, gl, metrics=["map@100"])
    assert out["map@100"] == pytest.approx((1 / 1 + 2 / 3) / 2, abs=1e-12)


def test_case2_ap_at_100_denominator_is_min_m_100_and_misses_count_zero():
    # query 0: 150 positives ranked first -> (1/100) * 100 hits of precision 1 = 1
    # query 1: its 5 positives ranked after 100 negatives -> 0, and it still counts
    n_neg = 100
    ids = list(range(150 + n_neg + 5))
    pos0 = list(range(150))
    pos1 = list(range(150 + n_neg, 150 + n_neg + 5))
    rank1 = list(range(150, 150 + n_neg)) + pos1
    q, ql, g, gl = ranking_problem([pos0, rank1], [set(pos0), set(pos1)], ids)
    per_q = per_query_metrics(q, ql, g, gl, metrics=["map@100"])["map@100"]
    np.testing.assert_allclose(per_q, [1.0, 0.0], atol=1e-12)
    assert retrieval_metrics(q, ql, g, gl, metrics=["map@100"])["map@100"] == pytest.approx(0.5)


def test_case4_kaggle_ap_single_positive_at_second_place_is_half():
    q, ql, g, gl = ranking_problem([[7, 8]], [{8}], [7, 8])
    out = retrieval_metrics(q, ql, g, gl, metrics=["map@100", "map"])
    assert out["map@100"] == pytest.approx(0.5, abs=1e-12)  # not the trapezoid 0.25
    assert out["map"] == pytest.approx(0.5, abs=1e-12)


def test_case6_recall_at_k():
    q, ql, g, gl = ranking_problem([[5, 2, 9], [7, 8, 1]], [{2}, {4}], [1, 2, 4, 5, 7, 8, 9])
    out = retrieval_metrics(q, ql, g, gl, metrics=["recall@1", "recall@2", "recall@3", "cmc@2"])
    assert out == pytest.approx({"recall@1": 0.0, "recall@2": 0.5, "recall@3": 0.5, "cmc@2": 0.5})


def test_precision_and_map_at_r_hand_values():
    # ranking: P N P N, 2 positives -> P@2 = 1/2, mAP@R = (1/2)(1/1) = 0.5, AP = (1 + 2/3)/2
    q, ql, g, gl = ranking_problem([[1, 2, 3, 4]], [{1, 3}], [1, 2, 3, 4])
    out = retrieval_metrics(q, ql, g, gl, metrics=["precision@2", "map@r", "map", "precision@4"])
    assert out == pytest.approx(
        {"precision@2": 0.5, "map@r": 0.5, "map": (1 + 2 / 3) / 2, "precision@4": 0.5}
    )


def test_map_groups_tied_scores_like_sklearn():
    # scores [2, 1, 1, 0]; positives at the first and one of the tied items
    scores = np.array([[2.0, 1.0, 1.0, 0.5]], dtype=np.float32)
    q, g = from_scores(scores)
    gl = np.array([0, 1, 0, 1])
    got = retrieval_metrics(q, [0], g, gl, metrics=["map", "cmc@1"])
    want = average_precision_score(gl == 0, scores[0])
    assert want == pytest.approx((1 + 2 / 3) / 2)  # threshold 1 holds 3 items, 2 positive
    assert got["map"] == pytest.approx(want, abs=1e-12)
    # rank metrics break the tie by lower index: ranking 0, 1(neg), 2(pos), 3
    got_rank = retrieval_metrics(q, [0], g, gl, metrics=["map@r", "precision@2"])
    assert got_rank == pytest.approx({"map@r": 0.5, "precision@2": 0.5})
    swapped = retrieval_metrics(q, [0], g, np.array([0, 0, 1, 1]), metrics=["map@r"])
    assert swapped["map@r"] == pytest.approx(1.0)


@pytest.mark.parametrize("seed", range(4))
def test_map_equals_sklearn_per_query_with_ties(seed):
    rng = np.random.default_rng(seed)
    q = rng.integers(-2, 3, (25, 3)).astype(np.float32)
    g = rng.integers(-2, 3, (60, 3)).astype(np.float32)
    ql, gl = rng.integers(0, 4, 25), rng.integers(0, 4, 60)
    per_q = per_query_metrics(q, ql, g, gl, metrics=["map"], distance="l2", chunk_size=7)["map"]
    s = pairwise_scores(q, g, distance="l2")
    for i in range(len(q)):
        rel = gl == ql[i]
        if rel.any():
            assert per_q[i] == pytest.approx(average_precision_score(rel, s[i]), abs=1e-12)
        else:
            assert np.isnan(per_q[i])


def test_exclude_self_matches_sklearn_without_the_diagonal():
    rng = np.random.default_rng(3)
    x = rng.integers(-2, 3, (40, 3)).astype(np.float32)
    labels = rng.integers(0, 3, 40)
    per_q = per_query_metrics(
        x, labels, x, labels, metrics=["map"], distance="l2", exclude_self=True, chunk_size=9
    )["map"]
    s = pairwise_scores(x, x, distance="l2")
    for i in range(40):
        keep = np.arange(40) != i
        rel = (labels == labels[i])[keep]
        if rel.any():
            assert per_q[i] == pytest.approx(average_precision_score(rel, s[i][keep]), abs=1e-12)


def test_cmc1_equals_leave_one_out_1nn_accuracy():
    rng = np.random.default_rng(5)
    centres = rng.normal(size=(6, 8))
    labels = rng.integers(0, 6, 200)
    x = (centres[labels] + rng.normal(size=(200, 8))).astype(np.float32)
    nn = knn(x, x, 1, exclude_self=True).indices[:, 0]
    acc = np.mean(labels[nn] == labels)
    out = retrieval_metrics(x, labels, x, labels, metrics=["cmc@1"], exclude_self=True)
    assert out["cmc@1"] == pytest.approx(acc, abs=1e-12)
    assert 0.2 < acc < 1.0  # the check is not vacuous


def test_sklearn_style_reference_equals_sklearn():
    rng = np.random.default_rng(0)
    for _ in range(20):
        rel = rng.random(30) < 0.3
        rel[0] = True
        s = rng.integers(0, 5, 30).astype(np.float64)
        assert sklearn_style_average_precision(rel, s) == pytest.approx(
            average_precision_score(rel, s), abs=1e-12
        )


def test_queries_without_positives_are_left_out_of_the_mean():
    q, ql, g, gl = ranking_problem([[1, 2], [2, 1]], [{1}, set()], [1, 2])
    per_q = per_query_metrics(q, ql, g, gl, metrics=["map", "cmc@1"])
    assert per_q["map"][0] == 1.0 and np.isnan(per_q["map"][1])
    assert retrieval_metrics(q, ql, g, gl, metrics=["map"])["map"] == 1.0


def test_result_keys_keep_the_given_order():
    q, ql, g, gl = ranking_problem([[1, 2]], [{1}], [1, 2])
    out = retrieval_metrics(q, ql, g, gl, metrics=["cmc@1", "map", "map@r"])
    assert list(out) == ["cmc@1", "map", "map@r"]


def _problem(seed, nq=23, ng=41, d=3, classes=4):
    rng = np.random.default_rng(seed)
    q = rng.integers(-2, 3, (nq, d)).astype(np.float32)
    g = rng.integers(-2, 3, (ng, d)).astype(np.float32)
    q[np.abs(q).sum(1) == 0, 0] = 1
    g[np.abs(g).sum(1) == 0, 0] = 1
    return q, rng.integers(0, classes, nq), g, rng.integers(0, classes, ng)


@pytest.mark.parametrize("name", METRICS.names())
def test_every_registered_metric_matches_the_reference(name):
    spec = name.replace("@k", "@3")
    q, ql, g, gl = _problem(11)
    got = retrieval_metrics(q, ql, g, gl, metrics=[spec], distance="l2", chunk_size=5)
    want = reference_metrics(q, ql, g, gl, metrics=[spec], distance="l2")
    assert 0.0 <= got[spec] <= 1.0
    assert got[spec] == pytest.approx(want[spec], abs=1e-12)


ALL = ["map", "map@r", "map@5", "cmc@1", "cmc@4", "recall@2", "precision@3"]


@settings(max_examples=40, deadline=None)
@given(
    seed=st.integers(0, 10_000),
    chunk_size=st.integers(1, 50),
    query_block=st.integers(1, 30),
    distance=st.sampled_from(["l2", "cosine"]),
    exclude_self=st.booleans(),
    ints=st.booleans(),
)
def test_chunked_equals_dense(seed, chunk_size, query_block, distance, exclude_self, ints):
    rng = np.random.default_rng(seed)
    ng, d = int(rng.integers(1, 40)), int(rng.integers(1, 5))
    nq = ng if exclude_self else int(rng.integers(1, 30))

    def feats(n):
        return tied_features(rng, n, d) if ints else rng.normal(size=(n, d)).astype(np.float32)

    g, gl = feats(ng), rng.integers(0, 4, ng)
    q, ql = (g, gl) if exclude_self else (feats(nq), rng.integers(0, 4, nq))
    want = reference_metrics(
        q, ql, g, gl, metrics=ALL, distance=distance, exclude_self=exclude_self, per_query=True
    )
    if np.isnan(want["map"]).all():
        with pytest.raises(ValueError, match="no query has a positive"):
            retrieval_metrics(q, ql, g, gl, distance=distance, exclude_self=exclude_self)
        return
    got = per_query_metrics(
        q,
        ql,
        g,
        gl,
        metrics=ALL,
        distance=distance,
        exclude_self=exclude_self,
        chunk_size=chunk_size,
        query_block=query_block,
    )
    for name in ALL:
        np.testing.assert_allclose(got[name], want[name], atol=1e-12, err_msg=name)


def test_dense_and_large_chunks_agree_on_clustered_data():
    rng = np.random.default_rng(2)
    centres = rng.normal(size=(20, 16))
    gl, ql = rng.integers(0, 20, 600), rng.integers(0, 20, 150)
    g = (centres[gl] + 1.2 * rng.normal(size=(600, 16))).astype(np.float32)
    q = (centres[ql] + 1.2 * rng.normal(size=(150, 16))).astype(np.float32)
    want = reference_metrics(q, ql, g, gl, metrics=ALL)
    for chunk, block in [(37, 16), (600, 2048), (128, 150)]:
        got = retrieval_metrics(q, ql, g, gl, metrics=ALL, chunk_size=chunk, query_block=block)
        assert got == pytest.approx(want, abs=1e-12)


def test_clear_errors():
    q, ql, g, gl = _problem(0)
    with pytest.raises(ValueError, match=r"dimension mismatch.*\(23, 3\).*\(41, 2\)"):
        retrieval_metrics(q, ql, g[:, :2], gl)
    bad = g.copy()
    bad[7, 0] = np.nan
    with pytest.raises(ValueError, match=r"gallery.*row 7"):
        retrieval_metrics(q, ql, bad, gl)
    with pytest.raises(ValueError, match="gallery_labels has 40 labels"):
        retrieval_metrics(q, ql, g, gl[:-1])
    with pytest.raises(UnknownNameError, match=r"unknown metric 'mAP'.*known: .*cmc@k"):
        retrieval_metrics(q, ql, g, gl, metrics=["mAP"])
    with pytest.raises(ValueError, match="more than once"):
        retrieval_metrics(q, ql, g, gl, metrics=["map", "map"])
    with pytest.raises(ValueError, match=r"exclude_self=True.*nq=23 and ng=41"):
        retrieval_metrics(q, ql, g, gl, exclude_self=True)
    with pytest.raises(ValueError, match="differ first at row 0"):
        retrieval_metrics(g, gl + 1, g, gl, exclude_self=True)
    with pytest.raises(ValueError, match="no query has a positive"):
        retrieval_metrics(q, ql + 100, g, gl)
    with pytest.raises(ValueError, match="chunk_size must be a positive integer"):
        retrieval_metrics(q, ql, g, gl, chunk_size=0)


def test_parse_metric():
    assert parse_metric("cmc@5").k == 5
    assert parse_metric("map").k is None
    assert parse_metric("map@r").k is None
    with pytest.raises(UnknownNameError, match="foo@3"):
        parse_metric("foo@3")
    with pytest.raises(ValueError, match="positive integer"):
        parse_metric("cmc@0")


def _assert_per_query_equal(got, want):
    for name in want:
        np.testing.assert_allclose(got[name], want[name], atol=1e-12, err_msg=name)


@pytest.mark.parametrize("numpy_on_cpu", [True, False])
@pytest.mark.parametrize(("distance", "exclude_self"), [("cosine", False), ("l2", True)])
def test_tiny_tiles_and_few_buckets_still_equal_dense(
    monkeypatch, numpy_on_cpu, distance, exclude_self
):
    """Several tiles per chunk, and so few buckets that most items share a bucket
    with one or several positives (compared or searched): the numpy path and the torch path
    (other devices) both give the dense reference."""
    monkeypatch.setattr(retrieval, "NUMPY_ON_CPU", numpy_on_cpu)
    monkeypatch.setattr(ranking, "TILE_ROWS", 3)
    monkeypatch.setattr(ranking, "DEFAULT_BUCKETS_PER_ROW", 2)
    rng = np.random.default_rng(4)
    g = tied_features(rng, 70, 4)
    gl = rng.integers(0, 5, 70)
    q, ql = (g, gl) if exclude_self else (tied_features(rng, 29, 4), gl[:29])
    want = reference_metrics(
        q, ql, g, gl, metrics=ALL, distance=distance, exclude_self=exclude_self, per_query=True
    )
    got = per_query_metrics(
        q, ql, g, gl, metrics=ALL, distance=distance, exclude_self=exclude_self, chunk_size=16
    )
    _assert_per_query_equal(got, want)


def test_every_score_tied_ranks_by_gallery_index():
    """One-hot vectors: cosine scores are exactly 0 or 1, every positive ties with other
    items, and the whole score span of a query may be zero."""
    rng = np.random.default_rng(0)
    g = np.eye(3, dtype=np.float32)[rng.integers(0, 3, 40)]
    q = np.eye(3, dtype=np.float32)[rng.integers(0, 3, 12)]
    gl, ql = rng.integers(0, 3, 40), rng.integers(0, 3, 12)
    want = reference_metrics(q, ql, g, gl, metrics=ALL, per_query=True)
    _assert_per_query_equal(per_query_metrics(q, ql, g, gl, metrics=ALL, chunk_size=9), want)
    valid = ~np.isnan(want["map"])
    assert ((want["map"][valid] > 0) & (want["map"][valid] < 1)).any()  # not a trivial case


def test_large_exact_scores_with_wide_spans():
    """Integer features x 1000 under l2: scores up to ~-1e7, exact in float32, spans so wide
    that the exact scaling factor drops below 1."""
    rng = np.random.default_rng(2)
    g = (rng.integers(-3, 4, (60, 3)) * 1000).astype(np.float32)
    q = (rng.integers(-3, 4, (20, 3)) * 1000).astype(np.float32)
    gl, ql = rng.integers(0, 4, 60), rng.integers(0, 4, 20)
    want = reference_metrics(q, ql, g, gl, metrics=ALL, distance="l2", per_query=True)
    got = per_query_metrics(q, ql, g, gl, metrics=ALL, distance="l2", chunk_size=11)
    _assert_per_query_equal(got, want)
    assert float(np.abs(pairwise_scores(q, g, distance="l2")).max()) > 1e7
