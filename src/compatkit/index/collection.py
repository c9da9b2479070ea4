"""A collection: items with an id, an optional source, JSON metadata and their vectors.

``Collection`` is a light handle (name + store); every method reads or writes the store in one
transaction. While an upgrade from ``vA`` to ``vB`` is under way, an item added or replaced gets
every vector the upgrade needs at once: its ``current`` vector in the serving version, plus its
``previous`` vector in ``vA`` (so a rollback keeps it) or its ``next`` vector in ``vB`` (so a
cold switch includes it).
"""

from __future__ import annotations

import json
import logging
import sqlite3
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from compatkit.errors import IncompatibleSpacesError, UnknownNameError
from compatkit.index.batching import BatchingStore
from compatkit.index.db import (
    count_items,
    item_ids,
    item_row,
    relations,
    require_collection,
    side_versions,
    unknown_message,
    version_map,
)
from compatkit.index.errors import StateConflictError
from compatkit.index.jobs import UpgradeStatus, unfinished_job
from compatkit.index.search import SearchResult
from compatkit.index.slots import (
    NewItem,
    Slot,
    delete_items,
    item_side_versions,
    item_vectors,
    vector_counts,
    write_items,
)
from compatkit.index.upgrade import job_status, latest_job, start_upgrade
from compatkit.index.vectors import as_vectors, from_blob, l2_normalize
from compatkit.index.versions import Relation, VersionInfo, can_search

logger = logging.getLogger(__name__)

MAX_ID_LENGTH = 512
MAX_METADATA_BYTES = 64 * 1024
MAX_K = 10_000
#: Items whose sources are embedded at once by ``add`` (bounds decoded images in memory).
EMBED_CHUNK = 256
_ADD_RETRIES = 5


@dataclass(frozen=True)
class ItemInput:
    """An item to add: an id, an optional source, metadata, and optionally a vector.

    ``vector`` comes with ``version`` (default: the serving version). Without a vector, the
    source is embedded by the serving version's embedder. ``side`` holds side-information
    vectors by side-info version (for transformations that need them).
    """

    id: str
    source: str | None = None
    metadata: Mapping[str, Any] = field(default_factory=dict)
    vector: Any = None
    version: str | None = None
    side: Mapping[str, Any] | None = None


@dataclass(frozen=True)
class StoredVector:
    """One of an item's vectors: its slot, version space, origin and (optionally) values."""

    slot: Slot
    version: str
    transformed_from: str | None
    vector: np.ndarray | None = None


@dataclass(frozen=True)
class Item:
    """A stored item with its vectors (``current`` first)."""

    id: str
    source: str | None
    metadata: dict[str, Any]
    revision: int
    vectors: tuple[StoredVector, ...]
    side_versions: tuple[str, ...] = ()

    @property
    def current(self) -> StoredVector:
        """The vector searches use."""
        return next(v for v in self.vectors if v.slot == "current")


@dataclass(frozen=True)
class AddResult:
    """How many items were inserted and how many replaced an item with the same id."""

    added: int
    replaced: int


@dataclass(frozen=True)
class CollectionStats:
    """Counts of a collection: items, and current vectors per (version, transformed_from)."""

    name: str
    serving_version: str
    index: str
    items: int
    current: dict[str, int]
    kept_previous: int
    pending_next: int
    active_job: int | None


@dataclass(frozen=True)
class _WriteState:
    """What decides which vectors an added item needs (re-checked inside the write)."""

    serving: str
    job: int | None
    job_old: str | None
    job_new: str | None
    strategy: str | None
    side_versions: tuple[str, ...]
    job_state: str | None = None


#: Markers in ``_Prepared.vectors`` for a vector still to embed or to transform.
_EMBED = "<embed>"
_TRANSFORM = "<transform>"
_EMPTY = np.zeros(0, dtype=np.float32)


