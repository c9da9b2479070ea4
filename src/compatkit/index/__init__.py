"""The upgrade system: a versioned embedding index that serves while its model is upgraded.

- ``IndexStore``: SQLite (WAL) store of versions, relations, collections, items, vectors, jobs.
- ``Collection``: add / delete / get / search items; vectors of different versions mix only
  through declared relations (``compatible``, ``transform``).
- ``compatkit.index.upgrade``: hot-refresh, transform and cold upgrades with resumable,
  idempotent batches (``claim_batch`` / ``commit_batch``), pause, resume, rollback, finalize.
- ``compatkit.index.service``: the FastAPI app (``create_app``); ``compatkit.index.cli``: the
  ``compatkit index`` commands and ``compatkit serve``.

Importing this package does not import torch or FastAPI.
"""

from compatkit.index.collection import AddResult, Collection, CollectionStats, Item, ItemInput
from compatkit.index.embedders import (
    ArtifactEmbedder,
    ArtifactTransform,
    Embedder,
    HashEmbedder,
    load_source_image,
)
from compatkit.index.errors import StateConflictError
from compatkit.index.jobs import Batch, UpgradeStatus, job_status
from compatkit.index.options import INDEX_KINDS, BackendOptions
from compatkit.index.search import Hit, SearchResult
from compatkit.index.store import IndexStore
from compatkit.index.upgrade import (
    STRATEGIES,
    BatchVectors,
    claim_batch,
    commit_batch,
    compute_batch,
    finalize,
    pause,
    release_claims,
    resume,
    rollback,
    run_backfill,
    start_upgrade,
)
from compatkit.index.versions import Relation, Route, VersionInfo

__all__ = [
    "INDEX_KINDS",
    "STRATEGIES",
    "AddResult",
    "ArtifactEmbedder",
    "ArtifactTransform",
    "BackendOptions",
    "Batch",
    "BatchVectors",
    "Collection",
    "CollectionStats",
    "Embedder",
    "HashEmbedder",
    "Hit",
    "IndexStore",
    "Item",
    "ItemInput",
    "Relation",
    "Route",
    "SearchResult",
    "StateConflictError",
    "UpgradeStatus",
    "VersionInfo",
    "claim_batch",
    "commit_batch",
    "compute_batch",
    "finalize",
    "job_status",
    "load_source_image",
    "pause",
    "release_claims",
    "resume",
    "rollback",
    "run_backfill",
    "start_upgrade",
]
