"""Google Landmarks v2 retrieval: the official solution CSV and Kaggle mAP@100.

Reference: reference/methods.md §4.1 (files, public/private split) and §4.2 (mAP@100).
The solution file ``retrieval_solution_v2.1.csv`` has columns ``id,images,Usage``: ``id`` is
a test image, ``images`` its space-separated positive index images, and ``Usage`` one of
``Public`` (validation), ``Private`` (final test) or ``Ignored`` (``images`` is ``None``).
"""

from __future__ import annotations

import csv
import logging
import os
from collections.abc import Collection, Hashable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np

from compatkit.errors import DataRootError
from compatkit.eval.protocols.common import PathLike, Ragged, require_file
from compatkit.eval.retrieval import Distance, check_features, knn

logger = logging.getLogger(__name__)

Split = Literal["public", "private", "all"]
SPLITS: tuple[str, ...] = ("public", "private", "all")
SOLUTION_FILE = "retrieval_solution_v2.1.csv"
INDEX_FILE = "index.csv"
TEST_FILE = "test.csv"
_SOLUTION_COLUMNS = ("id", "images", "Usage")
_USAGE_OF_SPLIT = {"public": "Public", "private": "Private"}
_USAGES = ("Public", "Private", "Ignored")


@dataclass(frozen=True)
class GLDv2GroundTruth:
    """Retrieval ground truth: query ids in file order and the positive index ids of each.

    Shapes:
        query_ids: (nq,) str, unique, in the order of the solution file.
        usage: (nq,) str, ``"Public"`` or ``"Private"`` per query.
        positives: ragged, row ``i`` holds the positive index ids of ``query_ids[i]``
            (at least one each).
        index_ids: (ni,) str or ``None``: the index image ids, when known.
        test_ids: (nt,) str or ``None``: the test image ids, when known.
    """

    query_ids: np.ndarray
    usage: np.ndarray
    positives: Ragged
    index_ids: np.ndarray | None = None
    test_ids: np.ndarray | None = None

    @classmethod
    def from_lists(
        cls,
        query_ids: Sequence[Any],
        positives: Sequence[Sequence[Any]],
        usage: Sequence[str],
    ) -> GLDv2GroundTruth:
        """Build ground truth by hand; ids become strings.

        Raises:
            ValueError: lengths differ, a repeated query id, an unknown usage, or a query
                without positives.
        """
        if not len(query_ids) == len(positives) == len(usage):
            raise ValueError(
                f"got {len(query_ids)} query ids, {len(positives)} positive lists and "
                f"{len(usage)} usages; expected one of each per query"
            )
        qids = np.asarray([str(q) for q in query_ids], dtype=str)
        _check_unique(qids, "query_ids")
        bad = sorted(set(usage) - set(_USAGE_OF_SPLIT.values()))
        if bad:
            raise ValueError(f"usage values {bad}; expected Public or Private")
        rows = [[str(p) for p in row] for row in positives]
        if any(not row for row in rows):
            raise ValueError("every query needs at least one positive id")
        return cls(qids, np.asarray(list(usage), dtype=str), Ragged.from_rows(rows, dtype=str))

    def __len__(self) -> int:
        return int(self.query_ids.shape[0])

    def split(self, name: Split) -> GLDv2GroundTruth:
        """The queries of one split (``public``, ``private`` or ``all``), order kept.

        Raises:
            ValueError: unknown split name.
        """
        if name not in SPLITS:
            raise ValueError(f"unknown GLDv2 split {name!r}; expected one of {', '.join(SPLITS)}")
        if name == "all":
            return self
        rows = np.flatnonzero(self.usage == _USAGE_OF_SPLIT[name])
        return GLDv2GroundTruth(
            query_ids=self.query_ids[rows],
            usage=self.usage[rows],
            positives=self.positives.select(rows),
            index_ids=self.index_ids,
            test_ids=self.test_ids,
        )

    def positive_sets(self) -> list[frozenset[str]]:
        """The positives of each query as a set, in query order."""
        return [frozenset(self.positives.row(i).tolist()) for i in range(len(self))]


