"""Search over a whole collection: one group per (version space, origin), merged top-k.

A ``SearchCache`` mirrors the ``current`` vectors of one collection into the groups of its
search backend (``compatkit.index.backends``: FAISS ``VectorGroup``s, or Qdrant). Before every
search it reads the store's change token (``Database.change_token``, one cheap read); only when
the token moved does it re-read the collection's state and replay the ``changes`` log (or
rebuild after a whole-collection rewrite). So a search sees every write committed before it
started, whichever process wrote it, without a SQLite transaction per request when nothing
changed.

Each group returns ``k + RESCORE_MARGIN`` candidates, which are rescored exactly (float64 dot
products of the stored vectors, one pair at a time) and ordered by (score desc, key asc): the
answer of a query is the same whether it was searched alone or in a batch of any size.
"""

from __future__ import annotations

import json
import logging
import threading
from collections import defaultdict
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np

from compatkit.errors import UnknownNameError
from compatkit.index.backends import open_backend
from compatkit.index.db import (
    Database,
    Store,
    changes_since,
    item_rows,
    last_change,
    last_seq,
    pruned_seq,
    relations,
    require_collection,
    unknown_message,
    version_map,
)
from compatkit.index.options import BackendOptions, GroupIndex, GroupKey, SearchBackend
from compatkit.index.slots import current_vectors
from compatkit.index.vectors import l2_normalize, stack_blobs
from compatkit.index.versions import Relation, Route, VersionInfo, find_route

logger = logging.getLogger(__name__)

#: Candidates per group beyond ``k`` that are rescored exactly before the top-k is cut.
RESCORE_MARGIN = 16


@dataclass(frozen=True)
class Hit:
    """One search result: the item, its cosine score, and which vector answered.

    A vector reached through a query adapter with a score calibration (``Relation``) scores
    the calibrated cosine, on the query version's own scale.

    ``version`` is the space of the vector that matched; ``transformed_from`` names the version
    it was transformed from (None for a vector embedded natively).
    """

    id: str
    score: float
    version: str
    transformed_from: str | None
    metadata: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class SearchResult:
    """The merged top-k of one query, best first, and the version the query was in."""

    query_version: str
    hits: tuple[Hit, ...]


class _ReadWriteLock:
    """Many readers or one writer; a waiting writer holds back new readers."""

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._readers = 0
        self._writer = False
        self._writers_waiting = 0

    @contextmanager
    def read(self) -> Iterator[None]:
        with self._cond:
            while self._writer or self._writers_waiting:
                self._cond.wait()
            self._readers += 1
        try:
            yield
        finally:
            with self._cond:
                self._readers -= 1
                if not self._readers:
                    self._cond.notify_all()

    @contextmanager
    def write(self) -> Iterator[None]:
        with self._cond:
            self._writers_waiting += 1
            while self._writer or self._readers:
                self._cond.wait()
            self._writers_waiting -= 1
            self._writer = True
        try:
            yield
        finally:
            with self._cond:
                self._writer = False
                self._cond.notify_all()


@dataclass(frozen=True)
class CollectionState:
    """What a search needs to know about the database, read in one snapshot after ``token``.

    Still current while ``Database.change_token()`` returns ``token``.
    """

    token: int
    serving: str
    options: BackendOptions
    epoch: int
    last_seq: int
    pruned_seq: int
    versions: dict[str, VersionInfo]
    relations: list[Relation]

    def version(self, name: str) -> VersionInfo:
        """The registered version ``name``. Raises UnknownNameError (with close names)."""
        info = self.versions.get(name)
        if info is None:
            raise UnknownNameError(unknown_message("version", name, list(self.versions)))
        return info


