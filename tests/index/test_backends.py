"""FAISS groups: exact search equals brute force, removals and re-adds, IVF/HNSW recall."""

from __future__ import annotations

import numpy as np
import pytest

from compatkit.index.backends import BackendOptions, VectorGroup

from .conftest import brute_top_k, mean_recall, unit_vectors


def test_flat_group_equals_brute_force_with_item_keys():
    x, q = unit_vectors(300, 16), unit_vectors(5, 16, seed=1)
    keys = np.arange(1000, 1300, dtype=np.int64)
    g = VectorGroup(16)
    g.add(keys, x)
    hits = g.search(q, 7)
    ref_s, ref_k = brute_top_k(x, keys, q, 7)
    np.testing.assert_allclose(hits.scores, ref_s, rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(hits.keys, ref_k)


def test_flat_batches_on_both_sides_of_the_blas_switch_equal_brute_force():
    import faiss

    from compatkit.index.backends import FLAT_BLAS_MIN_QUERIES

    x, q = unit_vectors(2000, 32), unit_vectors(2 * FLAT_BLAS_MIN_QUERIES, 32, seed=3)
    keys = np.arange(2000, dtype=np.int64)
    g = VectorGroup(32)
    g.add(keys, x)
    ref_s, ref_k = brute_top_k(x, keys, q, 10)
    for nq in (1, FLAT_BLAS_MIN_QUERIES - 1, FLAT_BLAS_MIN_QUERIES, 2 * FLAT_BLAS_MIN_QUERIES):
        hits = g.search(q[:nq], 10)  # query by query below the switch, one product from it
        np.testing.assert_allclose(hits.scores, ref_s[:nq], rtol=1e-5, atol=1e-6)
        np.testing.assert_array_equal(hits.keys, ref_k[:nq])
    assert faiss.cvar.distance_compute_blas_threshold == FLAT_BLAS_MIN_QUERIES * 32  # 8 x d


def test_hand_computed_scores_and_padding():
    g = VectorGroup(2)
    g.add(np.array([7, 9]), np.array([[1.0, 0.0], [0.6, 0.8]], dtype=np.float32))
    hits = g.search(np.array([[0.8, 0.6]], dtype=np.float32), 3)
    np.testing.assert_allclose(hits.scores[0, :2], [0.96, 0.8], rtol=1e-6)
    assert hits.keys.tolist() == [[9, 7, -1]]
    assert hits.scores[0, 2] == -np.inf


def test_removed_and_replaced_keys():
    g = VectorGroup(2)
    g.add(np.array([1, 2, 3]), np.array([[1, 0], [0, 1], [0.6, 0.8]], dtype=np.float32))
    g.remove(np.array([1, 42]))  # unknown keys are ignored
    assert len(g) == 2
    q = np.array([[1.0, 0.0]], dtype=np.float32)
    assert g.search(q, 3).keys.tolist() == [[3, 2, -1]]
    g.add(np.array([2]), np.array([[1.0, 0.0]], dtype=np.float32))  # key 2 moves
    assert len(g) == 2
    assert g.search(q, 3).keys.tolist() == [[2, 3, -1]]
    np.testing.assert_allclose(g.vectors_of(np.array([2])), [[1.0, 0.0]])


def test_compaction_keeps_results():
    x = unit_vectors(3000, 8)
    keys = np.arange(3000, dtype=np.int64)
    g = VectorGroup(8)
    g.add(keys, x)
    g.remove(keys[:2500])  # triggers a rebuild (dead slots dominate)
    q = unit_vectors(3, 8, seed=2)
    ref_s, ref_k = brute_top_k(x[2500:], keys[2500:], q, 5)
    hits = g.search(q, 5)
    np.testing.assert_array_equal(hits.keys, ref_k)
    np.testing.assert_allclose(hits.scores, ref_s, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("kind", ["ivf", "hnsw"])
def test_approximate_kinds_recall(kind):
    x, q = unit_vectors(4000, 16), unit_vectors(50, 16, seed=3)
    keys = np.arange(4000, dtype=np.int64)
    g = VectorGroup(16, BackendOptions(kind=kind, ivf_min_size=1000, nprobe=40))
    g.add(keys[:500], x[:500])
    assert g.structure == ("flat" if kind == "ivf" else "hnsw")  # small IVF groups stay exact
    g.add(keys[500:], x[500:])
    assert g.structure == kind
    g.remove(keys[:10])
    _, ref_k = brute_top_k(x[10:], keys[10:], q, 10)
    hits = g.search(q, 10)
    assert not np.isin(hits.keys, keys[:10]).any()
    assert mean_recall(hits.keys, ref_k) >= 0.9


def test_bad_shapes():
    g = VectorGroup(4)
    with pytest.raises(ValueError, match=r"vectors must be \(2, 4\), got \(2, 3\)"):
        g.add(np.array([1, 2]), np.zeros((2, 3), dtype=np.float32))
    with pytest.raises(ValueError, match="keys added in one call must be unique"):
        g.add(np.array([1, 1]), np.ones((2, 4), dtype=np.float32))
    with pytest.raises(ValueError, match="index kind must be one of"):
        VectorGroup(4, BackendOptions(kind="annoy"))  # type: ignore[arg-type]