def read_gldv2_solution(path: PathLike) -> GLDv2GroundTruth:
    """Read ``retrieval_solution_v2.1.csv``; ``Ignored`` rows are dropped.

    Raises:
        DataRootError: the file is missing.
        ValueError: missing columns, an unknown ``Usage``, a kept row without positives,
            or a repeated query id or positive id (the file and line named).
    """
    p = require_file(path, "GLDv2 retrieval solution CSV")
    query_ids: list[str] = []
    usage: list[str] = []
    positives: list[list[str]] = []
    seen: dict[str, int] = {}
    with p.open(newline="", encoding="utf-8") as f:
        reader = csv.DictReader(f)
        missing = [c for c in _SOLUTION_COLUMNS if c not in (reader.fieldnames or ())]
        if missing:
            raise ValueError(
                f"{p}: header {reader.fieldnames} lacks column(s) {missing}; expected "
                f"columns {','.join(_SOLUTION_COLUMNS)}"
            )
        for row in reader:
            line = reader.line_num
            qid = (row["id"] or "").strip()
            use = (row["Usage"] or "").strip()
            images = (row["images"] or "").split()
            if not qid:
                raise ValueError(f"{p}:{line}: empty query id")
            if use not in _USAGES:
                raise ValueError(
                    f"{p}:{line}: Usage {use!r} for query {qid!r}; expected one of "
                    f"{', '.join(_USAGES)}"
                )
            if qid in seen:
                raise ValueError(f"{p}:{line}: query id {qid!r} repeats line {seen[qid]}")
            seen[qid] = line
            if use == "Ignored":
                continue
            if not images or images == ["None"]:
                raise ValueError(
                    f"{p}:{line}: {use} query {qid!r} has no positive index ids; expected "
                    "space-separated ids (only Ignored rows may hold None)"
                )
            if len(set(images)) != len(images):
                dup = next(i for i in images if images.count(i) > 1)
                raise ValueError(f"{p}:{line}: query {qid!r} lists index id {dup!r} twice")
            query_ids.append(qid)
            usage.append(use)
            positives.append(images)
    logger.info(
        "read %d GLDv2 queries from %s (%d public, %d private)",
        len(query_ids),
        p,
        usage.count("Public"),
        usage.count("Private"),
    )
    return GLDv2GroundTruth(
        query_ids=np.asarray(query_ids, dtype=str),
        usage=np.asarray(usage, dtype=str),
        positives=Ragged.from_rows(positives, dtype=str),
    )


def read_gldv2_ids(path: PathLike) -> np.ndarray:
    """Read the ``id`` column of ``index.csv`` or ``test.csv`` (other columns ignored).

    Returns:
        (n,) str ids in file order.

    Raises:
        DataRootError: the file is missing.
        ValueError: no ``id`` column, an empty id, or a repeated id.
    """
    p = require_file(path, "GLDv2 id list")
    ids: list[str] = []
    with p.open(newline="", encoding="utf-8") as f:
        reader = csv.DictReader(f)
        if "id" not in (reader.fieldnames or ()):
            raise ValueError(f"{p}: header {reader.fieldnames} lacks an 'id' column")
        for row in reader:
            value = (row["id"] or "").strip()
            if not value:
                raise ValueError(f"{p}:{reader.line_num}: empty id")
            ids.append(value)
    arr = np.asarray(ids, dtype=str)
    _check_unique(arr, str(p))
    return arr


