"""The exact ranking engine: one chunked walk over the gallery counts, for every positive of
every query, the gallery items above it (:class:`~compatkit.eval.metric_specs.PositiveRanks`).

For each positive we count the gallery items scoring at least as high (sklearn threshold
semantics, for ``map``) and the items ranked above it with ties going to the lower gallery
index (for rank metrics). The walk scores one tile (query rows × gallery chunk) at a time,
never an (nq, ng) matrix, with the queries pre-multiplied by a power of two so every score
comes out scaled exactly. Positive pairs are skipped (they are counted from their canonical
scores) and so are items scoring below a query's lowest positive; the others are placed among
the query's sorted positive scores by a bucket table (O(1) per item; only items sharing a
bucket with a positive are compared one by one) and counted in a histogram per tile, whose
tail sums give every count. On the CPU the tiles of a block are scored and placed on
``torch.get_num_threads()`` worker threads (:mod:`compatkit.eval.threads`); tiles own disjoint
histogram rows, so results do not depend on the thread count.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from compatkit.eval.metric_specs import PositiveRanks
from compatkit.eval.retrieval import (
    Prepared,
    as_features,
    as_labels,
    blocks,
    check_distance,
    check_same_dim,
    numpy_fast_path,
    prepare,
    score_block,
)
from compatkit.eval.threads import Workers, Workspace

#: Upper bound on the positives handled in one query block (bounds the per-positive arrays).
DEFAULT_BLOCK_POSITIVES = 1 << 21

_INT31 = (1 << 31) - 1


# ----------------------------------------------------------------------------------------------
# Input handling shared with the compatibility and backfill-curve modules


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

    Shapes:
        qidx: (nb,) original query indices.   offsets: (nb + 1,) CSR offsets of positives.
        pos_row, pos_col: (P,) query row and gallery index, sorted by (row, gallery index).
        pos_member: (P,) position of each positive in the class-sorted gallery
            (``ClassIndex.members`` order).
        member_start, member_stop: (nb,) each row's class range in that order (empty for a
            label absent from the gallery).
    """

    qidx: torch.Tensor
    offsets: torch.Tensor
    pos_row: torch.Tensor
    pos_col: torch.Tensor
    pos_member: torch.Tensor
    member_start: torch.Tensor
    member_stop: torch.Tensor


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
        member = start[rows] + torch.arange(rows.numel(), device=dev) - first[rows]
        cols = index.members[member]
        if exclude_self:
            keep = cols != qidx[rows]
            rows, cols, member = rows[keep], cols[keep], member[keep]
        offsets = torch.cat([count.new_zeros(1), torch.cumsum(count, 0)])
        yield QueryBlock(qidx, offsets, rows, cols, member, start, start + full)
        i = end


def float_order_key(x: torch.Tensor) -> torch.Tensor:
    """int64 keys ordered like the float32 values (-0.0 == 0.0); fits in 32 bits signed."""
    bits = x.contiguous().view(torch.int32).to(torch.int64)
    return torch.where(bits >= 0, bits, -(bits & _INT31))


#: Positive scores are computed in GEMMs of consecutive rows against the class-sorted gallery
#: range holding all their positives: at most this many columns and this many scores each.
_POSITIVE_COLUMNS = 1024
_POSITIVE_SCORES = 1 << 20


def by_class(gp: Prepared, index: ClassIndex) -> Prepared:
    """The gallery in ``ClassIndex.members`` order (each class contiguous)."""
    norms = None if gp.sq_norms is None else gp.sq_norms.index_select(0, index.members)
    return Prepared(gp.feats.index_select(0, index.members), norms)


