"""Shared fixtures: a store with two hash-embedded versions, vB declared compatible with vA."""

from __future__ import annotations

import numpy as np
import pytest

from compatkit.index import HashEmbedder, IndexStore, ItemInput
from compatkit.index.vectors import l2_normalize

DIM = 8


def hash_versions(store: IndexStore) -> None:
    """vA (seed 0) and vB (seed 1, anchored on vA so it resembles a compatible model)."""
    store.register_version("vA", dim=DIM, embedder=HashEmbedder("vA", DIM, seed=0))
    store.register_version("vB", dim=DIM, embedder=HashEmbedder(
        "vB", DIM, seed=1, anchor_seed=0, anchor_weight=0.7))


@pytest.fixture()
def store(tmp_path):
    st = IndexStore(tmp_path / "store")
    hash_versions(st)
    st.declare_compatible("vB", "vA")
    yield st
    st.close()


def fill(store: IndexStore, n: int, name: str = "c", version: str = "vA"):
    """A collection of ``n`` items ``i0..`` with sources ``src0..`` and a label in metadata."""
    coll = store.create_collection(name, version)
    coll.add([ItemInput(f"i{i}", source=f"src{i}", metadata={"label": i % 3}) for i in range(n)])
    return coll


@pytest.fixture()
def torch_one_thread():
    """One torch thread while the test runs (two threads on a shared 2-core box crawl)."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture()
def make_model(tmp_path, torch_one_thread):
    """A function saving a tiny random image model artifact; returns its folder."""
    import torch

    from compatkit.artifacts import InputSpec, Manifest, save_module
    from compatkit.models import create_model

    def make(name: str, *, seed: int = 0, embed_dim: int = 8, num_classes: int | None = 4,
             compatible_with: tuple[str, ...] = (), in_chans: int = 1) -> str:
        torch.manual_seed(seed)
        model = create_model(backbone="resnet10_cifar", width=0.125, embed_dim=embed_dim,
                             num_classes=num_classes, in_chans=in_chans).eval()
        manifest = Manifest(model_version=name, spec=model.spec, embed_dim=embed_dim,
                            normalized=True, compatible_with=compatible_with,
                            input=InputSpec(image_size=16, in_chans=in_chans,
                                            mean=(0.5,) * in_chans, std=(0.25,) * in_chans))
        return str(save_module(tmp_path / "artifacts" / name, model, manifest))

    return make


@pytest.fixture()
def make_transformation(tmp_path, torch_one_thread):
    """A function saving a tiny random transformation artifact; returns its folder."""
    import torch

    from compatkit.artifacts import Manifest, save_module
    from compatkit.models import create_transformation

    def make(name: str, old: str, new: str, *, d_old: int = DIM, d_new: int = DIM,
             sigma_dim: int = 0, d_side: int | None = None, seed: int = 0) -> str:
        torch.manual_seed(seed)
        module = create_transformation(d_old=d_old, d_new=d_new, inner=16, sigma_dim=sigma_dim,
                                       d_side=d_side).eval()
        manifest = Manifest(kind="transformation", model_version=name, spec=module.spec,
                            embed_dim=d_new, normalized=False, transforms_from=old,
                            transforms_to=new)
        return str(save_module(tmp_path / "artifacts" / name, module, manifest))

    return make


def unit_vectors(n: int, d: int, seed: int = 0) -> np.ndarray:
    """(n, d) float32 random L2-normalised rows."""
    return l2_normalize(np.random.default_rng(seed).standard_normal((n, d)).astype(np.float32))


def brute_top_k(x: np.ndarray, keys: np.ndarray, q: np.ndarray, k: int):
    """Exact inner-product top-k of ``q`` over the rows of ``x``: (scores, keys of the rows)."""
    s = q @ x.T
    idx = np.argsort(-s, axis=1, kind="stable")[:, :k]
    return np.take_along_axis(s, idx, 1), keys[idx]


def mean_recall(found: np.ndarray, truth: np.ndarray) -> float:
    """Mean over queries of |found ∩ truth| / k, for (nq, k) key tables."""
    k = truth.shape[1]
    return float(np.mean([len(set(a) & set(t)) / k for a, t in zip(found, truth, strict=True)]))
