"""Hot-refresh backfilling curves (methods.md §3, fct-fastfill-peers.md §2.4).

At fraction p the first ``⌊p·ng⌋`` gallery items of an order hold their new feature and the
rest their old (or transformed-old) one; queries always use the new model. The curve is
computed in one walk over the gallery: each chunk is scored against the old and the new
gallery once, and every item's effect on each positive is recorded at the step where the item
switches, so all steps come out of prefix sums. Every point equals re-ranking the mixed gallery
from scratch; ``M(0)`` is the cross-test and ``M(1)`` the self-test.
"""

from __future__ import annotations

import itertools
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal, TypeVar

import numpy as np
import torch

from compatkit.eval.flips import flip_rates, top_k_correct
from compatkit.eval.metric_specs import PositiveRanks, parse_metrics
from compatkit.eval.ranking import (
    DEFAULT_BLOCK_POSITIVES,
    BucketGrid,
    ClassIndex,
    KnownPairs,
    Positions,
    QueryBlock,
    SortedPositives,
    TileItems,
    by_class,
    check_exclude_self,
    max_abs_score,
    plan_query_blocks,
    positive_scores,
    tile_rows,
)
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
from compatkit.eval.threads import Workers, Workspace
from compatkit.ordering import backfill_count, check_permutation

logger = logging.getLogger(__name__)

Reference = Literal["old_old", "previous_step"]
T = TypeVar("T")

#: Bucket table size per query row in the curve walk (its rows hold two targets per positive).
CURVE_BUCKETS_PER_ROW = 8192


def auc_trapezoid(fractions: Sequence[float], values: Sequence[float]) -> float:
    """∫₀¹ M(p) dp by the trapezoid rule on the evaluated grid (RACT-style)."""
    f, v = np.asarray(fractions, dtype=np.float64), np.asarray(values, dtype=np.float64)
    if f.shape != v.shape or f.ndim != 1 or f.size < 2:
        raise ValueError(
            f"need matching 1-D fractions and values with at least 2 points, got {f.shape} "
            f"and {v.shape}"
        )
    return float(np.sum((f[1:] - f[:-1]) * (v[1:] + v[:-1]) / 2.0))


def auc_mean(values: Sequence[float]) -> float:
    """FastFill's "AUC": the arithmetic mean of equally spaced curve points (ends included)."""
    v = np.asarray(values, dtype=np.float64)
    if v.ndim != 1 or v.size == 0:
        raise ValueError(f"need a non-empty 1-D list of curve values, got shape {v.shape}")
    return float(v.mean())


def mixed_gallery(old: Any, new: Any, order: Any, fraction: float) -> np.ndarray:
    """The gallery at ``fraction``: new features for the first ``⌊p·ng⌋`` items of ``order``.

    Shapes:
        old, new: (ng, d).  order: (ng,) permutation.  returns: (ng, d) float32.
    """
    o = as_features(old, "old_gallery").cpu().numpy()
    n = as_features(new, "new_gallery").cpu().numpy()
    if o.shape != n.shape:
        raise ValueError(f"old_gallery {o.shape} and new_gallery {n.shape} must have one shape")
    perm = check_permutation(order, o.shape[0])
    out = o.copy()
    done = perm[: backfill_count(o.shape[0], fraction)]
    out[done] = n[done]
    return out