def load_gldv2(
    path: PathLike,
    *,
    index_ids: PathLike | Sequence[Any] | np.ndarray | None = None,
    test_ids: PathLike | Sequence[Any] | np.ndarray | None = None,
) -> GLDv2GroundTruth:
    """Load the ground truth and, when given, the index/test id lists, checked against it.

    Args:
        path: the solution CSV, or a folder holding ``retrieval_solution_v2.1.csv`` (then
            ``index.csv`` / ``test.csv`` in it are read when present and not given).
        index_ids: a path to ``index.csv`` or the ids themselves.
        test_ids: a path to ``test.csv`` or the ids themselves.

    Raises:
        DataRootError: a missing file.
        ValueError: a malformed file, or a positive that is not in ``index_ids`` / a query
            that is not in ``test_ids``.
    """
    root = Path(path)
    if root.is_dir():
        solution = root / SOLUTION_FILE
        if not solution.is_file():
            raise DataRootError(f"GLDv2 folder {root} does not hold {SOLUTION_FILE}")
        if index_ids is None and (root / INDEX_FILE).is_file():
            index_ids = root / INDEX_FILE
        if test_ids is None and (root / TEST_FILE).is_file():
            test_ids = root / TEST_FILE
    else:
        solution = root
    gt = read_gldv2_solution(solution)
    index = _ids_from(index_ids, "index_ids")
    test = _ids_from(test_ids, "test_ids")
    if index is not None:
        _check_subset(gt.positives.values, index, "positive index ids", "index_ids")
    if test is not None:
        _check_subset(gt.query_ids, test, "query ids", "test_ids")
    return GLDv2GroundTruth(gt.query_ids, gt.usage, gt.positives, index, test)


def kaggle_average_precision(
    ranking: Sequence[Hashable] | np.ndarray, positives: Collection[Hashable], *, k: int = 100
) -> float:
    """Kaggle AP@k of one ranked list: ``Σ_{i≤k} P(i)·rel(i) / min(m, k)``.

    A repeated id counts at its first rank only (later copies keep their rank slot but are
    never relevant), as in the Kaggle scorer.

    Raises:
        ValueError: ``positives`` is empty or ``k < 1``.
    """
    if k < 1:
        raise ValueError(f"k must be a positive integer, got {k!r}")
    pos = positives if isinstance(positives, (set, frozenset)) else set(positives)
    if not pos:
        raise ValueError("AP@k needs at least one positive; got an empty positive set")
    seen: set[Hashable] = set()
    hits = 0
    total = 0.0
    for rank, item in enumerate(list(ranking)[:k], start=1):
        if item in seen:
            continue
        seen.add(item)
        if item in pos:
            hits += 1
            total += hits / rank
    return total / min(len(pos), k)


def gldv2_map_at_k(
    rankings: Sequence[Sequence[Hashable]] | np.ndarray,
    gt: GLDv2GroundTruth | Sequence[Collection[Hashable]],
    *,
    k: int = 100,
) -> float:
    """Kaggle GLDv2 mAP@k: mean of :func:`kaggle_average_precision` over all queries.

    Every query of ``gt`` counts, also one whose positives are all outside the top-k (AP 0).

    Args:
        rankings: ranked index ids per query, aligned with ``gt`` (``gt.query_ids`` order).
        gt: the ground truth, or one collection of positive ids per query.
        k: cut-off; also caps the AP denominator at ``min(m_q, k)``.

    Raises:
        ValueError: the number of rankings differs from the number of queries, a query
            without positives, no queries, or ``k < 1``.
    """
    sets = gt.positive_sets() if isinstance(gt, GLDv2GroundTruth) else list(gt)
    if len(rankings) != len(sets):
        raise ValueError(
            f"got {len(rankings)} rankings for {len(sets)} ground-truth queries; expected one "
            "ranking per query, in ground-truth order"
        )
    if not sets:
        raise ValueError("mAP@k needs at least one query; the ground truth is empty")
    aps = [kaggle_average_precision(r, s, k=k) for r, s in zip(rankings, sets, strict=True)]
    return float(np.mean(aps))