class SearchCache:
    """Per-process search structures of one collection, kept in step with the database.

    Searches run concurrently (FAISS releases the GIL); bringing the structures up to date
    takes them exclusively, and only when the database changed.
    """

    def __init__(self, store: Store, name: str) -> None:
        self.store, self.name = store, name
        self._lock = _ReadWriteLock()
        self._groups: dict[GroupKey, GroupIndex] = {}
        self._backend: SearchBackend | None = None
        self._where: dict[int, GroupKey] = {}
        self._epoch: int | None = None
        self._options: BackendOptions | None = None
        self._last_seq = 0
        self._state: CollectionState | None = None

    def state(self) -> CollectionState:
        """The collection's state as of now: the cached one while the change token holds, else
        read afresh. Raises UnknownNameError when the collection no longer exists."""
        token = self.store.change_token()  # before the read: a commit after it moves the token
        known = self._state
        if known is not None and known.token == token:
            return known
        with self.store.read() as con:
            serving, options, epoch = require_collection(con, self.name)
            state = CollectionState(token, serving, options, epoch, last_change(con, self.name),
                                    pruned_seq(con), version_map(con), relations(con))
        self._state = state
        return state

    def search(
        self, queries: np.ndarray, query_version: str, k: int,
    ) -> list[list[tuple[float, int, GroupKey]]]:
        """Top-k (score, item key, group) per query over every group, best first.

        Every write committed before the call is visible. Shapes: queries (nq, d) float32,
        checked by the caller against ``query_version``. Scores are exact cosines (float64
        dot products of the normalised vectors); ties go to the smaller key.

        Raises:
            IncompatibleSpacesError: a non-empty group is in a space the query version cannot
                reach through a declared relation (both versions named).
        """
        state = self.state()
        self._catch_up(state)
        per_query: list[list[tuple[float, int, GroupKey]]] = [[] for _ in range(len(queries))]
        with self._lock.read():
            spaces: dict[str, np.ndarray] = {}
            routes: dict[str, Route] = {}
            for gkey, group in self._groups.items():
                if len(group) == 0:
                    continue
                version = gkey[0]
                if version not in spaces:
                    routes[version] = find_route(query_version, version, state.relations,
                                                 state.versions)
                    spaces[version] = self._to_space(queries, routes[version])
                hits = group.search(spaces[version], min(k + RESCORE_MARGIN, len(group)))
                scores = calibrated_scores(exact_scores(spaces[version], hits.keys, group),
                                           routes[version])
                for qi in range(len(queries)):
                    for score, key in zip(scores[qi].tolist(), hits.keys[qi].tolist(),
                                          strict=True):
                        if key >= 0:
                            per_query[qi].append((score, key, gkey))
        return [sorted(rows, key=lambda r: (-r[0], r[1]))[:k] for rows in per_query]

    def _to_space(self, queries: np.ndarray, route: Route) -> np.ndarray:
        if route.via == "transform" and route.relation is not None:
            queries = self.store.transformer(route.relation).apply(queries)
        return l2_normalize(queries)

    # ------------------------------------------------------------- keeping in step

    def _stale(self, state: CollectionState) -> bool:
        return (state.epoch != self._epoch or state.options != self._options
                or self._last_seq < state.last_seq or self._last_seq < state.pruned_seq)

    def _catch_up(self, state: CollectionState) -> None:
        """Bring the structures at least to ``state`` (no-op when they already are)."""
        if not self._stale(state):
            return
        with self._lock.write():
            if not self._stale(state):
                return  # another thread caught up meanwhile
            with self.store.read() as con:
                _, options, epoch = require_collection(con, self.name)
                pruned = pruned_seq(con)
                if epoch != self._epoch or options != self._options or self._last_seq < pruned:
                    self._rebuild(con, options, version_map(con))
                    self._epoch, self._options = epoch, options
                else:
                    self._replay(con, version_map(con))

    def _rebuild(self, con: Any, options: BackendOptions,
                 versions: dict[str, VersionInfo]) -> None:
        self._last_seq = last_seq(con)
        rows = current_vectors(con, self.name)
        self._groups, self._where = {}, {}
        self._options = options
        if self._backend is not None:
            self._backend.close()
        self._backend = open_backend(self.store, self.name, options)
        self._backend.reset({v.name: v.dim for v in versions.values() if v.kind == "model"})
        self._add_rows(rows, versions)
        logger.info("search cache of %r rebuilt: %d vectors in %d groups", self.name,
                    len(rows), len(self._groups))

    def _replay(self, con: Any, versions: dict[str, VersionInfo]) -> None:
        changed = changes_since(con, self.name, self._last_seq)
        if not changed:
            return
        self._last_seq = int(changed[-1][0])
        keys = sorted({int(r[1]) for r in changed})
        by_group: dict[GroupKey, list[int]] = defaultdict(list)
        for key in keys:
            gkey = self._where.pop(key, None)
            if gkey is not None:
                by_group[gkey].append(key)
        for gkey, gkeys in by_group.items():
            self._groups[gkey].remove(np.asarray(gkeys, dtype=np.int64))
        self._add_rows(current_vectors(con, self.name, keys), versions)

    def _add_rows(self, rows: list[Any], versions: dict[str, VersionInfo]) -> None:
        grouped: dict[GroupKey, tuple[list[int], list[bytes]]] = defaultdict(lambda: ([], []))
        for key, version, tf, data in rows:
            keys, blobs = grouped[(version, tf)]
            keys.append(int(key))
            blobs.append(data)
        for gkey, (keys, blobs) in grouped.items():
            dim = versions[gkey[0]].dim
            group = self._groups.get(gkey)
            if group is None:
                if self._backend is None:
                    raise RuntimeError(f"search cache of {self.name!r} has no backend yet")
                group = self._groups[gkey] = self._backend.group(gkey, dim)
            group.add(np.asarray(keys, dtype=np.int64), l2_normalize(stack_blobs(blobs, dim)))
            self._where.update(dict.fromkeys(keys, gkey))


