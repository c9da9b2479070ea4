"""Compatibility: cross-model evaluation, the BCT criterion, update gain, CoReS AC/AM.

References: methods.md §2.1 and §4.2 (criterion ``M(new, old) > M(old, old)``, update gain),
fct-fastfill-peers.md §3.5 and §6.5 (average compatibility AC and average multi-model
accuracy AM over a sequence of models).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np

from compatkit.eval.metric_specs import parse_metrics
from compatkit.eval.metrics import retrieval_metrics
from compatkit.eval.retrieval import (
    DEFAULT_QUERY_BLOCK,
    Distance,
    check_features,
    check_labels,
)

logger = logging.getLogger(__name__)

Violation = Literal["<", "<="]


def update_gain(m_old_old: float, m_new_old: float, m_paragon: float) -> float:
    """Share of the ideal improvement obtained without backfilling (BCT §3):
    ``(M(new, old) − M(old, old)) / (M(paragon) − M(old, old))``.

    Raises:
        ValueError: the paragon does not differ from the old model (no improvement to share).
    """
    denom = m_paragon - m_old_old
    if denom == 0:
        raise ValueError(
            f"update gain is undefined: the paragon metric {m_paragon!r} equals the old/old "
            f"metric {m_old_old!r}"
        )
    return (m_new_old - m_old_old) / denom


def is_compatible(m_old_old: float, m_new_old: float) -> bool:
    """The empirical BCT criterion: ``M(new, old) > M(old, old)`` (strict)."""
    return m_new_old > m_old_old


@dataclass(frozen=True)
class EmbeddingSet:
    """One model's features of the evaluation queries and gallery.

    Shapes:
        query: (nq, d).  query_labels: (nq,).  gallery: (ng, d).  gallery_labels: (ng,).
    """

    query: Any
    query_labels: Any
    gallery: Any
    gallery_labels: Any

    @property
    def dim(self) -> int:
        return int(np.shape(self.query)[1])


@dataclass(frozen=True)
class CompatibilityMatrix:
    """Metrics for every (query model, gallery model) pair, plus criterion and update gain.

    ``values[(q, g)]`` is ``{metric: value}``, or ``None`` when the two models' feature
    dimensions differ (not comparable without a declared transformation).
    """

    models: tuple[str, ...]
    metrics: tuple[str, ...]
    values: Mapping[tuple[str, str], Mapping[str, float] | None]
    reference: str
    paragon: str | None
    dims: Mapping[str, int] = field(default_factory=dict)

    def value(self, query_model: str, gallery_model: str, metric: str) -> float | None:
        """M(query_model, gallery_model) for ``metric``; None for incompatible dimensions."""
        if (query_model, gallery_model) not in self.values:
            raise KeyError(f"no entry for query model {query_model!r}, gallery {gallery_model!r}")
        if metric not in self.metrics:
            raise KeyError(f"metric {metric!r} was not evaluated; have {list(self.metrics)}")
        entry = self.values[(query_model, gallery_model)]
        return None if entry is None else entry[metric]

    def criterion(self) -> dict[str, dict[str, bool | None]]:
        """Per model (except the reference) and metric: M(model, ref) > M(ref, ref)."""
        out: dict[str, dict[str, bool | None]] = {}
        for model in self.models:
            if model == self.reference:
                continue
            out[model] = {}
            for metric in self.metrics:
                cross = self.value(model, self.reference, metric)
                base = self.value(self.reference, self.reference, metric)
                out[model][metric] = (
                    None if cross is None or base is None else (is_compatible(base, cross))
                )
        return out

    def update_gains(self) -> dict[str, dict[str, float | None]]:
        """Per model and metric: :func:`update_gain` with the paragon's self-test; None when
        there is no paragon, the pair is incomparable or the gain is undefined."""
        out: dict[str, dict[str, float | None]] = {}
        for model in self.models:
            if model == self.reference:
                continue
            out[model] = {}
            for metric in self.metrics:
                out[model][metric] = self._gain(model, metric)
        return out

    def _gain(self, model: str, metric: str) -> float | None:
        if self.paragon is None:
            return None
        cross = self.value(model, self.reference, metric)
        base = self.value(self.reference, self.reference, metric)
        top = self.value(self.paragon, self.paragon, metric)
        if cross is None or base is None or top is None or top == base:
            return None
        return update_gain(base, cross, top)

    def as_array(self, metric: str, order: Sequence[str] | None = None) -> np.ndarray:
        """(T, T) array ``A[i, j] = M(order[i], order[j])``; NaN for incomparable pairs."""
        names = list(order) if order is not None else list(self.models)
        arr = np.full((len(names), len(names)), np.nan)
        for i, q in enumerate(names):
            for j, g in enumerate(names):
                v = self.value(q, g, metric)
                if v is not None:
                    arr[i, j] = v
        return arr

    def to_json(self) -> dict[str, Any]:
        """A JSON-ready dict: ``matrix`` rows, ``criterion`` and ``update_gain`` per model."""
        rows = []
        for q in self.models:
            for g in self.models:
                entry = self.values[(q, g)]
                row: dict[str, Any] = {
                    "query_model": q,
                    "gallery_model": g,
                    "comparable": entry is not None,
                }
                for metric in self.metrics:
                    row[metric] = None if entry is None else entry[metric]
                rows.append(row)
        return {
            "metrics": list(self.metrics),
            "models": list(self.models),
            "dims": dict(self.dims),
            "reference": self.reference,
            "paragon": self.paragon,
            "matrix": rows,
            "criterion": self.criterion(),
            "update_gain": self.update_gains(),
        }

    def to_markdown(self) -> str:
        """A query × gallery table per metric, then a criterion / update-gain table."""
        lines: list[str] = []
        for metric in self.metrics:
            lines.append(f"**{metric}** (rows: query model, columns: gallery model)\n")
            lines.append("| query \\ gallery | " + " | ".join(self.models) + " |")
            lines.append("|---|" + "---|" * len(self.models))
            for q in self.models:
                cells = [_fmt(self.value(q, g, metric)) for g in self.models]
                lines.append(f"| {q} | " + " | ".join(cells) + " |")
            lines.append("")
        ref = self.reference
        lines.append(
            f"Compatibility criterion M(model, {ref}) > M({ref}, {ref}); update gain "
            f"(M(model, {ref}) − M({ref}, {ref})) / (M(P, P) − M({ref}, {ref})) with paragon "
            f"P = {self.paragon if self.paragon is not None else '—'}\n"
        )
        lines.append(f"| model | metric | M(model, {ref}) | M({ref}, {ref}) | compatible | gain |")
        lines.append("|---|---|---|---|---|---|")
        crit, gains = self.criterion(), self.update_gains()
        for model in crit:
            for metric in self.metrics:
                c = crit[model][metric]
                lines.append(
                    f"| {model} | {metric} | {_fmt(self.value(model, ref, metric))} | "
                    f"{_fmt(self.value(ref, ref, metric))} | "
                    f"{'—' if c is None else ('yes' if c else 'no')} | "
                    f"{_fmt(gains[model][metric])} |"
                )
        return "\n".join(lines) + "\n"


def _fmt(v: float | None) -> str:
    return "—" if v is None or (isinstance(v, float) and math.isnan(v)) else f"{v:.4f}"


def _check_same_items(features: Mapping[str, EmbeddingSet]) -> None:
    names = list(features)
    first = features[names[0]]
    ql = check_labels(first.query_labels, np.shape(first.query)[0], f"{names[0]}.query_labels")
    gl = check_labels(
        first.gallery_labels, np.shape(first.gallery)[0], f"{names[0]}.gallery_labels"
    )
    for name in names[1:]:
        es = features[name]
        other_q = check_labels(es.query_labels, np.shape(es.query)[0], f"{name}.query_labels")
        other_g = check_labels(es.gallery_labels, np.shape(es.gallery)[0], f"{name}.gallery_labels")
        if not np.array_equal(other_q, ql) or not np.array_equal(other_g, gl):
            raise ValueError(
                f"models {names[0]!r} and {name!r} embed different items: cross-model "
                "evaluation needs the same query and gallery items (same labels, same order)"
            )


def compatibility_matrix(
    features: Mapping[str, EmbeddingSet],
    *,
    metrics: Sequence[str] = ("map", "cmc@1"),
    distance: Distance = "cosine",
    exclude_self: bool = False,
    reference: str = "old",
    paragon: str | None = "independent",
    chunk_size: int = 4096,
    query_block: int = DEFAULT_QUERY_BLOCK,
) -> CompatibilityMatrix:
    """Evaluate every (query model, gallery model) pair of the same items.

    Queries come from the query model's ``query`` features, the gallery from the gallery
    model's ``gallery`` features. Pairs whose dimensions differ are recorded as not comparable
    (``None``) rather than raising. ``paragon`` names the model whose self-test is the update
    gain's ideal (e.g. a new model trained without a compatibility term); if it is not among
    the models, gains are None.

    Raises:
        ValueError: fewer than one model, ``reference`` missing, models embedding different
            items, or any input error of :func:`retrieval_metrics`.
    """
    if not features:
        raise ValueError("compatibility_matrix needs at least one model, got none")
    if reference not in features:
        raise ValueError(
            f"reference model {reference!r} is not among the models {sorted(features)}"
        )
    names = [s.name for s in parse_metrics(metrics)]
    for name, es in features.items():
        if not isinstance(es, EmbeddingSet):
            raise TypeError(f"features[{name!r}] must be an EmbeddingSet, got {type(es).__name__}")
    _check_same_items(features)
    checked = {
        name: (
            check_features(es.query, f"{name}.query"),
            check_features(es.gallery, f"{name}.gallery"),
        )
        for name, es in features.items()
    }
    dims: dict[str, int] = {}
    for name, (q, g) in checked.items():
        if q.shape[1] != g.shape[1]:
            raise ValueError(
                f"model {name!r}: query features have shape {q.shape} but gallery features "
                f"{g.shape}; one model embeds both sides in one space"
            )
        dims[name] = q.shape[1]
    values: dict[tuple[str, str], dict[str, float] | None] = {}
    for qm, (q, _) in checked.items():
        for gm, (_, g) in checked.items():
            if dims[qm] != dims[gm]:
                logger.info(
                    "skipping %s → %s: dimensions %d and %d differ", qm, gm, dims[qm], dims[gm]
                )
                values[(qm, gm)] = None
                continue
            values[(qm, gm)] = retrieval_metrics(
                q,
                features[qm].query_labels,
                g,
                features[gm].gallery_labels,
                metrics=names,
                distance=distance,
                exclude_self=exclude_self,
                chunk_size=chunk_size,
                query_block=query_block,
            )
    return CompatibilityMatrix(
        models=tuple(features),
        metrics=tuple(names),
        values=values,
        reference=reference,
        paragon=paragon if paragon is not None and paragon in features else None,
        dims=dims,
    )


def _check_square(matrix: Any) -> np.ndarray:
    arr = np.asarray(matrix, dtype=np.float64)
    if arr.ndim != 2 or arr.shape[0] != arr.shape[1] or arr.shape[0] == 0:
        raise ValueError(f"expected a non-empty square (T, T) matrix, got shape {arr.shape}")
    lower = np.tril(np.ones_like(arr, dtype=bool))
    if not np.isfinite(arr[lower]).all():
        raise ValueError("the lower triangle (j <= i) of the matrix must be finite")
    return arr


def average_compatibility(matrix: Any, *, violation: Violation = "<") -> float:
    """CoReS AC: share of pairs i > j (query model i newer than gallery model j) that are
    compatible with the older model j, i.e. not a violation of ``M[i][j]`` vs ``M[j][j]``.

    ``violation="<"`` is CoReS's convention (only ``M[i][j] < M[j][j]`` violates, so equality
    passes); ``violation="<="`` is iamcl2r's (equality violates, i.e. the strict BCT criterion
    ``M[i][j] > M[j][j]``). Models are in upgrade order; only the lower triangle is read.

    Raises:
        ValueError: non-square input, fewer than two models, or an unknown convention.
    """
    arr = _check_square(matrix)
    t = arr.shape[0]
    if t < 2:
        raise ValueError("average compatibility needs at least two models in sequence")
    if violation not in ("<", "<="):
        raise ValueError(f"violation must be '<' (CoReS) or '<=' (iamcl2r), got {violation!r}")
    ok = 0
    for i in range(1, t):
        for j in range(i):
            bad = arr[i, j] < arr[j, j] if violation == "<" else arr[i, j] <= arr[j, j]
            ok += not bad
    return ok / (t * (t - 1) / 2)


def average_multimodel_accuracy(matrix: Any) -> float:
    """CoReS AM: mean of the lower-triangular entries ``M[i][j]``, j <= i (diagonal included)."""
    arr = _check_square(matrix)
    return float(arr[np.tril_indices(arr.shape[0])].mean())
