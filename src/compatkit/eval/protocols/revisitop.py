"""Revisited Oxford / Paris (ROxford5k, RParis6k): ground truth, trapezoid AP and E/M/H.

Reference: reference/methods.md §4.1 and §4.2. The ground truth ``gnd_roxford5k.pkl`` /
``gnd_rparis6k.pkl`` is a pickled dict with ``imlist`` (database names), ``qimlist`` (query
names) and ``gnd``: per query a dict of ``easy``, ``hard`` and ``junk`` database indices and
the query box ``bbx = [x1, y1, x2, y2]``. The whole database is ranked for every query.
"""

from __future__ import annotations

import logging
import pickle
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, NamedTuple

import numpy as np

from compatkit.errors import DataRootError
from compatkit.eval.protocols.common import PathLike, Ragged, require_file
from compatkit.eval.retrieval import Distance, check_features, check_positive_int, knn

logger = logging.getLogger(__name__)

Protocol = Literal["easy", "medium", "hard"]
PROTOCOLS: tuple[str, ...] = ("easy", "medium", "hard")
DEFAULT_KS: tuple[int, ...] = (1, 5, 10)

# Only plain containers and numpy arrays may come out of a ground-truth pickle.
_ALLOWED_GLOBALS = frozenset(
    {
        ("numpy", "ndarray"),
        ("numpy", "dtype"),
        ("numpy.core.multiarray", "_reconstruct"),
        ("numpy._core.multiarray", "_reconstruct"),
        ("numpy.core.multiarray", "scalar"),
        ("numpy._core.multiarray", "scalar"),
        ("numpy.core.numeric", "_frombuffer"),
        ("numpy._core.numeric", "_frombuffer"),
        ("_codecs", "encode"),  # bytes inside protocol-2 pickles
    }
    | {
        (module, name)
        for module in ("builtins", "__builtin__")
        for name in ("bytes", "bytearray", "set", "frozenset", "complex", "int", "float", "str")
    }
)


class ProtocolSets(NamedTuple):
    """Per-query positives (``ok``) and ignored items (``junk``) of one protocol.

    Shapes:
        ok, junk: ragged int64 database indices, one sorted row per query.
    """

    ok: Ragged
    junk: Ragged


@dataclass(frozen=True)
class RevisitopGroundTruth:
    """Revisited Oxford/Paris ground truth, one row per query in ``qimlist`` order.

    Shapes:
        imlist: (n_db,) str database image names; ``qimlist``: (nq,) str query names.
        easy, hard, junk: ragged int64 database indices per query.
        bbx: (nq, 4) float64 query boxes ``[x1, y1, x2, y2]``; NaN where the file has none.
    """

    name: str
    imlist: np.ndarray
    qimlist: np.ndarray
    easy: Ragged
    hard: Ragged
    junk: Ragged
    bbx: np.ndarray

    @property
    def num_queries(self) -> int:
        return int(self.qimlist.shape[0])

    @property
    def num_database(self) -> int:
        return int(self.imlist.shape[0])

    def protocol_sets(self, protocol: Protocol) -> ProtocolSets:
        """Positives and junk per query: Easy ok=easy, junk=junk∪hard; Medium ok=easy∪hard,
        junk=junk; Hard ok=hard, junk=junk∪easy (§4.2).

        Raises:
            ValueError: unknown protocol.
        """
        _check_protocol(protocol)
        ok_rows, junk_rows = [], []
        for i in range(self.num_queries):
            easy, hard, junk = self.easy.row(i), self.hard.row(i), self.junk.row(i)
            if protocol == "easy":
                ok, bad = easy, np.union1d(junk, hard)
            elif protocol == "medium":
                ok, bad = np.union1d(easy, hard), junk
            else:
                ok, bad = hard, np.union1d(junk, easy)
            ok = np.unique(ok)
            ok_rows.append(ok)
            junk_rows.append(np.setdiff1d(bad, ok))  # an item that is both counts as ok
        return ProtocolSets(
            Ragged.from_rows(ok_rows, dtype=np.int64), Ragged.from_rows(junk_rows, dtype=np.int64)
        )


class RevisitopScores(NamedTuple):
    """Scores of one protocol.

    Shapes:
        ap: (nq,) float64 AP per query; NaN for queries without positives (not averaged).
    """

    map: float
    mp_at_k: dict[int, float]
    ap: np.ndarray
    num_queries: int


class _GroundTruthUnpickler(pickle.Unpickler):
    """Unpickler that only builds plain containers and numpy arrays (no arbitrary code)."""

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) in _ALLOWED_GLOBALS:
            return super().find_class(module, name)
        raise pickle.UnpicklingError(
            f"refusing to load {module}.{name}: a ground-truth file holds only lists, dicts, "
            "numbers, strings and numpy arrays"
        )


