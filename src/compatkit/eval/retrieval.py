"""Exact, chunked nearest-neighbour search and the input checks shared by ``compatkit.eval``.

Scores are "higher is closer": cosine similarity of L2-normalised vectors, or the negative
squared Euclidean distance. The gallery is walked in chunks and merged into a running top-k,
so memory stays at ``O(nq·k + query_block·chunk_size)`` (the FAISS ``knn_ground_truth`` idea).
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from typing import Any, Literal, NamedTuple

import numpy as np
import torch

from compatkit.eval.threads import Workers

logger = logging.getLogger(__name__)

Distance = Literal["cosine", "l2"]
DISTANCES: tuple[str, ...] = ("cosine", "l2")

#: Queries scored at once; with ``chunk_size`` this bounds the score block in memory.
DEFAULT_QUERY_BLOCK = 2048

#: Queries scored at once by :func:`knn` for k = 1 (at most ``query_block``).
TOP1_QUERY_BLOCK = 512

#: CPU tensors take numpy for the steps where it is much faster than torch (compaction,
#: argmax, run-length repeats); other devices, or False here, take the torch path.
NUMPY_ON_CPU = True


def numpy_fast_path(t: torch.Tensor) -> bool:
    """Whether ``t``'s work runs in numpy (a CPU tensor and :data:`NUMPY_ON_CPU`)."""
    return NUMPY_ON_CPU and t.device.type == "cpu"


class KnnResult(NamedTuple):
    """Top-k neighbours per query, best first.

    Shapes:
        scores: (nq, k) float32, higher is closer; ``-inf`` where fewer than k items exist.
        indices: (nq, k) int64 gallery rows; ``-1`` where fewer than k items exist.
    """

    scores: np.ndarray
    indices: np.ndarray


def _as_array_or_tensor(x: Any) -> np.ndarray | torch.Tensor:
    if isinstance(x, torch.Tensor):
        return x.detach()
    return np.asarray(x)


def as_features(x: Any, name: str) -> torch.Tensor:
    """Validate a feature matrix; return it as a float32 tensor on its own device.

    numpy input becomes a CPU tensor (no copy when it is already float32 and contiguous).

    Shapes:
        x: (n, d) floating point, every value finite.

    Raises:
        TypeError: ``x`` is not floating point.
        ValueError: ``x`` is not 2-D, has no columns, or holds NaN/inf (the first bad row named).
    """
    arr = _as_array_or_tensor(x)
    if arr.ndim != 2:
        raise ValueError(f"{name} must be a 2-D (n, d) feature array, got shape {tuple(arr.shape)}")
    t = torch.from_numpy(np.ascontiguousarray(arr)) if isinstance(arr, np.ndarray) else arr
    if not t.dtype.is_floating_point:
        raise TypeError(f"{name} must be a floating-point array, got dtype {arr.dtype}")
    if t.shape[1] == 0:
        raise ValueError(
            f"{name} must have at least one feature column, got shape {tuple(t.shape)}"
        )
    t = t.to(torch.float32).contiguous()
    # one cheap pass when all is well (a sum overflowing to inf only triggers the full check)
    if t.numel() and bool(torch.isfinite(t.sum(dtype=torch.float64))):
        return t
    finite_rows = torch.isfinite(t).all(dim=1)
    if not bool(finite_rows.all()):
        bad_rows = torch.nonzero(~finite_rows)[:, 0]
        row = int(bad_rows[0])
        raise ValueError(
            f"{name} holds non-finite values (NaN or inf) in {bad_rows.numel()} row(s), "
            f"first at row {row}: {t[row][~torch.isfinite(t[row])][:3].tolist()}"
        )
    return t


def check_features(x: Any, name: str) -> np.ndarray:
    """Validate a feature matrix and return it as a float32 numpy array (see :func:`as_features`).

    Raises:
        TypeError: ``x`` is not floating point.
        ValueError: ``x`` is not 2-D, has no columns, or holds NaN/inf (the first bad row named).
    """
    return as_features(x, name).cpu().numpy()


