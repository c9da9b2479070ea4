"""PNG plots of curves and compatibility matrices."""

import numpy as np
import pytest

from compatkit.eval.compat import EmbeddingSet, compatibility_matrix
from compatkit.eval.curve import BackfillCurve
from compatkit.eval.plots import plot_backfill_curves, plot_compatibility_matrix

PNG = b"\x89PNG\r\n\x1a\n"


def curve(values, nfr):
    return BackfillCurve(
        fractions=(0, 0.5, 1),
        counts=(0, 5, 10),
        metrics={"map": values},
        nfr=nfr,
        pfr=[0, 0, 0],
        nfi=[0, 0, 0],
        reference="old_old",
        top_k=1,
    )


def test_backfill_plot_writes_png(tmp_path):
    curves = {
        "random": curve([0.4, 0.5, 0.6], [0, 0.1, 0]),
        "uncertainty": curve([0.4, 0.55, 0.6], [0, 0.05, 0]),
    }
    out = plot_backfill_curves(curves, tmp_path / "sub" / "curve.png", old_old=0.35, new_new=0.6)
    assert out.read_bytes()[:8] == PNG
    with pytest.raises(ValueError, match="no metric 'cmc@1'"):
        plot_backfill_curves(curves, tmp_path / "c.png", metric="cmc@1")
    with pytest.raises(ValueError, match="PNG"):
        plot_backfill_curves(curves, tmp_path / "c.pdf")


def test_matrix_plot_writes_png(tmp_path):
    rng = np.random.default_rng(0)
    ql, gl = rng.integers(0, 3, 10), rng.integers(0, 3, 20)
    es = EmbeddingSet(
        rng.normal(size=(10, 4)).astype(np.float32),
        ql,
        rng.normal(size=(20, 4)).astype(np.float32),
        gl,
    )
    wide = EmbeddingSet(np.ones((10, 6), np.float32), ql, np.ones((20, 6), np.float32), gl)
    m = compatibility_matrix({"old": es, "new": es, "wide": wide}, metrics=["map"])
    out = plot_compatibility_matrix(m, tmp_path / "m.png")
    assert out.read_bytes()[:8] == PNG
    with pytest.raises(ValueError, match="was not evaluated"):
        plot_compatibility_matrix(m, tmp_path / "m.png", metric="cmc@1")
