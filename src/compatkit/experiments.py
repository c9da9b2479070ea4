"""Multi-stage experiments built from single training runs: the BiCT λ_b sweep and the
evaluation of a chained, image-free gallery upgrade (reference methods.md §2.5).

For each λ_b, stage one trains φ_n with ``bct`` (weight λ_b) against the old model and stage
two trains the forward transformation ψ with ``bict``; the row reports self M(φ_n, φ_n),
backward M(φ_n, φ_o), forward M(φ_n, ψ∘φ_o) and old/old M(φ_o, φ_o) on the held-out test set.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from compatkit.artifacts import FeatureSet
from compatkit.errors import CompatkitError, IncompatibleSpacesError
from compatkit.feature_upgrade import upgrade_features

log = logging.getLogger(__name__)

SWEEP_FILE = "bict_sweep.json"


@dataclass(frozen=True)
class BiCTSweepRow:
    """One λ_b of the sweep: the four retrieval tests (metric name → value) and the artifacts."""

    lambda_b: float
    self_test: dict[str, float]
    backward: dict[str, float]
    forward: dict[str, float]
    old_old: dict[str, float]
    new_model: str
    transformation: str


def bict_sweep(
    base_overrides: Sequence[str], lambdas: Sequence[float], out_dir: str | Path, *,
    old_model: str | Path, bct_config: str | Path | None = None,
    bict_config: str | Path | None = None, bct_overrides: Sequence[str] = (),
    bict_overrides: Sequence[str] = (),
) -> list[BiCTSweepRow]:
    """Train BCT(λ_b) then BiCT's ψ for every λ_b; write ``bict_sweep.json`` into ``out_dir``.

    Args:
        base_overrides: ``key.path=value`` overrides shared by both stages (data, model, train).
        lambdas: the λ_b values (BCT weights, >= 0), in table order.
        out_dir: runs go to ``out_dir/lambda_<λ>/{bct,bict}``.
        old_model: the frozen old model artifact φ_o.
        bct_config, bict_config: optional YAML recipes of the two stages (e.g.
            ``configs/omniglot/{bct,bict}.yaml``); the sweep sets their method name, λ_b, old
            model and new model and keeps their other method fields.
        bct_overrides, bict_overrides: stage-specific overrides (e.g. the transformation's
            optimiser), applied after ``base_overrides``.

    Returns:
        One row per λ_b, in the order given.

    Raises:
        ValueError: no λ_b, or a negative one.
    """
    from compatkit.train.config import load_config
    from compatkit.train.loop import train_or_reuse

    if not lambdas:
        raise ValueError("bict_sweep needs at least one lambda_b")
    bad = [lam for lam in lambdas if not float(lam) >= 0]
    if bad:
        raise ValueError(f"lambda_b values must be >= 0, got {bad}")
    out_dir = Path(out_dir)
    rows: list[BiCTSweepRow] = []
    for lam in lambdas:
        tag = f"{float(lam):g}"
        run_dir = out_dir / f"lambda_{tag}"
        common = [*base_overrides, f"old_model={old_model}"]
        stage_one = load_config(bct_config, [*common, f"name=bct-l{tag}", "method.name=bct",
                                             f"method.weight={float(lam)!r}", *bct_overrides])
        new = train_or_reuse(stage_one, run_dir / "bct")
        stage_two = load_config(bict_config, [*common, f"name=bict-l{tag}", "method.name=bict",
                                              f"frozen_models.new={new.artifact_dir}",
                                              *bict_overrides])
        psi = train_or_reuse(stage_two, run_dir / "bict")
        m = psi.metrics
        rows.append(BiCTSweepRow(
            lambda_b=float(lam), self_test=m.get("self", {}), backward=m.get("cross", {}),
            forward=m.get("transformed", {}), old_old=m.get("old_old", {}),
            new_model=str(new.artifact_dir), transformation=str(psi.artifact_dir),
        ))
        log.info("bict sweep: lambda_b=%s done", tag)
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / SWEEP_FILE).write_text(json.dumps([asdict(r) for r in rows], indent=2))
    return rows


def format_sweep(rows: Sequence[BiCTSweepRow], metric: str = "map") -> str:
    """A markdown table of one metric: λ_b | self | backward | forward | old/old."""
    def cell(values: dict[str, float]) -> str:
        return f"{values[metric]:.4f}" if metric in values else "–"

    lines = [f"| λ_b | self M(φn,φn) | backward M(φn,φo) | forward M(φn,ψ∘φo) | old/old "
             f"({metric}) |", "|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r.lambda_b:g} | {cell(r.self_test)} | {cell(r.backward)} | "
                     f"{cell(r.forward)} | {cell(r.old_old)} |")
    return "\n".join(lines)


@dataclass(frozen=True)
class UpgradeEvaluation:
    """Leave-one-out metrics of an upgraded gallery and its reference points."""

    upgraded: dict[str, float]
    self_test: dict[str, float]
    old_old: dict[str, float]
    features: FeatureSet


def chained_upgrade(
    query: FeatureSet, gallery: FeatureSet, transformations: Sequence[str | Path], *,
    side: FeatureSet | None = None, metrics: Sequence[str] = ("map", "cmc@1"),
    distance: str = "cosine", chunk_size: int = 4096,
) -> UpgradeEvaluation:
    """Upgrade ``gallery`` (v1) through the chain and search it with ``query`` (the last model).

    ``query`` and ``gallery`` embed the same items (one leave-one-out test set): ``upgraded`` =
    M(φ_last, ψ_k∘…∘ψ_1∘φ_1), ``self_test`` = M(φ_last, φ_last), ``old_old`` = M(φ_1, φ_1).

    Raises:
        IncompatibleSpacesError: the chain does not end at the query's model version.
        CompatkitError: query and gallery are not the same items (labels or ids differ).
    """
    from compatkit.eval import retrieval_metrics

    if query.labels.shape != gallery.labels.shape or not np.array_equal(query.labels,
                                                                        gallery.labels):
        raise CompatkitError("query and gallery features must hold the same items (same labels "
                             "in the same order) for leave-one-out evaluation")
    if query.ids is not None and gallery.ids is not None and not np.array_equal(query.ids,
                                                                               gallery.ids):
        raise CompatkitError("query and gallery features hold different item ids")
    upgraded = upgrade_features(gallery, transformations, side=side)
    if upgraded.manifest.model_version != query.manifest.model_version:
        raise IncompatibleSpacesError(
            f"the chain ends at {upgraded.manifest.model_version} but the queries are of "
            f"{query.manifest.model_version}")

    def evaluate(q: np.ndarray, g: np.ndarray) -> dict[str, Any]:
        return retrieval_metrics(q, query.labels, g, query.labels, metrics=tuple(metrics),
                                 distance=distance, exclude_self=True, chunk_size=chunk_size)

    return UpgradeEvaluation(
        upgraded=evaluate(query.features, upgraded.features),
        self_test=evaluate(query.features, query.features),
        old_old=evaluate(gallery.features, gallery.features),
        features=upgraded,
    )
