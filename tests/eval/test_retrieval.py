"""knn and the shared input checks (compatkit.eval.retrieval)."""

import numpy as np
import pytest
import torch

from compatkit.eval import retrieval
from compatkit.eval.retrieval import (
    check_features,
    check_labels,
    knn,
    pairwise_scores,
)
from compatkit.eval.testing import check_ref_knn_with_ties, tied_features


def brute_knn(q, g, k, distance="l2", exclude_self=False):
    s = pairwise_scores(q, g, distance=distance).astype(np.float64)
    if exclude_self:
        np.fill_diagonal(s, -np.inf)
    idx = np.stack([np.lexsort((np.arange(s.shape[1]), -row)) for row in s])[:, :k]
    return np.take_along_axis(s, idx, 1), idx


@pytest.mark.parametrize("chunk_size", [1, 3, 7, 64, 4096])
@pytest.mark.parametrize("distance", ["l2", "cosine"])
def test_knn_equals_brute_force_with_ties_to_lower_index(chunk_size, distance):
    rng = np.random.default_rng(0)
    q, g = tied_features(rng, 30, 4), tied_features(rng, 90, 4)  # many exact ties
    res = knn(q, g, 10, distance=distance, chunk_size=chunk_size, query_block=8)
    ref_s, ref_i = brute_knn(q, g, 10, distance)
    assert res.indices.dtype == np.int64 and res.scores.dtype == np.float32
    np.testing.assert_array_equal(res.indices, ref_i)
    np.testing.assert_allclose(res.scores, ref_s, rtol=1e-6)


def test_knn_sentinels_when_fewer_than_k_items():
    q = np.array([[1.0, 0.0]], dtype=np.float32)
    g = np.array([[1.0, 0.0], [0.0, 1.0]], dtype=np.float32)
    res = knn(q, g, 4)
    np.testing.assert_array_equal(res.indices, [[0, 1, -1, -1]])
    assert res.scores[0, 0] == pytest.approx(1.0)
    assert np.isneginf(res.scores[0, 2:]).all()


def test_knn_exclude_self_skips_diagonal_and_pads():
    g = np.array([[0.0], [1.0], [3.0]], dtype=np.float32)
    res = knn(g, g, 3, distance="l2", exclude_self=True, chunk_size=2)
    np.testing.assert_array_equal(res.indices, [[1, 2, -1], [0, 2, -1], [1, 0, -1]])
    np.testing.assert_allclose(res.scores[:, :2], [[-1, -9], [-1, -4], [-4, -9]])


def test_knn_l2_score_is_negative_squared_distance():
    q = np.array([[0.0, 0.0]], dtype=np.float32)
    g = np.array([[3.0, 4.0], [1.0, 0.0]], dtype=np.float32)
    res = knn(q, g, 2, distance="l2")
    np.testing.assert_array_equal(res.indices, [[1, 0]])
    np.testing.assert_allclose(res.scores, [[-1.0, -25.0]])


def test_knn_cosine_normalises_both_sides():
    q = np.array([[10.0, 0.0]], dtype=np.float32)
    g = np.array([[0.1, 0.1], [5.0, 0.0]], dtype=np.float32)
    res = knn(q, g, 2)
    np.testing.assert_allclose(res.scores, [[1.0, np.sqrt(0.5)]], rtol=1e-6)


def test_knn_accepts_torch_tensors():
    g = torch.randn(20, 8, generator=torch.Generator().manual_seed(0))
    res = knn(g[:5], g, 1)
    np.testing.assert_array_equal(res.indices[:, 0], np.arange(5))


def test_check_ref_knn_with_ties_accepts_tie_orders_and_rejects_differences():
    s = np.array([[3.0, 2.0, 2.0, 1.0]])
    check_ref_knn_with_ties(s, np.array([[0, 1, 2, 3]]), s, np.array([[0, 2, 1, 3]]))
    # last run may be cut by k: any tied item is fine there
    s2 = np.array([[3.0, 2.0]])
    check_ref_knn_with_ties(s2, np.array([[0, 1]]), s2, np.array([[0, 5]]))
    with pytest.raises(AssertionError, match="row 0"):
        check_ref_knn_with_ties(s, np.array([[0, 1, 2, 3]]), s, np.array([[1, 0, 2, 3]]))
    with pytest.raises(AssertionError):
        check_ref_knn_with_ties(s, np.array([[0, 1, 2, 3]]), s + 1, np.array([[0, 1, 2, 3]]))


