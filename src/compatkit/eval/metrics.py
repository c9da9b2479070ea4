"""Exact retrieval metrics from one chunked walk over the gallery.

Every metric derives from the positives of each query: for each positive we count the gallery
items scoring at least as high (sklearn threshold semantics, for ``map``) and the items ranked
above it with ties going to the lower gallery index (for rank metrics). The walk scores one
(query block × gallery chunk) at a time, never an (nq, ng) matrix. Items scoring below a
query's lowest positive are skipped; the others are placed among the query's sorted positive
scores by a per-query bucket table (exact: only items sharing a bucket with a positive are
binary-searched) and counted in a histogram, whose reverse prefix sums give every count.

Metric names (the table :data:`METRICS`): ``map``, ``map@r``, ``map@k`` (e.g. ``map@100``),
``cmc@k`` (alias ``recall@k``), ``precision@k``. Every metric averages over the queries that
have at least one positive in the gallery.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from compatkit.errors import UnknownNameError
from compatkit.eval.retrieval import (
    DEFAULT_QUERY_BLOCK,
    Distance,
    Prepared,
    as_features,
    as_labels,
    blocks,
    check_distance,
    check_positive_int,
    check_same_dim,
    prepare,
    score_block,
)
from compatkit.registry import Registry

logger = logging.getLogger(__name__)

#: Upper bound on the positives handled in one query block (bounds the per-positive arrays).
DEFAULT_BLOCK_POSITIVES = 1 << 21

_INT31 = (1 << 31) - 1


# ----------------------------------------------------------------------------------------------
# Per-positive statistics and the metrics computed from them


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

    @property
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


# ----------------------------------------------------------------------------------------------
# Input handling shared with the compatibility and backfill modules


@dataclass(frozen=True)
class ClassIndex:
    """Gallery items grouped by class (CSR): ``members[starts[c]:starts[c + 1]]`` ascending."""

    classes: torch.Tensor
    starts: torch.Tensor
    members: torch.Tensor

    @classmethod
    def build(cls, labels: torch.Tensor) -> ClassIndex:
        members = torch.sort(labels, stable=True).indices
        classes, counts = torch.unique_consecutive(labels[members], return_counts=True)
        starts = torch.cat([counts.new_zeros(1), torch.cumsum(counts, 0)])
        return cls(classes, starts, members)

    def lookup(self, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(start, count) of each label's members; count 0 for labels absent from the gallery."""
        pos = torch.searchsorted(self.classes, labels)
        pos_c = pos.clamp(max=max(self.classes.numel() - 1, 0))
        if self.classes.numel() == 0:
            zero = torch.zeros_like(labels)
            return zero, zero
        found = self.classes[pos_c] == labels
        start = torch.where(found, self.starts[pos_c], 0)
        count = torch.where(found, self.starts[pos_c + 1] - self.starts[pos_c], 0)
        return start, count


def check_exclude_self(
    exclude_self: bool, query_labels: torch.Tensor, gallery_labels: torch.Tensor
) -> None:
    """``exclude_self`` needs the same items in the same order on both sides.

    Raises:
        ValueError: different lengths or labels.
    """
    if not exclude_self:
        return
    nq, ng = query_labels.numel(), gallery_labels.numel()
    if nq != ng:
        raise ValueError(
            f"exclude_self=True needs the query and gallery to be the same items in the same "
            f"order, got nq={nq} and ng={ng}"
        )
    diff = torch.nonzero(query_labels != gallery_labels)
    if diff.numel():
        i = int(diff[0, 0])
        raise ValueError(
            f"exclude_self=True needs equal query and gallery labels (same items, same order); "
            f"they differ first at row {i}: {int(query_labels[i])} vs {int(gallery_labels[i])}"
        )


