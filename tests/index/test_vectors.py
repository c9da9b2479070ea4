"""Vector checks at the edge and the BLOB encoding."""

from __future__ import annotations

import numpy as np
import pytest

from compatkit.index.vectors import as_vectors, from_blob, l2_normalize, stack_blobs, to_blob


def test_one_vector_becomes_one_row():
    out = as_vectors([3.0, 4.0], 2)
    assert out.shape == (1, 2) and out.dtype == np.float32
    np.testing.assert_array_equal(out, [[3.0, 4.0]])


@pytest.mark.parametrize(("value", "message"), [
    ([1.0, 2.0, 3.0], "vectors have dimension 3, expected 2"),
    ([[1.0, 0.0], [np.nan, 1.0]], "vectors row 1 holds NaN or infinite values (float32 holds at "
                                  "most ±3.4e38)"),
    ([[1.0, 0.0], [0.0, np.inf]], "vectors row 1 holds NaN or infinite values (float32 holds at "
                                  "most ±3.4e38)"),
    ([[1.0, 0.0], [0.0, 1e39]], "vectors row 1 holds NaN or infinite values (float32 holds at "
                                "most ±3.4e38)"),
    ([[0.0, 0.0]], "vectors row 0 is all zeros; a cosine score needs a non-zero vector"),
    ([[[1.0, 2.0]]], "vectors must be (n, 2), got shape (1, 1, 2)"),
    ("ab", "vectors must be numbers, got str"),
])
def test_bad_vectors_name_the_problem(value, message):
    with pytest.raises(ValueError) as err:
        as_vectors(value, 2)
    assert str(err.value) == message


def test_blob_round_trip_is_exact():
    v = np.array([0.1, -2.5, 3e-8], dtype=np.float32)
    blob = to_blob(v)
    assert len(blob) == 12
    np.testing.assert_array_equal(from_blob(blob, 3), v)
    np.testing.assert_array_equal(stack_blobs([blob, blob], 3), np.stack([v, v]))
    with pytest.raises(ValueError, match="stored vector has 12 bytes, expected 16"):
        from_blob(blob, 4)


def test_l2_normalize_rows():
    out = l2_normalize(np.array([[3.0, 4.0], [0.0, 2.0]]))
    np.testing.assert_allclose(out, [[0.6, 0.8], [0.0, 1.0]], rtol=1e-6)


@pytest.mark.parametrize(("row", "unit"), [
    ([3e38, 3e38, 0.0, 0.0], [0.5 ** 0.5, 0.5 ** 0.5, 0.0, 0.0]),  # float32 norm overflows
    ([-3.4e38, 3.4e38, 3.4e38, 3.4e38], [-0.5, 0.5, 0.5, 0.5]),
    ([1e20, 1e20, 0.0, 0.0], [0.5 ** 0.5, 0.5 ** 0.5, 0.0, 0.0]),  # squares overflow float32
    ([1e-30, 0.0, 0.0, 0.0], [1.0, 0.0, 0.0, 0.0]),  # squares underflow to zero
    ([1e-45, 0.0, -1e-45, 0.0], [0.5 ** 0.5, 0.0, -(0.5 ** 0.5), 0.0]),  # subnormal
])
def test_l2_normalize_neither_overflows_nor_underflows(row, unit):
    checked = as_vectors(row, 4)  # finite and non-zero: accepted at the edge
    out = l2_normalize(checked)
    assert out.dtype == np.float32
    np.testing.assert_allclose(out, [unit], rtol=1e-6, atol=1e-7)


def test_l2_normalize_refuses_non_finite_rows_and_keeps_zero_rows():
    with pytest.raises(ValueError, match="row 1 holds NaN or infinite values; it cannot be "
                                         "normalised"):
        l2_normalize(np.array([[1.0, 0.0], [np.inf, 1.0]]))
    np.testing.assert_array_equal(l2_normalize(np.zeros((1, 3))), np.zeros((1, 3)))


def test_huge_vectors_score_one_along_their_own_direction(tmp_path):
    from compatkit.index import IndexStore, ItemInput

    store = IndexStore(tmp_path / "st")
    store.register_version("v", dim=4)
    coll = store.create_collection("c", "v")
    coll.add([ItemInput("huge", vector=[3e38, 3e38, 0.0, 0.0]),
              ItemInput("tiny", vector=[0.0, 0.0, 1e-30, 0.0]),
              ItemInput("plain", vector=[0.0, 0.0, 0.0, 1.0])])
    hits = coll.search([1e20, 1e20, 0.0, 0.0], k=3).hits
    assert [h.id for h in hits[:1]] == ["huge"]
    assert hits[0].score == pytest.approx(1.0, abs=1e-6)
    assert [h.score for h in hits[1:]] == pytest.approx([0.0, 0.0], abs=1e-6)
    assert coll.search([0.0, 0.0, 5.0, 0.0], k=1).hits[0].id == "tiny"
    store.close()