@dataclass
class _Prepared:
    item: ItemInput
    metadata: str
    vectors: dict[str, tuple[str, str | None, np.ndarray]]  # slot -> (version, tf, vector)
    side: dict[str, np.ndarray]


class Collection:
    """A handle on one collection of an ``IndexStore`` (cheap to create; holds no state)."""

    def __init__(self, store: BatchingStore, name: str) -> None:
        self.store, self.name = store, name

    def __repr__(self) -> str:
        return f"Collection({self.name!r}, store={str(self.store.root)!r})"

    # ------------------------------------------------------------------ reads

    @property
    def serving_version(self) -> str:
        """The version queries are embedded in and new items are embedded with."""
        with self.store.read() as con:
            return require_collection(con, self.name)[0]

    def count(self) -> int:
        """The number of items."""
        with self.store.read() as con:
            return count_items(con, self.name)

    def get(self, item_id: str, *, with_vectors: bool = False) -> Item:
        """The item ``item_id`` with its vectors' slots and versions (values if asked).

        Raises:
            UnknownNameError: no such item.
        """
        with self.store.read() as con:
            require_collection(con, self.name)
            row = item_row(con, self.name, item_id)
            if row is None:
                raise UnknownNameError(f"collection {self.name!r} has no item {item_id!r}")
            key = row[0]
            dims = {v.name: v.dim for v in version_map(con).values()}
            vecs = item_vectors(con, key)
            sides = item_side_versions(con, key)
        order = {"current": 0, "previous": 1, "next": 2}
        vectors = tuple(sorted(
            (StoredVector(slot, version, tf,
                          from_blob(data, dims[version]) if with_vectors else None)
             for slot, version, tf, data in vecs), key=lambda v: order[v.slot]))
        return Item(item_id, row[1], json.loads(row[2]), row[3], vectors, tuple(sides))

    def list_ids(self, *, offset: int = 0, limit: int = 100) -> list[str]:
        """Item ids in insertion order, ``limit`` of them from ``offset``."""
        if offset < 0 or not 1 <= limit <= 10_000:
            raise ValueError(f"offset must be >= 0 and limit in [1, 10000], got {offset}, {limit}")
        with self.store.read() as con:
            require_collection(con, self.name)
            return item_ids(con, self.name, offset, limit)

    def stats(self) -> CollectionStats:
        """Item and vector counts, and the active upgrade job if any."""
        with self.store.read() as con:
            serving, options, _ = require_collection(con, self.name)
            items = count_items(con, self.name)
            rows = vector_counts(con, self.name)
            job = unfinished_job(con, self.name)
        current = {(f"{v}<-{tf}" if tf else v): int(n) for s, v, tf, n in rows if s == "current"}
        return CollectionStats(
            self.name, serving, options.kind, int(items), current,
            sum(int(n) for s, _, _, n in rows if s == "previous"),
            sum(int(n) for s, _, _, n in rows if s == "next"),
            None if job is None else job.id)

    # ------------------------------------------------------------------ search

    def search(
        self, vector: Any = None, *, version: str | None = None, source: str | bytes | None = None,
        k: int = 10, with_metadata: bool = True,
    ) -> SearchResult:
        """Top-k over the whole collection for one query; each hit names the answering version.

        Give either ``vector`` (with its ``version``; default the serving version) or a raw
        ``source`` (embedded by the serving version's embedder).

        Raises:
            ValueError: both or neither query given, bad k, wrong dimension, NaN/inf values.
            UnknownNameError: unknown version.
            IncompatibleSpacesError: the query's version cannot reach some stored vectors.
        """
        if (vector is None) == (source is None):
            raise ValueError("give exactly one of vector or source")
        if source is not None:
            if version is not None:
                raise ValueError("a source query is embedded by the serving version; "
                                 "do not pass version")
            serving = self.serving_version
            vector = self.store.embedder(serving).embed_sources([source])
            version = serving
        return self.search_batch(vector, version=version, k=k, with_metadata=with_metadata)[0]

    def search_batch(
        self, vectors: Any, *, version: str | None = None, k: int = 10,
        with_metadata: bool = True,
    ) -> list[SearchResult]:
        """Top-k for each row of ``vectors`` (nq, d) of one ``version``; see ``search``.

        Runs through the store's ``SearchBatcher``: concurrent calls share batched searches.
        """
        if isinstance(k, bool) or not isinstance(k, int) or not 1 <= k <= MAX_K:
            raise ValueError(f"k must be an integer in [1, {MAX_K}], got {k!r}")
        state = self.store.search_cache(self.name).state()  # no SQLite read if nothing changed
        info = state.version(version or state.serving)
        if info.kind != "model":
            raise ValueError(f"version {info.name!r} is a {info.kind} model; queries must be "
                             "embeddings of a model version")
        queries = as_vectors(vectors, info.dim, what=f"query vectors of version {info.name!r}")
        if info.normalized:  # its model's outputs are unit vectors: so is what a transform sees
            queries = l2_normalize(queries)
        return self.store.search_batcher().search(self.name, queries, info.name, k,
                                                  with_metadata=with_metadata)

    # ------------------------------------------------------------------ writes

    def add(self, items: Sequence[ItemInput], *, embed_chunk: int = EMBED_CHUNK) -> AddResult:
        """Insert or replace items (all or none); an id already present is replaced.

        Every item is checked and embedded first (``embed_chunk`` sources at a time), then all
        are written in one transaction, so a bad item anywhere leaves the collection unchanged.

        Raises:
            ValueError: a bad id, duplicate ids, oversized metadata, a bad vector, or an item
                with neither vector nor source.
            IncompatibleSpacesError: a vector the serving version cannot search.
            StateConflictError: an item cannot get the vector a running upgrade needs.
        """
        items = list(items)
        _check_items(items)
        if not items:
            return AddResult(0, 0)
        for _ in range(_ADD_RETRIES):
            state = self._write_state()
            with self.store.read() as con:
                versions = version_map(con)
            prepared = [self._prepare(it, state, versions) for it in items]  # cheap checks
            step = max(1, embed_chunk)
            for start in range(0, len(items), step):
                self._embed_missing(items[start:start + step], prepared[start:start + step],
                                    state)
            with self.store.write() as con:
                if self._write_state(con) != state:
                    continue  # an upgrade started or switched meanwhile: derive again
                return self._write(con, prepared)
        raise StateConflictError(f"collection {self.name!r} kept changing during the add; retry")

    def delete(self, ids: Sequence[str]) -> int:
        """Delete items by id with all their vectors; returns how many existed."""
        with self.store.write() as con:
            require_collection(con, self.name)
            return delete_items(con, self.name, list(ids))

    # ------------------------------------------------------------------ upgrades

    def start_upgrade(self, new_version: str, **options: Any) -> UpgradeStatus:
        """Start an upgrade to ``new_version``; see ``compatkit.index.upgrade.start_upgrade``."""
        return start_upgrade(self.store, self.name, new_version, **options)

    def upgrade_status(self, job: int | None = None) -> UpgradeStatus:
        """The status of ``job`` (default: the latest job of this collection)."""
        return job_status(self.store, latest_job(self.store, self.name) if job is None else job)

    # ------------------------------------------------------------------ internals

    def _write_state(self, con: sqlite3.Connection | None = None) -> _WriteState:
        if con is None:
            with self.store.read() as c:
                return self._write_state(c)
        serving, _, _ = require_collection(con, self.name)
        job = unfinished_job(con, self.name)
        sides = side_versions(con, self.name)
        if job is None:
            return _WriteState(serving, None, None, None, None, sides)
        return _WriteState(serving, job.id, job.old, job.new, job.strategy, sides, job.state)

    def _slot_targets(self, state: _WriteState) -> dict[str, str]:
        """slot -> the version whose queries must be able to search that slot's vector."""
        targets = {"current": state.serving}
        if state.job is not None and state.job_old is not None and state.job_new is not None:
            if state.serving == state.job_old:
                targets["next"] = state.job_new  # built aside, switched in at completion
            else:
                targets["previous"] = state.job_old  # kept for a rollback
        return targets

    def _prepare(self, it: ItemInput, state: _WriteState,
                 versions: dict[str, VersionInfo]) -> _Prepared:
        meta = json.dumps(dict(it.metadata), sort_keys=True)
        side: dict[str, np.ndarray] = {}
        for sv, vec in (it.side or {}).items():
            info = _known(versions, sv)
            side[sv] = as_vectors(vec, info.dim, what=f"item {it.id!r} side vector {sv!r}")[0]
        given = None
        if it.vector is not None:
            vinfo = _known(versions, it.version or state.serving)
            if vinfo.kind != "model":
                raise ValueError(f"item {it.id!r}: version {vinfo.name!r} is a {vinfo.kind} "
                                 "model; pass side-information under side")
            given = (vinfo.name, as_vectors(it.vector, vinfo.dim,
                                            what=f"item {it.id!r} vector")[0])
        elif it.version is not None:
            raise ValueError(f"item {it.id!r}: version given without a vector")
        return _Prepared(it, meta, {"given": (given[0], None, given[1])} if given else {}, side)

    def _embed_missing(self, items: list[ItemInput], prepared: list[_Prepared],
                       state: _WriteState) -> None:
        """Fill every slot's vector: the given vector where it fits, else embed the source."""
        with self.store.read() as con:
            versions, rels = version_map(con), relations(con)
        targets = self._slot_targets(state)
        embeddable = {t: self.store.has_embedder(t) for t in targets.values()}
        wanted: dict[str, list[int]] = {}  # version (or "side:" + version) -> rows to embed
        for row, p in enumerate(prepared):
            given = p.vectors.pop("given", None)
            for slot, target in targets.items():
                if given is not None and given[0] == target:
                    p.vectors[slot] = given
                elif p.item.source is not None and embeddable[target]:
                    wanted.setdefault(target, []).append(row)
                    p.vectors[slot] = (target, _EMBED, _EMPTY)
                elif given is not None and self._transformable(state, given[0], target,
                                                               rels):
                    p.vectors[slot] = (given[0], _TRANSFORM, given[2])
                elif given is not None and can_search(target, given[0], rels, versions):
                    p.vectors[slot] = given
                else:
                    raise _slot_error(self.name, p.item, slot, target, given, state)
            for sv in state.side_versions:
                if sv not in p.side and p.item.source is not None:
                    wanted.setdefault(f"side:{sv}", []).append(row)
        for target, rows in wanted.items():
            side = target.startswith("side:")
            version = target[len("side:"):] if side else target
            sources = [items[r].source or "" for r in rows]
            vecs = as_vectors(self.store.embedder(version).embed_sources(sources),
                              versions[version].dim, what=f"{version!r} embeddings")
            for r, v in zip(rows, vecs, strict=True):
                if side:
                    prepared[r].side[version] = v
                    continue
                for slot, (ver, tf, _) in list(prepared[r].vectors.items()):
                    if ver == version and tf == _EMBED:
                        prepared[r].vectors[slot] = (version, None, v)
        self._apply_transforms(prepared, state, rels)

    def _transformable(self, state: _WriteState, old: str, target: str,
                       rels: list[Relation]) -> bool:
        return (state.strategy == "transform" and old == state.job_old
                and target == state.job_new
                and any(r.kind == "transform" and r.old == old and r.new == target
                        for r in rels))

    def _apply_transforms(self, prepared: list[_Prepared], state: _WriteState,
                          rels: list[Relation]) -> None:
        rel = next((r for r in rels if r.kind == "transform" and r.old == state.job_old
                    and r.new == state.job_new), None)
        for p in prepared:
            for slot, (ver, tf, vec) in list(p.vectors.items()):
                if tf != _TRANSFORM or rel is None:
                    continue
                side = None
                if rel.side_version is not None:
                    if rel.side_version not in p.side:
                        raise StateConflictError(
                            f"item {p.item.id!r}: the upgrade's transformation needs a "
                            f"{rel.side_version!r} side vector or a source")
                    side = p.side[rel.side_version][None, :]
                out = self.store.transformer(rel).apply(vec[None, :], side)[0]
                p.vectors[slot] = (rel.new, ver, as_vectors(out, len(out))[0])

    def _write(self, con: sqlite3.Connection, prepared: list[_Prepared]) -> AddResult:
        added, replaced = write_items(con, self.name, [
            NewItem(p.item.id, p.item.source, p.metadata, p.vectors, p.side) for p in prepared])
        return AddResult(added, replaced)


