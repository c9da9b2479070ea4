"""Search-structure options and the interfaces every search engine implements.

``BackendOptions`` is stored with each collection; ``GroupIndex`` and ``SearchBackend`` are
what ``compatkit.index.backends`` (FAISS) and ``compatkit.index.qdrant_backend`` provide. This
module imports no engine, so the database and the CLI can read options without FAISS.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Literal, NamedTuple, Protocol

import numpy as np

IndexKind = Literal["flat", "ivf", "hnsw"]
INDEX_KINDS: tuple[str, ...] = ("flat", "ivf", "hnsw")
Engine = Literal["faiss", "qdrant"]
#: (version whose space the vectors are in, version they were transformed from or None).
GroupKey = tuple[str, str | None]


class BackendOptions(NamedTuple):
    """Search-structure parameters of a collection (stored with it as JSON).

    kind: ``flat`` (exact), ``ivf`` or ``hnsw``.
    ivf_min_size: below this many vectors an ``ivf`` group searches exactly.
    nprobe: IVF lists visited per query. nlist: IVF lists; None derives ``4·√n`` (at most
        ``n/39``) when the group is built.
    hnsw_m / ef_search / ef_construction: HNSW graph degree and beam widths (defaults 32, 256,
        200 reach recall@10 >= 0.99 on clustered data; see docs/RESULTS.md, "Service speed").
    engine: ``faiss`` (in-process) or ``qdrant``.
    location: Qdrant only: ``":memory:"``, a folder for qdrant-client's local mode (relative
        paths live inside the store folder), or an ``http(s)://`` URL of a Qdrant server or
        cluster (API key from ``$QDRANT_API_KEY``).
    namespace: Qdrant only: the prefix of the Qdrant collection names (``<namespace>-<name>``).
    """

    kind: IndexKind = "flat"
    ivf_min_size: int = 20_000
    nprobe: int = 16
    hnsw_m: int = 32
    ef_search: int = 256
    ef_construction: int = 200
    nlist: int | None = None
    engine: Engine = "faiss"
    location: str | None = None
    namespace: str = "compatkit"


class GroupHits(NamedTuple):
    """Top-k of one group. Shapes: scores (nq, k) float32 (-inf pads); keys (nq, k) int64 (-1)."""

    scores: np.ndarray
    keys: np.ndarray


class GroupIndex(Protocol):
    """The search structure of one group, addressable by item key (``VectorGroup``, Qdrant).

    Shapes: add keys (n,) int64 + vectors (n, dim) float32 L2-normalised; search queries
    (nq, dim) L2-normalised -> GroupHits (nq, k).
    """

    dim: int

    def __len__(self) -> int: ...

    @property
    def structure(self) -> str: ...

    def add(self, keys: np.ndarray, vectors: np.ndarray) -> None: ...

    def remove(self, keys: np.ndarray) -> None: ...

    def search(self, queries: np.ndarray, k: int) -> GroupHits: ...

    def vectors_of(self, keys: np.ndarray) -> np.ndarray: ...


class SearchBackend(Protocol):
    """The search structures of one collection: a fresh start, then one ``GroupIndex`` per group.

    ``reset(dims)`` drops everything and prepares for the model versions in ``dims`` (name ->
    dimension); ``group`` makes an empty group; ``close`` releases what the backend holds;
    ``drop`` deletes what it stored outside the process (the collection was dropped).
    """

    def reset(self, dims: Mapping[str, int]) -> None: ...

    def group(self, key: GroupKey, dim: int) -> GroupIndex: ...

    def close(self) -> None: ...

    def drop(self) -> None: ...


def check_group_add(keys: np.ndarray, vectors: np.ndarray, dim: int) -> np.ndarray:
    """``keys`` as int64 if they are unique, non-negative and match ``vectors`` (n, dim).

    Raises:
        ValueError: a shape mismatch, a repeated key or a negative key.
    """
    keys = np.asarray(keys, dtype=np.int64)
    if vectors.shape != (len(keys), dim):
        raise ValueError(f"vectors must be ({len(keys)}, {dim}), got {vectors.shape}")
    if len(np.unique(keys)) != len(keys):
        raise ValueError("keys added in one call must be unique")
    if len(keys) and (keys < 0).any():
        raise ValueError(f"keys must be non-negative, got {keys.min()}")
    return keys
