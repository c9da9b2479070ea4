"""Adapter kinds: closed forms recover known maps, the MLP learns what a linear map cannot,
and bad pairs fail with clear errors."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from compatkit.adapters import FitOptions, NotEnoughPairsError, fit_adapter
from compatkit.adapters.io import Vectors
from compatkit.errors import CompatkitError, UnknownNameError


def orthonormal(rng: np.random.Generator, d_in: int, d_out: int) -> np.ndarray:
    """A d_in × d_out block of a random orthogonal matrix (orthonormal rows or columns)."""
    q, _ = np.linalg.qr(rng.normal(size=(max(d_in, d_out), max(d_in, d_out))))
    return q[:d_in, :d_out]


def weights(module) -> tuple[np.ndarray, np.ndarray]:
    return module.matrix().detach().numpy(), module.bias.detach().numpy()


@pytest.mark.parametrize(("d_in", "d_out"), [(12, 12), (6, 12), (12, 6)])
def test_procrustes_recovers_orthogonal_map(d_in, d_out):
    rng = np.random.default_rng(0)
    q = orthonormal(rng, d_in, d_out)
    # for d_in > d_out the source vectors live in the d_out directions the map keeps
    x = rng.normal(size=(100, d_in)) if d_in <= d_out else rng.normal(size=(100, d_out)) @ q.T
    fitted = fit_adapter(x, x @ q, "procrustes", "old-to-new")
    w, b = weights(fitted.module)
    assert np.abs(w - q).max() < 1e-5
    assert np.abs(b).max() == 0
    assert fitted.module.d_in == d_in and fitted.module.d_out == d_out


def test_procrustes_new_to_old_maps_new_vectors_back():
    rng = np.random.default_rng(1)
    q = orthonormal(rng, 10, 10)
    old = rng.normal(size=(50, 10))
    fitted = fit_adapter(old, old @ q, "procrustes", "new-to-old")
    w, _ = weights(fitted.module)
    assert np.abs(w - q.T).max() < 1e-5
    assert (fitted.source_version, fitted.target_version) == ("new", "old")


@pytest.mark.parametrize(("d_in", "d_out"), [(10, 10), (8, 14), (14, 5)])
def test_linear_recovers_affine_map(d_in, d_out):
    rng = np.random.default_rng(2)
    a, c = rng.normal(size=(d_in, d_out)), rng.normal(size=d_out)
    x = rng.normal(size=(60, d_in))
    fitted = fit_adapter(x, x @ a + c, "linear", "old-to-new", options=FitOptions(ridge=0))
    w, b = weights(fitted.module)
    assert np.abs(w - a).max() < 1e-5
    assert np.abs(b - c).max() < 1e-5


@pytest.mark.parametrize(("d_in", "d_out", "rank"), [(12, 12, 3), (10, 16, 4), (16, 9, 2)])
def test_lowrank_recovers_affine_map_of_rank_r(d_in, d_out, rank):
    rng = np.random.default_rng(3)
    a = rng.normal(size=(d_in, rank)) @ rng.normal(size=(rank, d_out))
    c = rng.normal(size=d_out)
    x = rng.normal(size=(80, d_in))
    fitted = fit_adapter(x, x @ a + c, "lowrank", "old-to-new",
                         options=FitOptions(ridge=0, rank=rank))
    w, b = weights(fitted.module)
    assert np.abs(w - a).max() < 1e-5
    assert np.abs(b - c).max() < 1e-5
    assert fitted.module.down.shape == (d_in, rank) and fitted.module.up.shape == (rank, d_out)


def test_lowrank_keeps_the_best_rank_r_part_of_a_full_map():
    rng = np.random.default_rng(4)
    x = rng.normal(size=(200, 8))
    fitted = fit_adapter(x, x @ rng.normal(size=(8, 8)), "lowrank", "old-to-new",
                         options=FitOptions(ridge=0, rank=3))
    singular = np.linalg.svd(weights(fitted.module)[0], compute_uv=False)
    assert singular[3:].max() < 1e-5 < singular[2]


def test_mlp_beats_linear_on_a_non_linear_map():
    rng = np.random.default_rng(5)
    x = rng.normal(size=(1200, 6)).astype(np.float32)
    y = np.sin(2 * x) + x
    options = FitOptions(inner=64, epochs=30, seed=0)
    mlp = fit_adapter(x[:1000], y[:1000], "mlp", "old-to-new", options=options)
    linear = fit_adapter(x[:1000], y[:1000], "linear", "old-to-new", options=options)

    def mse(fitted) -> float:
        out = fitted.module(torch.from_numpy(x[1000:])).embedding.detach().numpy()
        return float(np.mean((out - y[1000:]) ** 2))

    assert mlp.stats["heldout_mse"] < 0.85 * mlp.stats["heldout_mse_linear"]
    assert mse(mlp) < 0.85 * mse(linear)


def test_fct_uses_the_side_information():
    rng = np.random.default_rng(6)
    x = rng.normal(size=(800, 4)).astype(np.float32)
    side = rng.normal(size=(800, 3)).astype(np.float32)
    y = x + np.sin(2 * side[:, :1])  # what y adds to x is only in the side-information
    options = FitOptions(inner=64, epochs=25, seed=0)
    fct = fit_adapter(x, y, "fct", "old-to-new", side=side, options=options)
    mlp = fit_adapter(x, y, "mlp", "old-to-new", options=options)
    assert fct.module.d_side == 3
    assert fct.stats["heldout_mse"] < 0.7 * mlp.stats["heldout_mse"]


def test_untrained_residual_module_equals_its_skip():
    from compatkit.models import ResidualTransformation

    module = ResidualTransformation(5, 3, inner=8).eval()
    x = torch.randn(4, 5)
    assert torch.equal(module(x).embedding, module.skip(x).embedding)


def test_pair_files_of_different_lengths_raise():
    with pytest.raises(CompatkitError, match="old 10 rows, new 9 rows"):
        fit_adapter(np.ones((10, 3)), np.ones((9, 3)), "linear", "old-to-new")


def test_nan_rows_are_named():
    old = np.random.default_rng(0).normal(size=(30, 3))
    old[[4, 17], 1] = np.nan
    with pytest.raises(CompatkitError, match=r"old vectors hold NaN or inf in 2 rows .*\[4, 17\]"):
        fit_adapter(old, np.ones((30, 3)), "linear", "old-to-new")


@pytest.mark.parametrize(("kind", "options", "need"), [
    ("procrustes", FitOptions(), 8),
    ("linear", FitOptions(ridge=0), 13),
    ("lowrank", FitOptions(ridge=0, rank=2), 13),
    ("mlp", FitOptions(), 20),
])
def test_fewer_pairs_than_a_kind_needs_raise(kind, options, need):
    rng = np.random.default_rng(0)
    x, y = rng.normal(size=(7, 12)), rng.normal(size=(7, 8))
    with pytest.raises(NotEnoughPairsError, match=f"needs at least {need} pairs, got 7"):
        fit_adapter(x, y, kind, "old-to-new", options=options)


def test_ridge_lets_linear_fit_fewer_pairs_than_dimensions():
    rng = np.random.default_rng(0)
    fitted = fit_adapter(rng.normal(size=(7, 12)), rng.normal(size=(7, 8)), "linear",
                         "old-to-new", options=FitOptions(ridge=1e-2))
    assert np.isfinite(weights(fitted.module)[0]).all()


def test_unknown_kind_and_direction_raise():
    x = np.ones((30, 3))
    with pytest.raises(UnknownNameError, match="unknown adapter kind 'lineal'; did you mean "
                                               "linear"):
        fit_adapter(x, x, "lineal", "old-to-new")
    with pytest.raises(CompatkitError, match="unknown direction 'up'"):
        fit_adapter(x, x, "linear", "up")


def test_side_information_errors():
    rng = np.random.default_rng(0)
    x, side = rng.normal(size=(40, 3)), rng.normal(size=(40, 2))
    with pytest.raises(CompatkitError, match="kind 'linear' takes no side-information"):
        fit_adapter(x, x, "linear", "old-to-new", side=side)
    with pytest.raises(CompatkitError, match="kind 'fct' needs side-information"):
        fit_adapter(x, x, "fct", "old-to-new")
    with pytest.raises(CompatkitError, match="query adapter"):
        fit_adapter(x, x, "fct", "new-to-old", side=side)
    with pytest.raises(CompatkitError, match="side 39 rows"):
        fit_adapter(x, x, "fct", "old-to-new", side=side[:39])


def test_disagreeing_item_ids_raise():
    x = np.ones((5, 2), dtype=np.float32)
    old = Vectors(x, ids=np.arange(5))
    new = Vectors(x, ids=np.array([0, 1, 2, 4, 3]))
    with pytest.raises(CompatkitError, match="disagree on the ids of row 3"):
        fit_adapter(old, new, "procrustes", "old-to-new")


@pytest.mark.parametrize(("field", "value"), [("ridge", -1.0), ("rank", 0), ("epochs", 0),
                                              ("holdout", 1.0)])
def test_bad_options_raise(field, value):
    with pytest.raises(ValueError, match=field):
        FitOptions(**{field: value})