@dataclass(frozen=True)
class QueryBlock:
    """A block of queries (sorted by label) and all their positives.

    The positives are sorted by (query row, score ascending, gallery index descending).

    Shapes:
        qidx: (nb,) original query indices.   offsets: (nb + 1,) CSR offsets of positives.
        pos_row, pos_col: (P,) query row and gallery index, sorted by row.
        new_columns: (nb,) gallery items a row adds to the positives of the rows before it
            (its class size where its label starts a run, else 0).
    """

    qidx: torch.Tensor
    offsets: torch.Tensor
    pos_row: torch.Tensor
    pos_col: torch.Tensor
    new_columns: torch.Tensor


def plan_query_blocks(
    query_labels: torch.Tensor,
    index: ClassIndex,
    *,
    exclude_self: bool,
    query_block: int,
    max_positives: int = DEFAULT_BLOCK_POSITIVES,
) -> Iterator[QueryBlock]:
    """Group queries by label into blocks of at most ``query_block`` queries and about
    ``max_positives`` positives, and list each block's positives (by gallery index)."""
    dev = query_labels.device
    perm = torch.sort(query_labels, stable=True).indices
    start_all, full_all = index.lookup(query_labels[perm])
    # with exclude_self the query itself (same label by then) is among its class members
    count_all = (full_all - 1).clamp(min=0) if exclude_self else full_all
    cum = torch.cumsum(count_all, 0).cpu()
    n = perm.numel()
    i = 0
    while i < n:
        before = int(cum[i - 1]) if i else 0
        end_by_pos = int(torch.searchsorted(cum, torch.tensor(before + max_positives), right=True))
        end = max(min(i + query_block, end_by_pos, n), i + 1)
        qidx = perm[i:end]
        start, full, count = start_all[i:end], full_all[i:end], count_all[i:end]
        rows = torch.repeat_interleave(torch.arange(end - i, device=dev), full)
        first = torch.cumsum(full, 0) - full
        within = torch.arange(rows.numel(), device=dev) - first[rows]
        cols = index.members[start[rows] + within]
        if exclude_self:
            keep = cols != qidx[rows]
            rows, cols = rows[keep], cols[keep]
        offsets = torch.cat([count.new_zeros(1), torch.cumsum(count, 0)])
        labels = query_labels[qidx]
        starts_run = torch.ones_like(labels, dtype=torch.bool)
        starts_run[1:] = labels[1:] != labels[:-1]
        yield QueryBlock(qidx, offsets, rows, cols, torch.where(starts_run, full, 0))
        i = end


def float_order_key(x: torch.Tensor) -> torch.Tensor:
    """int64 keys ordered like the float32 values (-0.0 == 0.0); fits in 32 bits signed."""
    bits = x.contiguous().view(torch.int32).to(torch.int64)
    return torch.where(bits >= 0, bits, -(bits & _INT31))


def positive_scores(qb: Prepared, gp: Prepared, block: QueryBlock, chunk_size: int) -> torch.Tensor:
    """(P,) score of each positive pair, from GEMMs of groups of same-label rows against the
    union of their positives (about ``chunk_size`` items per group).

    The walk overwrites the chunk scores of positive pairs with these values, so a positive is
    always compared with itself consistently whatever rounding the BLAS picks.
    """
    out = torch.empty(block.pos_col.numel(), dtype=torch.float32, device=block.pos_col.device)
    if not out.numel():
        return out
    cum = torch.cumsum(block.new_columns, 0).cpu()
    offsets = block.offsets.cpu()
    nb, ra = block.qidx.numel(), 0
    while ra < nb:
        before = int(cum[ra - 1]) if ra else 0
        rb = int(torch.searchsorted(cum, torch.tensor(before + chunk_size), right=True))
        rb = min(max(rb, ra + 1), nb)
        pa, pb = int(offsets[ra]), int(offsets[rb])
        if pa < pb:
            cols = block.pos_col[pa:pb]
            uniq = torch.unique(cols)
            where = torch.searchsorted(uniq, cols)
            for sl in blocks(uniq.numel(), chunk_size):
                sel = torch.nonzero((where >= sl.start) & (where < sl.stop)).view(-1)
                s = score_block(qb, gp, slice(ra, rb), uniq[sl])
                out[pa + sel] = s[block.pos_row[pa + sel] - ra, where[sel] - sl.start]
        ra = rb
    return out