def load_revisitop(path: PathLike) -> RevisitopGroundTruth:
    """Read ``gnd_roxford5k.pkl`` / ``gnd_rparis6k.pkl`` (or a folder holding one ``gnd_*.pkl``).

    Raises:
        DataRootError: the file is missing, or a folder holds no or several ``gnd_*.pkl``.
        ValueError: not a pickle of the expected structure: missing keys, a ``gnd`` whose
            length differs from ``qimlist``, indices outside the database, a bad ``bbx``.
    """
    p = Path(path)
    if p.is_dir():
        found = sorted(p.glob("gnd_*.pkl"))
        if len(found) != 1:
            raise DataRootError(
                f"revisitop folder {p} holds {len(found)} gnd_*.pkl files "
                f"({', '.join(f.name for f in found) or 'none'}); expected exactly one"
            )
        p = found[0]
    p = require_file(p, "revisitop ground-truth pickle")
    try:
        with p.open("rb") as f:
            cfg = _GroundTruthUnpickler(f, encoding="latin1").load()
    except (pickle.UnpicklingError, EOFError, AttributeError, ImportError, IndexError) as e:
        raise ValueError(f"{p}: cannot read as a revisitop ground-truth pickle ({e})") from e
    if not isinstance(cfg, dict):
        raise ValueError(
            f"{p}: expected a dict with imlist, qimlist, gnd; got {type(cfg).__name__}"
        )
    missing = [key for key in ("imlist", "qimlist", "gnd") if key not in cfg]
    if missing:
        raise ValueError(
            f"{p}: missing key(s) {missing}; expected imlist, qimlist and gnd (found "
            f"{sorted(map(str, cfg))})"
        )
    imlist = np.asarray([str(x) for x in cfg["imlist"]], dtype=str)
    qimlist = np.asarray([str(x) for x in cfg["qimlist"]], dtype=str)
    gnd = list(cfg["gnd"])
    if len(gnd) != len(qimlist):
        raise ValueError(
            f"{p}: gnd has {len(gnd)} entries but qimlist has {len(qimlist)}; expected one "
            "gnd entry per query"
        )
    n_db = len(imlist)
    sets: dict[str, list[np.ndarray]] = {"easy": [], "hard": [], "junk": []}
    bbx = np.full((len(gnd), 4), np.nan)
    for i, entry in enumerate(gnd):
        if not isinstance(entry, dict):
            raise ValueError(f"{p}: gnd[{i}] is a {type(entry).__name__}; expected a dict")
        for key, rows in sets.items():
            if key not in entry:
                raise ValueError(f"{p}: gnd[{i}] lacks {key!r}; expected easy, hard and junk")
            rows.append(_index_list(entry[key], n_db, f"{p}: gnd[{i}][{key!r}]"))
        if entry.get("bbx") is not None:
            bbx[i] = _box(entry["bbx"], f"{p}: gnd[{i}]['bbx']")
    name = p.stem[4:] if p.stem.startswith("gnd_") else p.stem
    logger.info("read revisitop %s: %d queries, %d database images", name, len(qimlist), n_db)
    return RevisitopGroundTruth(
        name=name,
        imlist=imlist,
        qimlist=qimlist,
        easy=Ragged.from_rows(sets["easy"], dtype=np.int64),
        hard=Ragged.from_rows(sets["hard"], dtype=np.int64),
        junk=Ragged.from_rows(sets["junk"], dtype=np.int64),
        bbx=bbx,
    )


def ranked_positions(ranking: np.ndarray, ok: np.ndarray, junk: np.ndarray) -> np.ndarray:
    """0-based positions of the ``ok`` items in ``ranking`` once ``junk`` items are removed.

    Removing junk shifts each positive down by the number of junk items ranked before it.
    ``-1`` entries (padding) are ignored.

    Shapes:
        ranking: (n,) int database indices, best first. Returns (n_found,) int64, increasing.
    """
    ranking = np.asarray(ranking)
    ranking = ranking[ranking >= 0]
    kept = ranking[~np.isin(ranking, junk)]
    return np.flatnonzero(np.isin(kept, ok)).astype(np.int64)


