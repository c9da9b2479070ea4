"""Search backends: where a collection's current vectors are searched, one group per
(version space, origin).

Vectors are L2-normalised and scored by inner product, so every score is a cosine similarity.
Engines (``BackendOptions.engine``):

- ``faiss`` (default, in-process): ``VectorGroup``. FAISS ids are slot numbers; a removed item
  only clears its slot's bit in a bitmap that every search passes as an ``IDSelectorBitmap``,
  and the index is rebuilt once dead slots dominate. Kinds: ``flat`` (exact, the default),
  ``ivf`` (``IndexIVFFlat``, exact below ``ivf_min_size`` vectors, k-means trained on at most
  ``IVF_TRAIN_PER_LIST`` points per list) and ``hnsw`` (``IndexHNSWFlat``).
- ``qdrant``: ``compatkit.index.qdrant_backend`` (one Qdrant collection per compatkit
  collection, a named vector per model version, the item's id and metadata as payload).

A backend only mirrors the store (``compatkit.index.search.SearchCache`` feeds it), so it never
holds state the database does not.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping

import faiss
import numpy as np

from compatkit.index.db import Database
from compatkit.index.options import (
    INDEX_KINDS,
    BackendOptions,
    GroupHits,
    GroupKey,
    SearchBackend,
    check_group_add,
)
from compatkit.registry import Registry

logger = logging.getLogger(__name__)

#: A flat search of at least this many queries is scored with one matrix product (BLAS), fewer
#: query by query. Measured here (100k x 128, one thread): a query-by-query scan costs 1.8 ms a
#: query at any batch size; the product costs about 8 ms per call plus 0.3 ms a query, so it
#: wins from 8 queries (1.2 ms a query; 0.65 at 16, 0.35 at 64). FAISS's own default threshold
#: sends only batches of 1,000 queries (at d = 128) to BLAS.
FLAT_BLAS_MIN_QUERIES = 8
_FAISS_BLAS_THRESHOLD = faiss.cvar.distance_compute_blas_threshold


def flat_blas_threshold(dim: int) -> int:
    """FAISS's ``distance_compute_blas_threshold`` for flat searches of dimension ``dim``:
    FAISS takes its BLAS path when queries x dimension reaches it."""
    return FLAT_BLAS_MIN_QUERIES * dim

#: IVF k-means sees at most this many (seeded, sampled) training points per list.
IVF_TRAIN_PER_LIST = 64
_IVF_SAMPLE_SEED = 0


class VectorGroup:
    """A FAISS index over the vectors of one group, addressable by item key.

    Args:
        dim: vector dimension.
        options: index kind and its parameters.

    Shapes:
        add: keys (n,) int64, vectors (n, dim) float32 already L2-normalised.
        search: queries (nq, dim) L2-normalised -> GroupHits (nq, k).
    """

    def __init__(self, dim: int, options: BackendOptions | None = None) -> None:
        self.dim = dim
        self.options = options or BackendOptions()
        if self.options.kind not in INDEX_KINDS:
            raise ValueError(f"index kind must be one of {INDEX_KINDS}, got {self.options.kind!r}")
        if self.options.nlist is not None and self.options.nlist < 1:
            raise ValueError(f"nlist must be a positive integer or None, got {self.options.nlist}")
        self._vectors = np.zeros((0, dim), dtype=np.float32)
        self._keys = np.zeros(0, dtype=np.int64)
        self._alive = np.zeros(0, dtype=bool)
        self._slot_of: dict[int, int] = {}
        self._size = 0  # slots used (alive or dead)
        self._index: faiss.Index = faiss.IndexFlatIP(dim)
        self._structure = "flat"

    def __len__(self) -> int:
        return len(self._slot_of)

    @property
    def structure(self) -> str:
        """The FAISS structure in use now: ``flat``, ``ivf`` or ``hnsw``."""
        return self._structure

    def add(self, keys: np.ndarray, vectors: np.ndarray) -> None:
        """Insert or replace the vectors of ``keys`` (a key already present moves to a new slot)."""
        keys = check_group_add(keys, vectors, self.dim)
        if len(keys) == 0:
            return
        self.remove(keys)
        self._reserve(self._size + len(keys))
        slots = np.arange(self._size, self._size + len(keys))
        self._vectors[slots] = vectors
        self._keys[slots] = keys
        self._alive[slots] = True
        self._slot_of.update(zip(keys.tolist(), slots.tolist(), strict=True))
        self._size += len(keys)
        if self._should_restructure():
            self._rebuild()
        else:
            self._index.add(np.ascontiguousarray(vectors, dtype=np.float32))

    def remove(self, keys: np.ndarray) -> None:
        """Drop ``keys`` (unknown keys are ignored)."""
        slots = [self._slot_of.pop(int(k)) for k in np.asarray(keys).tolist()
                 if int(k) in self._slot_of]
        if not slots:
            return
        self._alive[slots] = False
        dead = self._size - len(self._slot_of)
        if dead > max(1024, len(self._slot_of)):
            self._rebuild()

    def search(self, queries: np.ndarray, k: int) -> GroupHits:
        """The ``k`` best keys per query by inner product (cosine for normalised vectors)."""
        nq = queries.shape[0]
        if len(self) == 0 or k < 1:
            return GroupHits(np.full((nq, max(k, 0)), -np.inf, dtype=np.float32),
                             np.full((nq, max(k, 0)), -1, dtype=np.int64))
        queries = np.ascontiguousarray(queries, dtype=np.float32)
        # The threshold is process-wide: a thread searching another dimension at the same moment
        # may see this value, which only changes how fast its candidates are scored (they are
        # rescored exactly afterwards).
        faiss.cvar.distance_compute_blas_threshold = (
            flat_blas_threshold(self.dim) if self._structure == "flat" else _FAISS_BLAS_THRESHOLD)
        if len(self._slot_of) == self._size:
            scores, slots = self._index.search(queries, k, params=self._search_params(None))
        elif self._structure == "flat":
            scores, slots = self._search_flat_with_dead(queries, k)
        else:
            scores, slots = self._search_live(queries, k)
        keys = np.where(slots >= 0, self._keys[np.maximum(slots, 0)], -1)
        scores = np.where(slots >= 0, scores, -np.inf).astype(np.float32)
        return GroupHits(scores, keys.astype(np.int64))

    def _search_live(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """Search the live slots only, through an ``IDSelectorBitmap``."""
        bitmap = np.packbits(self._alive[:self._size], bitorder="little")
        sel = faiss.IDSelectorBitmap(self._size, faiss.swig_ptr(bitmap))
        # ``bitmap`` and ``sel`` stay referenced here until the search returns
        return self._index.search(queries, k, params=self._search_params(sel))

    def _search_flat_with_dead(self, queries: np.ndarray,
                               k: int) -> tuple[np.ndarray, np.ndarray]:
        """The live top-k of a flat index with dead slots, batched.

        FAISS scores a query batch with one matrix product, but a selector makes it score
        query by query; so ask for enough more than ``k`` to cover the dead slots, drop them,
        and search only the queries left short through the selector.
        """
        dead_share = 1.0 - len(self._slot_of) / self._size
        wide = min(self._size, k + int(np.ceil(2 * k * dead_share / (1 - dead_share))) + 8)
        scores, slots = self._index.search(queries, wide)
        alive = (slots >= 0) & self._alive[np.maximum(slots, 0)]
        order = np.argsort(~alive, axis=1, kind="stable")[:, :k]  # live first, rank kept
        scores = np.take_along_axis(scores, order, axis=1)
        slots = np.where(np.take_along_axis(alive, order, axis=1),
                         np.take_along_axis(slots, order, axis=1), -1)
        short = np.flatnonzero((slots < 0).any(axis=1))
        if len(short) and wide < self._size:
            scores[short], slots[short] = self._search_live(queries[short], k)
        return scores, slots

    def vectors_of(self, keys: np.ndarray) -> np.ndarray:
        """The stored (normalised) vectors of ``keys``. Raises KeyError for an unknown key."""
        slots = [self._slot_of[int(k)] for k in np.asarray(keys).tolist()]
        return self._vectors[slots].copy()

    def _search_params(self, sel: faiss.IDSelector | None) -> faiss.SearchParameters | None:
        if self._structure == "ivf":
            return faiss.SearchParametersIVF(sel=sel, nprobe=self.options.nprobe)
        if self._structure == "hnsw":
            return faiss.SearchParametersHNSW(sel=sel, efSearch=self.options.ef_search)
        return None if sel is None else faiss.SearchParameters(sel=sel)

    def _reserve(self, n: int) -> None:
        cap = len(self._keys)
        if n <= cap:
            return
        new_cap = max(n, 2 * cap, 1024)
        vectors = np.zeros((new_cap, self.dim), dtype=np.float32)
        vectors[:self._size] = self._vectors[:self._size]
        keys = np.full(new_cap, -1, dtype=np.int64)
        keys[:self._size] = self._keys[:self._size]
        alive = np.zeros(new_cap, dtype=bool)
        alive[:self._size] = self._alive[:self._size]
        self._vectors, self._keys, self._alive = vectors, keys, alive

    def _wanted_structure(self, n: int) -> str:
        kind = self.options.kind
        if kind == "ivf" and n < self.options.ivf_min_size:
            return "flat"
        return kind

    def _should_restructure(self) -> bool:
        return self._wanted_structure(len(self._slot_of)) != self._structure

    def _rebuild(self) -> None:
        """Compact the live vectors into fresh slots and a fresh FAISS index."""
        live = np.flatnonzero(self._alive[:self._size])
        vectors = self._vectors[live].copy()
        keys = self._keys[live].copy()
        n = len(live)
        self._vectors = np.zeros((max(n, 1024), self.dim), dtype=np.float32)
        self._vectors[:n] = vectors
        self._keys = np.full(len(self._vectors), -1, dtype=np.int64)
        self._keys[:n] = keys
        self._alive = np.zeros(len(self._vectors), dtype=bool)
        self._alive[:n] = True
        self._slot_of = dict(zip(keys.tolist(), range(n), strict=True))
        self._size = n
        self._structure = self._wanted_structure(n)
        self._index = self._new_index(vectors)
        if n:
            self._index.add(vectors)
        logger.debug("rebuilt %s group of %d vectors", self._structure, n)

    def _new_index(self, vectors: np.ndarray) -> faiss.Index:
        opts = self.options
        if self._structure == "ivf":
            n = len(vectors)
            nlist = ivf_nlist(n, opts.nlist)
            quantizer = faiss.IndexFlatIP(self.dim)
            index = faiss.IndexIVFFlat(quantizer, self.dim, nlist, faiss.METRIC_INNER_PRODUCT)
            if n > IVF_TRAIN_PER_LIST * nlist:  # k-means on a seeded sample, not on every vector
                rng = np.random.default_rng(_IVF_SAMPLE_SEED)
                sample = np.sort(rng.choice(n, IVF_TRAIN_PER_LIST * nlist, replace=False))
                vectors = vectors[sample]
            index.train(vectors)  # the Python wrapper keeps ``quantizer`` referenced
            return index
        if self._structure == "hnsw":
            index = faiss.IndexHNSWFlat(self.dim, opts.hnsw_m, faiss.METRIC_INNER_PRODUCT)
            index.hnsw.efConstruction = opts.ef_construction
            return index
        return faiss.IndexFlatIP(self.dim)


def ivf_nlist(n: int, nlist: int | None = None) -> int:
    """IVF lists for ``n`` vectors: ``nlist`` if given, else ``4·√n`` capped at ``n/39`` (FAISS
    wants 39 training points per list), at least 1, and never more lists than vectors."""
    if nlist is None:
        nlist = int(min(max(1, 4 * math.sqrt(n)), max(1, n // 39)))
    return max(1, min(int(nlist), n))


# ---------------------------------------------------------------------- engines

#: engine name -> factory ``(db, collection, options) -> SearchBackend``.
ENGINES: Registry = Registry("search engine")


class FaissBackend:
    """In-process FAISS groups (``VectorGroup``); nothing outlives the process."""

    def __init__(self, options: BackendOptions) -> None:
        self.options = options

    def reset(self, dims: Mapping[str, int]) -> None:
        """Nothing to drop: the old groups are garbage once the cache forgets them."""

    def group(self, key: GroupKey, dim: int) -> VectorGroup:
        """An empty FAISS group of dimension ``dim``."""
        return VectorGroup(dim, self.options)

    def close(self) -> None:
        """Nothing to release."""

    def drop(self) -> None:
        """Nothing is stored outside the process."""


@ENGINES.register("faiss")
def _faiss_engine(db: Database | None, collection: str,
                  options: BackendOptions) -> SearchBackend:
    """FAISS in-process (flat, ivf, hnsw)."""
    return FaissBackend(options)


@ENGINES.register("qdrant")
def _qdrant_engine(db: Database | None, collection: str,
                   options: BackendOptions) -> SearchBackend:
    """Qdrant (local mode or a server/cluster): one collection per compatkit collection."""
    from compatkit.index.qdrant_backend import QdrantBackend

    return QdrantBackend.open(db, collection, options)


def check_options(options: BackendOptions) -> BackendOptions:
    """``options`` if they name a known engine and a kind and location that engine takes.

    Raises:
        ValueError: an unknown engine or kind, a bad parameter, or a Qdrant collection without
            a location or with the ``ivf`` kind (Qdrant indexes with HNSW or searches exactly).
    """
    if options.engine not in ENGINES:
        raise ValueError(ENGINES.unknown_message(str(options.engine)))
    if options.kind not in INDEX_KINDS:
        raise ValueError(f"index kind must be one of {INDEX_KINDS}, got {options.kind!r}")
    for name in ("ivf_min_size", "nprobe", "hnsw_m", "ef_search", "ef_construction"):
        value = getattr(options, name)
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be a positive integer, got {value!r}")
    if options.nlist is not None and (isinstance(options.nlist, bool) or options.nlist < 1):
        raise ValueError(f"nlist must be a positive integer or None, got {options.nlist!r}")
    if options.engine == "qdrant":
        if options.kind == "ivf":
            raise ValueError("the qdrant engine has no IVF index; use kind 'hnsw' or 'flat'")
        if not options.location:
            raise ValueError("the qdrant engine needs a location: ':memory:', a folder for "
                             "local mode, or an http(s):// URL")
    elif options.location is not None:
        raise ValueError(f"location applies to the qdrant engine, not {options.engine!r}")
    return options


def open_backend(db: Database | None, collection: str,
                 options: BackendOptions) -> SearchBackend:
    """The search backend of ``collection`` for ``options.engine`` (checked first).

    ``db`` gives Qdrant the folder for relative local paths and the items' payloads; None
    (tests, benchmarks) means no payload beyond the item key.
    """
    check_options(options)
    return ENGINES.get(options.engine)(db, collection, options)