# ----------------------------------------------------------------------------------------------
# The walk


@dataclass(frozen=True)
class SortedPositives:
    """A block's positives sorted by (row, score ascending, index descending), with search keys.

    ``build`` takes them sorted by (row, gallery index); ``source[g]`` is the input position of
    sorted entry g.

    Shapes (P = positives, nb = queries):
        row, col, score, key, tie_key, group_start, source: (P,).  offsets: (nb + 1,).
        lo, hi: (nb,) lowest / highest positive score (+inf for queries without positives).
    """

    offsets: torch.Tensor
    row: torch.Tensor
    col: torch.Tensor
    score: torch.Tensor
    key: torch.Tensor
    tie_key: torch.Tensor
    group_start: torch.Tensor
    lo: torch.Tensor
    hi: torch.Tensor
    col_order: torch.Tensor
    sorted_col: torch.Tensor
    source: torch.Tensor

    @classmethod
    def build(
        cls, offsets: torch.Tensor, row: torch.Tensor, col: torch.Tensor, score: torch.Tensor
    ) -> SortedPositives:
        # (row, col ascending) reversed → stable sort by (row, score) leaves col descending
        rev = torch.arange(row.numel() - 1, -1, -1, device=row.device)
        key = (row[rev] << 32) + float_order_key(score[rev])
        order = rev[torch.sort(key, stable=True).indices]
        row, col, score = row[order], col[order], score[order]
        key = (row << 32) + float_order_key(score)
        group_start = torch.searchsorted(key, key)
        tie_key = (group_start << 32) + (_INT31 - col)
        nb = offsets.numel() - 1
        has = offsets[1:] > offsets[:-1]
        lo = torch.full((nb,), torch.inf, device=score.device)
        hi = torch.full((nb,), torch.inf, device=score.device)
        if score.numel():
            lo = torch.where(has, score[offsets[:-1].clamp(max=score.numel() - 1)], lo)
            hi = torch.where(has, score[(offsets[1:] - 1).clamp(min=0)], hi)
        col_order = torch.argsort(col)
        return cls(
            offsets,
            row,
            col,
            score,
            key,
            tie_key,
            group_start,
            lo,
            hi,
            col_order,
            col[col_order],
            order,
        )

    @property
    def num_rows(self) -> int:
        return self.offsets.numel() - 1

    @property
    def num_bins(self) -> int:
        """Histogram bins: row r owns bins ``offsets[r] + r + t`` for t in ``0..m_r``."""
        return int(self.offsets[-1]) + self.num_rows

    def in_chunk(self, start: int, stop: int) -> torch.Tensor:
        """Indices (into the sorted positives) of the positives with gallery index in range."""
        dev = self.col.device
        a = int(torch.searchsorted(self.sorted_col, torch.tensor(start, device=dev)))
        b = int(torch.searchsorted(self.sorted_col, torch.tensor(stop, device=dev)))
        return self.col_order[a:b]


@dataclass(frozen=True)
class Positions:
    """Histogram bins of located items: t = number of the row's positives the item reaches.

    ``bin`` counts positives scoring <= the item (for n_ge); the rank bin (positives whose
    (score, -index) key is below the item's) equals ``bin`` except at ``tie_idx``.

    Shapes:
        bin: (n,) int32 or int64.  tie_idx, tie_bin: (t,) int64.
    """

    bin: torch.Tensor
    tie_idx: torch.Tensor
    tie_bin: torch.Tensor


def locate_exact(
    sp: SortedPositives, rows: torch.Tensor, cols: torch.Tensor, vals: torch.Tensor
) -> Positions:
    """Locate items (query row, gallery index, score) among their row's positives by search."""
    ikeys = (rows << 32) + float_order_key(vals)
    left = torch.searchsorted(sp.key, ikeys)
    right = torch.searchsorted(sp.key, ikeys, right=True)
    tied = torch.nonzero(left < right)[:, 0]
    gl = left[tied]
    below = torch.searchsorted(sp.tie_key, (gl << 32) + (_INT31 - cols[tied])) - gl
    return Positions(right + rows, tied, gl + below + rows[tied])


