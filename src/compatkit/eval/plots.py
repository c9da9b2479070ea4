"""PNG plots of backfilling curves and compatibility matrices (matplotlib, imported lazily).

Install the extra with ``pip install 'compatkit[plots]'``. The figures are drawn without
pyplot, so no display or global backend state is touched.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from compatkit.eval.compat import CompatibilityMatrix
from compatkit.eval.curve import BackfillCurve


def _figure(**kwargs: Any) -> Any:
    try:
        from matplotlib.figure import Figure
    except ImportError as exc:  # pragma: no cover - exercised only without matplotlib
        raise ImportError(
            "plots need matplotlib; install it with: pip install 'compatkit[plots]'"
        ) from exc
    return Figure(**kwargs)


def _save(fig: Any, path: str | os.PathLike[str]) -> Path:
    out = Path(path)
    if out.suffix.lower() != ".png":
        raise ValueError(f"plots are saved as PNG; got the path {str(out)!r}")
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=120, bbox_inches="tight")
    return out


def plot_backfill_curves(
    curves: Mapping[str, BackfillCurve],
    path: str | os.PathLike[str],
    *,
    metric: str = "map",
    old_old: float | None = None,
    new_new: float | None = None,
    show_nfr: bool = True,
    title: str | None = None,
) -> Path:
    """Metric vs backfilled fraction, one line per ordering, plus an NFR panel.

    ``old_old`` and ``new_new`` (the no-update and full-update levels) are drawn as horizontal
    lines when given. The legend shows each ordering's trapezoid AUC.

    Raises:
        ValueError: no curves, a curve without ``metric``, or a non-PNG path.
    """
    if not curves:
        raise ValueError("plot_backfill_curves needs at least one curve, got none")
    for name, curve in curves.items():
        if metric not in curve.metrics:
            raise ValueError(
                f"curve {name!r} has no metric {metric!r}; it has {sorted(curve.metrics)}"
            )
    fig = _figure(figsize=(6.4, 6.4 if show_nfr else 4.2))
    if show_nfr:
        ax, ax_nfr = fig.subplots(2, 1, sharex=True, gridspec_kw={"height_ratios": [2, 1]})
    else:
        ax, ax_nfr = fig.subplots(1, 1), None
    for name, curve in curves.items():
        auc = curve.auc[metric]["trapezoid"]
        ax.plot(
            curve.fractions,
            curve.metrics[metric],
            marker="o",
            ms=3,
            label=f"{name} (AUC {auc:.4f})",
        )
        if ax_nfr is not None:
            ax_nfr.plot(curve.fractions, curve.nfr, marker="o", ms=3, label=name)
    if old_old is not None:
        ax.axhline(old_old, color="grey", ls="--", lw=1, label=f"old/old {old_old:.4f}")
    if new_new is not None:
        ax.axhline(new_new, color="black", ls=":", lw=1, label=f"new/new {new_new:.4f}")
    ax.set_ylabel(metric)
    ax.set_title(title or f"Backfilling curve ({metric})")
    ax.grid(alpha=0.3)
    ax.legend(fontsize="small")
    last = ax_nfr if ax_nfr is not None else ax
    last.set_xlabel("fraction of the gallery backfilled")
    if ax_nfr is not None:
        ax_nfr.set_ylabel("NFR")
        ax_nfr.grid(alpha=0.3)
    return _save(fig, path)


def plot_compatibility_matrix(
    matrix: CompatibilityMatrix,
    path: str | os.PathLike[str],
    *,
    metric: str | None = None,
    title: str | None = None,
) -> Path:
    """Heat map of M(query model, gallery model) with the values written in the cells;
    incomparable pairs (different dimensions) are left blank.

    Raises:
        ValueError: ``metric`` was not evaluated, or a non-PNG path.
    """
    metric = metric or matrix.metrics[0]
    if metric not in matrix.metrics:
        raise ValueError(f"metric {metric!r} was not evaluated; have {list(matrix.metrics)}")
    arr = matrix.as_array(metric)
    n = len(matrix.models)
    fig = _figure(figsize=(1.2 * n + 2.5, 1.0 * n + 1.8))
    ax = fig.subplots()
    im = ax.imshow(np.ma.masked_invalid(arr), cmap="viridis", vmin=0.0, vmax=1.0)
    ax.set_xticks(range(n), labels=matrix.models, rotation=30, ha="right")
    ax.set_yticks(range(n), labels=matrix.models)
    ax.set_xlabel("gallery model")
    ax.set_ylabel("query model")
    for i in range(n):
        for j in range(n):
            if np.isfinite(arr[i, j]):
                ax.text(
                    j,
                    i,
                    f"{arr[i, j]:.3f}",
                    ha="center",
                    va="center",
                    color="white" if arr[i, j] < 0.5 else "black",
                    fontsize="small",
                )
    fig.colorbar(im, ax=ax, label=metric)
    ax.set_title(title or f"Compatibility matrix ({metric})")
    return _save(fig, path)