def as_labels(
    labels: Any, n: int, name: str, *, device: torch.device | None = None
) -> torch.Tensor:
    """Validate a label vector of length ``n``; return it as an int64 tensor.

    Raises:
        TypeError: labels are not integers.
        ValueError: labels are not 1-D or their length differs from ``n``.
    """
    arr = _as_array_or_tensor(labels)
    if arr.ndim != 1:
        raise ValueError(f"{name} must be a 1-D label array, got shape {tuple(arr.shape)}")
    if arr.shape[0] != n:
        raise ValueError(
            f"{name} has {arr.shape[0]} labels but its features have {n} rows; expected {n}"
        )
    t = torch.from_numpy(np.ascontiguousarray(arr)) if isinstance(arr, np.ndarray) else arr
    if (t.dtype == torch.bool or t.dtype.is_floating_point or t.dtype.is_complex) and n > 0:
        raise TypeError(f"{name} must hold integer class ids, got dtype {arr.dtype}")
    return t.to(device=device if device is not None else t.device, dtype=torch.int64)


def check_labels(labels: Any, n: int, name: str) -> np.ndarray:
    """Validate a label vector of length ``n`` and return it as int64 numpy.

    Raises:
        TypeError: labels are not integers.
        ValueError: labels are not 1-D or their length differs from ``n``.
    """
    return as_labels(labels, n, name).cpu().numpy()


def check_same_dim(query: Any, gallery: Any, qname: str, gname: str) -> None:
    """Raise ``ValueError`` naming both shapes when the feature dimensions differ."""
    if query.shape[1] != gallery.shape[1]:
        raise ValueError(
            f"dimension mismatch: {qname} has shape {tuple(query.shape)} and {gname} has shape "
            f"{tuple(gallery.shape)}; both need the same feature dimension"
        )


def check_distance(distance: str) -> None:
    """Raise ``ValueError`` unless ``distance`` is one of :data:`DISTANCES`."""
    if distance not in DISTANCES:
        raise ValueError(f"unknown distance {distance!r}; expected one of {', '.join(DISTANCES)}")


def check_positive_int(value: int, name: str) -> int:
    """Return ``value`` if it is a positive int, else raise ``ValueError``."""
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
        raise ValueError(f"{name} must be a positive integer, got {value!r}")
    return int(value)


class Prepared(NamedTuple):
    """Features ready for scoring: L2-normalised for cosine; squared norms kept for l2."""

    feats: torch.Tensor
    sq_norms: torch.Tensor | None


Rows = slice | torch.Tensor

#: BLAS libraries switch to other kernels (gemv, small-matrix paths) for thin products, which
#: round differently. Padding with zeros to at least this many rows and columns keeps the score
#: of a (query, item) pair bit-identical whatever the block shapes (checked on MKL for
#: d <= 512); the engine never relies on it for its own consistency.
MIN_GEMM_ROWS = 8
MIN_GEMM_COLS = 16


def _pad_columns(x: torch.Tensor) -> torch.Tensor:
    if x.shape[1] >= MIN_GEMM_COLS:
        return x.contiguous()
    return torch.cat([x, x.new_zeros(x.shape[0], MIN_GEMM_COLS - x.shape[1])], dim=1)


def _rows(t: torch.Tensor, rows: Rows) -> torch.Tensor:
    return t[rows]


def _pad_rows(x: torch.Tensor) -> torch.Tensor:
    if x.shape[0] >= MIN_GEMM_ROWS:
        return x
    return torch.cat([x, x.new_zeros(MIN_GEMM_ROWS - x.shape[0], x.shape[1])])


def prepare(x: torch.Tensor, distance: str, name: str) -> Prepared:
    """Turn checked features into the form :func:`score_block` expects.

    Raises:
        ValueError: a zero row under cosine distance (its direction is undefined).
    """
    if distance == "cosine":
        norms = torch.linalg.vector_norm(x, dim=1, keepdim=True)
        zero = torch.nonzero(norms[:, 0] == 0)
        if zero.numel():
            raise ValueError(
                f"{name} row {int(zero[0, 0])} is the zero vector; cosine distance needs "
                "non-zero features"
            )
        return Prepared(_pad_columns(x / norms), None)
    return Prepared(_pad_columns(x), (x * x).sum(dim=1))