class BucketTable:
    """Exact search in O(1) per item: per-row score buckets that hold no positive map straight
    to a histogram bin; only items in a bucket that holds a positive are searched.

    Bucket of score s in row r: ``trunc(clamp((s - base_r) * scale_r, 0, B - 1))``, a monotone
    function of s computed by the same elementwise ops for items and positives, so an item in a
    bucket without positives is strictly above the positives of lower buckets and strictly below
    the others.
    """

    def __init__(
        self, sp: SortedPositives, *, buckets_per_positive: int = 8, max_buckets: int = 2048
    ) -> None:
        self.sp = sp
        dev = sp.score.device
        nb = sp.num_rows
        m = sp.offsets[1:] - sp.offsets[:-1]
        max_m = int(m.max()) if nb else 0
        wanted = 1 << (buckets_per_positive * max_m).bit_length()
        self.n_buckets = int(min(max_buckets, max(256, wanted)))
        span = (sp.hi - sp.lo).clamp(min=0)
        span = torch.where(torch.isfinite(span), span, 0.0)
        lo = torch.where(torch.isfinite(sp.lo), sp.lo, 0.0)
        span = torch.where(span > 0, span, lo.abs().clamp(min=1.0) * 2.0**-20)
        # power-of-two scale: hi lands at most at bucket B - 2 (2 below lo are left empty)
        exponent = torch.floor(torch.log2((self.n_buckets - 4) / span)).clamp(-100, 100)
        self.scale = torch.exp2(exponent).to(torch.float32)
        self.base = (lo - 2.0 / self.scale).to(torch.float32)
        # rows without positives: everything falls in bucket 0, which counts towards nobody
        self.base = torch.where(m > 0, self.base, torch.inf)
        self.scale = torch.where(m > 0, self.scale, 1.0)
        self.dump = sp.num_bins
        flat = sp.row * self.n_buckets + self.bucket(sp.row, sp.score)
        counts = torch.zeros(nb * self.n_buckets, dtype=torch.int32, device=dev)
        counts.index_add_(0, flat, torch.ones_like(flat, dtype=torch.int32))
        counts = counts.view(nb, self.n_buckets)
        below = torch.cumsum(counts, dim=1, dtype=torch.int32).sub_(counts)
        binbase = (sp.offsets[:-1] + torch.arange(nb, device=dev)).to(torch.int32)[:, None]
        table = below.add_(binbase).masked_fill_(counts > 0, self.dump)
        self.table = table.view(-1)

    def bucket(self, rows: torch.Tensor, vals: torch.Tensor) -> torch.Tensor:
        x = torch.sub(vals, self.base.index_select(0, rows))
        x.mul_(self.scale.index_select(0, rows)).clamp_(0, self.n_buckets - 1)
        return x.to(torch.int64)

    def locate(self, cand: Candidates, which: int = 0) -> Positions:
        """Bins of the candidates' scores in matrix ``which``; exact search only where needed."""
        rows, vals = cand.rows, cand.vals[which]
        idx = self.bucket(rows, vals).add_(rows * self.n_buckets)
        bins = self.table.index_select(0, idx)
        exact = torch.nonzero(bins == self.dump).view(-1)
        if not exact.numel():
            return Positions(bins, exact, exact)
        found = locate_exact(self.sp, rows[exact], cand.cols(exact), vals[exact])
        bins[exact] = found.bin.to(bins.dtype)
        return Positions(bins, exact[found.tie_idx], found.tie_bin)


@dataclass(frozen=True)
class Candidates:
    """Items of one (query block × gallery chunk) that may reach a positive.

    Shapes (n = items): rows, flat: (n,) int64 query row and row-major position in the chunk;
    vals: one (n,) float32 score array per score matrix.
    """

    rows: torch.Tensor
    flat: torch.Tensor
    vals: list[torch.Tensor]
    width: int
    col_start: int

    def cols(self, idx: torch.Tensor | None = None) -> torch.Tensor:
        """Gallery indices of all items, or of ``idx`` only."""
        flat, rows = (self.flat, self.rows) if idx is None else (self.flat[idx], self.rows[idx])
        return flat - rows * self.width + self.col_start


