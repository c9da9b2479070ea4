"""The system demo with tiny random models: the live accuracy's end points equal
``compatkit.eval``'s cross-test and self-test values."""

from __future__ import annotations

import numpy as np
import pytest

from compatkit.errors import CompatkitError
from compatkit.index.demo import run_system_demo


def _images(n: int, classes: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    labels = np.arange(n) % classes
    base = rng.integers(0, 256, (classes, 1, 16, 16))
    noise = rng.integers(-30, 30, (n, 1, 16, 16))
    return np.clip(base[labels] + noise, 0, 255).astype(np.uint8), labels


def test_demo_accuracy_over_time(tmp_path, make_model):
    from compatkit.eval.metrics import retrieval_metrics
    from compatkit.index import ArtifactEmbedder

    old = make_model("old", seed=0)
    new = make_model("new", seed=1, compatible_with=("old",))
    images, labels = _images(70, 5)
    seen = []
    result = run_system_demo(old, new, images, labels, work_dir=tmp_path / "demo", n_queries=10,
                             batch_size=6, batch_pause_s=0.01, seed=0, on_point=seen.append)
    points = result.points
    assert list(points) == seen
    fractions = [p.fraction for p in points]
    assert fractions == sorted(fractions) and fractions[-1] == 1.0
    assert points[-1].accuracy == pytest.approx(result.reference_self)
    assert points[-1].answered_by == {"new": 10}
    assert points[0].fraction == 0.0  # measured before the first batch
    assert points[0].accuracy == pytest.approx(result.reference_cross)
    assert points[0].answered_by == {"old": 10}
    assert len(points) >= 3
    # old/old before the upgrade, recomputed with the metrics engine
    perm = np.random.default_rng(0).permutation(70)
    q, g = np.sort(perm[:10]), np.sort(perm[10:])
    emb = ArtifactEmbedder(old)
    ref = retrieval_metrics(emb.embed_images(images[q]), labels[q], emb.embed_images(images[g]),
                            labels[g], metrics=["cmc@1"])["cmc@1"]
    assert result.old_accuracy == pytest.approx(ref)


def test_demo_needs_a_fresh_folder(tmp_path, make_model):
    (tmp_path / "used").mkdir()
    (tmp_path / "used" / "x").touch()
    images, labels = _images(20, 2)
    with pytest.raises(CompatkitError, match="is not empty"):
        run_system_demo(make_model("a"), make_model("b"), images, labels,
                        work_dir=tmp_path / "used", n_queries=5)
    with pytest.raises(ValueError, match=r"n_queries must lie in \[1, 19\], got 20"):
        run_system_demo("a", "b", images, labels, work_dir=tmp_path / "new", n_queries=20)