@dataclass(frozen=True)
class BackfillCurve:
    """Metrics and flips at each backfill fraction, with AUCs and regression indicators.

    ``auc[metric]`` holds ``trapezoid`` (∫ by the trapezoid rule on ``fractions``) and
    ``mean`` (FastFill's mean of the points; only an area when the points are equally spaced).
    """

    fractions: tuple[float, ...]
    counts: tuple[int, ...]
    metrics: dict[str, list[float]]
    nfr: list[float]
    pfr: list[float]
    nfi: list[float]
    reference: str
    top_k: int
    ordering: str | None = None
    auc: dict[str, dict[str, float]] = field(init=False)
    regression: dict[str, Any] = field(init=False)

    def __post_init__(self) -> None:
        auc = {
            name: {
                "trapezoid": auc_trapezoid(self.fractions, vals),
                "mean": auc_mean(vals),
            }
            for name, vals in self.metrics.items()
        }
        regression: dict[str, Any] = {
            name: {
                "min_minus_start": float(min(vals) - vals[0]),
                "decreasing_steps": int(sum(b < a for a, b in itertools.pairwise(vals))),
            }
            for name, vals in self.metrics.items()
        }
        regression["max_nfr"] = float(max(self.nfr))
        regression["mean_nfr"] = float(np.mean(self.nfr))
        object.__setattr__(self, "auc", auc)
        object.__setattr__(self, "regression", regression)

    def to_json(self) -> dict[str, Any]:
        """A JSON-ready dict of every field."""
        return {
            "ordering": self.ordering,
            "reference": self.reference,
            "top_k": self.top_k,
            "fractions": list(self.fractions),
            "counts": list(self.counts),
            "metrics": {k: list(v) for k, v in self.metrics.items()},
            "nfr": list(self.nfr),
            "pfr": list(self.pfr),
            "nfi": list(self.nfi),
            "auc": self.auc,
            "regression": self.regression,
        }


def _check_fractions(fractions: Sequence[float] | None, steps: int) -> list[float]:
    if fractions is None:
        steps = check_positive_int(steps, "steps")
        if steps < 2:
            raise ValueError(f"steps must be at least 2 (both end points), got {steps}")
        return [i / (steps - 1) for i in range(steps)]
    f = [float(x) for x in fractions]
    if len(f) < 2:
        raise ValueError(f"fractions must list at least 2 backfill fractions, got {f}")
    if any(not 0.0 <= x <= 1.0 for x in f):
        raise ValueError(f"fractions must lie in [0, 1], got {f}")
    if any(b < a for a, b in itertools.pairwise(f)):
        raise ValueError(f"fractions must be non-decreasing (prefix-closed sets), got {f}")
    return f


class _StepHistograms:
    """Bins of the walked items (positives excluded) per step. Every item starts in its old
    state (``base``); at the step where it switches, ``delta`` moves it from its old bin to
    its new one; running sums over steps give each step's histogram. A spare last step
    collects the items that never switch. Items tied with a target (rare) are also kept as
    records, for the rank order."""

    def __init__(self, steps: int, nbins: int, device: torch.device) -> None:
        self.steps, self.nbins, self.width = steps, nbins, steps + 1
        self.base = torch.zeros(nbins, dtype=torch.int64, device=device)
        self.delta = torch.zeros(self.width, nbins, dtype=torch.int64, device=device)
        # appended from several threads: the order varies, the counts made from it do not
        self._ties: list[tuple[torch.Tensor, ...]] = []

    def add_tile(self, items: TileItems, *, step: int, new: bool) -> None:
        """A located tile's items (no ties; bins relative to its bin range) in their old
        (``new=False``) or new state, all switching at ``step``: one bincount serves them
        all. Tiles of disjoint rows may be added from several threads at once."""
        if items.bins.numel():
            lo, hi = items.bin_range
            c = items.histogram()
            if not new:
                self.base[lo:hi] += c
                self.delta[step, lo:hi] -= c
            else:
                self.delta[step, lo:hi] += c

    def add(self, pos: Positions, step: int, *, new: bool) -> None:
        """Items located in their old (``new=False``) or new state, switching at ``step``.
        Items of disjoint rows may be added from several threads at once."""
        ones = torch.ones(pos.bin.numel(), dtype=torch.int64, device=pos.bin.device)
        if not new:
            self.base.index_add_(0, pos.bin, ones)
        self.delta[step].index_add_(0, pos.bin, ones, alpha=1 if new else -1)
        if pos.tie_idx.numel():
            ge = pos.bin[pos.tie_idx].to(torch.int64)
            at = torch.full_like(ge, step)
            # the item is in this state at steps [0, switch) when old, [switch, steps) when new
            start, stop = (at, torch.full_like(at, self.steps)) if new else (at * 0, at)
            self._ties.append((pos.tie_bin.to(torch.int64), ge, start, stop))

    def finish(self) -> torch.Tensor:
        """(steps + 1, nbins): the ge histogram of the items at each step (running sums of
        ``delta`` on ``base``, in place; no more items may be added)."""
        self.delta[0] += self.base
        for s in range(1, self.width):
            self.delta[s] += self.delta[s - 1]
        return self.delta

    def tie_targets(self, sp: SortedPositives) -> tuple[torch.Tensor, ...]:
        """(target, first step, stop step) of each (tied item, target) pair where the item's
        rank bin is below its ge bin: the item reaches that target but does not rank above
        it (it has the same score and a higher gallery index)."""
        if not self._ties:
            empty = sp.row.new_empty(0)
            return empty, empty, empty
        rank_bin, ge_bin, start, stop = (torch.cat(x) for x in zip(*self._ties, strict=True))
        row_bin0 = sp.offsets + torch.arange(sp.num_rows + 1, device=sp.row.device)
        row = torch.searchsorted(row_bin0, ge_bin, right=True) - 1
        n = ge_bin - rank_bin
        first = torch.repeat_interleave(rank_bin - row, n)
        within = torch.arange(first.numel(), device=first.device)
        within -= torch.repeat_interleave(torch.cumsum(n, 0) - n, n)
        spread = (torch.repeat_interleave(x, n) for x in (start, stop))
        return (first + within, *spread)


