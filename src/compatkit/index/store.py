"""The embedded store: one SQLite database (WAL) for versions, relations, items, vectors, jobs.

Every vector is a float32 BLOB in the same row-set and the same transaction as its item, so a
crash (``kill -9`` at any point) leaves either the whole write or none of it. An item has at
most one vector per slot (``UNIQUE (item, slot)``):

- ``current``: the vector searches use;
- ``previous``: the vector it had before an upgrade rewrote it, kept until the upgrade is
  finalised so that a rollback restores it;
- ``next``: a vector built aside by a cold upgrade, switched in when the upgrade completes.

Search structures (FAISS) are per-process caches rebuilt or updated from the ``changes`` log,
so they never hold state the database does not.
"""

from __future__ import annotations

import json
import logging
import secrets
import sqlite3
import threading
import time
from collections.abc import Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from compatkit.errors import CompatkitError, UnknownNameError
from compatkit.index.backends import INDEX_KINDS, BackendOptions, check_options, open_backend
from compatkit.index.embedders import ArtifactTransform, Embedder, embedder_from_spec
from compatkit.index.errors import StateConflictError
from compatkit.index.versions import (
    Relation,
    Route,
    VersionInfo,
    check_name,
    find_route,
)

if TYPE_CHECKING:
    from compatkit.index.collection import Collection
    from compatkit.index.search import SearchCache

logger = logging.getLogger(__name__)

DB_NAME = "index.sqlite3"
SCHEMA_VERSION = "1"
#: The ``changes`` log keeps at least this many recent entries; caches older than that rebuild.
KEEP_CHANGES = 500_000
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