def trapezoid_ap(ranked_positive_positions: Sequence[int] | np.ndarray, n_positives: int) -> float:
    """Average precision by the trapezoid rule over the PR curve (cirtorch ``compute_ap``).

    With 0-based positions ``r_0 < r_1 < …`` (junk already removed) and ``n`` positives:
    ``AP = Σ_j (P0_j + P1_j) / (2n)``, ``P0_j = 1 if r_j = 0 else j / r_j``,
    ``P1_j = (j + 1) / (r_j + 1)``. Positives missing from the ranking add nothing.

    Raises:
        ValueError: ``n_positives < 1`` or fewer than the positions given, or positions
            that are negative or not strictly increasing.
    """
    r = np.asarray(ranked_positive_positions, dtype=np.float64).reshape(-1)
    if isinstance(n_positives, bool) or n_positives < max(1, r.size):
        raise ValueError(
            f"n_positives must be ≥ 1 and ≥ the {r.size} positions given, got {n_positives!r}"
        )
    if r.size and (r[0] < 0 or np.any(np.diff(r) <= 0)):
        raise ValueError(
            f"positions must be non-negative and strictly increasing, got {r[:10].tolist()}"
        )
    j = np.arange(r.size, dtype=np.float64)
    p0 = np.where(r == 0, 1.0, j / np.maximum(r, 1.0))
    p1 = (j + 1.0) / (r + 1.0)
    return float(np.sum((p0 + p1) / 2.0) / n_positives)


def revisitop_precision_at_k(
    ranked_positive_positions: Sequence[int] | np.ndarray, k: int
) -> float:
    """Precision at ``k`` as the revisitop code computes it (junk removed).

    The cut-off is ``kq = min(k, rank of the last positive)`` (1-based), so a query whose
    positives all lie above ``k`` scores ``n / kq``; no positive in the ranking gives 0.
    """
    k = check_positive_int(k, "k")
    pos = np.asarray(ranked_positive_positions, dtype=np.int64).reshape(-1) + 1
    if pos.size == 0:
        return 0.0
    kq = min(int(pos.max()), k)
    return float(np.count_nonzero(pos <= kq) / kq)


def revisitop_scores(
    rankings: Any,
    gt: RevisitopGroundTruth,
    *,
    protocol: Protocol = "medium",
    ks: Sequence[int] = DEFAULT_KS,
) -> RevisitopScores:
    """mAP and mP@k of one protocol from ranked database indices.

    Queries without positives under ``protocol`` get AP NaN and are left out of the means.

    Shapes:
        rankings: (nq, n) int database indices per query, best first; the full database
            for the standard protocol (a shorter ranking scores missing positives as misses).
            ``-1`` entries are ignored.

    Raises:
        ValueError: unknown protocol, bad ``ks``, rankings whose row count differs from
            the number of queries or that hold indices outside the database, or no query
            with positives under ``protocol``.
    """
    sets = gt.protocol_sets(protocol)
    ks = _check_ks(ks)
    ranks = np.asarray(rankings)
    if ranks.ndim != 2 or ranks.shape[0] != gt.num_queries:
        raise ValueError(
            f"rankings must have shape ({gt.num_queries}, n), one row per query; got {ranks.shape}"
        )
    if not np.issubdtype(ranks.dtype, np.integer):
        raise TypeError(f"rankings must hold integer database indices, got dtype {ranks.dtype}")
    if ranks.size and (ranks.min() < -1 or ranks.max() >= gt.num_database):
        raise ValueError(
            f"rankings hold indices in [{ranks.min()}, {ranks.max()}]; expected database "
            f"indices in [0, {gt.num_database}) or -1 for padding"
        )
    ap = np.full(gt.num_queries, np.nan)
    prs = np.full((gt.num_queries, len(ks)), np.nan)
    for i in range(gt.num_queries):
        ok = sets.ok.row(i)
        if ok.size == 0:
            continue
        pos = ranked_positions(ranks[i], ok, sets.junk.row(i))
        ap[i] = trapezoid_ap(pos, int(ok.size))
        prs[i] = [revisitop_precision_at_k(pos, k) for k in ks]
    scored = ~np.isnan(ap)
    if not scored.any():
        raise ValueError(f"no query has positives under the {protocol!r} protocol")
    mp = prs[scored].mean(axis=0)
    return RevisitopScores(
        map=float(ap[scored].mean()),
        mp_at_k={k: float(v) for k, v in zip(ks, mp, strict=True)},
        ap=ap,
        num_queries=int(scored.sum()),
    )