def walk_segments(counts: Sequence[int], ng: int, chunk_size: int) -> list[tuple[int, int, int]]:
    """The walk over the gallery in backfill order: (start, stop, step) pieces of at most
    ``chunk_size`` positions whose items all switch at ``step`` (position p is new at step s
    when p < counts[s], so it switches at the number of counts <= p)."""
    cuts = sorted({0, ng, *(c for c in counts if 0 < c < ng)})
    pieces = []
    for a, b in itertools.pairwise(cuts):
        step = int(np.searchsorted(np.asarray(counts), a, side="right"))
        pieces += [(sl.start + a, sl.stop + a, step) for sl in blocks(b - a, chunk_size)]
    return pieces


def backfill_curve(
    query: Any,
    query_labels: Any,
    old_gallery: Any,
    new_gallery: Any,
    gallery_labels: Any,
    order: Any,
    *,
    fractions: Sequence[float] | None = None,
    steps: int = 21,
    metrics: Sequence[str] = ("map", "cmc@1"),
    distance: Distance = "cosine",
    exclude_self: bool = False,
    reference: Reference = "old_old",
    old_query: Any = None,
    reference_gallery: Any = None,
    top_k: int = 1,
    chunk_size: int = 4096,
    query_block: int = DEFAULT_QUERY_BLOCK,
    ordering: str | None = None,
) -> BackfillCurve:
    """Metrics, NFR/PFR/NFI and AUCs of a gallery backfilled in ``order``.

    Args:
        query: (nq, d) new-model query features.     query_labels: (nq,).
        old_gallery, new_gallery: (ng, d) old (or transformed-old) and new features of the
            same items.                               gallery_labels: (ng,).
        order: (ng,) permutation, e.g. from :func:`compatkit.ordering.backfill_order`.
        fractions: backfill fractions (non-decreasing, in [0, 1]); default ``steps`` equally
            spaced points from 0 to 1 (``steps=22`` reproduces FastFill's grid).
        reference: flips against the old/old system (needs ``old_query``) or against the
            previous step (step 0 against old/old when ``old_query`` is given, else itself).
        old_query: (nq, d_old) old-model query features, for the old/old reference.
        reference_gallery: (ng, d_old) the old/old system's gallery when ``old_gallery`` is
            not the raw old features (e.g. transformed-old with FCT/BiCT); default old_gallery.
        top_k: a query is correct when a positive is in its top k.
        ordering: a label stored in the result (e.g. ``"uncertainty"``).

    Raises:
        ValueError: shapes, dimensions, a non-permutation order, bad fractions, an unknown
            metric or reference, or ``reference="old_old"`` without ``old_query``.
    """
    specs = parse_metrics(metrics)
    check_distance(distance)
    chunk_size = check_positive_int(chunk_size, "chunk_size")
    query_block = check_positive_int(query_block, "query_block")
    top_k = check_positive_int(top_k, "top_k")
    if reference not in ("old_old", "previous_step"):
        raise ValueError(f"reference must be 'old_old' or 'previous_step', got {reference!r}")
    if reference == "old_old" and old_query is None:
        raise ValueError(
            "reference='old_old' needs old_query (old-model query features); pass it or use "
            "reference='previous_step'"
        )
    fr = _check_fractions(fractions, steps)
    q = as_features(query, "query")
    go = as_features(old_gallery, "old_gallery").to(q.device)
    gn = as_features(new_gallery, "new_gallery").to(q.device)
    if go.shape != gn.shape:
        raise ValueError(
            f"old_gallery has shape {tuple(go.shape)} but new_gallery {tuple(gn.shape)}; both "
            "hold the same items in one index, so they need one shape"
        )
    check_same_dim(q, go, "query", "old_gallery")
    ql = as_labels(query_labels, q.shape[0], "query_labels", device=q.device)
    gl = as_labels(gallery_labels, go.shape[0], "gallery_labels", device=q.device)
    check_exclude_self(exclude_self, ql, gl)
    nq, ng = q.shape[0], go.shape[0]
    perm = check_permutation(order, ng)
    counts = [backfill_count(ng, f) for f in fr]
    n_steps = len(fr)
    # the walk visits the gallery in backfill order, so each piece switches at one step
    walk_order = torch.from_numpy(perm).to(q.device)
    position = torch.empty_like(walk_order)
    position[walk_order] = torch.arange(ng, device=q.device)
    segments = walk_segments(counts, ng, chunk_size)
    switch = torch.searchsorted(
        torch.tensor(counts, dtype=torch.int64, device=q.device), position, right=True
    )

    ref_correct = None
    if old_query is not None:
        ref_correct = top_k_correct(
            old_query,
            query_labels,
            old_gallery if reference_gallery is None else reference_gallery,
            gallery_labels,
            k=top_k,
            distance=distance,
            exclude_self=exclude_self,
            chunk_size=chunk_size,
            query_block=query_block,
        )

    qp = prepare(q, distance, "query")
    gpo, gpn = prepare(go, distance, "old_gallery"), prepare(gn, distance, "new_gallery")
    hit_name = f"cmc@{top_k}"
    hit_spec = parse_metrics([hit_name])[0]
    sums = np.zeros((n_steps, len(specs)))
    counted = 0
    correct = np.zeros((n_steps, nq), dtype=bool)
    index = ClassIndex.build(gl)
    with Workers(q.device) as workers:
        walk = _CurveWalk(
            (_reordered(gpo, walk_order), _reordered(gpn, walk_order)),
            (by_class(gpo, index), by_class(gpn, index)),
            segments,
            walk_order,
            position,
            switch,
            n_steps,
            workers,
        )
        for block in plan_query_blocks(
            ql,
            index,
            exclude_self=exclude_self,
            query_block=query_block,
            max_positives=DEFAULT_BLOCK_POSITIVES // 2,
        ):
            qb = Prepared(
                qp.feats[block.qidx], None if qp.sq_norms is None else qp.sq_norms[block.qidx]
            )
            idx = block.qidx.cpu().numpy()
            valid = (block.offsets[1:] > block.offsets[:-1]).cpu().numpy()
            counted += int(valid.sum())

            def summarize(
                s: int, stats: PositiveRanks, idx: np.ndarray = idx, valid: np.ndarray = valid
            ) -> None:
                # steps run concurrently: each writes its own row of sums and correct
                for j, spec in enumerate(specs):
                    sums[s, j] += float(spec.per_query(stats).cpu().numpy()[valid].sum())
                correct[s, idx] = np.nan_to_num(hit_spec.per_query(stats).cpu().numpy()) > 0.5

            walk.block(qb, block, summarize, exclude_self=exclude_self)
    if counted == 0:
        raise ValueError("no query has a positive (same-label) item in the gallery")
    values = {spec.name: [float(v) for v in sums[:, j] / counted] for j, spec in enumerate(specs)}

    flips = []
    for s in range(n_steps):
        if reference == "old_old":
            ref = ref_correct
        elif s > 0:
            ref = correct[s - 1]
        else:
            ref = ref_correct if ref_correct is not None else correct[0]
        flips.append(flip_rates(ref, correct[s]))
    return BackfillCurve(
        fractions=tuple(fr),
        counts=tuple(counts),
        metrics=values,
        nfr=[f.nfr for f in flips],
        pfr=[f.pfr for f in flips],
        nfi=[f.nfi for f in flips],
        reference=reference,
        top_k=top_k,
        ordering=ordering,
    )