class IndexStore:
    """A folder holding the SQLite database of versions, relations, collections and jobs.

    Safe to share between threads (one SQLite connection per thread) and to open from several
    processes at once (WAL; writers wait up to ``busy_timeout_s``).

    Args:
        root: the store folder (created if missing).
        synchronous: SQLite ``synchronous`` pragma. ``FULL`` (default) makes every acknowledged
            write survive a power loss; ``NORMAL`` survives a process crash only.
        embedders: embedders by version that override the specs stored with the versions
            (tests and benchmarks inject cheap ones here).
        device: torch device for artifact embedders and transformations. Default "cpu".
        busy_timeout_s: how long a writer waits for another. Default 30.
    """

    def __init__(
        self, root: str | Path, *, synchronous: Literal["FULL", "NORMAL"] = "FULL",
        embedders: Mapping[str, Embedder] | None = None, device: str = "cpu",
        busy_timeout_s: float = 30.0,
    ) -> None:
        if synchronous not in ("FULL", "NORMAL"):
            raise ValueError(f"synchronous must be 'FULL' or 'NORMAL', got {synchronous!r}")
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)
        self.path = self.root / DB_NAME
        self.synchronous = synchronous
        self.device = device
        self.busy_timeout_s = busy_timeout_s
        self._local = threading.local()
        self._connections: list[sqlite3.Connection] = []
        self._lock = threading.Lock()
        self._embedders: dict[str, Embedder] = dict(embedders or {})
        self._transforms: dict[str, ArtifactTransform] = {}
        self._caches: dict[str, SearchCache] = {}
        for version, emb in self._embedders.items():
            if emb.version != version:
                raise ValueError(f"embedder for {version!r} reports version {emb.version!r}")
        con = self._con()
        con.execute("BEGIN IMMEDIATE")
        try:
            for statement in SCHEMA.split(";"):
                if statement.strip():
                    con.execute(statement)
            con.execute("INSERT OR IGNORE INTO meta VALUES ('schema_version', ?)",
                        (SCHEMA_VERSION,))
            found = con.execute("SELECT value FROM meta WHERE key='schema_version'").fetchone()[0]
        except BaseException:
            con.execute("ROLLBACK")
            raise
        con.execute("COMMIT")
        if found != SCHEMA_VERSION:
            raise CompatkitError(f"{self.path} has schema version {found}, this code reads "
                                 f"{SCHEMA_VERSION}")

    # ----------------------------------------------------------------- connections

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

    def close(self) -> None:
        """Close every connection this object opened (in any thread)."""
        with self._lock:
            for con in self._connections:
                con.close()
            self._connections.clear()
            self._local = threading.local()

    # ----------------------------------------------------------------- versions

    def register_version(
        self, name: str, *, dim: int, normalized: bool = True,
        kind: Literal["model", "side_info"] = "model",
        embedder: Mapping[str, Any] | Any | None = None,
    ) -> VersionInfo:
        """Register a model version (idempotent when every field matches).

        Args:
            name: the version name (as in a manifest's ``model_version``).
            dim: vector dimension. normalized: whether its model L2-normalises.
            kind: ``model`` or ``side_info``.
            embedder: a JSON spec (``{"kind": "hash", "seed": 1}``), an object with ``spec()``
                (``HashEmbedder``), or None (vectors only).

        Raises:
            ValueError: a bad name or dimension, or a relation naming it with another dimension.
            StateConflictError: the name is registered with other fields.
        """
        check_name(name, "version")
        if not isinstance(dim, int) or isinstance(dim, bool) or dim < 1:
            raise ValueError(f"dim must be a positive integer, got {dim!r}")
        if kind not in ("model", "side_info"):
            raise ValueError(f"kind must be 'model' or 'side_info', got {kind!r}")
        if embedder is None:
            spec: dict[str, Any] = {"kind": "none"}
        elif isinstance(embedder, Mapping):
            spec = dict(embedder)
        else:
            spec = dict(embedder.spec())
        if spec.get("kind") not in ("none", "hash", "artifact"):
            raise ValueError(f"embedder kind must be 'none', 'hash' or 'artifact', got "
                             f"{spec.get('kind')!r}")
        info = VersionInfo(name, dim, bool(normalized), kind, spec)
        with self.write() as con:
            existing = _version_row(con, name)
            if existing is not None:
                if existing != info:
                    raise StateConflictError(
                        f"version {name!r} is already registered with other fields "
                        f"(dim {existing.dim}, normalized {existing.normalized}, "
                        f"kind {existing.kind})")
                return existing
            for rel in _relations(con):
                if rel.kind == "compatible" and name in (rel.old, rel.new):
                    other = _version_row(con, rel.new if rel.old == name else rel.old)
                    if other is not None and other.dim != dim:
                        raise ValueError(f"{rel.describe()} is declared, but {name!r} has "
                                         f"dimension {dim} and {other.name!r} {other.dim}")
            con.execute("INSERT INTO versions VALUES (?, ?, ?, ?, ?, ?)",
                        (name, dim, int(info.normalized), kind, json.dumps(spec), time.time()))
        return info

    def register_artifact(
        self, directory: str | Path, *, new: str | None = None, side_version: str | None = None,
    ) -> VersionInfo | Relation:
        """Register what an artifact folder holds: a model version (with the compatibility
        relations its manifest declares), a side-info version, or a transformation.

        For a transformation, the manifest's ``transforms_from`` and ``transforms_to`` name the
        old and new versions (``new`` overrides the latter).

        Raises:
            CompatkitError: not an artifact, or a transformation whose target is unknown.
        """
        from compatkit.artifacts import read_manifest

        directory = Path(directory).resolve()
        manifest = read_manifest(directory)
        spec = {"kind": "artifact", "path": str(directory)}
        if manifest.kind == "transformation":
            if manifest.transforms_from is None:
                raise CompatkitError(f"transformation {directory} has no transforms_from")
            new = new or manifest.transforms_to
            if new is None:
                raise CompatkitError(f"transformation {directory} has no transforms_to; say "
                                     "which version it maps into (new=...)")
            return self.declare_transform(manifest.transforms_from, new, directory,
                                          side_version=side_version, origin="manifest")
        info = self.register_version(manifest.model_version, dim=int(manifest.embed_dim),
                                     normalized=manifest.normalized, kind=manifest.kind,
                                     embedder=spec)
        for old in manifest.compatible_with:
            with self.write() as con:
                _insert_relation(con, Relation("compatible", old, info.name, origin="manifest"))
        return info

    def version(self, name: str) -> VersionInfo:
        """The registered version ``name``. Raises UnknownNameError (with close names)."""
        with self.read() as con:
            return _require_version(con, name)

    def versions(self) -> list[VersionInfo]:
        """Every registered version, by name."""
        with self.read() as con:
            rows = con.execute("SELECT name FROM versions ORDER BY name").fetchall()
            return [_require_version(con, r[0]) for r in rows]

    # ----------------------------------------------------------------- relations

    def declare_compatible(self, new: str, old: str) -> Relation:
        """Declare that queries of ``new`` may search vectors of ``old`` (idempotent).

        Raises:
            UnknownNameError: a version is not registered.
            ValueError: same version twice, or different dimensions.
        """
        if new == old:
            raise ValueError(f"a version is always compatible with itself ({new!r})")
        with self.write() as con:
            n, o = _require_version(con, new), _require_version(con, old)
            if n.dim != o.dim:
                raise ValueError(f"{new!r} (dim {n.dim}) cannot be compatible with {old!r} "
                                 f"(dim {o.dim}): the dimensions differ")
            rel = Relation("compatible", old, new, origin="user")
            _insert_relation(con, rel)
        return rel

    def declare_transform(
        self, old: str, new: str, artifact: str | Path, *, side_version: str | None = None,
        origin: Literal["manifest", "user"] = "user",
    ) -> Relation:
        """Declare that the transformation artifact maps ``old`` vectors into ``new``'s space.

        Raises:
            UnknownNameError: a version is not registered.
            CompatkitError: the artifact is not a transformation, its dimensions do not match
                the versions, or side-information is missing or unexpected.
        """
        from compatkit.artifacts import read_manifest

        artifact = Path(artifact).resolve()
        manifest = read_manifest(artifact)
        if manifest.kind != "transformation":
            raise CompatkitError(f"{artifact} holds a {manifest.kind}, not a transformation")
        d_old, d_new = manifest.spec.get("d_old"), manifest.spec.get("d_new")
        d_side = manifest.spec.get("d_side")
        with self.write() as con:
            o, n = _require_version(con, old), _require_version(con, new)
            if (d_old, d_new) != (o.dim, n.dim):
                raise CompatkitError(f"transformation {artifact} maps {d_old} -> {d_new} dims, "
                                     f"but {old!r} has {o.dim} and {new!r} has {n.dim}")
            if d_side is not None and side_version is None:
                raise CompatkitError(f"transformation {artifact} needs side-information of "
                                     f"dimension {d_side}: name its side_version")
            if d_side is None and side_version is not None:
                raise CompatkitError(f"transformation {artifact} takes no side-information, "
                                     f"got side_version={side_version!r}")
            if side_version is not None:
                s = _require_version(con, side_version)
                if s.dim != d_side:
                    raise CompatkitError(f"side version {side_version!r} has dimension {s.dim}, "
                                         f"the transformation expects {d_side}")
            rel = Relation("transform", old, new, str(artifact), side_version, origin)
            _insert_relation(con, rel)
        return rel

    def relations(self) -> list[Relation]:
        """Every declared relation."""
        with self.read() as con:
            return _relations(con)

    def route(self, query_version: str, stored_version: str) -> Route:
        """How a query of one version reaches vectors of another (``versions.find_route``)."""
        with self.read() as con:
            return find_route(query_version, stored_version, _relations(con),
                              _version_map(con))

    # ----------------------------------------------------------------- collections

    def create_collection(
        self, name: str, version: str, *, index: BackendOptions | str = "flat",
        side_versions: Sequence[str] = (),
    ) -> Collection:
        """Create an empty collection served by ``version``.

        ``side_versions``: side-info versions embedded from every added item's source and
        stored next to its vectors (FCT's side-information, needed by some transformations).

        Raises:
            ValueError: a bad name or index kind. UnknownNameError: unknown version.
            StateConflictError: the collection exists.
        """
        from compatkit.index.collection import Collection

        check_name(name, "collection")
        options = BackendOptions(kind=index) if isinstance(index, str) else index
        if options.kind not in INDEX_KINDS:
            raise ValueError(f"index must be one of {', '.join(INDEX_KINDS)}, got "
                             f"{options.kind!r}")
        check_options(options)  # engine, parameters, Qdrant location
        with self.write() as con:
            info = _require_version(con, version)
            if info.kind != "model":
                raise ValueError(f"version {version!r} is a {info.kind} model; a collection is "
                                 "served by a model version")
            if con.execute("SELECT 1 FROM collections WHERE name=?", (name,)).fetchone():
                raise StateConflictError(f"collection {name!r} already exists")
            for sv in side_versions:
                if _require_version(con, sv).kind != "side_info":
                    raise ValueError(f"side version {sv!r} is not a side_info version")
            # a random first epoch: caches of a dropped namesake never match it
            epoch = secrets.randbits(62)
            con.execute("INSERT INTO collections VALUES (?, ?, ?, ?, ?)",
                        (name, version, json.dumps(options._asdict()), epoch, time.time()))
            con.execute("INSERT OR REPLACE INTO meta VALUES (?, ?)",
                        (f"side_versions:{name}", json.dumps(list(side_versions))))
        return Collection(self, name)

    def collection(self, name: str) -> Collection:
        """A handle on an existing collection. Raises UnknownNameError (with close names)."""
        from compatkit.index.collection import Collection

        with self.read() as con:
            _require_collection(con, name)
        return Collection(self, name)

    def collection_names(self) -> list[str]:
        """The names of every collection, sorted."""
        with self.read() as con:
            return [r[0] for r in con.execute("SELECT name FROM collections ORDER BY name")]

    def drop_collection(self, name: str) -> None:
        """Delete a collection with its items, vectors, jobs and the backend's stored data."""
        with self.write() as con:
            _, options, _ = _require_collection(con, name)
            con.execute("DELETE FROM collections WHERE name=?", (name,))
            con.execute("DELETE FROM meta WHERE key=?", (f"side_versions:{name}",))
            con.execute("DELETE FROM changes WHERE collection=?", (name,))
        with self._lock:
            self._caches.pop(name, None)
        open_backend(self, name, options).drop()  # Qdrant: its collections go too

    # ----------------------------------------------------------------- embedders, caches

    def embedder(self, version: str) -> Embedder:
        """The embedder of ``version``: an injected one, else rebuilt from its stored spec.

        Raises:
            UnknownNameError: unknown version. CompatkitError: the version has no embedder.
        """
        with self._lock:
            emb = self._embedders.get(version)
        if emb is not None:
            return emb
        emb = embedder_from_spec(self.version(version), device=self.device)
        with self._lock:
            return self._embedders.setdefault(version, emb)

    def has_embedder(self, version: str) -> bool:
        """Whether sources can be embedded in ``version`` (an injected embedder or a spec)."""
        with self._lock:
            if version in self._embedders:
                return True
        return self.version(version).embedder.get("kind", "none") != "none"

    def transformer(self, relation: Relation) -> ArtifactTransform:
        """The loaded transformation of a ``transform`` relation (cached per artifact)."""
        if relation.kind != "transform" or relation.artifact is None:
            raise ValueError(f"{relation.describe()} is not a transformation")
        with self._lock:
            tr = self._transforms.get(relation.artifact)
        if tr is None:
            tr = ArtifactTransform(relation.artifact, device=self.device)
            with self._lock:
                tr = self._transforms.setdefault(relation.artifact, tr)
        return tr

    def search_cache(self, name: str) -> SearchCache:
        """This process's search structures for collection ``name``."""
        from compatkit.index.search import SearchCache

        with self._lock:
            cache = self._caches.get(name)
            if cache is None:
                cache = self._caches[name] = SearchCache(self, name)
            return cache


