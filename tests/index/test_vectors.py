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
    ([[1.0, 0.0], [np.nan, 1.0]], "vectors row 1 holds NaN or infinite values"),
    ([[1.0, 0.0], [0.0, np.inf]], "vectors row 1 holds NaN or infinite values"),
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