@dataclass(frozen=True)
class _CurveWalk:
    """What every query block's curve walk shares: (old, new) prepared galleries in walk
    (backfill) order and in class order, the walk pieces (start, stop, step), the gallery
    index at each walk position and back, and each gallery item's switch step."""

    galleries: tuple[Prepared, Prepared]
    galleries_by_class: tuple[Prepared, Prepared]
    segments: list[tuple[int, int, int]]
    walk_order: torch.Tensor
    position: torch.Tensor
    switch: torch.Tensor
    n_steps: int
    workers: Workers
    workspace: Workspace = field(default_factory=Workspace)

    def block(
        self,
        qb: Prepared,
        block: QueryBlock,
        summarize: Callable[[int, PositiveRanks], T],
        *,
        exclude_self: bool,
    ) -> list[T]:
        """One walk over the gallery for a query block, then ``summarize(step, ranks)`` of
        the PositiveRanks at every step (steps run on the worker threads)."""
        dev = qb.feats.device
        y_old, y_new = (positive_scores(qb, g, block) for g in self.galleries_by_class)
        n_pos = y_old.numel()
        # two targets per positive (its old and new score), interleaved: entry 2i + state
        t_row = torch.repeat_interleave(block.pos_row, 2)
        t_col = torch.repeat_interleave(block.pos_col, 2)
        t_score = torch.stack([y_old, y_new], dim=1).view(-1)
        sp = SortedPositives.build(2 * block.offsets, t_row, t_col, t_score)
        hist = _StepHistograms(self.n_steps, sp.num_bins, dev)
        if n_pos:
            self._count(qb, block, sp, hist, (y_old, y_new), exclude_self=exclude_self)
        tie_target, tie_start, tie_stop = hist.tie_targets(sp)
        items_ge = hist.finish()
        # the positives: at each step each sits at the target of its current state
        sorted_pos = torch.empty_like(sp.source)
        sorted_pos[sp.source] = torch.arange(sp.source.numel(), device=dev)
        pos_switch = self.switch[block.pos_col]
        row = block.pos_row
        row_start, row_end = block.offsets[row], sp.offsets[row + 1]
        bin_end = row_end + row + 1  # the next row's bin 0
        n_targets = sp.source.numel()
        tie_pos = sp.source[tie_target] // 2
        ranks = torch.arange(n_pos, device=dev)

        def step_ranks(s: int) -> T:
            work = self.workers.workspace()
            where = sorted_pos.index_select(0, 2 * ranks + (pos_switch <= s))
            active = work.take("active", n_targets + 1, torch.int64, dev).zero_()
            active.index_fill_(0, where + 1, 1)
            act = torch.cumsum(active, 0, out=active)  # act[g]: active targets before g
            end = act.index_select(0, row_end)
            above = end - act.index_select(0, where + 1)
            tp_ge = end - act.index_select(0, sp.group_start.index_select(0, where))
            # items reaching beyond each positive: tails of the item histogram
            cum = work.take("cum", sp.num_bins + 1, torch.int64, dev)
            cum[0] = 0
            torch.cumsum(items_ge[s], 0, out=cum[1:])
            n_items = cum.index_select(0, bin_end) - cum.index_select(0, where + row + 1)
            rank = n_items + above
            if tie_target.numel():
                live = (tie_start <= s) & (s < tie_stop) & (where[tie_pos] == tie_target)
                rank -= torch.bincount(tie_pos[live], minlength=n_pos)
            best_first = torch.empty_like(where)
            best_first[row_start + above] = ranks
            pick = (rank, n_items + tp_ge, tp_ge)
            return summarize(s, PositiveRanks(block.offsets, *(x[best_first] for x in pick)))

        return self.workers.map(step_ranks, range(self.n_steps))

    def _count(
        self,
        qb: Prepared,
        block: QueryBlock,
        sp: SortedPositives,
        hist: _StepHistograms,
        scores: tuple[torch.Tensor, torch.Tensor],
        *,
        exclude_self: bool,
    ) -> None:
        """Fill ``hist`` with every walked item of every step, piece by piece (a piece's
        items all switch at one step). ``scores``: (old, new) score of each positive."""
        grid = BucketGrid(
            sp,
            score_bound=max_abs_score(qb, *self.galleries),
            buckets_per_row=CURVE_BUCKETS_PER_ROW,
            workspace=self.workspace,
        )
        floors = self._floors(block, scores, grid.scale)
        starts = [a for a, _, _ in self.segments]
        known = KnownPairs(
            sp, block.qidx, starts, exclude_self=exclude_self, position=self.position
        )
        qs = grid.scaled(qb, query=True)
        scaled = [grid.scaled(gp, query=False) for gp in self.galleries]
        workers, dev = self.workers, qb.feats.device
        rows = tile_rows(dev)
        tiles = list(blocks(block.qidx.numel(), rows))
        for seg, (a, b, step) in enumerate(self.segments):
            # always-new pieces cancel in the old state; never-new ones in the new state
            states = [st for st in (0, 1) if (st, step) not in ((0, 0), (1, self.n_steps))]
            bounds = known.in_tiles(seg, rows)

            def place(
                t: int,
                a: int = a,
                b: int = b,
                step: int = step,
                states: list[int] = states,
                bounds: list[int] = bounds,
            ) -> None:
                # both states of a tile in one unit: they count into the same bins
                r_sl, work = tiles[t], workers.workspace()
                out = work.take("scores", (r_sl.stop - r_sl.start) * (b - a), torch.float32, dev)
                for state in states:
                    sg = score_block(qs, scaled[state], r_sl, slice(a, b), out=out)
                    known.skip(sg, r_sl.start, a, bounds[t], bounds[t + 1])
                    items = grid.locate(sg, r_sl.start, a, work, floors[state][step])
                    hist.add_tile(items, step=step, new=bool(state))
                    if items.shared is not None:
                        placed = grid.settle(items.shared, self.walk_order)
                        hist.add(placed, step, new=bool(state))

            workers.map(place, range(len(tiles)))

    def _floors(
        self, block: QueryBlock, scores: tuple[torch.Tensor, torch.Tensor], scale: float
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(old, new) floors: ``floors[state][t]`` (nb,) is the lowest scaled score of the
        targets active while an item switching at step t is in ``state``; items below it
        reach none of them then. (Positive i's old target is active at the steps before its
        switch sw_i, its new one from sw_i on.)"""
        nb, steps = block.qidx.numel(), self.n_steps
        sw = self.switch[block.pos_col]
        key = sw * nb + block.pos_row
        lowest = []
        for y in scores:
            m = torch.full(((steps + 1) * nb,), torch.inf, device=y.device)
            lowest.append(m.scatter_reduce_(0, key, y, "amin").view(steps + 1, nb))
        old_from = torch.flip(torch.cummin(torch.flip(lowest[0], [0]), 0).values, [0])
        new_upto = torch.cummin(lowest[1], 0).values
        inf = torch.full((1, nb), torch.inf, device=sw.device)
        # old state at steps [0, t): old targets with sw >= 1, new ones with sw <= t - 1
        old = torch.minimum(old_from[1:2], torch.cat([inf, new_upto[:-1]]))
        # new state at steps [t, steps): old targets with sw > t, new ones with sw < steps
        new = torch.minimum(torch.cat([old_from[1:], inf]), new_upto[steps - 1 : steps])
        return old * scale, new * scale


def _reordered(p: Prepared, order: torch.Tensor) -> Prepared:
    """Prepared features with rows taken in ``order``."""
    norms = None if p.sq_norms is None else p.sq_norms.index_select(0, order)
    return Prepared(p.feats.index_select(0, order), norms)