# --------------------------------------------------------------------- SQL helpers


def _version_row(con: sqlite3.Connection, name: str) -> VersionInfo | None:
    row = con.execute("SELECT name, dim, normalized, kind, embedder FROM versions WHERE name=?",
                      (name,)).fetchone()
    if row is None:
        return None
    return VersionInfo(row[0], int(row[1]), bool(row[2]), row[3], json.loads(row[4]))


def _require_version(con: sqlite3.Connection, name: str) -> VersionInfo:
    info = _version_row(con, name)
    if info is None:
        names = [r[0] for r in con.execute("SELECT name FROM versions ORDER BY name")]
        raise UnknownNameError(unknown_message("version", name, names))
    return info


def _version_map(con: sqlite3.Connection) -> dict[str, VersionInfo]:
    rows = con.execute("SELECT name, dim, normalized, kind, embedder FROM versions").fetchall()
    return {r[0]: VersionInfo(r[0], int(r[1]), bool(r[2]), r[3], json.loads(r[4])) for r in rows}


def _relations(con: sqlite3.Connection) -> list[Relation]:
    rows = con.execute("SELECT kind, old, new, artifact, side_version, origin FROM relations "
                       "ORDER BY kind, old, new").fetchall()
    return [Relation(*r) for r in rows]


def _insert_relation(con: sqlite3.Connection, rel: Relation) -> None:
    row = con.execute("SELECT artifact, side_version FROM relations WHERE kind=? AND old=? AND "
                      "new=?", (rel.kind, rel.old, rel.new)).fetchone()
    if row is not None:
        if tuple(row) != (rel.artifact, rel.side_version):
            raise StateConflictError(f"a different {rel.kind} relation {rel.old} -> {rel.new} "
                                     "is already declared")
        return
    con.execute("INSERT INTO relations VALUES (?, ?, ?, ?, ?, ?, ?)",
                (rel.kind, rel.old, rel.new, rel.artifact, rel.side_version, rel.origin,
                 time.time()))


