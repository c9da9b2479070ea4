"""FAISS search over one group of vectors (one version space, one origin) with cheap updates.

Vectors are L2-normalised and scored by inner product, so every score is a cosine similarity.
FAISS ids are slot numbers; a removed item only clears its slot's bit in a bitmap that every
search passes as an ``IDSelectorBitmap``, and the index is rebuilt once dead slots dominate.
Kinds: ``flat`` (exact, the default), ``ivf`` (``IndexIVFFlat``, exact below
``ivf_min_size`` vectors) and ``hnsw`` (``IndexHNSWFlat``).
"""

from __future__ import annotations

import logging
import math
from typing import Literal, NamedTuple

import faiss
import numpy as np

logger = logging.getLogger(__name__)

IndexKind = Literal["flat", "ivf", "hnsw"]
INDEX_KINDS: tuple[str, ...] = ("flat", "ivf", "hnsw")


class BackendOptions(NamedTuple):
    """Search-structure parameters of a collection.

    ivf_min_size: below this many vectors an ``ivf`` group searches exactly.
    nprobe: IVF lists visited per query. hnsw_m / ef_search / ef_construction: HNSW graph.
    """

    kind: IndexKind = "flat"
    ivf_min_size: int = 20_000
    nprobe: int = 16
    hnsw_m: int = 32
    ef_search: int = 128
    ef_construction: int = 80


class GroupHits(NamedTuple):
    """Top-k of one group. Shapes: scores (nq, k) float32 (-inf pads); keys (nq, k) int64 (-1)."""

    scores: np.ndarray
    keys: np.ndarray


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
        keys = np.asarray(keys, dtype=np.int64)
        if vectors.shape != (len(keys), self.dim):
            raise ValueError(f"vectors must be ({len(keys)}, {self.dim}), got {vectors.shape}")
        if len(keys) == 0:
            return
        if len(np.unique(keys)) != len(keys):
            raise ValueError("keys added in one call must be unique")
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
        bitmap = sel = None
        if len(self._slot_of) < self._size:  # dead slots: search the live ones only
            bitmap = np.packbits(self._alive[:self._size], bitorder="little")
            sel = faiss.IDSelectorBitmap(self._size, faiss.swig_ptr(bitmap))
        # ``bitmap`` and ``sel`` stay referenced here until the search returns
        scores, slots = self._index.search(np.ascontiguousarray(queries, dtype=np.float32), k,
                                           params=self._search_params(sel))
        keys = np.where(slots >= 0, self._keys[np.maximum(slots, 0)], -1)
        scores = np.where(slots >= 0, scores, -np.inf).astype(np.float32)
        return GroupHits(scores, keys.astype(np.int64))

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

    def _new_index(self, train: np.ndarray) -> faiss.Index:
        opts = self.options
        if self._structure == "ivf":
            nlist = int(min(max(1, 4 * math.sqrt(len(train))), max(1, len(train) // 39)))
            quantizer = faiss.IndexFlatIP(self.dim)
            index = faiss.IndexIVFFlat(quantizer, self.dim, nlist, faiss.METRIC_INNER_PRODUCT)
            index.train(train)  # the Python wrapper keeps ``quantizer`` referenced
            return index
        if self._structure == "hnsw":
            index = faiss.IndexHNSWFlat(self.dim, opts.hnsw_m, faiss.METRIC_INNER_PRODUCT)
            index.hnsw.efConstruction = opts.ef_construction
            return index
        return faiss.IndexFlatIP(self.dim)