def score_block(
    q: Prepared, g: Prepared, q_rows: Rows, g_rows: Rows, *, out: torch.Tensor | None = None
) -> torch.Tensor:
    """Scores of the selected queries against the selected gallery rows, higher is closer.

    Args:
        out: optional float32 buffer with at least as many elements as the result; the result
            is then a contiguous view of its start (saves page faults in chunk loops).

    Shapes:
        returns: (len(q_rows), len(g_rows)) float32, contiguous.
    """
    qf, gf = _rows(q.feats, q_rows), _rows(g.feats, g_rows)
    nq, ng = qf.shape[0], gf.shape[0]
    if out is not None and out.numel() >= nq * ng:
        s = out.view(-1)[: nq * ng].view(nq, ng)
        if nq >= MIN_GEMM_ROWS and ng >= MIN_GEMM_ROWS:
            torch.matmul(qf, gf.T, out=s)
        else:
            s.copy_((_pad_rows(qf) @ _pad_rows(gf).T)[:nq, :ng])
    else:
        s = (_pad_rows(qf) @ _pad_rows(gf).T)[:nq, :ng].contiguous()
    if q.sq_norms is not None and g.sq_norms is not None:
        # negative squared distance: -(|q|² + |g|² - 2 q·g)
        s.mul_(2.0).sub_(_rows(q.sq_norms, q_rows)[:, None]).sub_(
            _rows(g.sq_norms, g_rows)[None, :]
        )
    return s


def pairwise_scores(query: Any, gallery: Any, *, distance: Distance = "cosine") -> np.ndarray:
    """Dense (nq, ng) float32 score matrix, computed exactly as the chunked engine does."""
    check_distance(distance)
    q = as_features(query, "query")
    g = as_features(gallery, "gallery").to(q.device)
    check_same_dim(q, g, "query", "gallery")
    qp, gp = prepare(q, distance, "query"), prepare(g, distance, "gallery")
    return score_block(qp, gp, slice(None), slice(None)).cpu().numpy()


def blocks(n: int, size: int) -> Iterator[slice]:
    """Consecutive slices of at most ``size`` covering ``range(n)``."""
    for start in range(0, n, size):
        yield slice(start, min(start + size, n))


