"""Metric names and the per-query functions behind them (the table :data:`METRICS`).

Every metric derives from :class:`PositiveRanks`, the positives of each query with the gallery
items scoring at least as high (sklearn threshold semantics, for ``map``) and the items ranked
above them with ties going to the lower gallery index (for rank metrics);
``compatkit.eval.ranking`` computes them. Names: ``map``, ``map@r``, ``map@k`` (e.g.
``map@100``), ``cmc@k`` (alias ``recall@k``), ``precision@k``.
"""

from __future__ import annotations

import functools
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from compatkit.errors import UnknownNameError
from compatkit.registry import Registry


@dataclass(frozen=True)
class PositiveRanks:
    """Every positive of a block of queries, best first within each query (CSR layout).

    Shapes:
        offsets: (nb + 1,) int64; query r owns entries ``offsets[r]:offsets[r + 1]``.
        rank: (P,) int64 0-based position in the query's full ranking (ties to lower index).
        n_ge: (P,) int64 gallery items scoring >= this positive (itself included).
        tp_ge: (P,) int64 positives scoring >= this positive (itself included).
    """

    offsets: torch.Tensor
    rank: torch.Tensor
    n_ge: torch.Tensor
    tp_ge: torch.Tensor

    @property
    def num_positives(self) -> torch.Tensor:
        """(nb,) int64 positives per query."""
        return self.offsets[1:] - self.offsets[:-1]

    @functools.cached_property
    def row(self) -> torch.Tensor:
        """(P,) int64 query row of each positive."""
        m = self.num_positives
        return torch.repeat_interleave(torch.arange(m.numel(), device=m.device), m)

    @property
    def above(self) -> torch.Tensor:
        """(P,) int64 positives of the same query ranked above this one."""
        return torch.arange(self.rank.numel(), device=self.rank.device) - self.offsets[self.row]


MetricFn = Callable[[PositiveRanks, "int | None"], torch.Tensor]


def _segment_sum(stats: PositiveRanks, values: torch.Tensor) -> torch.Tensor:
    nb = stats.offsets.numel() - 1
    out = torch.zeros(nb, dtype=torch.float64, device=values.device)
    return out.index_add_(0, stats.row, values.to(torch.float64))


def _per_query(stats: PositiveRanks, values: torch.Tensor) -> torch.Tensor:
    """NaN for queries without positives; ``values`` otherwise."""
    return torch.where(stats.num_positives > 0, values, torch.nan)


def _need_k(k: int | None) -> int:
    if k is None:
        raise ValueError("this metric needs a cut-off k, e.g. cmc@5")
    return k


def _average_precision(stats: PositiveRanks, k: int | None) -> torch.Tensor:
    """Full-ranking AP as scikit-learn computes it: Σ over positives of precision at their score
    threshold (ties grouped), divided by the number of positives."""
    prec = stats.tp_ge.to(torch.float64) / stats.n_ge.to(torch.float64)
    m = stats.num_positives.to(torch.float64)
    return _per_query(stats, _segment_sum(stats, prec) / m.clamp(min=1))


def _precision_at_hits(stats: PositiveRanks, cutoff: torch.Tensor) -> torch.Tensor:
    """Σ_{positives ranked < cutoff} precision at that rank. ``cutoff``: (P,) per positive."""
    hit = stats.rank < cutoff
    prec = (stats.above + 1).to(torch.float64) / (stats.rank + 1).to(torch.float64)
    return _segment_sum(stats, torch.where(hit, prec, 0.0))


def _map_at_r(stats: PositiveRanks, k: int | None) -> torch.Tensor:
    """mAP@R: R = number of positives; (1/R) Σ_{i ≤ R} P(i)·rel(i)."""
    m = stats.num_positives
    total = _precision_at_hits(stats, m[stats.row])
    return _per_query(stats, total / m.clamp(min=1).to(torch.float64))


def _map_at_k(stats: PositiveRanks, k: int | None) -> torch.Tensor:
    """GLDv2/Kaggle AP@k: (1/min(m, k)) Σ_{i ≤ k} P(i)·rel(i); no hit in the top k scores 0."""
    k = _need_k(k)
    m = stats.num_positives
    total = _precision_at_hits(stats, torch.full_like(stats.rank, k))
    return _per_query(stats, total / m.clamp(min=1, max=k).to(torch.float64))


def _cmc_at_k(stats: PositiveRanks, k: int | None) -> torch.Tensor:
    """CMC@k (Recall@k): 1 if any positive is among the top k."""
    k = _need_k(k)
    m = stats.num_positives
    first = stats.offsets[:-1].clamp(max=max(stats.rank.numel() - 1, 0))
    first_rank = stats.rank[first] if stats.rank.numel() else torch.zeros_like(m)
    return _per_query(stats, ((first_rank < k) & (m > 0)).to(torch.float64))


def _precision_at_k(stats: PositiveRanks, k: int | None) -> torch.Tensor:
    """Precision@k: positives among the top k, divided by k."""
    k = _need_k(k)
    hits = _segment_sum(stats, (stats.rank < k).to(torch.float64))
    return _per_query(stats, hits / k)


#: Metric name → per-query function. Names ending in ``@k`` take an integer (``cmc@5``).
METRICS: Registry[MetricFn] = Registry("metric")
METRICS.add("map", _average_precision)
METRICS.add("map@r", _map_at_r)
METRICS.add("map@k", _map_at_k)
METRICS.add("cmc@k", _cmc_at_k)
METRICS.add("recall@k", _cmc_at_k)
METRICS.add("precision@k", _precision_at_k)

_K_NAME = re.compile(r"^([a-z_]+)@(\d+)$")


@dataclass(frozen=True)
class MetricSpec:
    """A parsed metric name: its table entry and its ``k`` (None when it takes none)."""

    name: str
    fn: MetricFn
    k: int | None

    def per_query(self, stats: PositiveRanks) -> torch.Tensor:
        """(nb,) float64 values; NaN for queries without positives."""
        return self.fn(stats, self.k)


def parse_metric(name: str) -> MetricSpec:
    """Look ``name`` up in :data:`METRICS` (``cmc@5`` → entry ``cmc@k`` with k = 5).

    Raises:
        UnknownNameError: the name matches no entry (the known names are listed).
        ValueError: k is not a positive integer.
    """
    if not isinstance(name, str):
        raise TypeError(f"metric names must be strings, got {name!r}")
    if name in METRICS and not name.endswith("@k"):
        return MetricSpec(name, METRICS.get(name), None)
    match = _K_NAME.match(name)
    if match:
        base = f"{match.group(1)}@k"
        if base in METRICS:
            k = int(match.group(2))
            if k < 1:
                raise ValueError(f"metric {name!r}: k must be a positive integer, got {k}")
            return MetricSpec(name, METRICS.get(base), k)
    raise UnknownNameError(
        f"{METRICS.unknown_message(name)}; '@k' entries take a positive integer, e.g. cmc@5"
    )


def parse_metrics(metrics: Sequence[str]) -> list[MetricSpec]:
    """Parse a non-empty list of distinct metric names.

    Raises:
        ValueError: empty list, duplicates or an unknown name.
    """
    if isinstance(metrics, str):
        metrics = [metrics]
    specs = [parse_metric(m) for m in metrics]
    if not specs:
        raise ValueError("metrics must name at least one metric, got an empty list")
    names = [s.name for s in specs]
    dup = sorted({n for n in names if names.count(n) > 1})
    if dup:
        raise ValueError(f"metrics lists {', '.join(dup)} more than once")
    return specs
