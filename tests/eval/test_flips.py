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
