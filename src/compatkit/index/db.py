"""The database: one SQLite file (WAL) for versions, relations, items, vectors, jobs.

Every vector is a float32 BLOB in the same row-set and the same transaction as its item, so a
crash (``kill -9`` at any point) leaves either the whole write or none of it. An item has at
most one vector per slot (``UNIQUE (item, slot)``):

- ``current``: the vector searches use;
- ``previous``: the vector it had before an upgrade rewrote it, kept until the upgrade is
  finalised so that a rollback restores it;
- ``next``: a vector built aside by a cold upgrade, switched in when the upgrade completes.

This module holds the schema, the connections and transactions, the rows of the registry
(versions, relations, collections, side versions), item rows, and the ``changes`` log that
search caches replay. Vector rows are written only by ``compatkit.index.slots``, job rows only
by ``compatkit.index.jobs``.
"""

from __future__ import annotations

import difflib
import json
import secrets
import sqlite3
import threading
import time
from collections.abc import Iterable, Iterator, Sequence
from contextlib import AbstractContextManager, contextmanager
from pathlib import Path
from typing import Literal, Protocol

from compatkit.errors import CompatkitError, UnknownNameError
from compatkit.index.embedders import ArtifactTransform, Embedder
from compatkit.index.errors import StateConflictError
from compatkit.index.options import BackendOptions
from compatkit.index.versions import Relation, VersionInfo
from compatkit.score_calibration import ScoreCalibration

DB_NAME = "index.sqlite3"
SCHEMA_VERSION = "2"
#: The ``changes`` log keeps at least this many recent entries; caches older than that rebuild.
KEEP_CHANGES = 500_000
#: The log is pruned when its sequence number crosses a multiple of this.
PRUNE_EVERY = 100_000

SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS versions (
    name TEXT PRIMARY KEY,
    dim INTEGER NOT NULL CHECK (dim > 0),
    normalized INTEGER NOT NULL,
    kind TEXT NOT NULL CHECK (kind IN ('model', 'side_info')),
    embedder TEXT NOT NULL,
    created REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS relations (
    kind TEXT NOT NULL CHECK (kind IN ('compatible', 'transform')),
    old TEXT NOT NULL,
    new TEXT NOT NULL,
    artifact TEXT,
    side_version TEXT,
    origin TEXT NOT NULL,
    created REAL NOT NULL,
    calibration TEXT,
    PRIMARY KEY (kind, old, new)
);
CREATE TABLE IF NOT EXISTS collections (
    name TEXT PRIMARY KEY,
    serving_version TEXT NOT NULL REFERENCES versions(name),
    options TEXT NOT NULL,
    epoch INTEGER NOT NULL DEFAULT 0,
    created REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS items (
    key INTEGER PRIMARY KEY AUTOINCREMENT,
    collection TEXT NOT NULL REFERENCES collections(name) ON DELETE CASCADE,
    id TEXT NOT NULL,
    source TEXT,
    metadata TEXT NOT NULL,
    revision INTEGER NOT NULL DEFAULT 1,
    created REAL NOT NULL,
    updated REAL NOT NULL,
    UNIQUE (collection, id)
);
CREATE TABLE IF NOT EXISTS vectors (
    item INTEGER NOT NULL REFERENCES items(key) ON DELETE CASCADE,
    slot TEXT NOT NULL CHECK (slot IN ('current', 'previous', 'next')),
    version TEXT NOT NULL,
    transformed_from TEXT,
    data BLOB NOT NULL,
    UNIQUE (item, slot)
);
CREATE TABLE IF NOT EXISTS side_vectors (
    item INTEGER NOT NULL REFERENCES items(key) ON DELETE CASCADE,
    version TEXT NOT NULL,
    data BLOB NOT NULL,
    PRIMARY KEY (item, version)
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS changes (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    collection TEXT NOT NULL,
    item INTEGER NOT NULL
);
CREATE INDEX IF NOT EXISTS changes_by_collection ON changes (collection, seq);
CREATE TABLE IF NOT EXISTS jobs (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    collection TEXT NOT NULL REFERENCES collections(name) ON DELETE CASCADE,
    old_version TEXT NOT NULL,
    new_version TEXT NOT NULL,
    strategy TEXT NOT NULL,
    ordering TEXT NOT NULL,
    options TEXT NOT NULL,
    state TEXT NOT NULL
        CHECK (state IN ('running', 'paused', 'completed', 'rolled_back', 'finalized')),
    phases TEXT NOT NULL,
    phase_index INTEGER NOT NULL DEFAULT 0,
    phase_ready INTEGER NOT NULL DEFAULT 0,
    created REAL NOT NULL,
    updated REAL NOT NULL,
    finished REAL
);
CREATE INDEX IF NOT EXISTS jobs_by_collection ON jobs (collection, state);
CREATE TABLE IF NOT EXISTS job_order (
    job INTEGER NOT NULL REFERENCES jobs(id) ON DELETE CASCADE,
    phase INTEGER NOT NULL,
    position INTEGER NOT NULL,
    item INTEGER NOT NULL,
    PRIMARY KEY (job, phase, position)
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS job_phases (
    job INTEGER NOT NULL REFERENCES jobs(id) ON DELETE CASCADE,
    phase INTEGER NOT NULL,
    total INTEGER NOT NULL,
    skipped INTEGER NOT NULL,
    batch_size INTEGER NOT NULL,
    next_batch INTEGER NOT NULL DEFAULT 0,
    done INTEGER NOT NULL DEFAULT 0,
    written INTEGER NOT NULL DEFAULT 0,
    failed INTEGER NOT NULL DEFAULT 0,
    started REAL NOT NULL,
    PRIMARY KEY (job, phase)
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS job_batches (
    job INTEGER NOT NULL REFERENCES jobs(id) ON DELETE CASCADE,
    phase INTEGER NOT NULL,
    batch INTEGER NOT NULL,
    state TEXT NOT NULL CHECK (state IN ('claimed', 'committed')),
    worker TEXT NOT NULL,
    items BLOB NOT NULL,
    size INTEGER NOT NULL,
    claimed REAL NOT NULL,
    committed REAL,
    PRIMARY KEY (job, phase, batch)
) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS job_batches_by_state ON job_batches (job, phase, state);
"""


#: Statements that bring a store of schema version ``key`` to the next version, in order.
MIGRATIONS: dict[str, tuple[str, tuple[str, ...]]] = {
    # 1 -> 2: a query adapter's score calibration stored with its relation
    "1": ("2", ("ALTER TABLE relations ADD COLUMN calibration TEXT",)),
}


#: Items per ``IN (...)`` list.
IN_CHUNK = 500


class Database:
    """The SQLite database of a store folder (created with its schema if missing).

    Safe to share between threads (one SQLite connection per thread) and to open from several
    processes at once (WAL; writers wait up to ``busy_timeout_s``).
    """

    def __init__(self, root: str | Path, *, synchronous: Literal["FULL", "NORMAL"] = "FULL",
                 busy_timeout_s: float = 30.0) -> None:
        if synchronous not in ("FULL", "NORMAL"):
            raise ValueError(f"synchronous must be 'FULL' or 'NORMAL', got {synchronous!r}")
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)
        self.path = self.root / DB_NAME
        self.synchronous = synchronous
        self.busy_timeout_s = busy_timeout_s
        self._local = threading.local()
        self._connections: list[sqlite3.Connection] = []
        self._lock = threading.Lock()
        self._watcher: sqlite3.Connection | None = None
        self._watch_lock = threading.Lock()
        with self.write() as con:
            for statement in SCHEMA.split(";"):
                if statement.strip():
                    con.execute(statement)
            con.execute("INSERT OR IGNORE INTO meta VALUES ('schema_version', ?)",
                        (SCHEMA_VERSION,))
            found = migrate(con)
        if found != SCHEMA_VERSION:
            raise CompatkitError(f"{self.path} has schema version {found}, this code reads "
                                 f"{SCHEMA_VERSION}")

    def _con(self) -> sqlite3.Connection:
        con = getattr(self._local, "con", None)
        if con is None:
            con = sqlite3.connect(self.path, isolation_level=None, timeout=self.busy_timeout_s,
                                  check_same_thread=False)
            con.execute("PRAGMA journal_mode=WAL")
            con.execute(f"PRAGMA synchronous={self.synchronous}")
            con.execute("PRAGMA foreign_keys=ON")
            self._local.con = con
            with self._lock:
                self._connections.append(con)
        return con

    @contextmanager
    def write(self) -> Iterator[sqlite3.Connection]:
        """A write transaction (``BEGIN IMMEDIATE``): committed on exit, rolled back on error."""
        con = self._con()
        con.execute("BEGIN IMMEDIATE")
        try:
            yield con
        except BaseException:
            con.execute("ROLLBACK")
            raise
        con.execute("COMMIT")

    @contextmanager
    def read(self) -> Iterator[sqlite3.Connection]:
        """A read transaction: every query inside sees one consistent snapshot."""
        con = self._con()
        con.execute("BEGIN")
        try:
            yield con
        finally:
            con.execute("COMMIT")

    @contextmanager
    def snapshot(self) -> Iterator[sqlite3.Connection]:
        """This thread's open transaction if there is one (its snapshot), else a new read."""
        con = self._con()
        if con.in_transaction:
            yield con
            return
        with self.read() as fresh:
            yield fresh

    def change_token(self) -> int:
        """A number that changes whenever any connection, of any process, commits a write.

        One cheap read (``PRAGMA data_version`` on a connection of its own that never writes):
        a token read before a read transaction, and equal to one read later, proves that
        nothing was committed in between, so what that transaction saw is still current.
        """
        with self._watch_lock:
            if self._watcher is None:
                self._watcher = sqlite3.connect(self.path, isolation_level=None,
                                                timeout=self.busy_timeout_s,
                                                check_same_thread=False)
            return int(self._watcher.execute("PRAGMA data_version").fetchone()[0])

    def close(self) -> None:
        """Close every connection this object opened (in any thread)."""
        with self._watch_lock:
            if self._watcher is not None:
                self._watcher.close()
                self._watcher = None
        with self._lock:
            for con in self._connections:
                con.close()
            self._connections.clear()
            self._local = threading.local()


def migrate(con: sqlite3.Connection) -> str:
    """Bring an older store's schema to ``SCHEMA_VERSION`` in the caller's transaction;
    returns the schema version found at the end (a newer one is left alone)."""
    found = con.execute("SELECT value FROM meta WHERE key='schema_version'").fetchone()[0]
    while found in MIGRATIONS:
        found, statements = MIGRATIONS[found]
        for statement in statements:
            con.execute(statement)
        con.execute("UPDATE meta SET value=? WHERE key='schema_version'", (found,))
    return found


class Store(Protocol):
    """What the layers under ``IndexStore`` use of it: its database and its versions' models."""

    root: Path

    def read(self) -> AbstractContextManager[sqlite3.Connection]: ...

    def write(self) -> AbstractContextManager[sqlite3.Connection]: ...

    def snapshot(self) -> AbstractContextManager[sqlite3.Connection]: ...

    def change_token(self) -> int: ...

    def version(self, name: str) -> VersionInfo: ...

    def relations(self) -> list[Relation]: ...

    def embedder(self, version: str) -> Embedder: ...

    def has_embedder(self, version: str) -> bool: ...

    def transformer(self, relation: Relation) -> ArtifactTransform: ...


def in_chunks(keys: Sequence, chunk: int = IN_CHUNK) -> Iterator[tuple[Sequence, str]]:
    """(part of ``keys``, its ``?,?,...`` placeholders) for queries with an ``IN`` list."""
    for start in range(0, len(keys), chunk):
        part = keys[start:start + chunk]
        yield part, ",".join("?" * len(part))


def unknown_message(kind: str, name: str, names: Sequence[str]) -> str:
    """``unknown <kind> '<name>'`` plus the closest known names, if any."""
    close = difflib.get_close_matches(name, list(names), n=3, cutoff=0.5)
    hint = f"; did you mean {', '.join(close)}?" if close else ""
    return f"unknown {kind} {name!r}{hint}"


# --------------------------------------------------------------------- versions, relations


def _version_info(row: Sequence) -> VersionInfo:
    return VersionInfo(row[0], int(row[1]), bool(row[2]), row[3], json.loads(row[4]))


def version_row(con: sqlite3.Connection, name: str) -> VersionInfo | None:
    """The registered version ``name``, or None."""
    row = con.execute("SELECT name, dim, normalized, kind, embedder FROM versions WHERE name=?",
                      (name,)).fetchone()
    return None if row is None else _version_info(row)


def require_version(con: sqlite3.Connection, name: str) -> VersionInfo:
    """The registered version ``name``. Raises UnknownNameError (with close names)."""
    info = version_row(con, name)
    if info is None:
        names = [r[0] for r in con.execute("SELECT name FROM versions ORDER BY name")]
        raise UnknownNameError(unknown_message("version", name, names))
    return info


def version_map(con: sqlite3.Connection) -> dict[str, VersionInfo]:
    """Every registered version by name (sorted)."""
    rows = con.execute("SELECT name, dim, normalized, kind, embedder FROM versions "
                       "ORDER BY name").fetchall()
    return {r[0]: _version_info(r) for r in rows}


def insert_version(con: sqlite3.Connection, info: VersionInfo) -> None:
    """Register ``info`` (the caller checked that the name is free)."""
    con.execute("INSERT INTO versions VALUES (?, ?, ?, ?, ?, ?)",
                (info.name, info.dim, int(info.normalized), info.kind,
                 json.dumps(info.embedder), time.time()))


def relations(con: sqlite3.Connection) -> list[Relation]:
    """Every declared relation, by kind, old and new version."""
    rows = con.execute("SELECT kind, old, new, artifact, side_version, origin, calibration "
                       "FROM relations ORDER BY kind, old, new").fetchall()
    return [Relation(*r[:6], calibration=None if r[6] is None else
                     ScoreCalibration.from_json(json.loads(r[6]))) for r in rows]


def insert_relation(con: sqlite3.Connection, rel: Relation) -> None:
    """Declare ``rel`` (idempotent). Raises StateConflictError if another one is declared."""
    row = con.execute("SELECT artifact, side_version FROM relations WHERE kind=? AND old=? AND "
                      "new=?", (rel.kind, rel.old, rel.new)).fetchone()
    if row is not None:
        if tuple(row) != (rel.artifact, rel.side_version):
            raise StateConflictError(f"a different {rel.kind} relation {rel.old} -> {rel.new} "
                                     "is already declared")
        return
    con.execute("INSERT INTO relations VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                (rel.kind, rel.old, rel.new, rel.artifact, rel.side_version, rel.origin,
                 time.time(), _calibration_json(rel.calibration)))


def set_calibration(con: sqlite3.Connection, rel: Relation,
                    calibration: ScoreCalibration | None) -> None:
    """Store (or, with None, remove) the score calibration of the declared relation ``rel``."""
    con.execute("UPDATE relations SET calibration=? WHERE kind=? AND old=? AND new=?",
                (_calibration_json(calibration), rel.kind, rel.old, rel.new))


def _calibration_json(calibration: ScoreCalibration | None) -> str | None:
    return None if calibration is None else json.dumps(calibration.to_json())


# --------------------------------------------------------------------- collections


def require_collection(con: sqlite3.Connection, name: str) -> tuple[str, BackendOptions, int]:
    """(serving version, options, epoch) of ``name``. Raises UnknownNameError (close names)."""
    row = con.execute("SELECT serving_version, options, epoch FROM collections WHERE name=?",
                      (name,)).fetchone()
    if row is None:
        raise UnknownNameError(unknown_message("collection", name, collection_names(con)))
    return row[0], BackendOptions(**json.loads(row[1])), int(row[2])


def collection_names(con: sqlite3.Connection) -> list[str]:
    """The names of every collection, sorted."""
    return [r[0] for r in con.execute("SELECT name FROM collections ORDER BY name")]


def insert_collection(con: sqlite3.Connection, name: str, version: str, options: BackendOptions,
                      side_versions: Sequence[str]) -> None:
    """Create collection ``name`` (the caller checked the name is free and the versions)."""
    # a random first epoch: caches of a dropped namesake never match it
    epoch = secrets.randbits(62)
    con.execute("INSERT INTO collections VALUES (?, ?, ?, ?, ?)",
                (name, version, json.dumps(options._asdict()), epoch, time.time()))
    con.execute("INSERT OR REPLACE INTO meta VALUES (?, ?)",
                (f"side_versions:{name}", json.dumps(list(side_versions))))


def delete_collection(con: sqlite3.Connection, name: str) -> None:
    """Delete collection ``name`` with its items, vectors, jobs and logged changes."""
    con.execute("DELETE FROM collections WHERE name=?", (name,))
    con.execute("DELETE FROM meta WHERE key=?", (f"side_versions:{name}",))
    con.execute("DELETE FROM changes WHERE collection=?", (name,))


def side_versions(con: sqlite3.Connection, name: str) -> tuple[str, ...]:
    """The side-info versions embedded for every item of collection ``name``."""
    row = con.execute("SELECT value FROM meta WHERE key=?", (f"side_versions:{name}",)).fetchone()
    return tuple(json.loads(row[0])) if row else ()


def set_serving_version(con: sqlite3.Connection, name: str, version: str) -> None:
    """Make ``version`` serve collection ``name`` (queries and new items use it)."""
    con.execute("UPDATE collections SET serving_version=? WHERE name=?", (version, name))


# --------------------------------------------------------------------- items


def count_items(con: sqlite3.Connection, collection: str) -> int:
    """The number of items of ``collection``."""
    return int(con.execute("SELECT count(*) FROM items WHERE collection=?",
                           (collection,)).fetchone()[0])


def item_row(con: sqlite3.Connection, collection: str,
             item_id: str) -> tuple[int, str | None, str, int] | None:
    """(key, source, metadata JSON, revision) of item ``item_id``, or None."""
    row = con.execute("SELECT key, source, metadata, revision FROM items "
                      "WHERE collection=? AND id=?", (collection, item_id)).fetchone()
    return None if row is None else (int(row[0]), row[1], row[2], int(row[3]))


def item_ids(con: sqlite3.Connection, collection: str, offset: int, limit: int) -> list[str]:
    """Item ids in insertion order, ``limit`` of them from ``offset``."""
    return [r[0] for r in con.execute("SELECT id FROM items WHERE collection=? ORDER BY key "
                                      "LIMIT ? OFFSET ?", (collection, limit, offset))]


def item_keys(con: sqlite3.Connection, collection: str, ids: Sequence[str]) -> dict[str, int]:
    """id -> key of the items of ``ids`` that exist."""
    out: dict[str, int] = {}
    for part, marks in in_chunks(list(ids)):
        out.update({r[1]: int(r[0]) for r in con.execute(
            f"SELECT key, id FROM items WHERE collection=? AND id IN ({marks})",
            [collection, *part])})
    return out


def item_rows(con: sqlite3.Connection,
              keys: Sequence[int]) -> dict[int, tuple[str, str | None, int, str]]:
    """key -> (id, source, revision, metadata JSON) of the items of ``keys`` that exist."""
    out: dict[int, tuple[str, str | None, int, str]] = {}
    for part, marks in in_chunks([int(k) for k in keys]):
        out.update({int(r[0]): (r[1], r[2], int(r[3]), r[4]) for r in con.execute(
            f"SELECT key, id, source, revision, metadata FROM items WHERE key IN ({marks})",
            part)})
    return out


# --------------------------------------------------------------------- the changes log


def log_changes(con: sqlite3.Connection, collection: str, keys: Iterable[int]) -> None:
    """Record that the current vectors of ``keys`` changed (search caches replay this log).

    Only ``compatkit.index.slots`` calls it, in the transaction that changed them.
    """
    rows = [(collection, int(k)) for k in keys]
    if not rows:
        return
    con.executemany("INSERT INTO changes (collection, item) VALUES (?, ?)", rows)
    last = last_seq(con)
    if last // PRUNE_EVERY != (last - len(rows)) // PRUNE_EVERY and last > KEEP_CHANGES:
        frontier = last - KEEP_CHANGES
        con.execute("DELETE FROM changes WHERE seq <= ?", (frontier,))
        con.execute("INSERT OR REPLACE INTO meta VALUES ('pruned_seq', ?)", (str(frontier),))


def bump_epoch(con: sqlite3.Connection, collection: str) -> None:
    """Make every search cache of ``collection`` rebuild (after a whole-collection rewrite).

    Only ``compatkit.index.slots`` calls it, in the transaction that rewrote the collection.
    """
    con.execute("UPDATE collections SET epoch = epoch + 1 WHERE name=?", (collection,))


def last_change(con: sqlite3.Connection, collection: str) -> int:
    """The sequence number of the collection's latest logged change (0 if none)."""
    row = con.execute("SELECT max(seq) FROM changes WHERE collection=?", (collection,)).fetchone()
    return int(row[0] or 0)


def last_seq(con: sqlite3.Connection) -> int:
    """The sequence number of the latest logged change of any collection (0 if none)."""
    row = con.execute("SELECT seq FROM sqlite_sequence WHERE name='changes'").fetchone()
    return int(row[0]) if row else 0


def pruned_seq(con: sqlite3.Connection) -> int:
    """Changes up to this sequence number were pruned from the log (a cache older rebuilds)."""
    row = con.execute("SELECT value FROM meta WHERE key='pruned_seq'").fetchone()
    return int(row[0]) if row else 0


def changes_since(con: sqlite3.Connection, collection: str, seq: int) -> list[tuple[int, int]]:
    """(sequence number, item key) of the collection's changes after ``seq``, in order."""
    return [(int(r[0]), int(r[1])) for r in con.execute(
        "SELECT seq, item FROM changes WHERE collection=? AND seq > ? ORDER BY seq",
        (collection, seq))]