def _known(versions: dict[str, VersionInfo], name: str) -> VersionInfo:
    if name not in versions:
        raise UnknownNameError(unknown_message("version", name, sorted(versions)))
    return versions[name]


def _check_items(items: list[ItemInput]) -> None:
    seen: set[str] = set()
    for it in items:
        if not isinstance(it.id, str) or not it.id or len(it.id) > MAX_ID_LENGTH:
            raise ValueError(f"item id must be a non-empty string of at most {MAX_ID_LENGTH} "
                             f"characters, got {it.id!r}")
        if it.id in seen:
            raise ValueError(f"item id {it.id!r} appears twice in one request")
        seen.add(it.id)
        if it.source is not None and (not isinstance(it.source, str) or not it.source):
            raise ValueError(f"item {it.id!r}: source must be a non-empty string or None")
        if not isinstance(it.metadata, Mapping):
            raise ValueError(f"item {it.id!r}: metadata must be a JSON object")
        try:
            size = len(json.dumps(dict(it.metadata)))
        except (TypeError, ValueError, RecursionError) as err:
            raise ValueError(f"item {it.id!r}: metadata is not JSON-serialisable ({err})") from None
        if size > MAX_METADATA_BYTES:
            raise ValueError(f"item {it.id!r}: metadata is {size} bytes, at most "
                             f"{MAX_METADATA_BYTES} allowed")
        if it.vector is None and it.source is None:
            raise ValueError(f"item {it.id!r} needs a vector or a source")