def test_check_features_names_array_and_row_of_nan():
    x = np.zeros((5, 3), dtype=np.float32)
    x[3, 1] = np.nan
    with pytest.raises(ValueError, match=r"gallery.*row 3"):
        check_features(x, "gallery")
    x[3, 1] = np.inf
    with pytest.raises(ValueError, match="non-finite"):
        check_features(x, "gallery")


def test_check_features_shape_and_dtype_errors():
    with pytest.raises(ValueError, match=r"2-D.*\(4,\)"):
        check_features(np.zeros(4), "query")
    with pytest.raises(TypeError, match="floating-point"):
        check_features(np.zeros((2, 2), dtype=np.int64), "query")
    out = check_features(np.ones((2, 2), dtype=np.float64), "query")
    assert out.dtype == np.float32


def test_check_labels_errors():
    with pytest.raises(ValueError, match="has 3 labels but its features have 4 rows"):
        check_labels(np.zeros(3, dtype=int), 4, "query_labels")
    with pytest.raises(TypeError, match="integer"):
        check_labels(np.zeros(4), 4, "query_labels")
    assert check_labels([1, 2], 2, "x").dtype == np.int64


def test_knn_errors():
    q = np.zeros((2, 3), dtype=np.float32) + 1
    with pytest.raises(ValueError, match=r"dimension mismatch.*\(2, 3\).*\(4, 2\)"):
        knn(q, np.ones((4, 2), dtype=np.float32), 1)
    with pytest.raises(ValueError, match="zero vector"):
        knn(np.zeros((1, 3), dtype=np.float32), q, 1)
    with pytest.raises(ValueError, match="k must be a positive integer"):
        knn(q, q, 0)
    with pytest.raises(ValueError, match="unknown distance"):
        knn(q, q, 1, distance="manhattan")
    with pytest.raises(ValueError, match="exclude_self"):
        knn(q, q[:1], 1, exclude_self=True)


@pytest.mark.parametrize("numpy_on_cpu", [True, False])
@pytest.mark.parametrize("chunk_size", [1, 3, 64])
@pytest.mark.parametrize("exclude_self", [False, True])
def test_knn_top1_keeps_the_lowest_index_among_ties(
    monkeypatch, numpy_on_cpu, chunk_size, exclude_self
):
    """k = 1 keeps a running best across chunks (numpy or torch argmax): a later chunk only
    wins with a strictly higher score, so ties go to the lower gallery index."""
    monkeypatch.setattr(retrieval, "NUMPY_ON_CPU", numpy_on_cpu)
    rng = np.random.default_rng(1)
    g = rng.integers(-1, 2, (50, 3)).astype(np.float32)
    g[np.abs(g).sum(1) == 0, 0] = 1
    q = g if exclude_self else rng.integers(-1, 2, (17, 3)).astype(np.float32)
    q[np.abs(q).sum(1) == 0, 0] = 1
    res = knn(q, g, 1, distance="l2", exclude_self=exclude_self, chunk_size=chunk_size)
    ref_s, ref_i = brute_knn(q, g, 1, "l2", exclude_self=exclude_self)
    np.testing.assert_array_equal(res.indices, ref_i)
    np.testing.assert_array_equal(res.scores, ref_s.astype(np.float32))
    # ties are frequent here, so the check is not vacuous
    s = pairwise_scores(q, g, distance="l2")
    assert (np.sum(s == s.max(axis=1, keepdims=True), axis=1) > 1).any()


def test_knn_top1_fewer_items_than_k_sentinels():
    g = np.array([[1.0, 0.0]], dtype=np.float32)
    res = knn(g, g, 1, exclude_self=True)
    np.testing.assert_array_equal(res.indices, [[-1]])
    assert np.isneginf(res.scores[0, 0])
