"""Backfilling orders: uncertainty values (case 13), determinism, prefix-closed sets."""

import math
import subprocess
import sys

import numpy as np
import pytest

from compatkit.errors import UnknownNameError
from compatkit.ordering import (
    ORDERINGS,
    backfill_count,
    backfill_order,
    backfill_set,
    check_permutation,
    uncertainty_scores,
)

G1, G2 = (0.8, 0.6), (0.0, 1.0)


def test_case13_entropy_values_and_order():
    feats = np.array([G1, G2], dtype=np.float32)
    h = uncertainty_scores(feats, np.eye(2))
    np.testing.assert_allclose(h, [0.688172, 0.582203], atol=1e-6)
    order = backfill_order("uncertainty", 2, old_features=feats, classifier=np.eye(2))
    np.testing.assert_array_equal(order, [0, 1])


def test_case13_uniform_gives_log_c_and_one_hot_gives_zero():
    uniform = uncertainty_scores(np.zeros((1, 3), np.float32), np.ones((4, 3)))
    assert uniform[0] == pytest.approx(math.log(4), abs=1e-9)
    assert uniform[0] == pytest.approx(1.386294, abs=1e-6)
    one_hot = uncertainty_scores(np.array([[1000.0, 0.0]], np.float32), np.eye(2))
    assert one_hot[0] == pytest.approx(0.0, abs=1e-9)


def test_uncertainty_variants_and_temperature():
    feats = np.array([G1, G2], dtype=np.float32)
    lc = uncertainty_scores(feats, np.eye(2), kind="least_confidence")
    p1 = 1 / (1 + math.exp(-0.2))
    assert lc[0] == pytest.approx(1 - p1)
    margin = uncertainty_scores(feats, np.eye(2), kind="margin")
    assert margin[0] == pytest.approx(1 - (2 * p1 - 1))
    hot = uncertainty_scores(feats, np.eye(2), temperature=100.0)
    assert hot[0] > uncertainty_scores(feats, np.eye(2))[0]  # higher T: flatter, less sure
    with pytest.raises(ValueError, match="temperature"):
        uncertainty_scores(feats, np.eye(2), temperature=0.0)
    with pytest.raises(ValueError, match="kind"):
        uncertainty_scores(feats, np.eye(2), kind="variance")
    with pytest.raises(ValueError, match="dimension mismatch"):
        uncertainty_scores(feats, np.eye(3))


def test_ties_broken_by_index():
    feats = np.array([G2, G1, G2, G1], dtype=np.float32)
    order = backfill_order("uncertainty", 4, old_features=feats, classifier=np.eye(2))
    np.testing.assert_array_equal(order, [1, 3, 0, 2])
    np.testing.assert_array_equal(backfill_order("sigma", 4, sigma=[1, 2, 2, 1]), [1, 2, 0, 3])


def test_sigma_oracle_random_given():
    np.testing.assert_array_equal(
        backfill_order("sigma", 3, sigma=[[0.1, 0.3], [0.5, 0.5], [0.0, 0.0]]), [1, 0, 2]
    )
    old = np.zeros((3, 2), np.float32) + 1
    new = old + np.array([[0.0, 0.0], [2.0, 0.0], [0.0, 1.0]], np.float32)
    np.testing.assert_array_equal(
        backfill_order("oracle", 3, new_features=new, old_features=old), [1, 2, 0]
    )
    a = backfill_order("random", 50, seed=3)
    np.testing.assert_array_equal(a, backfill_order("random", 50, seed=3))
    assert not np.array_equal(a, backfill_order("random", 50, seed=4))
    np.testing.assert_array_equal(backfill_order("given", 3, order=[2, 0, 1]), [2, 0, 1])


def test_given_order_from_files(tmp_path):
    np.save(tmp_path / "o.npy", np.array([1, 0, 2]))
    (tmp_path / "o.txt").write_text("2\n1\n0\n")
    np.testing.assert_array_equal(backfill_order("given", 3, order=tmp_path / "o.npy"), [1, 0, 2])
    np.testing.assert_array_equal(
        backfill_order("given", 3, order=str(tmp_path / "o.txt")), [2, 1, 0]
    )
    with pytest.raises(FileNotFoundError):
        backfill_order("given", 3, order=tmp_path / "missing.npy")


@pytest.mark.parametrize("name", ORDERINGS.names())
def test_every_ordering_returns_a_permutation(name):
    rng = np.random.default_rng(0)
    old = rng.normal(size=(20, 4)).astype(np.float32)
    inputs = {
        "random": {"seed": 1},
        "uncertainty": {"old_features": old, "classifier": rng.normal(size=(5, 4))},
        "sigma": {"sigma": rng.random(20)},
        "oracle": {"new_features": old + 1, "old_features": old},
        "given": {"order": rng.permutation(20)},
    }[name]
    order = backfill_order(name, 20, **inputs)
    assert order.dtype == np.int64
    np.testing.assert_array_equal(np.sort(order), np.arange(20))


def test_permutation_checks_and_errors():
    with pytest.raises(ValueError, match="repeats"):
        check_permutation([0, 0, 1], 3)
    with pytest.raises(ValueError, match="outside"):
        check_permutation([0, 1, 3], 3)
    with pytest.raises(ValueError, match="permutation of 3"):
        check_permutation([0, 1], 3)
    with pytest.raises(UnknownNameError, match="random"):
        backfill_order("randm", 3)
    with pytest.raises(TypeError, match="'sigma'"):
        backfill_order("sigma", 3, sigmas=[1, 2, 3])
    with pytest.raises(ValueError, match="sigma has 2 rows"):
        backfill_order("sigma", 3, sigma=[1, 2])


def test_backfill_sets_are_prefix_closed():
    order = backfill_order("random", 10, seed=0)
    prev: set[int] = set()
    for p in np.linspace(0, 1, 11):
        cur = set(backfill_set(order, p).tolist())
        assert prev <= cur and len(cur) == math.floor(p * 10 + 1e-9)
        prev = cur
    assert backfill_count(100, 0.29) == 29  # float slack
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        backfill_count(10, 1.5)


def test_feature_inputs_are_checked():
    with pytest.raises(ValueError, match=r"old_features holds non-finite values .* first at row 1"):
        uncertainty_scores(np.array([[1.0, 0.0], [np.nan, 0.0]]), np.eye(2))
    with pytest.raises(TypeError, match="classifier must be a floating-point array"):
        uncertainty_scores(np.ones((2, 2)), np.eye(2, dtype=np.int64))
    with pytest.raises(ValueError, match=r"new_features must be a 2-D \(n, d\) feature array"):
        backfill_order("oracle", 2, new_features=np.ones(2), old_features=np.ones((2, 1)))


def test_orderings_import_neither_torch_nor_the_metrics_engine():
    code = ("import sys, compatkit.ordering; "
            "print(sorted(m for m in ('torch', 'compatkit.eval') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"
