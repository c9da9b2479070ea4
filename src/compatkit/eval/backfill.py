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
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np
import torch

from compatkit.eval.flips import flip_rates, top_k_correct
from compatkit.eval.metrics import (
    DEFAULT_BLOCK_POSITIVES,
    BucketTable,
    ClassIndex,
    Positions,
    PositiveRanks,
    SortedPositives,
    check_exclude_self,
    chunk_candidates,
    float_order_key,
    parse_metrics,
    plan_query_blocks,
    positive_scores,
    reverse_segment_counts,
)
from compatkit.eval.ordering import backfill_count, check_permutation
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

logger = logging.getLogger(__name__)

Reference = Literal["old_old", "previous_step"]


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
    """Item bins per step: step 0 holds every item in its old state, step t adds the change of
    the items that switch at t; prefix sums over steps give each step's histogram. A spare last
    step collects the items that never switch. Laid out bin-major, so the scattered adds of one
    query stay within a small region."""

    def __init__(self, steps: int, nbins: int, device: torch.device) -> None:
        self.steps, self.nbins, self.width = steps, nbins, steps + 1
        self.ge = torch.zeros(nbins * self.width, dtype=torch.int64, device=device)
        self.rank_delta = torch.zeros(nbins * self.width, dtype=torch.int64, device=device)

    def _moves(
        self,
        target: torch.Tensor,
        at: torch.Tensor,
        bin_from: torch.Tensor,
        bin_to: torch.Tensor,
        base: torch.Tensor | None,
    ) -> None:
        """+1 at (base, 0), −1 at (bin_from, at), +1 at (bin_to, at), in one scatter."""
        w = self.width
        parts = [bin_to.long() * w + at, bin_from.long() * w + at]
        signs = [1, -1]
        if base is not None:
            parts.append(base.long() * w)
            signs.append(1)
        weights = torch.cat(
            [torch.full_like(p, sign) for p, sign in zip(parts, signs, strict=True)]
        )
        target.index_add_(0, torch.cat(parts), weights)

    def add(self, old: Positions, new: Positions, switch: torch.Tensor) -> None:
        """``switch``: (n,) step at which each item turns new (``steps`` = never)."""
        self._moves(self.ge, switch, old.bin, new.bin, old.bin)
        # rank bins differ from ge bins only at ties with a positive: add (rank − ge) there
        if old.tie_idx.numel():
            i = old.tie_idx
            self._moves(self.rank_delta, switch[i], old.tie_bin, old.bin[i], old.tie_bin)
            self.rank_delta.index_add_(0, old.bin[i].long() * self.width, -torch.ones_like(i))
        if new.tie_idx.numel():
            i = new.tie_idx
            self._moves(self.rank_delta, switch[i], new.bin[i], new.tie_bin, None)

    def per_step(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(steps, nbins) histograms for n_ge and for rank."""
        ge = torch.cumsum(self.ge.view(self.nbins, self.width), 1)[:, : self.steps]
        delta = torch.cumsum(self.rank_delta.view(self.nbins, self.width), 1)[:, : self.steps]
        return ge.T.contiguous(), (ge + delta).T.contiguous()


def _step_ranks(
    sorted_pos: torch.Tensor,
    n_pos: int,
    offsets: torch.Tensor,
    pos_row: torch.Tensor,
    target_score: torch.Tensor,
    new_now: torch.Tensor,
    n_ge_all: torch.Tensor,
    rank_all: torch.Tensor,
) -> PositiveRanks:
    """PositiveRanks of one step, where positive i sits at its old or new target
    (``sorted_pos[e]``: sorted position of target entry e = 2i + state)."""
    entry = 2 * torch.arange(n_pos, device=pos_row.device) + new_now.to(torch.int64)
    where = sorted_pos[entry]
    n_ge, rank = n_ge_all[where], rank_all[where]
    value = target_score[entry]
    key = (pos_row << 32) + float_order_key(value)
    first_ge = torch.searchsorted(torch.sort(key).values, key)
    tp_ge = offsets[1:][pos_row] - first_ge
    order = torch.argsort((pos_row << 32) + rank)
    return PositiveRanks(offsets, rank[order], n_ge[order], tp_ge[order])


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
        order: (ng,) permutation, e.g. from :func:`compatkit.eval.ordering.backfill_order`.
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
    position = np.empty(ng, dtype=np.int64)
    position[perm] = np.arange(ng)
    switch = torch.from_numpy(np.searchsorted(np.asarray(counts), position, side="right")).to(
        q.device
    )
    n_steps = len(fr)

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
    for block in plan_query_blocks(
        ql,
        ClassIndex.build(gl),
        exclude_self=exclude_self,
        query_block=query_block,
        max_positives=DEFAULT_BLOCK_POSITIVES // 2,
    ):
        qb = Prepared(
            qp.feats[block.qidx], None if qp.sq_norms is None else qp.sq_norms[block.qidx]
        )
        per_step = _walk_block_curve(
            qb,
            gpo,
            gpn,
            block,
            switch,
            n_steps,
            exclude_self=exclude_self,
            chunk_size=chunk_size,
        )
        idx = block.qidx.cpu().numpy()
        valid = (block.offsets[1:] > block.offsets[:-1]).cpu().numpy()
        counted += int(valid.sum())
        for s, stats in enumerate(per_step):
            for j, spec in enumerate(specs):
                sums[s, j] += float(spec.per_query(stats).cpu().numpy()[valid].sum())
            correct[s, idx] = np.nan_to_num(hit_spec.per_query(stats).cpu().numpy()) > 0.5
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


def _walk_block_curve(
    qb: Prepared,
    gpo: Prepared,
    gpn: Prepared,
    block: Any,
    switch: torch.Tensor,
    n_steps: int,
    *,
    exclude_self: bool,
    chunk_size: int,
) -> list[PositiveRanks]:
    """One walk over the gallery for a query block; PositiveRanks at every step."""
    ng = gpo.feats.shape[0]
    dev = qb.feats.device
    y_old = positive_scores(qb, gpo, block, chunk_size)
    y_new = positive_scores(qb, gpn, block, chunk_size)
    n_pos = y_old.numel()
    # two targets per positive (its old and new score), interleaved: entry 2i + state
    t_row = torch.repeat_interleave(block.pos_row, 2)
    t_col = torch.repeat_interleave(block.pos_col, 2)
    t_score = torch.stack([y_old, y_new], dim=1).view(-1)
    sp = SortedPositives.build(2 * block.offsets, t_row, t_col, t_score)
    table = BucketTable(sp)
    hist = _StepHistograms(n_steps, sp.num_bins, dev)
    nb = block.qidx.numel()
    width = min(chunk_size, ng)
    buf_o = torch.empty(nb, width, device=dev)
    buf_n = torch.empty(nb, width, device=dev)
    mask = torch.empty(nb, width, dtype=torch.bool, device=dev)
    for g_sl in blocks(ng, chunk_size):
        s_o = score_block(qb, gpo, slice(None), g_sl, out=buf_o)
        s_n = score_block(qb, gpn, slice(None), g_sl, out=buf_n)
        inside = sp.in_chunk(g_sl.start, g_sl.stop)
        is_new = (sp.source[inside] % 2).bool()
        for s, sel in ((s_o, inside[~is_new]), (s_n, inside[is_new])):
            s[sp.row[sel], sp.col[sel] - g_sl.start] = sp.score[sel]
        if exclude_self:
            own = torch.nonzero((block.qidx >= g_sl.start) & (block.qidx < g_sl.stop)).view(-1)
            s_o[own, block.qidx[own] - g_sl.start] = -torch.inf
            s_n[own, block.qidx[own] - g_sl.start] = -torch.inf
        cand = chunk_candidates([s_o, s_n], sp.lo, g_sl.start, mask)
        if cand.rows.numel():
            hist.add(table.locate(cand, 0), table.locate(cand, 1), switch[cand.cols()])
    ge, rank = hist.per_step()
    n_ge_all = reverse_segment_counts(sp, ge)
    rank_all = reverse_segment_counts(sp, rank)
    sorted_pos = torch.empty_like(sp.source)
    sorted_pos[sp.source] = torch.arange(sp.source.numel(), device=sp.source.device)
    pos_switch = switch[block.pos_col]
    return [
        _step_ranks(
            sorted_pos,
            n_pos,
            block.offsets,
            block.pos_row,
            t_score,
            pos_switch <= s,
            n_ge_all[s],
            rank_all[s],
        )
        for s in range(n_steps)
    ]