def _slot_error(collection: str, it: ItemInput, slot: str, target: str,
                given: tuple[str, np.ndarray] | None, state: _WriteState) -> Exception:
    have = f"a vector of version {given[0]!r}" if given else "no vector"
    src = "a source" if it.source is not None else "no source"
    if slot == "current":
        if given is not None:
            return IncompatibleSpacesError(
                f"item {it.id!r}: the serving version {target!r} cannot search a vector of "
                f"version {given[0]!r} (no declared relation), and the item has {src} that "
                f"{target!r} can embed")
        return StateConflictError(f"item {it.id!r}: version {target!r} has no embedder for its "
                                  "source; add the item with a vector")
    why = ("so that a rollback keeps it" if slot == "previous"
           else "to be switched in when the upgrade completes")
    if state.job_state == "completed":
        finish = (f"or finalize upgrade job {state.job} first (`compatkit index finalize "
                  f"{collection} --job {state.job}` or POST /collections/{collection}/upgrades/"
                  f"{state.job}/finalize; it can then no longer be rolled back)")
    else:
        finish = (f"or wait until upgrade job {state.job} completes and finalize it "
                  f"(`compatkit index finalize {collection} --job {state.job}`)")
    return StateConflictError(
        f"item {it.id!r}: upgrade job {state.job} ({state.job_old} -> {state.job_new}) is "
        f"{state.job_state} and needs a vector that {target!r} can search, {why}; the item has "
        f"{have} and {src} that {target!r} can embed. Add it with a source or a {target!r} "
        f"vector, {finish}")
