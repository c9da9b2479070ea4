"""The upgrade orchestrator: move a collection from version vA to vB while it serves.

Strategies (each a list of phases; a phase re-embeds or transforms items in a stored order):

- ``hot-refresh``: vB serves at once (it must be able to search vA vectors: a declared
  compatibility, or a query adapter, a transformation vB -> vA that maps vB queries onto the
  vA items until they are re-embedded); items with a source are re-embedded by vB batch by
  batch in the chosen order.
- ``transform``: a registered transformation vA -> vB rewrites the stored vectors, no sources
  needed; vB serves at once when it can search vA vectors, else when the phase completes.
  With ``then_refresh``, a hot-refresh phase re-embeds the items whose sources exist.
- ``cold``: vB vectors are built aside while vA serves; the switch happens when all are built.

Every batch is claimed (``claim_batch``), computed by any worker, and committed
(``commit_batch``) with the job's progress in one transaction; committing a batch twice is a
no-op, so pausing, resuming or restarting after a crash continues where the job stopped with
no item skipped or written twice. The order of each phase is computed once, when the phase
starts, and stored. Until ``finalize``, every rewritten item keeps its old vector, so
``rollback`` returns the collection to vA exactly.

This module drives the steps; ``plan`` plans phases and orders, ``jobs`` keeps the job records
and the lease queue, ``slots`` moves the vectors.
"""

from __future__ import annotations

import logging
import sqlite3
import threading
import time
from collections.abc import Callable, Sequence
from typing import Any, Literal, NamedTuple

import numpy as np

from compatkit.errors import CompatkitError
from compatkit.index.db import (
    Store,
    last_change,
    relations,
    require_collection,
    require_version,
    set_serving_version,
    version_map,
)
from compatkit.index.errors import StateConflictError
from compatkit.index.jobs import (
    UNFINISHED,
    Batch,
    BatchItem,
    Job,
    UpgradeStatus,
    claim,
    claimed_pairs,
    insert_job,
    insert_phase,
    job_status,
    latest_job_id,
    load_job,
    others_pending,
    record_commit,
    refuse_if_unfinished,
    release,
    running_job_ids,
    set_state,
    transform_relation,
)
from compatkit.index.plan import check_ordering, plan_order, plan_phases
from compatkit.index.slots import drop_previous, restore_previous, unrestorable, write_upgraded
from compatkit.index.vectors import as_vectors
from compatkit.index.versions import can_search

__all__ = [
    "DEFAULT_LEASE_S",
    "MAX_BATCH_SIZE",
    "STRATEGIES",
    "Batch",
    "BatchItem",
    "BatchVectors",
    "Strategy",
    "UpgradeStatus",
    "active_jobs",
    "claim_batch",
    "commit_batch",
    "compute_batch",
    "finalize",
    "job_status",
    "latest_job",
    "pause",
    "release_claims",
    "resume",
    "rollback",
    "run_backfill",
    "start_upgrade",
]

logger = logging.getLogger(__name__)

Strategy = Literal["hot-refresh", "transform", "cold"]
STRATEGIES: tuple[str, ...] = ("hot-refresh", "transform", "cold")
MAX_BATCH_SIZE = 100_000
DEFAULT_LEASE_S = 300.0
_START_RETRIES = 5


# ------------------------------------------------------------------------ public API