def calibrated_scores(scores: np.ndarray, route: Route) -> np.ndarray:
    """A group's scores on the query version's own scale: those of a query adapter with a
    stored score calibration are mapped by it (before the groups are merged), others kept."""
    rel = route.relation if route.via == "transform" else None
    if rel is None or rel.calibration is None:
        return scores
    return rel.calibration.apply(scores)


class SearchStore(Store, Protocol):
    """A store that keeps a search cache per collection (``IndexStore``)."""

    def search_cache(self, name: str) -> SearchCache: ...


def exact_scores(queries: np.ndarray, keys: np.ndarray, group: GroupIndex) -> np.ndarray:
    """Cosine of each query with each candidate, in float64 one pair at a time (the same
    value whatever else is in the batch); -inf where ``keys`` is -1.

    Shapes: queries (nq, d) normalised, keys (nq, c) int64 -> (nq, c) float64.
    """
    out = np.full(keys.shape, -np.inf)
    found = keys >= 0
    if not found.any():
        return out
    rows = np.nonzero(found)[0]
    vectors = group.vectors_of(keys[found]).astype(np.float64)
    out[found] = (vectors * queries[rows].astype(np.float64)).sum(axis=1)
    return out


def fetch_hits(
    db: Database, rows: list[tuple[float, int, GroupKey]], *, with_metadata: bool = True,
) -> tuple[Hit, ...]:
    """Turn (score, key, group) rows into ``Hit``s; items deleted since the search are dropped."""
    return fetch_hits_batch(db, [rows], with_metadata=[with_metadata])[0]


def fetch_hits_batch(
    db: Database, results: list[list[tuple[float, int, GroupKey]]], *,
    with_metadata: list[bool],
) -> list[tuple[Hit, ...]]:
    """``fetch_hits`` for many results with one read of the items they name.

    ``with_metadata[i]`` says whether result ``i``'s hits carry their decoded metadata.
    """
    keys = sorted({r[1] for rows in results for r in rows})
    if not keys:
        return [() for _ in results]
    with db.read() as con:
        found = item_rows(con, keys)
    out = []
    for rows, meta_wanted in zip(results, with_metadata, strict=True):
        hits = []
        for score, key, (version, tf) in rows:
            row = found.get(key)
            if row is not None:
                hits.append(Hit(row[0], float(score), version, tf,
                                json.loads(row[3]) if meta_wanted else {}))
        out.append(tuple(hits))
    return out
