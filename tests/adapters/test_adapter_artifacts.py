"""Adapters are transformation artifacts: they round-trip, upgrade stored features (also from
the command line) and chain like any transformation."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from compatkit.adapters import FitOptions, fit_adapter, save_adapter
from compatkit.artifacts import FeatureSet, Manifest, load_features, load_module, save_features
from compatkit.feature_upgrade import upgrade_features

SRC = Path(__file__).resolve().parents[2] / "src"


def unit(x: np.ndarray) -> np.ndarray:
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


def features(version: str, x: np.ndarray) -> FeatureSet:
    manifest = Manifest(model_version=version, spec={}, embed_dim=x.shape[1], normalized=True)
    return FeatureSet(x, np.arange(len(x)) % 5, manifest, np.arange(len(x)))


@pytest.mark.parametrize(("kind", "options", "side"), [
    ("procrustes", FitOptions(), False),
    ("lowrank", FitOptions(rank=3), False),
    ("mlp", FitOptions(inner=16, epochs=2), False),
    ("fct", FitOptions(inner=16, epochs=2), True),
])
def test_adapter_artifact_round_trips(tmp_path, kind, options, side):
    rng = np.random.default_rng(0)
    old, new = rng.normal(size=(60, 6)), rng.normal(size=(60, 8))
    s = rng.normal(size=(60, 4)) if side else None
    fitted = fit_adapter(old, new, kind, "old-to-new", side=s, options=options)
    save_adapter(fitted, tmp_path / "a", data={"old": "o.npy"})
    module, manifest = load_module(tmp_path / "a")
    x = torch.from_numpy(old[:5].astype(np.float32))
    st = None if s is None else torch.from_numpy(s[:5].astype(np.float32))
    with torch.no_grad():
        assert torch.equal(module(x, st).embedding, fitted.module(x, st).embedding)
    assert manifest.kind == "transformation"
    assert (manifest.transforms_from, manifest.transforms_to) == ("old", "new")
    assert manifest.spec["d_old"] == 6 and manifest.spec["d_new"] == 8
    assert manifest.spec.get("d_side") == (4 if side else None)
    assert manifest.config["kind"] == kind and manifest.config["direction"] == "old-to-new"
    assert manifest.data == {"pairs": 60, "old": "o.npy"}
    assert manifest.method == f"adapter-{kind}"


def test_query_adapter_manifest_maps_new_into_old(tmp_path):
    rng = np.random.default_rng(1)
    old = features("v1", unit(rng.normal(size=(30, 4))))
    new = features("v2", unit(rng.normal(size=(30, 6))))
    from compatkit.adapters.io import Vectors

    fitted = fit_adapter(Vectors(old.features, version="v1", normalized=True),
                         Vectors(new.features, version="v2", normalized=True),
                         "linear", "new-to-old")
    manifest = load_module(save_adapter(fitted, tmp_path / "q"))[1]
    assert (manifest.transforms_from, manifest.transforms_to) == ("v2", "v1")
    assert manifest.embed_dim == 4 and manifest.normalized


def fitted_gallery_adapter(tmp_path: Path) -> tuple[FeatureSet, np.ndarray, Path]:
    rng = np.random.default_rng(2)
    q = np.linalg.qr(rng.normal(size=(8, 8)))[0]
    old = unit(rng.normal(size=(40, 8)))
    save_features(tmp_path / "old.safetensors", features("v1", old))
    save_features(tmp_path / "new.safetensors", features("v2", old @ q))
    from compatkit.adapters.io import load_vectors

    fitted = fit_adapter(load_vectors(tmp_path / "old.safetensors"),
                         load_vectors(tmp_path / "new.safetensors"), "procrustes", "old-to-new")
    return features("v1", old), old @ q, save_adapter(fitted, tmp_path / "adapter")


def test_upgrade_features_applies_a_gallery_adapter(tmp_path):
    stored, expected, adapter = fitted_gallery_adapter(tmp_path)
    upgraded = upgrade_features(stored, [adapter])
    assert upgraded.manifest.model_version == "v2"
    assert upgraded.manifest.lineage[0] == "v1" and upgraded.manifest.lineage[-1] == "v2"
    assert np.abs(upgraded.features - expected).max() < 1e-5
    assert np.array_equal(upgraded.ids, stored.ids)


def test_cli_upgrade_embeddings_accepts_an_adapter(tmp_path):
    _, expected, adapter = fitted_gallery_adapter(tmp_path)
    env = {**os.environ, "PYTHONPATH": f"{SRC}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    res = subprocess.run([sys.executable, "-m", "compatkit", "upgrade-embeddings", "--features",
                          str(tmp_path / "old.safetensors"), "--transformation", str(adapter),
                          "--out", str(tmp_path / "up.safetensors")],
                         capture_output=True, text=True, env=env, timeout=120)
    assert res.returncode == 0, res.stderr
    assert json.loads(res.stdout)["model_version"] == "v2"
    assert np.abs(load_features(tmp_path / "up.safetensors").features - expected).max() < 1e-5


def test_adapters_chain(tmp_path):
    rng = np.random.default_rng(3)
    v1 = unit(rng.normal(size=(40, 6)))
    q12, q23 = (np.linalg.qr(rng.normal(size=(6, 6)))[0] for _ in range(2))
    from compatkit.adapters.io import Vectors

    def vec(x, version):
        return Vectors(x, version=version, normalized=True)

    a12 = save_adapter(fit_adapter(vec(v1, "v1"), vec(v1 @ q12, "v2"), "procrustes",
                                   "old-to-new"), tmp_path / "a12")
    a23 = save_adapter(fit_adapter(vec(v1 @ q12, "v2"), vec(v1 @ q12 @ q23, "v3"), "procrustes",
                                   "old-to-new"), tmp_path / "a23")
    out = upgrade_features(features("v1", v1), [a12, a23])
    assert out.manifest.model_version == "v3"
    assert np.abs(out.features - v1 @ q12 @ q23).max() < 1e-5


def test_index_upgrades_a_collection_through_a_gallery_adapter(tmp_path):
    from compatkit.index import HashEmbedder, IndexStore, ItemInput, run_backfill

    store = IndexStore(tmp_path / "store")
    store.register_version("vA", dim=8, embedder=HashEmbedder("vA", 8, seed=0))
    store.register_version("vB", dim=6, embedder=HashEmbedder("vB", 6, seed=1))
    coll = store.create_collection("c", "vA")
    coll.add([ItemInput(f"i{i}", vector=unit(np.random.default_rng(i).normal(size=(1, 8)))[0])
              for i in range(30)])
    old = np.stack([coll.get(f"i{i}", with_vectors=True).current.vector for i in range(30)])
    from compatkit.adapters.io import Vectors

    rng = np.random.default_rng(9)
    fitted = fit_adapter(Vectors(old, version="vA"), Vectors(unit(old @ rng.normal(size=(8, 6))),
                                                             version="vB"),
                         "linear", "old-to-new")
    store.register_artifact(save_adapter(fitted, tmp_path / "adapter"))
    job = coll.start_upgrade("vB", strategy="transform").job
    assert run_backfill(store, job).state == "completed"
    assert coll.serving_version == "vB"
    got = coll.get("i3", with_vectors=True).current
    assert (got.version, got.transformed_from) == ("vB", "vA")
    expected = fitted.module(torch.from_numpy(old[3:4])).embedding.detach().numpy()[0]
    np.testing.assert_allclose(got.vector, expected / np.linalg.norm(expected), atol=1e-5)
    store.close()


def test_index_serves_new_queries_through_a_fitted_query_adapter(tmp_path):
    from compatkit.index import HashEmbedder, IndexStore, ItemInput

    old_model, new_model = HashEmbedder("vA", 8, seed=0), HashEmbedder("vB", 6, seed=1)
    pairs = [f"pair{i}" for i in range(40)]
    from compatkit.adapters.io import Vectors

    fitted = fit_adapter(Vectors(old_model.embed_sources(pairs), version="vA"),
                         Vectors(new_model.embed_sources(pairs), version="vB"), "linear",
                         "new-to-old")
    store = IndexStore(tmp_path / "store")
    store.register_version("vA", dim=8, embedder=old_model)
    store.register_version("vB", dim=6, embedder=new_model)
    coll = store.create_collection("c", "vA")
    coll.add([ItemInput(f"i{i}", source=f"src{i}") for i in range(30)])
    store.register_artifact(save_adapter(fitted, tmp_path / "adapter"))
    queries = new_model.embed_sources(["q0", "q1"])
    adapted = unit(fitted.module(torch.from_numpy(queries)).embedding.detach().numpy())
    stored = unit(np.stack([coll.get(f"i{i}", with_vectors=True).current.vector
                            for i in range(30)]))
    for row, res in zip(adapted @ stored.T, coll.search_batch(queries, version="vB", k=5),
                        strict=True):
        assert [h.id for h in res.hits] == [f"i{j}" for j in np.argsort(-row, kind="stable")[:5]]
        np.testing.assert_allclose([h.score for h in res.hits], np.sort(row)[::-1][:5],
                                   atol=1e-5)
    store.close()
