"""Qdrant search backend: the same group interface as FAISS, on qdrant-client.

One Qdrant collection per compatkit collection, reached through the alias
``<namespace>-<collection>``; a named vector per model version; one point per item (point id =
the store's item key) holding its one current vector under its version's name, with payload
``{"item": id, "metadata": {...}, "version": v, "origin": transformed_from or ""}``. A group
(version space, origin) is the named vector ``version`` filtered on ``origin``. Scores are dot
products of L2-normalised vectors (cosine), as with FAISS.

Like the FAISS groups, the Qdrant collection mirrors the store: a search cache rebuild writes a
fresh physical collection and flips the alias to it. A version that appears later gets its
named vector with ``create_vector_name`` (Qdrant >= 1.18) or, on older servers, by copying the
points into a new physical collection with the extra vector. Local mode (``":memory:"`` or a
folder) always searches exactly; a server builds HNSW (``kind="hnsw"``) with ``hnsw_m`` and
``ef_construction`` and searches with ``ef_search``.

Requires the ``qdrant`` extra (``pip install compatkit[qdrant]``).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import secrets
import threading
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager, nullcontext
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from compatkit.errors import CompatkitError
from compatkit.index.db import Database, item_rows
from compatkit.index.options import BackendOptions, GroupHits, GroupKey, check_group_add

if TYPE_CHECKING:
    from qdrant_client import QdrantClient

logger = logging.getLogger(__name__)

#: Points per upsert, scroll and delete request.
CHUNK = 1024
_SAFE = re.compile(r"[^A-Za-z0-9._@+\-]")
#: item keys -> {key: payload} for the points of those items.
PayloadSource = Callable[[Sequence[int]], dict[int, dict[str, Any]]]

_clients: dict[str, tuple[QdrantClient, threading.Lock | None]] = {}
_clients_lock = threading.Lock()


def _models() -> Any:
    try:
        from qdrant_client import models
    except ImportError:
        raise CompatkitError("the qdrant engine needs qdrant-client: pip install "
                             "'compatkit[qdrant]'") from None
    return models


def safe_name(name: str) -> str:
    """``name`` usable as a Qdrant collection or vector name: characters outside
    ``[A-Za-z0-9._@+-]`` become ``_``, followed by a short hash of the original when changed."""
    safe = _SAFE.sub("_", name)
    if safe != name:
        safe += "-" + hashlib.sha1(name.encode()).hexdigest()[:8]
    return safe


def is_remote(location: str) -> bool:
    """Whether ``location`` names a Qdrant server (an http(s) URL) rather than local mode."""
    return location.startswith(("http://", "https://"))


def connect(location: str, *,
            root: Path | None = None) -> tuple[QdrantClient, threading.Lock | None]:
    """A client for ``location`` and the lock its calls need (local mode is not thread-safe).

    ``":memory:"`` gets a new private client; a folder (relative to ``root``) or a URL gets one
    client per process, shared (a local-mode folder can be opened once per process).
    """
    from qdrant_client import QdrantClient

    if location == ":memory:":
        return QdrantClient(location=":memory:"), threading.Lock()
    if is_remote(location):
        key = location
    else:
        path = Path(location).expanduser()
        if not path.is_absolute() and root is not None:
            path = root / path
        key = str(path.resolve())
    with _clients_lock:
        if key not in _clients:
            if is_remote(location):
                client = QdrantClient(url=location, api_key=os.environ.get("QDRANT_API_KEY"))
                _clients[key] = (client, None)
            else:
                Path(key).mkdir(parents=True, exist_ok=True)
                client = QdrantClient(path=key, force_disable_check_same_thread=True)
                _clients[key] = (client, threading.Lock())
        return _clients[key]


def close_clients() -> None:
    """Close every shared client of this process (releases local-mode folder locks)."""
    with _clients_lock:
        for client, _ in _clients.values():
            client.close()
        _clients.clear()


def store_payloads(db: Database) -> PayloadSource:
    """A ``PayloadSource`` reading each item's id and metadata from ``db``.

    Inside the search cache's read transaction (this thread's connection) it reads the same
    snapshot as the vectors being added; elsewhere it opens its own read.
    """

    def payloads(keys: Sequence[int]) -> dict[int, dict[str, Any]]:
        with db.snapshot() as con:
            rows = item_rows(con, keys)
        return {key: {"item": row[0], "metadata": json.loads(row[3])} for key, row in rows.items()}

    return payloads


class QdrantBackend:
    """The Qdrant collection of one compatkit collection (see the module docstring).

    Args:
        client: a ``QdrantClient`` (local mode or remote).
        name: the alias searches and writes go through (``<namespace>-<collection>``).
        options: the collection's ``BackendOptions`` (kind ``flat`` or ``hnsw``).
        payloads: item keys -> payloads (id, metadata); None stores the key only.
        lock: serialises client calls (local mode); None for a thread-safe remote client.
        remote: whether the client talks to a server (search parameters and payload indexes
            apply there; local mode searches exactly).
    """

    def __init__(self, client: QdrantClient, name: str, options: BackendOptions, *,
                 payloads: PayloadSource | None = None, lock: threading.Lock | None = None,
                 remote: bool = False) -> None:
        if options.kind == "ivf":
            raise ValueError("the qdrant engine has no IVF index; use kind 'hnsw' or 'flat'")
        self.client, self.name, self.options = client, name, options
        self.payloads, self.remote = payloads, remote
        self._lock = lock
        self._dims: dict[str, int] = {}
        self._physical: str | None = None
        self._groups: list[QdrantGroup] = []
        #: False forces the copy migration even where ``create_vector_name`` exists.
        self.use_create_vector_name = True

    @classmethod
    def open(cls, db: Database | None, collection: str,
             options: BackendOptions) -> QdrantBackend:
        """The backend of ``collection`` at ``options.location`` (relative to the store)."""
        _models()
        location = options.location or ""
        client, lock = connect(location, root=None if db is None else db.root)
        name = safe_name(f"{options.namespace}-{collection}")
        return cls(client, name, options, payloads=None if db is None else
                   store_payloads(db), lock=lock, remote=is_remote(location))

    @contextmanager
    def call(self) -> Iterator[QdrantClient]:
        """The client, with the local-mode lock held."""
        with self._lock if self._lock is not None else nullcontext():
            yield self.client

    # ----------------------------------------------------------- collections

    def reset(self, dims: Mapping[str, int]) -> None:
        """A fresh empty physical collection with a named vector per version in ``dims``."""
        self._groups.clear()
        self._switch_to(dict(dims), copy_points=False)

    def group(self, key: GroupKey, dim: int) -> QdrantGroup:
        """An empty group: the named vector ``key[0]`` (added if new), origin ``key[1]``."""
        if self._physical is None:
            self.reset({})
        version = key[0]
        if version in self._dims and self._dims[version] != dim:
            raise ValueError(f"version {version!r} has dimension {self._dims[version]} in Qdrant "
                             f"collection {self.name!r}, got {dim}")
        if version not in self._dims:
            self._add_vector(version, dim)
        group = QdrantGroup(self, key, dim)
        group.clear()
        self._groups.append(group)
        return group

    def close(self) -> None:
        """Close a private (``":memory:"``) client; shared clients stay open."""
        if self.options.location == ":memory:":
            self.client.close()

    def drop(self) -> None:
        """Delete the alias and every physical collection behind it."""
        m = _models()
        pattern = re.compile(re.escape(self.name) + r"-[0-9a-f]{8}")
        with self.call() as client:
            if self._alias_target(client) is not None:
                client.update_collection_aliases(change_aliases_operations=[
                    m.DeleteAliasOperation(delete_alias=m.DeleteAlias(alias_name=self.name))])
            for c in client.get_collections().collections:
                if pattern.fullmatch(c.name):
                    client.delete_collection(c.name)
        self._physical, self._dims = None, {}
        self._groups.clear()

    def vector_params(self, dim: int) -> Any:
        """The ``VectorParams`` of a named vector: dot product, HNSW per ``options``."""
        m = _models()
        hnsw = (m.HnswConfigDiff(m=self.options.hnsw_m, ef_construct=self.options.ef_construction)
                if self.options.kind == "hnsw" else m.HnswConfigDiff(m=0))
        return m.VectorParams(size=dim, distance=m.Distance.DOT, hnsw_config=hnsw)

    def search_params(self) -> Any:
        """Per-query parameters for a server (None in local mode, which is always exact)."""
        if not self.remote:
            return None
        m = _models()
        if self.options.kind == "hnsw":
            return m.SearchParams(hnsw_ef=self.options.ef_search)
        return m.SearchParams(exact=True)

    def _add_vector(self, version: str, dim: int) -> None:
        m = _models()
        if self.use_create_vector_name and hasattr(self.client, "create_vector_name"):
            try:
                params = self.vector_params(dim)
                with self.call() as client:
                    client.create_vector_name(
                        self._physical, safe_name(version), m.DenseVectorNameConfig(
                            dense=m.DenseVectorConfig(size=dim, distance=params.distance)))
                    if self.remote:
                        client.update_collection(self._physical, vectors_config={
                            safe_name(version): m.VectorParamsDiff(hnsw_config=params.hnsw_config)})
                self._dims[version] = dim
                return
            except Exception as err:  # an older server: fall back to copying the points
                logger.info("create_vector_name unavailable (%s); copying %r", err, self.name)
        self._switch_to({**self._dims, version: dim}, copy_points=True)

    def _switch_to(self, dims: dict[str, int], *, copy_points: bool) -> None:
        """Create a physical collection for ``dims`` (copying the current points if asked),
        point the alias at it, and drop the previous one."""
        m = _models()
        physical = f"{self.name}-{secrets.token_hex(4)}"
        old = self._physical if self._physical is not None else self._alias_target()
        with self.call() as client:
            client.create_collection(physical, vectors_config={
                safe_name(v): self.vector_params(d) for v, d in dims.items()})
            if self.remote:
                for field in ("origin", "version"):
                    client.create_payload_index(physical, field,
                                                field_schema=m.PayloadSchemaType.KEYWORD)
            if copy_points and old is not None:
                self._copy(client, old, physical)
            ops: list[Any] = []
            if old is not None or self._alias_target(client) is not None:
                ops.append(m.DeleteAliasOperation(delete_alias=m.DeleteAlias(alias_name=self.name)))
            ops.append(m.CreateAliasOperation(create_alias=m.CreateAlias(
                collection_name=physical, alias_name=self.name)))
            client.update_collection_aliases(change_aliases_operations=ops)
            pattern = re.compile(re.escape(self.name) + r"-[0-9a-f]{8}")
            for c in client.get_collections().collections:  # the old one, and any orphan
                if c.name != physical and pattern.fullmatch(c.name):
                    client.delete_collection(c.name)
        self._physical, self._dims = physical, dims
        logger.info("qdrant collection %r -> %s (%d named vectors%s)", self.name, physical,
                    len(dims), ", points copied" if copy_points else "")

    def _alias_target(self, client: QdrantClient | None = None) -> str | None:
        def find(c: QdrantClient) -> str | None:
            for alias in c.get_aliases().aliases:
                if alias.alias_name == self.name:
                    return alias.collection_name
            return None

        if client is not None:
            return find(client)
        with self.call() as c:
            return find(c)

    @staticmethod
    def _copy(client: QdrantClient, source: str, target: str) -> None:
        m = _models()
        offset = None
        while True:
            records, offset = client.scroll(source, limit=CHUNK, offset=offset,
                                            with_payload=True, with_vectors=True)
            if records:
                client.upsert(target, points=[
                    m.PointStruct(id=r.id, vector=r.vector, payload=r.payload) for r in records])
            if offset is None:
                break


class QdrantGroup:
    """One group (version space, origin) of a ``QdrantBackend``: ``VectorGroup``'s interface.

    Shapes: add keys (n,) int64 + vectors (n, dim) float32 L2-normalised; search queries
    (nq, dim) -> GroupHits (nq, k) with -inf / -1 padding.
    """

    def __init__(self, backend: QdrantBackend, key: GroupKey, dim: int) -> None:
        self.backend, self.key, self.dim = backend, key, dim
        self.vector_name = safe_name(key[0])
        self._keys: set[int] = set()

    def __len__(self) -> int:
        return len(self._keys)

    @property
    def structure(self) -> str:
        """``hnsw`` on a server with kind hnsw, else ``flat`` (exact)."""
        return "hnsw" if self.backend.remote and self.backend.options.kind == "hnsw" else "flat"

    def _filter(self, keys: Sequence[int] | None = None) -> Any:
        m = _models()
        must: list[Any] = [
            m.FieldCondition(key="version", match=m.MatchValue(value=self.key[0])),
            m.FieldCondition(key="origin", match=m.MatchValue(value=self.key[1] or ""))]
        if keys is not None:
            must.append(m.HasIdCondition(has_id=list(keys)))
        return m.Filter(must=must)

    def clear(self) -> None:
        """Delete every point of this group left in the collection (a fresh group is empty)."""
        m = _models()
        with self.backend.call() as client:
            client.delete(self.backend.name, points_selector=m.FilterSelector(
                filter=self._filter()))
        self._keys.clear()

    def add(self, keys: np.ndarray, vectors: np.ndarray) -> None:
        """Insert or replace the points of ``keys`` with these vectors and their payloads."""
        m = _models()
        keys = check_group_add(keys, vectors, self.dim)
        if len(keys) == 0:
            return
        klist = keys.tolist()
        payloads = self.backend.payloads(klist) if self.backend.payloads is not None else {}
        base = {"version": self.key[0], "origin": self.key[1] or ""}
        with self.backend.call() as client:
            for start in range(0, len(klist), CHUNK):
                part = klist[start:start + CHUNK]
                rows = np.asarray(vectors[start:start + CHUNK], dtype=np.float32)
                client.upsert(self.backend.name, points=[
                    m.PointStruct(id=k, vector={self.vector_name: row.tolist()},
                                  payload={**payloads.get(k, {}), **base})
                    for k, row in zip(part, rows, strict=True)])
        self._keys.update(klist)

    def remove(self, keys: np.ndarray) -> None:
        """Drop the points of ``keys`` that belong to this group (others are ignored)."""
        m = _models()
        present = [int(k) for k in np.asarray(keys).tolist() if int(k) in self._keys]
        if not present:
            return
        with self.backend.call() as client:
            for start in range(0, len(present), CHUNK):
                client.delete(self.backend.name, points_selector=m.FilterSelector(
                    filter=self._filter(present[start:start + CHUNK])))
        self._keys.difference_update(present)

    def search(self, queries: np.ndarray, k: int) -> GroupHits:
        """The ``k`` best keys per query by inner product (cosine for normalised vectors)."""
        m = _models()
        nq = queries.shape[0]
        width = max(k, 0)
        scores = np.full((nq, width), -np.inf, dtype=np.float32)
        keys = np.full((nq, width), -1, dtype=np.int64)
        if len(self) == 0 or k < 1 or nq == 0:
            return GroupHits(scores, keys)
        flt, params = self._filter(), self.backend.search_params()
        requests = [m.QueryRequest(query=q.tolist(), using=self.vector_name, limit=k,
                                   filter=flt, params=params, with_payload=False)
                    for q in np.asarray(queries, dtype=np.float32)]
        with self.backend.call() as client:
            responses = client.query_batch_points(self.backend.name, requests=requests)
        for qi, response in enumerate(responses):
            for j, point in enumerate(response.points[:k]):
                scores[qi, j] = point.score
                keys[qi, j] = int(point.id)
        return GroupHits(scores, keys)

    def vectors_of(self, keys: np.ndarray) -> np.ndarray:
        """The stored vectors of ``keys``. Raises KeyError for a key not in this group."""
        wanted = [int(k) for k in np.asarray(keys).tolist()]
        for k in wanted:
            if k not in self._keys:
                raise KeyError(k)
        if not wanted:
            return np.zeros((0, self.dim), dtype=np.float32)
        with self.backend.call() as client:
            records = client.retrieve(self.backend.name, ids=sorted(set(wanted)),
                                      with_vectors=[self.vector_name], with_payload=False)
        found = {int(r.id): r.vector[self.vector_name] for r in records}
        return np.asarray([found[k] for k in wanted], dtype=np.float32)