def start_upgrade(
    store: Store, collection: str, new_version: str, *,
    strategy: Strategy = "hot-refresh", ordering: str = "random", seed: int = 0,
    batch_size: int = 256, given_order: Sequence[str] | None = None,
    then_refresh: bool = False, refresh_ordering: str | None = None,
    temperature: float = 1.0,
) -> UpgradeStatus:
    """Start upgrading ``collection`` from its serving version to ``new_version``.

    Args:
        strategy: ``hot-refresh``, ``transform`` or ``cold`` (module docstring).
        ordering: backfill order of the first phase, a name of ``compatkit.ordering``
            (``random``, ``uncertainty``, ``sigma``, ``given``; not ``oracle``).
        seed: seed of the ``random`` ordering.
        batch_size: items per claimed batch.
        given_order: item ids for the ``given`` ordering (ids not listed follow, oldest first).
        then_refresh: after a ``transform`` phase, re-embed items with sources (hot-refresh).
        refresh_ordering: ordering of that refresh phase (default: ``ordering``).
        temperature: softmax temperature of the ``uncertainty`` ordering.

    Raises:
        UnknownNameError: unknown collection, version or ordering.
        ValueError: bad strategy, batch size or ordering arguments.
        IncompatibleSpacesError: the strategy needs a relation that is not declared.
        StateConflictError: another upgrade of the collection is not finished.
    """
    if strategy not in STRATEGIES:
        raise ValueError(f"strategy must be one of {', '.join(STRATEGIES)}, got {strategy!r}")
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or not (
            1 <= batch_size <= MAX_BATCH_SIZE):
        raise ValueError(f"batch_size must be an integer in [1, {MAX_BATCH_SIZE}], "
                         f"got {batch_size!r}")
    if then_refresh and strategy != "transform":
        raise ValueError(f"then_refresh applies to the transform strategy, not {strategy!r}")
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    for name in (ordering, refresh_ordering or ordering):
        check_ordering(name, given_order)
    with store.read() as con:
        old, _, _ = require_collection(con, collection)
        new_info = require_version(con, new_version)
        versions, rels = version_map(con), relations(con)
        refuse_if_unfinished(con, collection)
    if new_info.kind != "model":
        raise ValueError(f"version {new_version!r} is a {new_info.kind} model, not a model")
    if new_version == old:
        raise ValueError(f"collection {collection!r} is already served by {new_version!r}")
    phases = plan_phases(store, strategy, old, new_version, ordering, then_refresh,
                         refresh_ordering, versions, rels)
    options = {"seed": int(seed), "batch_size": batch_size, "temperature": float(temperature),
               "given_order": list(given_order) if given_order is not None else None}
    job = Job(0, collection, old, new_version, strategy, ordering, options, "running",
              phases, 0, False, 0.0, 0.0, None)
    for _ in range(_START_RETRIES):
        with store.read() as con:
            seen = last_change(con, collection)
        order, skipped = plan_order(store, job, 0)
        with store.write() as con:
            if last_change(con, collection) == seen:  # no item changed since the plan
                job_id = _create_job(con, job, order, skipped)
                break
    else:
        raise StateConflictError(f"collection {collection!r} kept changing while the upgrade "
                                 "was planned; retry")
    logger.info("upgrade job %d of %r started: %s -> %s, %s, %d items in phase 0", job_id,
                collection, old, new_version, strategy, len(order))
    return job_status(store, job_id)


def _create_job(con: sqlite3.Connection, job: Job, order: list[int], skipped: int) -> int:
    """Insert a planned job with its first phase's order; serve vB now if the phase is live."""
    refuse_if_unfinished(con, job.collection)
    if require_collection(con, job.collection)[0] != job.old:
        raise StateConflictError(f"collection {job.collection!r} changed version meanwhile")
    job_id = insert_job(con, job)
    if job.phases[0].placement == "live":
        set_serving_version(con, job.collection, job.new)
    insert_phase(con, load_job(con, job_id), 0, order, skipped)
    return job_id


def claim_batch(
    store: Store, job_id: int, *, worker: str = "local", lease_s: float = DEFAULT_LEASE_S,
) -> Batch | None:
    """Claim the next batch of a running job for ``worker``, or None when there is none now.

    A worker that claimed a batch and has not committed it gets the same batch again (so a
    restarted worker resumes its batch); a batch whose claim is older than ``lease_s`` seconds
    goes to the next worker that asks.
    """
    _ensure_phase_started(store, job_id)
    with store.write() as con:
        job = load_job(con, job_id)
        if job.state != "running" or not job.phase_ready:
            return None
        return claim(con, job, worker, lease_s)