def positive_scores(qb: Prepared, by_class_gallery: Prepared, block: QueryBlock) -> torch.Tensor:
    """(P,) score of each positive pair of the block.

    Consecutive rows (sorted by label) share a short range of the class-sorted gallery that
    holds all their positives, so a few GEMMs of contiguous slices cover every pair. The walk
    skips positive pairs and uses these canonical values instead, so a positive is always
    compared consistently whatever rounding the BLAS picks.
    """
    out = torch.empty(block.pos_col.numel(), dtype=torch.float32, device=block.pos_col.device)
    if not out.numel():
        return out
    starts, stops = block.member_start.tolist(), block.member_stop.tolist()
    offsets = block.offsets.tolist()
    nb, ra = len(starts), 0
    while ra < nb:
        if offsets[ra + 1] == offsets[ra]:
            ra += 1
            continue
        ca, cb, rb = starts[ra], stops[ra], ra + 1
        while rb < nb:
            if offsets[rb + 1] > offsets[rb]:
                stop = max(cb, stops[rb])
                wider = stop > cb and stop - ca > _POSITIVE_COLUMNS
                if wider or (rb + 1 - ra) * (stop - ca) > _POSITIVE_SCORES:
                    break
                cb = stop
            rb += 1
        pa, pb = offsets[ra], offsets[rb]
        s = score_block(qb, by_class_gallery, slice(ra, rb), slice(ca, cb))
        flat = (block.pos_row[pa:pb] - ra) * (cb - ca) + (block.pos_member[pa:pb] - ca)
        out[pa:pb] = s.view(-1).index_select(0, flat)
        ra = rb
    return out


# ----------------------------------------------------------------------------------------------
# The walk

#: Buckets per query row the bucket table aims at (int32 entries; a block of 2048 queries holds
#: about 2048 × this many). More buckets leave fewer items to compare with positives one by one.
DEFAULT_BUCKETS_PER_ROW = 4096

#: Query rows one CPU thread scores and places at once: the tile (rows × chunk) and the work
#: arrays of its candidates stay in cache between the steps.
TILE_ROWS = 128

#: Query rows of a tile on other devices (one stream: bigger tiles, fewer kernel launches).
GEMM_ROWS = 512


def flat_nonzero(mask: torch.Tensor) -> torch.Tensor:
    """Positions of the true entries of a contiguous bool tensor, flattened (int64)."""
    if numpy_fast_path(mask):
        return torch.from_numpy(np.flatnonzero(mask.numpy()))
    return torch.nonzero(mask.view(-1)).view(-1)


