"""Image-free upgrade of stored features: chained hops, version checks, side-info, σ scores."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from compatkit.artifacts import FeatureSet, Manifest, load_features, save_features, save_module
from compatkit.errors import CompatkitError, IncompatibleSpacesError
from compatkit.feature_upgrade import apply_transformation, sigma_scores, upgrade_features
from compatkit.models import Transformation


def _trained_like(t: Transformation, seed: int) -> Transformation:
    """Random BN statistics, so eval-mode outputs differ from a fresh module's."""
    g = torch.Generator().manual_seed(seed)
    for m in t.modules():
        if isinstance(m, torch.nn.BatchNorm1d):
            m.running_mean.copy_(torch.randn(m.num_features, generator=g))
            m.running_var.copy_(torch.rand(m.num_features, generator=g) + 0.5)
    return t.eval()


def save_transformation(path, t: Transformation, version: str, src: str, dst: str, *,
                        normalized: bool = False):
    manifest = Manifest(kind="transformation", model_version=version, spec=t.spec,
                        embed_dim=t.d_out, normalized=normalized, method="fct",
                        transforms_from=src, transforms_to=dst)
    save_module(path, t, manifest)
    return path


def features(version: str, dim: int, n: int = 10, *, kind="model", seed=0) -> FeatureSet:
    g = np.random.default_rng(seed)
    manifest = Manifest(kind=kind, model_version=version, spec={}, embed_dim=dim,
                        normalized=False)
    return FeatureSet(g.standard_normal((n, dim)).astype(np.float32), np.arange(n) % 3,
                      manifest, np.arange(100, 100 + n))


@pytest.fixture
def chain(tmp_path):
    torch.manual_seed(0)
    t12 = _trained_like(Transformation(6, 5, inner=8), 1)
    t23 = _trained_like(Transformation(5, 4, inner=8), 2)
    p12 = save_transformation(tmp_path / "t12", t12, "fct-12", "v1", "v2")
    p23 = save_transformation(tmp_path / "t23", t23, "fct-23", "v2", "v3")
    return t12, t23, p12, p23


def test_chained_upgrade_names_every_hop(chain, tmp_path):
    t12, t23, p12, p23 = chain
    fs = features("v1", 6)
    out = upgrade_features(fs, [p12, p23])
    with torch.no_grad():
        expected = t23(t12(torch.from_numpy(fs.features)).embedding).embedding.numpy()
    np.testing.assert_allclose(out.features, expected, rtol=1e-5, atol=1e-6)
    m = out.manifest
    assert (m.model_version, m.embed_dim, m.kind) == ("v3", 4, "model")
    assert m.lineage == ("v1", "fct-12", "v2", "fct-23", "v3")
    np.testing.assert_array_equal(out.labels, fs.labels)
    np.testing.assert_array_equal(out.ids, fs.ids)
    # the lineage survives a round trip and a further hop continues it
    save_features(tmp_path / "v2.safetensors", upgrade_features(fs, [p12]))
    resumed = upgrade_features(load_features(tmp_path / "v2.safetensors"), [p23])
    assert resumed.manifest.lineage == m.lineage
    np.testing.assert_allclose(resumed.features, out.features, rtol=1e-5, atol=1e-6)


def test_wrong_version_hops_are_refused(chain):
    _, _, p12, p23 = chain
    fs = features("v1", 6)
    with pytest.raises(IncompatibleSpacesError, match=r"maps v2 → v3.*version v1"):
        upgrade_features(fs, [p23])
    with pytest.raises(IncompatibleSpacesError, match="v2"):
        upgrade_features(fs, [p12, p12])
    with pytest.raises(CompatkitError, match="at least one"):
        upgrade_features(fs, [])
    with pytest.raises(CompatkitError, match="no transformation of the chain"):
        upgrade_features(fs, [p12], side=features("psi", 3, kind="side_info"))


def test_dimension_mismatch_is_refused(tmp_path):
    path = save_transformation(tmp_path / "t", Transformation(7, 5, inner=8), "t", "v1", "v2")
    with pytest.raises(IncompatibleSpacesError, match="7-d"):
        upgrade_features(features("v1", 6), [path])


def test_a_model_artifact_is_not_a_transformation(tmp_path):
    t = Transformation(6, 5, inner=8)
    manifest = Manifest(kind="model", model_version="m", spec={}, embed_dim=5, normalized=False)
    save_module(tmp_path / "m", t, manifest)
    with pytest.raises(CompatkitError, match="not a transformation"):
        upgrade_features(features("v1", 6), [tmp_path / "m"])


def test_side_information_hop(tmp_path):
    torch.manual_seed(1)
    t = _trained_like(Transformation(6, 5, d_side=3, inner=8), 3)
    path = save_transformation(tmp_path / "t", t, "fct-side", "v1", "v2", normalized=True)
    fs = features("v1", 6)
    side = features("psi", 3, kind="side_info", seed=1)
    out = upgrade_features(fs, [path], side=side)
    with torch.no_grad():
        raw = t(torch.from_numpy(fs.features), torch.from_numpy(side.features)).embedding
    expected = torch.nn.functional.normalize(raw, dim=1).numpy()
    np.testing.assert_allclose(out.features, expected, rtol=1e-5, atol=1e-6)
    assert out.manifest.normalized
    np.testing.assert_allclose(np.linalg.norm(out.features, axis=1), 1.0, rtol=1e-5)
    with pytest.raises(CompatkitError, match="needs side-information"):
        upgrade_features(fs, [path])
    with pytest.raises(CompatkitError, match="not a side-info model"):
        upgrade_features(fs, [path], side=features("psi", 3, kind="model"))
    with pytest.raises(CompatkitError, match="shape"):
        upgrade_features(fs, [path], side=features("psi", 3, n=9, kind="side_info"))
    shuffled = FeatureSet(side.features, side.labels, side.manifest, side.ids[::-1].copy())
    with pytest.raises(CompatkitError, match="ids"):
        upgrade_features(fs, [path], side=shuffled)


def test_apply_is_batch_size_independent_and_restores_the_mode():
    t = _trained_like(Transformation(4, 3, inner=8), 4).train()
    x = np.random.default_rng(0).standard_normal((11, 4)).astype(np.float32)
    a = apply_transformation(t, x, batch_size=3)
    b = apply_transformation(t, x, batch_size=1000)
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
    assert a.shape == (11, 3) and a.dtype == np.float32 and t.training
    assert apply_transformation(t, x[:0]).shape == (0, 3)
    with pytest.raises(ValueError, match="NaN"):
        apply_transformation(t, np.full((2, 4), np.nan, dtype=np.float32))
    with pytest.raises(ValueError, match="side-information"):
        apply_transformation(t, x, np.zeros((11, 2), dtype=np.float32))


def test_sigma_scores():
    t = _trained_like(Transformation(4, 3, inner=8, sigma_dim=3), 5)
    x = np.random.default_rng(1).standard_normal((7, 4)).astype(np.float32)
    scores = sigma_scores(t, x, batch_size=2)
    with torch.no_grad():
        expected = t(torch.from_numpy(x)).log_sigma.mean(1).numpy()
    np.testing.assert_allclose(scores, expected, rtol=1e-5, atol=1e-6)
    assert scores.shape == (7,)
    with pytest.raises(ValueError, match="no σ head"):
        sigma_scores(Transformation(4, 3, inner=8), x)