def chunk_candidates(
    scores: Sequence[torch.Tensor], lo: torch.Tensor, col_start: int, mask: torch.Tensor
) -> Candidates:
    """Chunk items scoring >= their row's ``lo`` in any of ``scores``; the others reach no
    positive and count for nothing.

    ``mask`` is a bool buffer with at least as many elements as a score matrix. On CPU the
    compaction runs in numpy, whose ``flatnonzero`` is several times faster than torch's.
    """
    shape = scores[0].shape
    width = shape[1]
    m = mask.view(-1)[: scores[0].numel()].view(shape)
    if m.device.type == "cpu":
        m_np, lo_np = m.numpy(), lo.numpy()[:, None]
        np.greater_equal(scores[0].numpy(), lo_np, out=m_np)
        for extra in scores[1:]:
            m_np |= extra.numpy() >= lo_np
        flat_np = np.flatnonzero(m_np)
        rows = torch.from_numpy(flat_np // width)
        flat = torch.from_numpy(flat_np)
    else:
        torch.ge(scores[0], lo[:, None], out=m)
        for extra in scores[1:]:
            m |= extra >= lo[:, None]
        flat = torch.nonzero(m.view(-1)).view(-1)
        rows = torch.div(flat, width, rounding_mode="floor")
    vals = [sc.view(-1).index_select(0, flat) for sc in scores]
    return Candidates(rows, flat, vals, width, col_start)


class Counter:
    """Accumulates item bins of one query block and turns them into per-positive counts."""

    def __init__(self, sp: SortedPositives) -> None:
        self.sp = sp
        dev = sp.offsets.device
        self.hist = torch.zeros(sp.num_bins, dtype=torch.int64, device=dev)
        self.rank_delta = torch.zeros(sp.num_bins, dtype=torch.int64, device=dev)
        self._ones = torch.ones(1 << 16, dtype=torch.int64, device=dev)

    def add(self, pos: Positions) -> None:
        n = pos.bin.numel()
        if self._ones.numel() < n:
            self._ones = torch.ones(
                max(n, 2 * self._ones.numel()), dtype=torch.int64, device=pos.bin.device
            )
        self.hist.index_add_(0, pos.bin, self._ones[:n])
        if pos.tie_idx.numel():
            ones = torch.ones_like(pos.tie_bin)
            self.rank_delta.index_add_(0, pos.bin[pos.tie_idx], -ones)
            self.rank_delta.index_add_(0, pos.tie_bin, ones)

    def finish(self) -> PositiveRanks:
        return ranks_from_histograms(self.sp, self.hist, self.hist + self.rank_delta)


def reverse_segment_counts(sp: SortedPositives, hist: torch.Tensor) -> torch.Tensor:
    """For each sorted positive g of row r: Σ of ``hist`` over the bins after g's in its row,
    i.e. the items reaching beyond it. ``hist``: (..., num_bins), summed over the last axis."""
    tail = torch.flip(torch.cumsum(torch.flip(hist, [-1]), -1), [-1])
    tail = torch.cat([tail, tail.new_zeros((*tail.shape[:-1], 1))], dim=-1)
    nb = sp.num_rows
    seg_end = sp.offsets[1:] + torch.arange(1, nb + 1, device=hist.device)  # next row's bin 0
    g = torch.arange(sp.row.numel(), device=hist.device)
    return tail[..., g + sp.row + 1] - tail[..., seg_end[sp.row]]


def best_first_order(sp: SortedPositives) -> torch.Tensor:
    """Permutation taking the ascending-score positive layout to best first within each row."""
    g = torch.arange(sp.row.numel(), device=sp.row.device)
    best_first = sp.offsets[sp.row] + sp.offsets[1:][sp.row] - 1 - g
    order = torch.empty_like(best_first)
    order[best_first] = g
    return order


def ranks_from_histograms(
    sp: SortedPositives, hist_ge: torch.Tensor, hist_rank: torch.Tensor
) -> PositiveRanks:
    """Per-positive counts (best first) from the accumulated item histograms."""
    n_ge = reverse_segment_counts(sp, hist_ge)
    rank = reverse_segment_counts(sp, hist_rank)
    tp_ge = sp.offsets[1:][sp.row] - sp.group_start
    order = best_first_order(sp)
    return PositiveRanks(sp.offsets, rank[order], n_ge[order], tp_ge[order])


def overwrite_positive_scores(
    s: torch.Tensor, sp: SortedPositives, g_sl: slice, qidx: torch.Tensor, exclude_self: bool
) -> None:
    """Put the canonical positive scores into a chunk's score block and drop self-matches."""
    inside = sp.in_chunk(g_sl.start, g_sl.stop)
    s[sp.row[inside], sp.col[inside] - g_sl.start] = sp.score[inside]
    if exclude_self:
        own = torch.nonzero((qidx >= g_sl.start) & (qidx < g_sl.stop))[:, 0]
        s[own, qidx[own] - g_sl.start] = -torch.inf


def walk_block(
    qb: Prepared,
    gp: Prepared,
    block: QueryBlock,
    *,
    exclude_self: bool,
    chunk_size: int,
) -> PositiveRanks:
    """Count, for every positive of a query block, the gallery items above it (one walk)."""
    ng = gp.feats.shape[0]
    score = positive_scores(qb, gp, block, chunk_size)
    sp = SortedPositives.build(block.offsets, block.pos_row, block.pos_col, score)
    table = BucketTable(sp)
    counter = Counter(sp)
    buf = torch.empty(block.qidx.numel(), min(chunk_size, ng), device=qb.feats.device)
    mask = torch.empty(buf.shape, dtype=torch.bool, device=buf.device)
    for g_sl in blocks(ng, chunk_size):
        s = score_block(qb, gp, slice(None), g_sl, out=buf)
        overwrite_positive_scores(s, sp, g_sl, block.qidx, exclude_self)
        cand = chunk_candidates([s], sp.lo, g_sl.start, mask)
        if cand.rows.numel():
            counter.add(table.locate(cand))
    return counter.finish()


# ----------------------------------------------------------------------------------------------
# Public API


@dataclass(frozen=True)
class EvalInputs:
    """Checked, prepared inputs of one evaluation (shared with compat and backfill)."""

    query: Prepared
    gallery: Prepared
    query_labels: torch.Tensor
    gallery_labels: torch.Tensor
    index: ClassIndex


def prepare_inputs(
    query: Any,
    query_labels: Any,
    gallery: Any,
    gallery_labels: Any,
    *,
    distance: str,
    exclude_self: bool,
    names: tuple[str, str] = ("query", "gallery"),
) -> EvalInputs:
    """Validate features and labels (shapes, finiteness, dims, exclude_self) and prepare them.

    Raises:
        ValueError/TypeError: as described in :func:`retrieval_metrics`.
    """
    check_distance(distance)
    qn, gn = names
    q = as_features(query, qn)
    g = as_features(gallery, gn).to(q.device)
    check_same_dim(q, g, qn, gn)
    ql = as_labels(query_labels, q.shape[0], f"{qn}_labels", device=q.device)
    gl = as_labels(gallery_labels, g.shape[0], f"{gn}_labels", device=q.device)
    check_exclude_self(exclude_self, ql, gl)
    return EvalInputs(
        prepare(q, distance, qn), prepare(g, distance, gn), ql, gl, ClassIndex.build(gl)
    )


def iter_positive_ranks(
    inputs: EvalInputs,
    *,
    exclude_self: bool,
    chunk_size: int,
    query_block: int,
    max_positives: int = DEFAULT_BLOCK_POSITIVES,
) -> Iterator[tuple[torch.Tensor, PositiveRanks]]:
    """Yield (original query indices, their :class:`PositiveRanks`) block by block."""
    for block in plan_query_blocks(
        inputs.query_labels,
        inputs.index,
        exclude_self=exclude_self,
        query_block=query_block,
        max_positives=max_positives,
    ):
        qb = Prepared(
            inputs.query.feats[block.qidx],
            None if inputs.query.sq_norms is None else inputs.query.sq_norms[block.qidx],
        )
        yield (
            block.qidx,
            walk_block(qb, inputs.gallery, block, exclude_self=exclude_self, chunk_size=chunk_size),
        )


def per_query_metrics(
    query: Any,
    query_labels: Any,
    gallery: Any,
    gallery_labels: Any,
    *,
    metrics: Sequence[str] = ("map", "cmc@1"),
    distance: Distance = "cosine",
    exclude_self: bool = False,
    chunk_size: int = 4096,
    query_block: int = DEFAULT_QUERY_BLOCK,
) -> dict[str, np.ndarray]:
    """Per-query values of each metric; NaN for queries without a positive in the gallery.

    Shapes:
        returns: {metric name: (nq,) float64}, in the order of ``metrics``.

    Raises:
        ValueError: as :func:`retrieval_metrics`.
    """
    specs = parse_metrics(metrics)
    chunk_size = check_positive_int(chunk_size, "chunk_size")
    query_block = check_positive_int(query_block, "query_block")
    inputs = prepare_inputs(
        query, query_labels, gallery, gallery_labels, distance=distance, exclude_self=exclude_self
    )
    nq = inputs.query_labels.numel()
    out = {s.name: np.full(nq, np.nan) for s in specs}
    for qidx, stats in iter_positive_ranks(
        inputs, exclude_self=exclude_self, chunk_size=chunk_size, query_block=query_block
    ):
        idx = qidx.cpu().numpy()
        for spec in specs:
            out[spec.name][idx] = spec.per_query(stats).cpu().numpy()
    return out


def retrieval_metrics(
    query: Any,
    query_labels: Any,
    gallery: Any,
    gallery_labels: Any,
    *,
    metrics: Sequence[str] = ("map", "cmc@1"),
    distance: Distance = "cosine",
    exclude_self: bool = False,
    chunk_size: int = 4096,
    query_block: int = DEFAULT_QUERY_BLOCK,
) -> dict[str, float]:
    """Exact retrieval metrics of ``query`` against ``gallery``.

    Args:
        query: (nq, d) float features.            query_labels: (nq,) int class ids.
        gallery: (ng, d) float features.          gallery_labels: (ng,) int class ids.
        metrics: names from :data:`METRICS`, e.g. ``("map", "cmc@1", "map@100")``.
        distance: ``"cosine"`` or ``"l2"`` (negative squared distance as the score).
        exclude_self: query i and gallery i are the same item; skip that pair.
            Requires nq == ng and equal labels.
        chunk_size: gallery rows scored at once; extra memory is about
            query_block × chunk_size floats, never nq × ng.
        query_block: queries scored at once.

    Returns:
        {metric name as given: value in [0, 1]}, in the order of ``metrics``; each is the mean
        over the queries that have at least one positive.

    Raises:
        ValueError: dimension mismatch, NaN/inf features, labels whose length differs from
            their features, an unknown metric (the known ones listed), exclude_self with
            different sets, or no query with a positive in the gallery.
    """
    specs = parse_metrics(metrics)
    chunk_size = check_positive_int(chunk_size, "chunk_size")
    query_block = check_positive_int(query_block, "query_block")
    inputs = prepare_inputs(
        query, query_labels, gallery, gallery_labels, distance=distance, exclude_self=exclude_self
    )
    sums = dict.fromkeys((s.name for s in specs), 0.0)
    counted = 0
    for _, stats in iter_positive_ranks(
        inputs, exclude_self=exclude_self, chunk_size=chunk_size, query_block=query_block
    ):
        valid = stats.num_positives > 0
        counted += int(valid.sum())
        for spec in specs:
            sums[spec.name] += float(spec.per_query(stats)[valid].sum())
    if counted == 0:
        raise ValueError(
            "no query has a positive (same-label) item in the gallery"
            + (" once self-matches are excluded" if exclude_self else "")
            + "; retrieval metrics are undefined"
        )
    return {name: total / counted for name, total in sums.items()}