def repeat_counts(values: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
    """``values[i]`` repeated ``counts[i]`` times, concatenated."""
    if numpy_fast_path(values):
        return torch.from_numpy(np.repeat(values.numpy(), counts.numpy()))
    return torch.repeat_interleave(values, counts)


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


@dataclass(frozen=True)
class SharedItems:
    """Items that fell in buckets holding positives, set aside for exact placement
    (:meth:`BucketGrid.settle`). Shapes (n,): table code, scaled score, block row and walk
    position (the gallery index, unless the walk visits the gallery in another order)."""

    code: torch.Tensor
    vals: torch.Tensor
    rows: torch.Tensor
    cols: torch.Tensor

    @staticmethod
    def cat(parts: Sequence[SharedItems]) -> SharedItems:
        return SharedItems(*(torch.cat([getattr(p, f) for p in parts]) for f in _SHARED_FIELDS))


_SHARED_FIELDS = ("code", "vals", "rows", "cols")


@dataclass(frozen=True)
class TileItems:
    """The candidates of one tile: their bins relative to ``bin_range[0]`` (bin 0 of the first
    row, which counts for nobody, for the ``shared`` items placed later). Every bin lies in
    ``bin_range``. The bins may live in work buffers reused by the next
    :meth:`BucketGrid.locate` call."""

    bins: torch.Tensor
    shared: SharedItems | None
    bin_range: tuple[int, int]

    def histogram(self) -> torch.Tensor:
        """(hi - lo,) int64 items per bin of ``bin_range``."""
        lo, hi = self.bin_range
        return torch.bincount(self.bins, minlength=hi - lo)


def run_bounds(sorted_keys: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """For each entry of a sorted key array, the start and end of its run of equal keys
    (what ``searchsorted(keys, keys)`` left and right give, without the searches)."""
    _, counts = torch.unique_consecutive(sorted_keys, return_counts=True)
    ends = torch.cumsum(counts, 0)
    return repeat_counts(ends - counts, counts), repeat_counts(ends, counts)


@dataclass(frozen=True)
class SortedPositives:
    """A block's positives sorted by (row, score ascending, index descending), with search keys.

    ``build`` takes them sorted by (row, gallery index); ``source[g]`` is the input position of
    sorted entry g.

    Shapes (P = positives, nb = queries):
        row, col, score, key, tie_key, source: (P,).  offsets: (nb + 1,).
        group_start, group_end: (P,) the run of entries of the same row and score.
        lo, hi: (nb,) lowest / highest positive score (+inf for queries without positives).
    """

    offsets: torch.Tensor
    row: torch.Tensor
    col: torch.Tensor
    score: torch.Tensor
    key: torch.Tensor
    tie_key: torch.Tensor
    group_start: torch.Tensor
    group_end: torch.Tensor
    lo: torch.Tensor
    hi: torch.Tensor
    source: torch.Tensor

    @classmethod
    def build(
        cls, offsets: torch.Tensor, row: torch.Tensor, col: torch.Tensor, score: torch.Tensor
    ) -> SortedPositives:
        # (row, col ascending) reversed → stable sort by (row, score) leaves col descending
        rev = torch.arange(row.numel() - 1, -1, -1, device=row.device)
        key = (row[rev] << 32) + float_order_key(score[rev])
        key, perm = torch.sort(key, stable=True)
        order = rev[perm]
        row, col, score = row[order], col[order], score[order]
        group_start, group_end = run_bounds(key)
        tie_key = (group_start << 32) + (_INT31 - col)
        nb = offsets.numel() - 1
        has = offsets[1:] > offsets[:-1]
        lo = torch.full((nb,), torch.inf, device=score.device)
        hi = torch.full((nb,), torch.inf, device=score.device)
        if score.numel():
            lo = torch.where(has, score[offsets[:-1].clamp(max=score.numel() - 1)], lo)
            hi = torch.where(has, score[(offsets[1:] - 1).clamp(min=0)], hi)
        return cls(offsets, row, col, score, key, tie_key, group_start, group_end, lo, hi, order)

    @property
    def num_rows(self) -> int:
        return self.offsets.numel() - 1

    @property
    def num_bins(self) -> int:
        """Histogram bins: row r owns bins ``offsets[r] + r + t`` for t in ``0..m_r``."""
        return int(self.offsets[-1]) + self.num_rows

    def self_positions(self) -> Positions:
        """Bins of every sorted entry as an item of its own row scoring its own score (the walk
        skips positive pairs; entries sharing a gallery index never rank each other)."""
        first_of_col, _ = run_bounds(self.tie_key)
        idx = torch.arange(self.row.numel(), device=self.row.device)
        return Positions(self.group_end + self.row, idx, first_of_col + self.row)


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


def _bucket_scale(lo: torch.Tensor, top: float, score_bound: float, per_row: int) -> float:
    """Power of two S giving the rows about ``per_row`` unit buckets each over [lo_r, top],
    with |S·lo|, |S·top| <= 2^30 (int32 buckets) and S·score_bound <= 2^100 (no overflow)."""
    if lo.numel() == 0:
        return 1.0
    lo64 = lo.to(torch.float64)
    span = float((top - lo64).sum())
    magnitude = max(abs(top), float(lo64.abs().max()))
    e_max = 100 if magnitude == 0 else math.floor(math.log2(2.0**30 / magnitude))
    bound = min(max(score_bound, 1e-30), 2.0**100)  # an overflowing l2 bound: S <= 1
    e_max = min(e_max, math.floor(math.log2(2.0**100 / bound)), 100)
    e = e_max if span <= 0 else math.floor(math.log2(per_row * lo.numel() / span))
    return 2.0 ** max(min(e, e_max), -100)


class BucketGrid:
    """Exact placement of item scores among a block's sorted positives in O(1) per item.

    All scores are multiplied by a power of two S (exact: the walk scores pre-scaled queries,
    so every order and tie is kept). A scaled score w falls in bucket ``trunc(min(w, top))``,
    top = the block's highest scaled positive; row r owns the buckets from its lowest
    positive's to top. The table maps a bucket without positives straight to its histogram
    bin and a bucket holding positives to ``-1 - (its first positive)``: only items there are
    compared with those positives, and items tied with one are searched for the rank order.
    """

    def __init__(
        self,
        sp: SortedPositives,
        *,
        score_bound: float,
        buckets_per_row: int = DEFAULT_BUCKETS_PER_ROW,
        workspace: Workspace | None = None,
    ) -> None:
        self.sp = sp
        self.workspace = Workspace() if workspace is None else workspace
        dev = sp.score.device
        has = sp.offsets[1:] > sp.offsets[:-1]
        top = float(sp.score.max()) if sp.score.numel() else 0.0
        self.scale = _bucket_scale(sp.lo[has], top, score_bound, buckets_per_row)
        self.lo = sp.lo * self.scale
        self.pos = sp.score * self.scale
        self.top = top * self.scale
        lo_bucket = torch.where(has, self.lo, 0.0).to(torch.int32).to(torch.int64)
        n = torch.where(has, int(self.top) - lo_bucket + 1, 0)
        ends = torch.cumsum(n, 0)
        total = int(ends[-1]) if n.numel() else 0
        if total >= 1 << 31:
            raise ValueError(f"bucket table of {total} entries needs int64; use a smaller block")
        self.off = (ends - n - lo_bucket).to(torch.int32)
        # table value of a bucket without positives: positives below it + its row (its bin)
        pidx = self.off[sp.row].to(torch.int64) + self.pos.to(torch.int32)
        shared, fill = torch.unique_consecutive(pidx, return_counts=True)
        first = torch.cumsum(fill, 0) - fill
        step = self.workspace.take("table", total + 1, torch.int32, dev).zero_()
        step.index_add_(0, shared + 1, fill.to(torch.int32))
        rows_with = torch.nonzero(has).view(-1)
        row_step = torch.diff(rows_with, prepend=rows_with.new_zeros(1))
        step.index_add_(0, (ends - n)[rows_with], row_step.to(torch.int32))
        self.table = step[:total].cumsum_(0)
        self.table[shared] = (-1 - first).to(torch.int32)
        self.bucket_end = repeat_counts(first + fill, fill)
        #: Bin 0 of each row (items reaching no positive; it counts for nobody), and the end.
        self.row_bin0 = sp.offsets + torch.arange(sp.num_rows + 1, device=dev)
        self._bin0 = self.row_bin0.tolist()
        self._np = {}
        if numpy_fast_path(self.table):
            self._np = {
                "off": self.off.numpy(),
                "top": np.float32(self.top),
                "row_bounds": np.arange(sp.num_rows + 1, dtype=np.int64),
                "row_bin0": self.row_bin0.numpy(),
            }

    def scaled(self, p: Prepared, *, query: bool) -> Prepared:
        """Features whose scores come out multiplied by S (queries scaled, l2 norms scaled)."""
        norms = None if p.sq_norms is None else p.sq_norms * self.scale
        return Prepared(p.feats * self.scale if query else p.feats, norms)

    def locate(
        self,
        s: torch.Tensor,
        row0: int,
        col_start: int,
        work: Workspace,
        lo: torch.Tensor | None = None,
    ) -> TileItems:
        """Bins of the items of a scaled (r, w) score tile (block rows ``row0:row0 + r``,
        gallery items from ``col_start``) that reach a positive; items in buckets holding
        positives get their row's bin 0 and are returned for :meth:`settle`.

        ``work``: buffers of the calling thread (the result may live in them). ``lo``: (nb,)
        scaled per-row thresholds at or above :attr:`lo`, when fewer positives matter; items
        below are skipped.
        """
        lo = self.lo if lo is None else lo
        mask = work.take("mask", s.numel(), torch.bool, s.device)
        if self._np and numpy_fast_path(s):
            return self._locate_numpy(s, row0, col_start, mask, lo, work)
        rows_sl = slice(row0, row0 + s.shape[0])
        width = s.shape[1]
        m = mask.view(s.shape)
        torch.ge(s, lo[rows_sl, None], out=m)
        flat = torch.nonzero(m.view(-1)).view(-1)
        bounds = torch.arange(s.shape[0] + 1, device=s.device) * width
        counts = torch.diff(torch.searchsorted(flat, bounds))
        vals = s.view(-1).index_select(0, flat)
        idx = torch.clamp(vals, max=self.top).to(torch.int32)
        idx += torch.repeat_interleave(self.off[rows_sl], counts)
        bins = self.table.index_select(0, idx)
        sel = torch.nonzero(bins < 0).view(-1)
        bin_range = (self._bin0[row0], self._bin0[row0 + s.shape[0]])
        shared = None
        if sel.numel():
            at = flat.index_select(0, sel)
            rows = torch.div(at, width, rounding_mode="floor")
            cols = at - rows * width + col_start
            code = bins.index_select(0, sel)
            shared = SharedItems(code, vals.index_select(0, sel), rows + row0, cols)
            bins.index_fill_(0, sel, bin_range[0])
        bins -= bin_range[0]
        return TileItems(bins, shared, bin_range)

    def _locate_numpy(
        self,
        s: torch.Tensor,
        row0: int,
        col_start: int,
        mask: torch.Tensor,
        lo: torch.Tensor,
        work: Workspace,
    ) -> TileItems:
        """:meth:`locate` for CPU tensors, in numpy (fewer passes, less per-call overhead),
        into work buffers kept between calls (fewer page faults)."""
        r, width = s.shape
        s_np = s.numpy()
        m = mask.numpy().reshape(r, width)
        np.greater_equal(s_np, lo.numpy()[row0 : row0 + r, None], out=m)
        flat = np.flatnonzero(m)
        n = flat.size
        counts = np.diff(np.searchsorted(flat, self._np["row_bounds"][: r + 1] * width))
        vals_buf, clamp_buf, idx_buf, bins_buf, neg_buf = _locate_buffers(work, n)
        vals = np.take(s_np.reshape(-1), flat, out=vals_buf, mode="clip")  # in range
        clamped = np.minimum(vals, self._np["top"], out=clamp_buf)
        idx = idx_buf
        np.copyto(idx, clamped, casting="unsafe")  # truncation, as astype
        idx += np.repeat(self._np["off"][row0 : row0 + r], counts)
        bins = torch.index_select(self.table, 0, torch.from_numpy(idx), out=bins_buf)
        b = bins.numpy()
        sel = np.flatnonzero(np.less(b, 0, out=neg_buf))
        lo_bin, hi_bin = self._bin0[row0], self._bin0[row0 + r]
        shared = None
        if sel.size:
            rows, cols = np.divmod(flat[sel], width)
            rows += row0
            cols += col_start
            shared = SharedItems(*(torch.from_numpy(x) for x in (b[sel], vals[sel], rows, cols)))
            b[sel] = lo_bin
        b -= lo_bin
        return TileItems(bins, shared, (lo_bin, hi_bin))

    def settle(self, items: SharedItems, walk_order: torch.Tensor | None = None) -> Positions:
        """Bins of the items set aside by :meth:`locate`: an item in a bucket with one positive
        reaches it or not; with several positives, or tied with one, it is searched
        (``walk_order``: gallery index at each walk position, for the tie order; default the
        identity)."""
        first = (-1 - items.code).to(torch.int64)
        p = self.pos.index_select(0, first)
        search = (self.bucket_end.index_select(0, first) - first > 1) | (items.vals == p)
        found = first.add_(items.rows).add_(items.vals >= p)
        todo = flat_nonzero(search)
        if not todo.numel():
            return Positions(found, todo, todo)
        r = items.rows.index_select(0, todo)
        cols = items.cols.index_select(0, todo)
        if walk_order is not None:
            cols = walk_order.index_select(0, cols)
        exact = locate_exact(self.sp, r, cols, items.vals.index_select(0, todo) / self.scale)
        found[todo] = exact.bin
        return Positions(found, todo[exact.tie_idx], exact.tie_bin)


def _locate_buffers(ws: Workspace, n: int) -> tuple[Any, ...]:
    """Work buffers of ``n`` items for :meth:`BucketGrid._locate_numpy`."""
    cpu = torch.device("cpu")
    return (
        ws.take("vals", n, torch.float32, cpu).numpy(),
        ws.take("clamped", n, torch.float32, cpu).numpy(),
        ws.take("idx", n, torch.int32, cpu).numpy(),
        ws.take("bins", n, torch.int32, cpu),
        ws.take("negative", n, torch.bool, cpu).numpy(),
    )


def tile_rows(device: torch.device) -> int:
    """Query rows of one walk tile on ``device``."""
    return TILE_ROWS if device.type == "cpu" else GEMM_ROWS


def max_abs_score(*parts: Prepared) -> float:
    """An upper bound on |score| for these prepared features (cosine: 1; l2: from the norms)."""
    norms = [
        float(p.sq_norms.max()) for p in parts if p.sq_norms is not None and p.sq_norms.numel()
    ]
    return 1.0 if not norms else 4.0 * sum(norms) + 1.0


class KnownPairs:
    """The pairs the walk skips (set to -inf in each tile): positive pairs, counted from their
    canonical scores instead, and with ``exclude_self`` each query's own item.

    The walk visits the gallery in segments (``starts``: first walk position of each); pairs
    are keyed by (segment, block row).
    """

    def __init__(
        self,
        sp: SortedPositives,
        qidx: torch.Tensor,
        starts: Sequence[int],
        *,
        exclude_self: bool,
        position: torch.Tensor | None = None,
    ) -> None:
        """``position``: walk position of each gallery index (default: the identity)."""
        nb = sp.num_rows
        rows, cols = sp.row, sp.col
        if exclude_self:
            rows = torch.cat([rows, torch.arange(nb, device=rows.device)])
            cols = torch.cat([cols, qidx])
        if position is not None:
            cols = position[cols]
        seg_starts = torch.tensor(list(starts), dtype=torch.int64, device=cols.device)
        seg = torch.searchsorted(seg_starts, cols, right=True) - 1
        key, order = torch.sort(seg * nb + rows)
        self.key, self.rows, self.cols, self.nb = key, rows[order], cols[order], nb

    def in_tiles(self, seg: int, tile_rows: int) -> list[int]:
        """Bounds of the known pairs of each row tile (``tile_rows`` rows) of segment ``seg``:
        tile t owns entries ``bounds[t]:bounds[t + 1]``."""
        starts = [*range(0, self.nb, tile_rows), self.nb]
        keys = torch.tensor([seg * self.nb + r for r in starts], device=self.key.device)
        return torch.searchsorted(self.key, keys).tolist()

    def skip(self, s: torch.Tensor, row0: int, col_start: int, a: int, b: int) -> None:
        """-inf at the known pairs ``a:b`` (see :meth:`in_tiles`) in the tile ``s`` of block
        rows from ``row0`` and walk positions from ``col_start``."""
        if a < b:
            flat = (self.rows[a:b] - row0) * s.shape[1] + (self.cols[a:b] - col_start)
            s.view(-1).index_fill_(0, flat, -torch.inf)


class Counter:
    """Accumulates item bins of one query block and turns them into per-positive counts."""

    def __init__(self, sp: SortedPositives) -> None:
        self.sp = sp
        dev = sp.offsets.device
        self.hist = torch.zeros(sp.num_bins, dtype=torch.int64, device=dev)
        self.rank_delta = torch.zeros(sp.num_bins, dtype=torch.int64, device=dev)
        self._ones = torch.ones(1 << 16, dtype=torch.int64, device=dev)

    def add(self, pos: Positions) -> None:
        """Count items at their bins."""
        self.hist.index_add_(0, pos.bin, self._unit(pos.bin.numel()))
        if pos.tie_idx.numel():
            ones = self._unit(pos.tie_idx.numel())
            self.rank_delta.index_add_(0, pos.bin[pos.tie_idx], ones, alpha=-1)
            self.rank_delta.index_add_(0, pos.tie_bin, ones)

    def add_tile(self, items: TileItems) -> None:
        """Count a located tile's items (no ties; bins relative to its bin range). Tiles of
        disjoint rows may be added from several threads at once."""
        if items.bins.numel():
            lo, hi = items.bin_range
            self.hist[lo:hi] += items.histogram()

    def _unit(self, n: int) -> torch.Tensor:
        if self._ones.numel() < n:
            self._ones = torch.ones(
                max(n, 2 * self._ones.numel()), dtype=torch.int64, device=self._ones.device
            )
        return self._ones[:n]

    def finish(self) -> PositiveRanks:
        return ranks_from_histograms(self.sp, self.hist, self.hist + self.rank_delta)


def tail_counts(
    sp: SortedPositives,
    hist: torch.Tensor,
    at: torch.Tensor | None = None,
    bin_end: torch.Tensor | None = None,
) -> torch.Tensor:
    """For each sorted positive g (or each of ``at``) of row r: Σ of ``hist`` over the bins
    after g's in its row, i.e. the items reaching beyond it. ``bin_end``: the end of each
    one's row bins (the next row's bin 0), when already known.

    Shapes:
        hist: (num_bins,).  at, bin_end: (n,).  returns: (P,) or (n,) int64.
    """
    cum = torch.empty(hist.numel() + 1, dtype=torch.int64, device=hist.device)
    cum[0] = 0
    torch.cumsum(hist, 0, dtype=torch.int64, out=cum[1:])
    g = torch.arange(sp.row.numel(), device=hist.device) if at is None else at
    row = sp.row.index_select(0, g)
    if bin_end is None:
        bin_end = sp.offsets.index_select(0, row + 1) + row + 1
    return cum.index_select(0, bin_end) - cum.index_select(0, g + row + 1)


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
    n_ge = tail_counts(sp, hist_ge)
    rank = tail_counts(sp, hist_rank)
    tp_ge = sp.offsets[1:][sp.row] - sp.group_start
    order = best_first_order(sp)
    return PositiveRanks(sp.offsets, rank[order], n_ge[order], tp_ge[order])


def walk_block(
    qb: Prepared,
    gp: Prepared,
    gp_by_class: Prepared,
    block: QueryBlock,
    *,
    exclude_self: bool,
    chunk_size: int,
    workers: Workers,
    workspace: Workspace | None = None,
) -> PositiveRanks:
    """Count, for every positive of a query block, the gallery items above it (one walk).
    ``gp_by_class``: the gallery in class order (see :func:`by_class`); ``workers``: score
    and place the tiles; ``workspace``: buffers shared with the other blocks' walks."""
    ng = gp.feats.shape[0]
    score = positive_scores(qb, gp_by_class, block)
    sp = SortedPositives.build(block.offsets, block.pos_row, block.pos_col, score)
    counter = Counter(sp)
    if not score.numel():
        return counter.finish()
    counter.add(sp.self_positions())
    ws = Workspace() if workspace is None else workspace
    grid = BucketGrid(
        sp,
        score_bound=max_abs_score(qb, gp),
        buckets_per_row=DEFAULT_BUCKETS_PER_ROW,
        workspace=ws,
    )
    starts = list(range(0, ng, chunk_size))
    known = KnownPairs(sp, block.qidx, starts, exclude_self=exclude_self)
    qs, gs = grid.scaled(qb, query=True), grid.scaled(gp, query=False)
    dev = qb.feats.device
    rows = tile_rows(dev)
    tiles = list(blocks(block.qidx.numel(), rows))
    shared = []
    for seg, g_sl in enumerate(blocks(ng, chunk_size)):
        bounds = known.in_tiles(seg, rows)

        def place(t: int, g_sl: slice = g_sl, bounds: list[int] = bounds) -> SharedItems | None:
            r_sl, work = tiles[t], workers.workspace()
            n = (r_sl.stop - r_sl.start) * (g_sl.stop - g_sl.start)
            sg = score_block(qs, gs, r_sl, g_sl, out=work.take("scores", n, torch.float32, dev))
            known.skip(sg, r_sl.start, g_sl.start, bounds[t], bounds[t + 1])
            items = grid.locate(sg, r_sl.start, g_sl.start, work)
            counter.add_tile(items)
            return items.shared

        shared += [x for x in workers.map(place, range(len(tiles))) if x is not None]
    if shared:
        counter.add(grid.settle(SharedItems.cat(shared)))
    return counter.finish()


# ----------------------------------------------------------------------------------------------
# Checked inputs and the per-block walk the public functions run


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
    gp_by_class = by_class(inputs.gallery, inputs.index)
    workspace = Workspace()
    planned = plan_query_blocks(
        inputs.query_labels,
        inputs.index,
        exclude_self=exclude_self,
        query_block=query_block,
        max_positives=max_positives,
    )
    with Workers(inputs.query.feats.device) as workers:
        for block in planned:
            qb = Prepared(
                inputs.query.feats[block.qidx],
                None if inputs.query.sq_norms is None else inputs.query.sq_norms[block.qidx],
            )
            ranks = walk_block(
                qb,
                inputs.gallery,
                gp_by_class,
                block,
                exclude_self=exclude_self,
                chunk_size=chunk_size,
                workers=workers,
                workspace=workspace,
            )
            yield block.qidx, ranks
