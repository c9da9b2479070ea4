"""Compatibility criterion, update gain, compatibility matrix and CoReS AC / AM."""

import json

import numpy as np
import pytest

from compatkit.eval.compat import (
    CompatibilityMatrix,
    EmbeddingSet,
    average_compatibility,
    average_multimodel_accuracy,
    compatibility_matrix,
    is_compatible,
    update_gain,
)
from compatkit.eval.metrics import retrieval_metrics


def test_case9_criterion_and_update_gain():
    assert is_compatible(0.40, 0.45) is True
    assert update_gain(0.40, 0.45, 0.60) == pytest.approx(0.25)
    assert is_compatible(0.40, 0.40) is False  # strict
    assert update_gain(0.40, 0.30, 0.60) == pytest.approx(-0.5)
    with pytest.raises(ValueError, match="undefined"):
        update_gain(0.4, 0.5, 0.4)


def clustered(seed, n_query=120, n_gallery=400, classes=10, dim=16, noise=0.8):
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(classes, dim))
    ql, gl = rng.integers(0, classes, n_query), rng.integers(0, classes, n_gallery)
    q = (centres[ql] + noise * rng.normal(size=(n_query, dim))).astype(np.float32)
    g = (centres[gl] + noise * rng.normal(size=(n_gallery, dim))).astype(np.float32)
    return q, ql, g, gl


def test_case8_cross_test_wiring_same_model_equals_self_and_random_is_chance():
    q, ql, g, gl = clustered(0)
    rng = np.random.default_rng(1)
    feats = {
        "old": EmbeddingSet(q, ql, g, gl),
        "same": EmbeddingSet(q.copy(), ql, g.copy(), gl),
        "random": EmbeddingSet(
            rng.normal(size=q.shape).astype(np.float32),
            ql,
            rng.normal(size=g.shape).astype(np.float32),
            gl,
        ),
    }
    m = compatibility_matrix(feats, metrics=["map", "cmc@1"], paragon=None)
    for metric in ("map", "cmc@1"):
        assert m.value("same", "old", metric) == m.value("old", "old", metric)
        assert m.value("old", "same", metric) == m.value("old", "old", metric)
    prior = np.mean([np.mean(gl == c) for c in ql])
    assert m.value("old", "old", "map") > 0.8
    assert abs(m.value("random", "old", "map") - prior) < 0.05
    assert abs(m.value("random", "old", "cmc@1") - prior) < 0.08
    # queries come from the query model, the gallery from the gallery model
    direct = retrieval_metrics(feats["random"].query, ql, g, gl, metrics=["map"])["map"]
    assert m.value("random", "old", "map") == direct


def test_matrix_criterion_gain_json_and_markdown():
    q, ql, g, gl = clustered(2)
    rng = np.random.default_rng(3)
    noisy = (q + 0.9 * rng.normal(size=q.shape)).astype(np.float32)
    noisy_g = (g + 0.9 * rng.normal(size=g.shape)).astype(np.float32)
    feats = {
        "old": EmbeddingSet(noisy, ql, noisy_g, gl),
        "new": EmbeddingSet(q, ql, g, gl),
        "independent": EmbeddingSet(q, ql, g, gl),
        "wide": EmbeddingSet(
            np.ones((len(q), 5), np.float32), ql, np.ones((len(g), 5), np.float32), gl
        ),
    }
    m = compatibility_matrix(feats, metrics=["map"])
    assert isinstance(m, CompatibilityMatrix)
    assert m.value("wide", "old", "map") is None  # different dims: not comparable, no error
    crit, gains = m.criterion(), m.update_gains()
    assert crit["wide"]["map"] is None
    base, cross, top = (
        m.value("old", "old", "map"),
        m.value("new", "old", "map"),
        m.value("independent", "independent", "map"),
    )
    assert crit["new"]["map"] == (cross > base)
    assert gains["new"]["map"] == pytest.approx((cross - base) / (top - base))
    js = m.to_json()
    json.dumps(js)
    assert len(js["matrix"]) == 16
    row = next(r for r in js["matrix"] if r["query_model"] == "new" and r["gallery_model"] == "old")
    assert row["map"] == cross and row["comparable"] is True
    assert js["criterion"]["new"]["map"] == crit["new"]["map"]
    assert "old" not in js["criterion"]
    md = m.to_markdown()
    assert "| query \\ gallery | old | new | independent | wide |" in md
    assert f"{cross:.4f}" in md and "—" in md


def test_matrix_without_paragon_has_no_gain():
    q, ql, g, gl = clustered(4, n_query=30, n_gallery=60)
    m = compatibility_matrix({"old": EmbeddingSet(q, ql, g, gl)}, paragon="independent")
    assert m.paragon is None and m.update_gains() == {}


def test_matrix_errors():
    q, ql, g, gl = clustered(5, n_query=20, n_gallery=40)
    with pytest.raises(ValueError, match="reference model 'old'"):
        compatibility_matrix({"a": EmbeddingSet(q, ql, g, gl)})
    with pytest.raises(ValueError, match="embed different items"):
        compatibility_matrix(
            {"old": EmbeddingSet(q, ql, g, gl), "new": EmbeddingSet(q, ql + 1, g, gl)}
        )
    with pytest.raises(ValueError, match="one model embeds both sides"):
        compatibility_matrix({"old": EmbeddingSet(q, ql, g[:, :3], gl)})
    with pytest.raises(TypeError, match="EmbeddingSet"):
        compatibility_matrix({"old": (q, ql, g, gl)})


def test_average_compatibility_conventions():
    m = np.array(
        [
            [0.50, np.nan, np.nan],
            [0.50, 0.60, np.nan],  # M[1][0] == M[0][0]: passes under '<', fails under '<='
            [0.55, 0.58, 0.70],  # M[2][1] < M[1][1]: violation in both
        ]
    )
    assert average_compatibility(m, violation="<") == pytest.approx(2 / 3)
    assert average_compatibility(m, violation="<=") == pytest.approx(1 / 3)
    assert average_multimodel_accuracy(m) == pytest.approx(
        (0.5 + 0.5 + 0.6 + 0.55 + 0.58 + 0.7) / 6
    )
    with pytest.raises(ValueError, match="at least two"):
        average_compatibility([[0.5]])
    with pytest.raises(ValueError, match="square"):
        average_multimodel_accuracy([[0.5, 0.2]])
    with pytest.raises(ValueError, match="violation"):
        average_compatibility(m, violation="<<")


def test_as_array_feeds_coreS_scores():
    q, ql, g, gl = clustered(6, n_query=40, n_gallery=80)
    feats = {"old": EmbeddingSet(q, ql, g, gl), "new": EmbeddingSet(q, ql, g, gl)}
    m = compatibility_matrix(feats, metrics=["cmc@1"])
    arr = m.as_array("cmc@1", order=["old", "new"])
    assert arr.shape == (2, 2) and np.all(arr == arr[0, 0])
    assert average_compatibility(arr, violation="<") == 1.0
    assert average_compatibility(arr, violation="<=") == 0.0
