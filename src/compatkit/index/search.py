"""Search over a whole collection: one group per (version space, origin), merged top-k.

A ``SearchCache`` mirrors the ``current`` vectors of one collection into the groups of its
search backend (``compatkit.index.backends``: FAISS ``VectorGroup``s, or Qdrant). It
replays the store's ``changes`` log before every search (or rebuilds after a whole-collection
rewrite), so a search sees every write committed before it started, whichever process wrote it.
"""

from __future__ import annotations

import json
import logging
import threading
from collections import defaultdict
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np

from compatkit.index.backends import BackendOptions, GroupIndex, SearchBackend, open_backend
from compatkit.index.store import _relations, _require_collection, _version_map, last_change
from compatkit.index.vectors import l2_normalize, stack_blobs
from compatkit.index.versions import Relation, Route, VersionInfo, find_route

if TYPE_CHECKING:
    from compatkit.index.store import IndexStore

logger = logging.getLogger(__name__)

#: (version whose space the vectors are in, version they were transformed from or None).
GroupKey = tuple[str, str | None]

_IN_CHUNK = 500


@dataclass(frozen=True)
class Hit:
    """One search result: the item, its cosine score, and which vector answered.

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
class _DbState:
    """What one search needs to know about the database, read in one snapshot."""

    serving: str
    options: BackendOptions
    epoch: int
    last_seq: int
    pruned_seq: int
    versions: dict[str, VersionInfo]
    relations: list[Relation]


class SearchCache:
    """Per-process search structures of one collection, kept in step with the database.

    Searches run concurrently (FAISS releases the GIL); bringing the structures up to date
    takes them exclusively, and only when the database changed.
    """

    def __init__(self, store: IndexStore, name: str) -> None:
        self.store, self.name = store, name
        self._lock = _ReadWriteLock()
        self._groups: dict[GroupKey, GroupIndex] = {}
        self._backend: SearchBackend | None = None
        self._where: dict[int, GroupKey] = {}
        self._epoch: int | None = None
        self._options: BackendOptions | None = None
        self._last_seq = 0

    def search(
        self, queries: np.ndarray, query_version: str, k: int,
    ) -> list[list[tuple[float, int, GroupKey]]]:
        """Top-k (score, item key, group) per query over every group, best first.

        Every write committed before the call is visible. Shapes: queries (nq, d) float32,
        checked by the caller against ``query_version``.

        Raises:
            IncompatibleSpacesError: a non-empty group is in a space the query version cannot
                reach through a declared relation (both versions named).
        """
        state = self._db_state()
        self._catch_up(state)
        per_query: list[list[tuple[float, int, GroupKey]]] = [[] for _ in range(len(queries))]
        with self._lock.read():
            spaces: dict[str, np.ndarray] = {}
            for gkey, group in self._groups.items():
                if len(group) == 0:
                    continue
                version = gkey[0]
                if version not in spaces:
                    route = find_route(query_version, version, state.relations, state.versions)
                    spaces[version] = self._to_space(queries, route)
                hits = group.search(spaces[version], min(k, len(group)))
                for qi in range(len(queries)):
                    for score, key in zip(hits.scores[qi].tolist(), hits.keys[qi].tolist(),
                                          strict=True):
                        if key >= 0:
                            per_query[qi].append((score, key, gkey))
        return [sorted(rows, key=lambda r: (-r[0], r[1]))[:k] for rows in per_query]

    def _to_space(self, queries: np.ndarray, route: Route) -> np.ndarray:
        if route.via == "transform" and route.relation is not None:
            queries = self.store.transformer(route.relation).apply(queries)
        return l2_normalize(queries)

    # ------------------------------------------------------------- keeping in step

    def _db_state(self) -> _DbState:
        with self.store.read() as con:
            serving, options, epoch = _require_collection(con, self.name)
            row = con.execute("SELECT value FROM meta WHERE key='pruned_seq'").fetchone()
            return _DbState(serving, options, epoch, last_change(con, self.name),
                            int(row[0]) if row else 0, _version_map(con), _relations(con))

    def _stale(self, state: _DbState) -> bool:
        return (state.epoch != self._epoch or state.options != self._options
                or self._last_seq < state.last_seq or self._last_seq < state.pruned_seq)

    def _catch_up(self, state: _DbState) -> None:
        """Bring the structures at least to ``state`` (no-op when they already are)."""
        if not self._stale(state):
            return
        with self._lock.write():
            if not self._stale(state):
                return  # another thread caught up meanwhile
            with self.store.read() as con:
                _, options, epoch = _require_collection(con, self.name)
                row = con.execute("SELECT value FROM meta WHERE key='pruned_seq'").fetchone()
                pruned = int(row[0]) if row else 0
                if epoch != self._epoch or options != self._options or self._last_seq < pruned:
                    self._rebuild(con, options, _version_map(con))
                    self._epoch, self._options = epoch, options
                else:
                    self._replay(con, _version_map(con))

    def _rebuild(self, con: Any, options: BackendOptions,
                 versions: dict[str, VersionInfo]) -> None:
        row = con.execute("SELECT seq FROM sqlite_sequence WHERE name='changes'").fetchone()
        self._last_seq = int(row[0]) if row else 0
        rows = con.execute(
            "SELECT v.item, v.version, v.transformed_from, v.data FROM vectors v "
            "JOIN items i ON i.key = v.item WHERE i.collection=? AND v.slot='current'",
            (self.name,)).fetchall()
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
        changed = con.execute("SELECT seq, item FROM changes WHERE collection=? AND seq > ? "
                              "ORDER BY seq", (self.name, self._last_seq)).fetchall()
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
        rows = []
        for start in range(0, len(keys), _IN_CHUNK):
            chunk = keys[start:start + _IN_CHUNK]
            marks = ",".join("?" * len(chunk))
            rows += con.execute(
                f"SELECT item, version, transformed_from, data FROM vectors "
                f"WHERE slot='current' AND item IN ({marks})", chunk).fetchall()
        self._add_rows(rows, versions)

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


def fetch_hits(
    store: IndexStore, rows: list[tuple[float, int, GroupKey]], *, with_metadata: bool = True,
) -> tuple[Hit, ...]:
    """Turn (score, key, group) rows into ``Hit``s; items deleted since the search are dropped."""
    if not rows:
        return ()
    keys = [r[1] for r in rows]
    marks = ",".join("?" * len(keys))
    with store.read() as con:
        found = {int(r[0]): (r[1], r[2]) for r in con.execute(
            f"SELECT key, id, metadata FROM items WHERE key IN ({marks})", keys)}
    hits = []
    for score, key, (version, tf) in rows:
        if key in found:
            item_id, meta = found[key]
            hits.append(Hit(item_id, float(score), version, tf,
                            json.loads(meta) if with_metadata else {}))
    return tuple(hits)
