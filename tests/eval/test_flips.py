"""Negative / positive flip rates."""

import numpy as np
import pytest

from compatkit.eval.flips import FlipRates, flip_rates, top_k_correct


def test_case10_flip_rates():
    out = flip_rates([1, 1, 0, 0], [1, 0, 1, 0])
    assert isinstance(out, FlipRates)
    assert out == pytest.approx((0.25, 0.25, 0.5))


def test_no_mistakes_gives_zero_nfi():
    assert flip_rates([True, False], [True, True]) == pytest.approx((0.0, 0.5, 0.0))


def test_flip_rate_errors():
    with pytest.raises(ValueError, match="same queries"):
        flip_rates([1, 0], [1])
    with pytest.raises(ValueError, match="0/1"):
        flip_rates([1, 2], [1, 0])
    with pytest.raises(ValueError, match="at least one query"):
        flip_rates([], [])


def test_top_k_correct():
    # scores of query 0: item0 0.9 (neg), item1 0.5 (pos); query 1 has no positive
    q = np.array([[0.9, 0.5, 0.1], [0.1, 0.2, 0.9]], dtype=np.float32)
    g = np.eye(3, dtype=np.float32)
    ql, gl = np.array([0, 5]), np.array([1, 0, 1])
    np.testing.assert_array_equal(top_k_correct(q, ql, g, gl, k=1), [False, False])
    np.testing.assert_array_equal(top_k_correct(q, ql, g, gl, k=2), [True, False])


@pytest.mark.parametrize("k", [1, 3])
def test_top_k_correct_agrees_with_engine_cmc_on_ties(k):
    from compatkit.eval.metrics import per_query_metrics

    rng = np.random.default_rng(k)
    g = rng.integers(-2, 3, (50, 3)).astype(np.float32)
    gl = rng.integers(0, 4, 50)
    got = top_k_correct(g, gl, g, gl, k=k, distance="l2", exclude_self=True, chunk_size=7)
    cmc = per_query_metrics(g, gl, g, gl, metrics=[f"cmc@{k}"], distance="l2", exclude_self=True)[
        f"cmc@{k}"
    ]
    np.testing.assert_array_equal(got, np.nan_to_num(cmc) > 0.5)
    assert 0 < got.sum() < 50