def commit_batch(
    store: Store, job_id: int, batch_id: int, vectors: Any, *, phase: int | None = None,
    failed: Sequence[int] = (),
) -> bool:
    """Write a claimed batch's vectors and advance the job, in one transaction.

    ``vectors`` has one row per ``Batch.items`` entry; rows of skipped items and the rows
    listed in ``failed`` (items whose source could not be embedded) are ignored, and failed
    ones are counted in the status. Returns False, changing nothing, when the batch is already
    committed, belongs to another phase, or the job was rolled back or finalised.

    Raises:
        ValueError: the batch was never claimed, or wrong shape / NaN / zero rows.
    """
    with store.write() as con:
        job = load_job(con, job_id)
        p = job.phase_index if phase is None else phase
        if job.state not in ("running", "paused") or p != job.phase_index:
            return False
        claimed = claimed_pairs(con, job_id, p, batch_id)
        if claimed is None:
            raise ValueError(f"batch {batch_id} of job {job_id} (phase {p}) was never claimed")
        state, pairs = claimed
        if state == "committed":
            return False
        dim = require_version(con, job.new).dim
        arr = np.asarray(vectors, dtype=np.float32)
        if arr.shape != (len(pairs), dim):
            raise ValueError(f"batch {batch_id} needs vectors of shape ({len(pairs)}, {dim}), "
                             f"got {arr.shape}")
        bad = sorted({int(i) for i in failed})
        if bad and (bad[0] < 0 or bad[-1] >= len(pairs)):
            raise ValueError(f"failed rows must lie in [0, {len(pairs)}), got {bad}")
        keep = np.ones(len(pairs), dtype=bool)
        keep[bad] = False
        written = write_upgraded(con, job.collection, pairs[keep], arr[keep], old=job.old,
                                 new=job.new, kind=job.phase.kind,
                                 placement=job.phase.placement)
        record_commit(con, job, p, batch_id, size=len(pairs), written=written, failed=len(bad))
    return True


class BatchVectors(NamedTuple):
    """What a worker computed for a batch: one row per item, and the rows that failed."""

    vectors: np.ndarray
    failed: tuple[int, ...]


def compute_batch(store: Store, batch: Batch) -> BatchVectors:
    """The vB vectors of a batch: sources embedded by vB, or stored vectors transformed.

    A source that cannot be read or decoded fails alone (logged, listed in ``failed``).

    Shapes: vectors (len(batch.items), d_new) float32, zeros on skipped and failed rows.
    """
    dim = store.version(batch.new_version).dim
    out = np.zeros((len(batch.items), dim), dtype=np.float32)
    todo = batch.todo
    if not todo:
        return BatchVectors(out, ())
    if batch.kind == "refresh":
        embedder = store.embedder(batch.new_version)
        what = f"{batch.new_version!r} embeddings"
        sources = [batch.items[i].source or "" for i in todo]
        try:
            out[todo] = as_vectors(embedder.embed_sources(sources), dim, what=what)
            return BatchVectors(out, ())
        except CompatkitError:
            failed = []
            for i in todo:  # find the bad sources; embed the others one by one
                try:
                    out[i] = as_vectors(embedder.embed_sources([batch.items[i].source or ""]),
                                        dim, what=what)[0]
                except CompatkitError as err:
                    logger.warning("job %d: item %r not re-embedded: %s", batch.job,
                                   batch.items[i].id, err)
                    failed.append(i)
            return BatchVectors(out, tuple(failed))
    if batch.old_vectors is None:
        raise ValueError(f"transform batch {batch.batch_id} of job {batch.job} carries no "
                         "old vectors")
    with store.read() as con:
        job = load_job(con, batch.job)
    rel = transform_relation(store.relations(), job.old, job.new)
    side = None if batch.side is None else batch.side[todo]
    out[todo] = store.transformer(rel).apply(batch.old_vectors[todo], side)
    return BatchVectors(out, ())


def run_backfill(
    store: Store, job_id: int, *, worker: str = "local", stop: threading.Event | None = None,
    max_batches: int | None = None, poll_s: float = 0.2,
    on_batch: Callable[[UpgradeStatus], None] | None = None, lease_s: float = DEFAULT_LEASE_S,
) -> UpgradeStatus:
    """Claim, compute and commit batches until the job completes, pauses or ``stop`` is set.

    Returns the job's status when it stops. Batches claimed by other live workers are waited
    for (polling every ``poll_s`` seconds) so that the phase can complete; a claim older than
    ``lease_s`` seconds is taken over (its worker is presumed dead).
    """
    count = 0
    while not (stop is not None and stop.is_set()):
        if max_batches is not None and count >= max_batches:
            break
        batch = claim_batch(store, job_id, worker=worker, lease_s=lease_s)
        if batch is None:
            status = job_status(store, job_id)
            if status.state != "running" or not _others_pending(store, job_id, worker):
                if status.state == "running" and _phase_pending(store, job_id):
                    continue  # the next phase starts on the next claim
                break
            if stop is not None:
                stop.wait(poll_s)
            else:
                time.sleep(poll_s)
            continue
        computed = compute_batch(store, batch)
        commit_batch(store, job_id, batch.batch_id, computed.vectors, phase=batch.phase,
                      failed=computed.failed)
        count += 1
        if on_batch is not None:
            on_batch(job_status(store, job_id))
    return job_status(store, job_id)