def _row_max(s: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Best score of each row and its first (lowest) column; numpy's argmax on CPU."""
    if numpy_fast_path(s):
        idx = torch.from_numpy(s.numpy().argmax(axis=1))
        return s.gather(1, idx[:, None])[:, 0], idx
    vals, idx = torch.max(s, dim=1)  # documented: the first maximal index
    return vals, idx


def _topk_lowest_index(s: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-k per row where ties at the k-th value go to the lowest column; sorted best first."""
    if k >= s.shape[1]:
        vals, idx = torch.sort(s, dim=1, descending=True, stable=True)
        return vals, idx
    # top k + 1: rows whose k-th and (k+1)-th values differ have an unambiguous top-k set
    vals1, idx1 = torch.topk(s, k + 1, dim=1)
    vals, idx = vals1[:, :k].contiguous(), idx1[:, :k].contiguous()
    boundary = torch.nonzero(vals1[:, k - 1] == vals1[:, k]).view(-1)
    if boundary.numel():
        sub = s[boundary]
        kth = vals[boundary, k - 1 : k]
        above = sub > kth
        tied = sub == kth
        room = k - above.sum(dim=1, keepdim=True)
        take = above | (tied & (torch.cumsum(tied, dim=1) <= room))
        cols = torch.nonzero(take)[:, 1].reshape(-1, k)
        idx[boundary] = cols
        vals[boundary] = torch.gather(sub, 1, cols)
    # order: score descending, ties by lower column
    by_col = torch.sort(idx, dim=1).indices
    idx, vals = torch.gather(idx, 1, by_col), torch.gather(vals, 1, by_col)
    order = torch.sort(vals, dim=1, descending=True, stable=True).indices
    return torch.gather(vals, 1, order), torch.gather(idx, 1, order)


def knn(
    query: Any,
    gallery: Any,
    k: int,
    *,
    distance: Distance = "cosine",
    exclude_self: bool = False,
    chunk_size: int = 4096,
    query_block: int = DEFAULT_QUERY_BLOCK,
) -> KnnResult:
    """Exact k nearest gallery rows of each query; ties go to the lower gallery index.

    Args:
        query: (nq, d) float features.
        gallery: (ng, d) float features.
        k: neighbours per query.
        distance: ``"cosine"`` (L2-normalise both sides, inner product) or ``"l2"``
            (score = negative squared Euclidean distance).
        exclude_self: query i and gallery i are the same item; pair (i, i) is skipped.
            Requires nq == ng.
        chunk_size: gallery rows scored at once.
        query_block: queries scored at once.

    Returns:
        :class:`KnnResult` with (nq, k) float32 scores and int64 indices, best first;
        ``-inf`` / ``-1`` fill the slots beyond the available items.

    Raises:
        ValueError: bad shapes, non-finite features, dimension mismatch, unknown distance,
            non-positive k/chunk sizes, or exclude_self with nq != ng.
    """
    check_distance(distance)
    k = check_positive_int(k, "k")
    chunk_size = check_positive_int(chunk_size, "chunk_size")
    query_block = check_positive_int(query_block, "query_block")
    q = as_features(query, "query")
    g = as_features(gallery, "gallery").to(q.device)
    check_same_dim(q, g, "query", "gallery")
    nq, ng = q.shape[0], g.shape[0]
    if exclude_self and nq != ng:
        raise ValueError(
            f"exclude_self=True needs the query and gallery to be the same items, "
            f"got nq={nq} and ng={ng}"
        )
    dev = q.device
    qp, gp = prepare(q, distance, "query"), prepare(g, distance, "gallery")
    out_scores = np.full((nq, k), -np.inf, dtype=np.float32)
    out_idx = np.full((nq, k), -1, dtype=np.int64)
    if k == 1:  # a running best per row: shorter blocks keep the GEMM output in cache
        query_block = min(query_block, TOP1_QUERY_BLOCK)

    def search(q_sl: slice) -> None:
        nb = q_sl.stop - q_sl.start
        buf = workers.workspace().take("knn", nb * min(chunk_size, ng), torch.float32, dev)
        # k = 1 keeps a running best (a later chunk wins only with a strictly higher score)
        kept = 1 if k == 1 else 0
        best_s = torch.full((nb, kept), -torch.inf, device=dev)
        best_i = torch.full((nb, kept), -1, dtype=torch.int64, device=dev)
        for g_sl in blocks(ng, chunk_size):
            s = score_block(qp, gp, q_sl, g_sl, out=buf)
            if exclude_self:
                rows = torch.arange(q_sl.start, q_sl.stop, device=dev)
                hit = (rows >= g_sl.start) & (rows < g_sl.stop)
                s[torch.nonzero(hit)[:, 0], rows[hit] - g_sl.start] = -torch.inf
            if k == 1:
                cs, ci = _row_max(s)
                better = cs > best_s[:, 0]
                best_s[better, 0] = cs[better]
                best_i[better, 0] = ci[better] + g_sl.start
                continue
            cs, ci = _topk_lowest_index(s, k)
            # the running results hold lower indices than this chunk, so a stable sort keeps
            # tied scores in index order
            merged_s = torch.cat([best_s, cs], dim=1)
            merged_i = torch.cat([best_i, ci + g_sl.start], dim=1)
            order = torch.sort(merged_s, dim=1, descending=True, stable=True).indices[:, :k]
            best_s = torch.gather(merged_s, 1, order)
            best_i = torch.gather(merged_i, 1, order)
        kk = best_s.shape[1]
        best_i = torch.where(torch.isneginf(best_s), -1, best_i)
        out_scores[q_sl, :kk] = best_s.cpu().numpy()
        out_idx[q_sl, :kk] = best_i.cpu().numpy()

    with Workers(dev) as workers:
        if workers.threads > 1:  # enough blocks to keep every worker busy to the end
            query_block = min(query_block, max(64, -(-nq // (4 * workers.threads))))
        workers.map(search, list(blocks(nq, query_block)))
    return KnnResult(out_scores, out_idx)