def evaluate_gldv2(
    query_feats: Any,
    query_ids: Sequence[Any] | np.ndarray,
    index_feats: Any,
    index_ids: Sequence[Any] | np.ndarray,
    gt: GLDv2GroundTruth,
    *,
    split: Split = "private",
    k: int = 100,
    distance: Distance = "cosine",
    chunk_size: int = 4096,
) -> dict[str, float]:
    """GLDv2 retrieval mAP@k of one split: rank the index with ``knn``, score with Kaggle AP.

    ``query_feats`` may hold more rows than the split (e.g. the whole test set); the rows
    of the split's queries are picked by id. For a cross-test, embed the queries with the
    new model and the index with the old one.

    Shapes:
        query_feats: (nq, d) float, rows named by ``query_ids`` (nq,).
        index_feats: (ni, d) float, rows named by ``index_ids`` (ni,).

    Returns:
        ``{"map@{k}": value, "num_queries": number of scored queries}``.

    Raises:
        ValueError: bad features, ids whose length differs from their features, repeated
            ids, or a split query with no row in ``query_ids``.
    """
    q = check_features(query_feats, "query_feats")
    g = check_features(index_feats, "index_feats")
    qids = _ids_for(query_ids, q.shape[0], "query_ids")
    gids = _ids_for(index_ids, g.shape[0], "index_ids")
    sub = gt.split(split)
    if len(sub) == 0:
        raise ValueError(f"the GLDv2 ground truth has no {split!r} queries")
    row_of = {qid: i for i, qid in enumerate(qids.tolist())}
    missing = [qid for qid in sub.query_ids.tolist() if qid not in row_of]
    if missing:
        raise ValueError(
            f"{len(missing)} of {len(sub)} {split} queries have no row in query_ids, "
            f"e.g. {missing[:3]}; expected features for every ground-truth query"
        )
    absent = np.setdiff1d(sub.positives.values, gids).size
    if absent:
        logger.warning(
            "%d positive ids of the %s split are not in index_ids; they still count in the "
            "AP denominator",
            absent,
            split,
        )
    rows = np.asarray([row_of[qid] for qid in sub.query_ids.tolist()], dtype=np.int64)
    result = knn(q[rows], g, k, distance=distance, chunk_size=chunk_size)
    rankings = [gids[idx[idx >= 0]] for idx in result.indices]
    value = gldv2_map_at_k(rankings, sub, k=k)
    logger.info("GLDv2 %s mAP@%d = %.4f over %d queries", split, k, value, len(sub))
    return {f"map@{k}": value, "num_queries": float(len(sub))}


def _ids_from(ids: PathLike | Sequence[Any] | np.ndarray | None, name: str) -> np.ndarray | None:
    if ids is None:
        return None
    if isinstance(ids, (str, os.PathLike)):
        return read_gldv2_ids(ids)
    arr = np.asarray(ids).astype(str)
    if arr.ndim != 1:
        raise ValueError(f"{name} must be a 1-D list of ids, got shape {arr.shape}")
    _check_unique(arr, name)
    return arr


def _ids_for(ids: Sequence[Any] | np.ndarray, n: int, name: str) -> np.ndarray:
    arr = np.asarray(ids).astype(str)
    if arr.ndim != 1 or arr.shape[0] != n:
        raise ValueError(
            f"{name} has shape {arr.shape} but its features have {n} rows; expected ({n},)"
        )
    _check_unique(arr, name)
    return arr


def _check_unique(ids: np.ndarray, where: str) -> None:
    uniq, counts = np.unique(ids, return_counts=True)
    if uniq.shape[0] != ids.shape[0]:
        dup = uniq[counts > 1][:3].tolist()
        raise ValueError(f"{where} repeats ids, e.g. {dup}; expected unique ids")


def _check_subset(ids: np.ndarray, universe: np.ndarray, what: str, name: str) -> None:
    outside = np.setdiff1d(ids, universe)
    if outside.size:
        raise ValueError(
            f"{outside.size} {what} of the ground truth are not in {name}, e.g. "
            f"{outside[:3].tolist()}; expected the lists that belong to the solution file"
        )