def pause(store: Store, job_id: int) -> UpgradeStatus:
    """Stop handing out batches (a batch being computed may still commit)."""
    return _set_state(store, job_id, "paused", allowed=("running",))


def resume(store: Store, job_id: int) -> UpgradeStatus:
    """Hand out batches again after ``pause``."""
    return _set_state(store, job_id, "running", allowed=("paused",))


def rollback(store: Store, job_id: int) -> UpgradeStatus:
    """Return the collection to the old version: every item gets back the vector it had.

    Raises:
        StateConflictError: the job is finalised or rolled back already, or some items hold
            only vectors the old version cannot search (added during the upgrade without a
            source or an old-version vector).
    """
    with store.write() as con:
        job = load_job(con, job_id)
        if job.state not in UNFINISHED:
            raise StateConflictError(f"upgrade job {job_id} is {job.state}; only a running, "
                                     "paused or completed upgrade can be rolled back")
        versions, rels = version_map(con), relations(con)
        for version, n in unrestorable(con, job.collection):
            if not can_search(job.old, version, rels, versions):
                raise StateConflictError(
                    f"cannot roll back upgrade job {job_id}: {n} items hold only {version!r} "
                    f"vectors that {job.old!r} cannot search (added during the upgrade "
                    "without a source); delete them or finalise the upgrade")
        restore_previous(con, job.collection)
        set_serving_version(con, job.collection, job.old)
        set_state(con, job, "rolled_back", finished=True)
    logger.info("upgrade job %d rolled back to %s", job_id, job.old)
    return job_status(store, job_id)


def finalize(store: Store, job_id: int) -> UpgradeStatus:
    """Drop the old vectors kept for a rollback; the upgrade can no longer be undone.

    Raises:
        StateConflictError: the job has not completed.
    """
    with store.write() as con:
        job = load_job(con, job_id)
        if job.state != "completed":
            raise StateConflictError(f"upgrade job {job_id} is {job.state}; only a completed "
                                     "upgrade can be finalised")
        drop_previous(con, job.collection)
        set_state(con, job, "finalized")
    return job_status(store, job_id)


def release_claims(store: Store, job_id: int, *, worker: str | None = None) -> int:
    """Forget uncommitted claims (of ``worker``, or all) so any worker can take them now."""
    with store.write() as con:
        load_job(con, job_id)
        return release(con, job_id, worker)


def latest_job(store: Store, collection: str) -> int:
    """The id of the most recent upgrade job of ``collection``.

    Raises:
        UnknownNameError: unknown collection, or it has never been upgraded.
    """
    with store.read() as con:
        return latest_job_id(con, collection)


def active_jobs(store: Store) -> list[int]:
    """Ids of every running job, oldest first (what a background worker should process)."""
    with store.read() as con:
        return running_job_ids(con)


# ------------------------------------------------------------------------ helpers


def _ensure_phase_started(store: Store, job_id: int) -> None:
    """Plan and store the current phase's order if it is not ready yet."""
    with store.read() as con:
        job = load_job(con, job_id)
    if job.state not in ("running", "paused") or job.phase_ready:
        return
    order, skipped = plan_order(store, job, job.phase_index)
    with store.write() as con:
        again = load_job(con, job_id)
        if again.phase_ready or again.phase_index != job.phase_index or again.state not in (
                "running", "paused"):
            return
        insert_phase(con, again, job.phase_index, order, skipped)


def _set_state(store: Store, job_id: int, state: str, *,
               allowed: tuple[str, ...]) -> UpgradeStatus:
    with store.write() as con:
        job = load_job(con, job_id)
        if job.state not in allowed:
            raise StateConflictError(f"upgrade job {job_id} is {job.state}; it must be "
                                     f"{' or '.join(allowed)} to become {state}")
        set_state(con, job, state)
    return job_status(store, job_id)


def _others_pending(store: Store, job_id: int, worker: str) -> bool:
    with store.read() as con:
        return others_pending(con, load_job(con, job_id), worker)


def _phase_pending(store: Store, job_id: int) -> bool:
    with store.read() as con:
        job = load_job(con, job_id)
    return job.state == "running" and not job.phase_ready
