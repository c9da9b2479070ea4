"""The store: a folder's database (``compatkit.index.db``) with its registry of versions,
relations and collections, and this process's caches of embedders, transformations and search
structures.

Search structures (FAISS) are per-process caches rebuilt or updated from the ``changes`` log,
so they never hold state the database does not.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Literal

import numpy as np

from compatkit.errors import CompatkitError, UnknownNameError
from compatkit.index.backends import check_options, open_backend
from compatkit.index.batching import SearchBatcher
from compatkit.index.collection import Collection
from compatkit.index.db import (
    DB_NAME,
    Database,
    collection_names,
    delete_collection,
    insert_collection,
    insert_relation,
    insert_version,
    relations,
    require_collection,
    require_version,
    set_calibration,
    version_map,
    version_row,
)
from compatkit.index.embedders import ArtifactTransform, Embedder
from compatkit.index.errors import StateConflictError
from compatkit.index.external_embedders import build_embedder, resolve_spec
from compatkit.index.options import INDEX_KINDS, BackendOptions
from compatkit.index.search import SearchCache
from compatkit.index.versions import (
    Relation,
    Route,
    VersionInfo,
    check_name,
    find_route,
)
from compatkit.score_calibration import ScoreCalibration, fit_score_calibration

__all__ = ["DB_NAME", "IndexStore"]

logger = logging.getLogger(__name__)


class IndexStore(Database):
    """A store folder: its database, the registry of versions, relations and collections, and
    this process's caches of embedders, transformations and search structures.

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
        self.device = device
        self._embedders: dict[str, Embedder] = dict(embedders or {})
        self._transforms: dict[str, ArtifactTransform] = {}
        self._caches: dict[str, SearchCache] = {}
        self._batcher = SearchBatcher(self)
        for version, emb in self._embedders.items():
            if emb.version != version:
                raise ValueError(f"embedder for {version!r} reports version {emb.version!r}")
        super().__init__(root, synchronous=synchronous, busy_timeout_s=busy_timeout_s)

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
            embedder: a JSON spec (``{"kind": "hash", "seed": 1}``, an ONNX, TorchScript or
                python spec: ``compatkit.index.external_embedders``), an object with ``spec()``
                (``HashEmbedder``), or None (vectors only).

        Raises:
            ValueError: a bad name or dimension, or a relation naming it with another dimension.
            CompatkitError: an external embedder that cannot be built or embeds in another
                dimension (``resolve_spec``).
            StateConflictError: the name is registered with other fields.
        """
        check_name(name, "version")
        if not isinstance(dim, int) or isinstance(dim, bool) or dim < 1:
            raise ValueError(f"dim must be a positive integer, got {dim!r}")
        if kind not in ("model", "side_info"):
            raise ValueError(f"kind must be 'model' or 'side_info', got {kind!r}")
        spec = resolve_spec(embedder, version=name, dim=dim, normalized=bool(normalized))
        info = VersionInfo(name, dim, bool(normalized), kind, spec)
        with self.write() as con:
            existing = version_row(con, name)
            if existing is not None:
                if existing != info and existing.embedder.get("files") and (
                        existing.embedder != info.embedder):
                    raise StateConflictError(
                        f"version {name!r} is already registered with another embedder "
                        f"({existing.embedder}); an embedder never changes under a version's "
                        "name: register the new model as a new version")
                if existing != info:
                    raise StateConflictError(
                        f"version {name!r} is already registered with other fields "
                        f"(dim {existing.dim}, normalized {existing.normalized}, "
                        f"kind {existing.kind})")
                return existing
            for rel in relations(con):
                if rel.kind == "compatible" and name in (rel.old, rel.new):
                    other = version_row(con, rel.new if rel.old == name else rel.old)
                    if other is not None and other.dim != dim:
                        raise ValueError(f"{rel.describe()} is declared, but {name!r} has "
                                         f"dimension {dim} and {other.name!r} {other.dim}")
            insert_version(con, info)
        return info

    def register_artifact(
        self, directory: str | Path, *, new: str | None = None, side_version: str | None = None,
        calibrate: bool | None = None, from_vectors: Any = None, to_vectors: Any = None,
    ) -> VersionInfo | Relation:
        """Register what an artifact folder holds: a model version (with the compatibility
        relations its manifest declares), a side-info version, or a transformation.

        For a transformation, the manifest's ``transforms_from`` and ``transforms_to`` name the
        old and new versions (``new`` overrides the latter); ``calibrate``, ``from_vectors``
        and ``to_vectors`` are passed to ``declare_transform``.

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
                                          side_version=side_version, origin="manifest",
                                          calibrate=calibrate, from_vectors=from_vectors,
                                          to_vectors=to_vectors)
        if calibrate is not None or from_vectors is not None or to_vectors is not None:
            raise CompatkitError(f"{directory} holds a {manifest.kind}: score calibration "
                                 "applies to a transformation")
        info = self.register_version(manifest.model_version, dim=int(manifest.embed_dim),
                                     normalized=manifest.normalized, kind=manifest.kind,
                                     embedder=spec)
        for old in manifest.compatible_with:
            with self.write() as con:
                insert_relation(con, Relation("compatible", old, info.name, origin="manifest"))
        return info

    def version(self, name: str) -> VersionInfo:
        """The registered version ``name``. Raises UnknownNameError (with close names)."""
        with self.read() as con:
            return require_version(con, name)

    def versions(self) -> list[VersionInfo]:
        """Every registered version, by name."""
        with self.read() as con:
            return list(version_map(con).values())

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
            n, o = require_version(con, new), require_version(con, old)
            if n.dim != o.dim:
                raise ValueError(f"{new!r} (dim {n.dim}) cannot be compatible with {old!r} "
                                 f"(dim {o.dim}): the dimensions differ")
            rel = Relation("compatible", old, new, origin="user")
            insert_relation(con, rel)
        return rel

    def declare_transform(
        self, old: str, new: str, artifact: str | Path, *, side_version: str | None = None,
        origin: Literal["manifest", "user"] = "user", calibrate: bool | None = None,
        from_vectors: Any = None, to_vectors: Any = None,
    ) -> Relation:
        """Declare that the transformation artifact maps ``old`` vectors into ``new``'s space.

        Declared without side-information it also maps ``old`` queries onto ``new`` vectors
        (a query adapter, e.g. a fitted map from a new model back to the collection's old
        one). ``calibrate=True`` fits a score calibration of that route on a paired sample,
        ``from_vectors`` (n, d_old) and ``to_vectors`` (n, d_new), row i one item
        (``compatkit.score_calibration``), and stores it with the relation; searches then
        merge the adapted scores on ``old``'s own scale. ``False`` removes a stored
        calibration, None (default) keeps what is stored.

        Raises:
            UnknownNameError: a version is not registered.
            CompatkitError: the artifact is not a transformation, its dimensions do not match
                the versions, side-information is missing or unexpected, or calibration is
                asked of a transformation with side-information.
            ValueError: ``calibrate=True`` without a valid paired sample, or vectors given
                without ``calibrate=True``.
        """
        from compatkit.artifacts import read_manifest

        artifact = Path(artifact).resolve()
        manifest = read_manifest(artifact)
        if manifest.kind != "transformation":
            raise CompatkitError(f"{artifact} holds a {manifest.kind}, not a transformation")
        d_old, d_new = manifest.spec.get("d_old"), manifest.spec.get("d_new")
        d_side = manifest.spec.get("d_side")
        with self.read() as con:
            o, n = require_version(con, old), require_version(con, new)
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
                s = require_version(con, side_version)
                if s.dim != d_side:
                    raise CompatkitError(f"side version {side_version!r} has dimension {s.dim}, "
                                         f"the transformation expects {d_side}")
        rel = Relation("transform", old, new, str(artifact), side_version, origin)
        if side_version is not None and calibrate is not None:
            raise CompatkitError(f"{rel.describe()} needs side-information, so it cannot map "
                                 "queries; score calibration applies to a query adapter")
        if not calibrate and (from_vectors is not None or to_vectors is not None):
            raise ValueError("from_vectors and to_vectors are the paired sample of "
                             "calibrate=True; they were given without it")
        calibration = self._fit_calibration(rel, from_vectors, to_vectors) if calibrate else None
        with self.write() as con:
            insert_relation(con, rel)
            if calibrate is not None:
                set_calibration(con, rel, calibration)
        return self._relation(rel)

    def _fit_calibration(self, rel: Relation, from_vectors: Any,
                         to_vectors: Any) -> ScoreCalibration:
        """The score calibration of ``rel``'s query route on a paired sample."""
        if from_vectors is None or to_vectors is None:
            raise ValueError(f"calibrating {rel.describe()} needs a paired sample: "
                             f"from_vectors ({rel.old!r} vectors) and to_vectors ({rel.new!r} "
                             "vectors of the same items)")
        source = np.asarray(from_vectors, dtype=np.float32)
        target = np.asarray(to_vectors, dtype=np.float32)
        for arr, version, what in ((source, rel.old, "from_vectors"),
                                   (target, rel.new, "to_vectors")):
            dim = self.version(version).dim
            if arr.ndim != 2 or arr.shape[1] != dim:
                raise ValueError(f"{what} must be (n, {dim}) {version!r} vectors, got shape "
                                 f"{arr.shape}")
        if len(source) != len(target):
            raise ValueError(f"from_vectors has {len(source)} rows but to_vectors "
                             f"{len(target)}; row i of each is the same item")
        for arr, what in ((source, "from_vectors"), (target, "to_vectors")):
            bad = np.flatnonzero(~np.isfinite(arr).all(axis=1))
            if bad.size:
                raise ValueError(f"{what} row {int(bad[0])} holds NaN or infinite values")
        mapped = self.transformer(rel).apply(source)
        return fit_score_calibration(mapped, target, source)

    def _relation(self, rel: Relation) -> Relation:
        """The stored form of the declared relation ``rel`` (with its calibration)."""
        for stored in self.relations():
            if (stored.kind, stored.old, stored.new) == (rel.kind, rel.old, rel.new):
                return stored
        raise UnknownNameError(f"{rel.describe()} is not declared")

    def relations(self) -> list[Relation]:
        """Every declared relation."""
        with self.read() as con:
            return relations(con)

    def route(self, query_version: str, stored_version: str) -> Route:
        """How a query of one version reaches vectors of another (``versions.find_route``)."""
        with self.read() as con:
            return find_route(query_version, stored_version, relations(con), version_map(con))

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
        check_name(name, "collection")
        options = BackendOptions(kind=index) if isinstance(index, str) else index
        if options.kind not in INDEX_KINDS:
            raise ValueError(f"index must be one of {', '.join(INDEX_KINDS)}, got "
                             f"{options.kind!r}")
        check_options(options)  # engine, parameters, Qdrant location
        with self.write() as con:
            info = require_version(con, version)
            if info.kind != "model":
                raise ValueError(f"version {version!r} is a {info.kind} model; a collection is "
                                 "served by a model version")
            if name in collection_names(con):
                raise StateConflictError(f"collection {name!r} already exists")
            for sv in side_versions:
                if require_version(con, sv).kind != "side_info":
                    raise ValueError(f"side version {sv!r} is not a side_info version")
            insert_collection(con, name, version, options, side_versions)
        return Collection(self, name)

    def collection(self, name: str) -> Collection:
        """A handle on an existing collection. Raises UnknownNameError (with close names).

        A collection this process searched is checked through its search cache's state (a
        change-token read while nothing was committed), others with one SQLite read.
        """
        with self._lock:
            cache = self._caches.get(name)
        if cache is not None:
            cache.state()
        else:
            with self.read() as con:
                require_collection(con, name)
        return Collection(self, name)

    def collection_names(self) -> list[str]:
        """The names of every collection, sorted."""
        with self.read() as con:
            return collection_names(con)

    def drop_collection(self, name: str) -> None:
        """Delete a collection with its items, vectors, jobs and the backend's stored data."""
        with self.write() as con:
            _, options, _ = require_collection(con, name)
            delete_collection(con, name)
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
        emb = build_embedder(self.version(version), device=self.device)
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

    def search_batcher(self) -> SearchBatcher:
        """This process's batcher of concurrent searches (all collections)."""
        return self._batcher

    def search_cache(self, name: str) -> SearchCache:
        """This process's search structures for collection ``name``."""
        with self._lock:
            cache = self._caches.get(name)
            if cache is None:
                cache = self._caches[name] = SearchCache(self, name)
            return cache