def _require_collection(con: sqlite3.Connection, name: str) -> tuple[str, BackendOptions, int]:
    row = con.execute("SELECT serving_version, options, epoch FROM collections WHERE name=?",
                      (name,)).fetchone()
    if row is None:
        names = [r[0] for r in con.execute("SELECT name FROM collections ORDER BY name")]
        raise UnknownNameError(unknown_message("collection", name, names))
    return row[0], BackendOptions(**json.loads(row[1])), int(row[2])


def unknown_message(kind: str, name: str, names: Sequence[str]) -> str:
    """``unknown <kind> '<name>'`` plus the closest known names, if any."""
    import difflib

    close = difflib.get_close_matches(name, list(names), n=3, cutoff=0.5)
    hint = f"; did you mean {', '.join(close)}?" if close else ""
    return f"unknown {kind} {name!r}{hint}"


def log_changes(con: sqlite3.Connection, collection: str, keys: Iterable[int]) -> None:
    """Record that the current vectors of ``keys`` changed (search caches replay this log)."""
    rows = [(collection, int(k)) for k in keys]
    if not rows:
        return
    con.executemany("INSERT INTO changes (collection, item) VALUES (?, ?)", rows)
    last = con.execute("SELECT seq FROM sqlite_sequence WHERE name='changes'").fetchone()[0]
    if last // PRUNE_EVERY != (last - len(rows)) // PRUNE_EVERY and last > KEEP_CHANGES:
        frontier = last - KEEP_CHANGES
        con.execute("DELETE FROM changes WHERE seq <= ?", (frontier,))
        con.execute("INSERT OR REPLACE INTO meta VALUES ('pruned_seq', ?)", (str(frontier),))


def last_change(con: sqlite3.Connection, collection: str) -> int:
    """The sequence number of the collection's latest logged change (0 if none)."""
    row = con.execute("SELECT max(seq) FROM changes WHERE collection=?", (collection,)).fetchone()
    return int(row[0] or 0)


def bump_epoch(con: sqlite3.Connection, collection: str) -> None:
    """Make every search cache of ``collection`` rebuild (after a whole-collection rewrite)."""
    con.execute("UPDATE collections SET epoch = epoch + 1 WHERE name=?", (collection,))