def evaluate_revisitop(
    query_feats: Any,
    db_feats: Any,
    gt: RevisitopGroundTruth,
    *,
    protocols: Sequence[Protocol] = ("easy", "medium", "hard"),
    ks: Sequence[int] = DEFAULT_KS,
    distance: Distance = "cosine",
    chunk_size: int = 4096,
) -> dict[str, float]:
    """Rank the whole database for each query with ``knn`` and score each protocol.

    For a cross-test, embed the queries with the new model and the database with the old.

    Shapes:
        query_feats: (nq, d) float in ``gt.qimlist`` order (cropped to ``bbx`` for the
            standard protocol, see :func:`crop_queries`).
        db_feats: (n_db, d) float in ``gt.imlist`` order.

    Returns:
        ``{"<protocol>/map", "<protocol>/mp@<k>" for each k, "<protocol>/num_queries"}``
        per protocol, in the order given.

    Raises:
        ValueError: bad features, row counts that differ from the ground truth, unknown
            protocols or bad ``ks``.
    """
    for p in protocols:
        _check_protocol(p)
    ks = _check_ks(ks)
    q = check_features(query_feats, "query_feats")
    g = check_features(db_feats, "db_feats")
    if q.shape[0] != gt.num_queries:
        raise ValueError(
            f"query_feats has {q.shape[0]} rows but {gt.name} has {gt.num_queries} queries"
        )
    if g.shape[0] != gt.num_database:
        raise ValueError(
            f"db_feats has {g.shape[0]} rows but {gt.name} has {gt.num_database} database images"
        )
    ranking = knn(q, g, gt.num_database, distance=distance, chunk_size=chunk_size).indices
    out: dict[str, float] = {}
    for p in protocols:
        s = revisitop_scores(ranking, gt, protocol=p, ks=ks)
        out[f"{p}/map"] = s.map
        for k in ks:
            out[f"{p}/mp@{k}"] = s.mp_at_k[k]
        out[f"{p}/num_queries"] = float(s.num_queries)
        logger.info("%s %s: mAP %.4f over %d queries", gt.name, p, s.map, s.num_queries)
    return out


def crop_queries(images: Sequence[Any], gt: RevisitopGroundTruth) -> list[Any]:
    """Crop each query image to its ``bbx`` (the standard revisitop query protocol).

    Box corners are rounded as PIL's ``Image.crop`` rounds them, then clipped to the image.
    Works on numpy arrays (H, W) / (H, W, C) and PIL images; returns the same kind.

    Raises:
        ValueError: the number of images differs from the number of queries, a query
            without a box, or a box that is empty inside its image.
        TypeError: an image that is neither a numpy array nor a PIL image.
    """
    from PIL import Image

    if len(images) != gt.num_queries:
        raise ValueError(
            f"got {len(images)} images for {gt.num_queries} queries; expected one per query "
            "in qimlist order"
        )
    out: list[Any] = []
    for i, img in enumerate(images):
        if np.isnan(gt.bbx[i]).any():
            raise ValueError(f"query {i} ({gt.qimlist[i]}) has no bbx to crop to")
        if isinstance(img, Image.Image):
            width, height = img.size
        elif isinstance(img, np.ndarray) and img.ndim in (2, 3):
            height, width = img.shape[:2]
        else:
            raise TypeError(
                f"image {i} is a {type(img).__name__}; expected a numpy array (H, W[, C]) "
                "or a PIL image"
            )
        x0, y0, x1, y1 = (round(float(v)) for v in gt.bbx[i])
        x0, x1 = max(0, x0), min(width, x1)
        y0, y1 = max(0, y0), min(height, y1)
        if x1 <= x0 or y1 <= y0:
            raise ValueError(
                f"query {i} ({gt.qimlist[i]}): bbx {gt.bbx[i].tolist()} is empty inside its "
                f"{width}x{height} image"
            )
        if isinstance(img, Image.Image):
            out.append(img.crop((x0, y0, x1, y1)))
        else:
            out.append(img[y0:y1, x0:x1])
    return out


def _check_protocol(protocol: str) -> None:
    if protocol not in PROTOCOLS:
        raise ValueError(
            f"unknown revisitop protocol {protocol!r}; expected one of {', '.join(PROTOCOLS)}"
        )


def _check_ks(ks: Sequence[int]) -> tuple[int, ...]:
    if len(ks) == 0:
        raise ValueError("ks must name at least one cut-off, got an empty sequence")
    return tuple(check_positive_int(k, "each of ks") for k in ks)


def _index_list(value: Any, n_db: int, where: str) -> np.ndarray:
    arr = np.asarray(value).reshape(-1) if value is not None else np.zeros(0, dtype=np.int64)
    if arr.size == 0:
        return np.zeros(0, dtype=np.int64)
    if arr.dtype == np.bool_ or not np.issubdtype(arr.dtype, np.integer):
        raise ValueError(f"{where} must hold integer database indices, got dtype {arr.dtype}")
    if arr.min() < 0 or arr.max() >= n_db:
        raise ValueError(
            f"{where} holds indices in [{arr.min()}, {arr.max()}]; expected [0, {n_db})"
        )
    return np.unique(arr.astype(np.int64))


def _box(value: Any, where: str) -> np.ndarray:
    try:
        box = np.asarray(value, dtype=np.float64).reshape(-1)
    except (TypeError, ValueError) as e:
        raise ValueError(f"{where} must be 4 numbers [x1, y1, x2, y2], got {value!r}") from e
    if box.shape != (4,) or not np.isfinite(box).all():
        raise ValueError(f"{where} must be 4 finite numbers [x1, y1, x2, y2], got {value!r}")
    if box[2] <= box[0] or box[3] <= box[1]:
        raise ValueError(f"{where} = {box.tolist()} has x2 <= x1 or y2 <= y1")
    return box
