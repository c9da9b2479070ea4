"""The upgrade orchestrator: move a collection from version vA to vB while it serves.

Strategies (each a list of phases; a phase re-embeds or transforms items in a stored order):

- ``hot-refresh``: vB serves at once (it must be able to search vA vectors: a declared
  compatibility); items with a source are re-embedded by vB batch by batch in the chosen order.
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
"""

from __future__ import annotations

import json
import logging
import math
import sqlite3
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal, NamedTuple

import numpy as np

from compatkit.errors import CompatkitError, IncompatibleSpacesError, UnknownNameError
from compatkit.index.errors import StateConflictError
from compatkit.index.store import (
    _relations,
    _require_collection,
    _require_version,
    _version_map,
    bump_epoch,
    last_change,
    log_changes,
)
from compatkit.index.vectors import as_vectors, stack_blobs, to_blob
from compatkit.index.versions import Relation, VersionInfo, can_search

if TYPE_CHECKING:
    from compatkit.index.store import IndexStore

logger = logging.getLogger(__name__)

Strategy = Literal["hot-refresh", "transform", "cold"]
STRATEGIES: tuple[str, ...] = ("hot-refresh", "transform", "cold")
JOB_STATES: tuple[str, ...] = ("running", "paused", "completed", "rolled_back", "finalized")
#: Orderings that need data a live system does not have (new vectors of the gallery).
ANALYSIS_ONLY_ORDERINGS: tuple[str, ...] = ("oracle",)
MAX_BATCH_SIZE = 100_000
DEFAULT_LEASE_S = 300.0
_RATE_WINDOW = 20
_START_RETRIES = 5


@dataclass(frozen=True)
class Phase:
    """One pass over the collection: ``refresh`` (embed sources with vB) or ``transform``
    (map stored vA vectors), writing ``live`` (into the searched slot) or ``aside`` (switched
    in when the phase completes), in ``ordering``."""

    kind: Literal["refresh", "transform"]
    placement: Literal["live", "aside"]
    ordering: str

    def label(self) -> str:
        """e.g. ``refresh(live, random)``."""
        return f"{self.kind}({self.placement}, {self.ordering})"


@dataclass(frozen=True)
class UpgradeStatus:
    """Where an upgrade job stands.

    ``total``/``done``/``fraction`` count the current phase's positions; ``written`` counts the
    vectors written in it, ``skipped`` the items it could not cover (no source, no side
    vector) and ``failed`` the sources that could not be embedded. ``rate`` is items per second
    over the last batches and ``eta_s`` the seconds left at that rate (None while unknown).
    """

    job: int
    collection: str
    old_version: str
    new_version: str
    strategy: str
    state: str
    phase: int
    phases: tuple[str, ...]
    total: int
    done: int
    fraction: float
    written: int
    skipped: int
    failed: int
    rate: float | None
    eta_s: float | None
    created: float
    updated: float
    finished: float | None

    def as_dict(self) -> dict[str, Any]:
        """A JSON-able dict of every field."""
        return {k: (list(v) if isinstance(v, tuple) else v) for k, v in self.__dict__.items()}


@dataclass(frozen=True)
class BatchItem:
    """One position of a claimed batch. ``skip``: the item was deleted or replaced since the
    phase started, so its row of the committed vectors is ignored."""

    key: int
    id: str
    source: str | None
    revision: int
    skip: bool


@dataclass(frozen=True)
class Batch:
    """A claimed batch: compute one vB vector per item (rows of skipped items are ignored).

    Shapes: ``old_vectors`` (n, d_old) and ``side`` (n, d_side) for a transform phase
    (zeros on skipped rows), else None.
    """

    job: int
    phase: int
    batch_id: int
    kind: Literal["refresh", "transform"]
    new_version: str
    items: tuple[BatchItem, ...]
    old_vectors: np.ndarray | None = None
    side: np.ndarray | None = None

    @property
    def todo(self) -> list[int]:
        """Row indices of the items to compute (not skipped)."""
        return [i for i, it in enumerate(self.items) if not it.skip]


@dataclass(frozen=True)
class _Job:
    id: int
    collection: str
    old: str
    new: str
    strategy: str
    ordering: str
    options: dict[str, Any]
    state: str
    phases: tuple[Phase, ...]
    phase_index: int
    phase_ready: bool
    created: float
    updated: float
    finished: float | None

    @property
    def phase(self) -> Phase:
        return self.phases[min(self.phase_index, len(self.phases) - 1)]


# ------------------------------------------------------------------------ public API


def start_upgrade(
    store: IndexStore, collection: str, new_version: str, *,
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
        _check_ordering(name, given_order)
    with store.read() as con:
        old, _, _ = _require_collection(con, collection)
        new_info = _require_version(con, new_version)
        versions, relations = _version_map(con), _relations(con)
        _refuse_if_active(con, collection)
    if new_info.kind != "model":
        raise ValueError(f"version {new_version!r} is a {new_info.kind} model, not a model")
    if new_version == old:
        raise ValueError(f"collection {collection!r} is already served by {new_version!r}")
    phases = _plan_phases(store, strategy, old, new_version, ordering, then_refresh,
                          refresh_ordering, versions, relations)
    options = {"seed": int(seed), "batch_size": batch_size, "temperature": float(temperature),
               "given_order": list(given_order) if given_order is not None else None}
    job = _Job(0, collection, old, new_version, strategy, ordering, options, "running",
               phases, 0, False, 0.0, 0.0, None)
    for _ in range(_START_RETRIES):
        with store.read() as con:
            seen = last_change(con, collection)
        order, skipped = _plan_order(store, job, 0)
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


def _create_job(con: sqlite3.Connection, job: _Job, order: list[int], skipped: int) -> int:
    """Insert a planned job with its first phase's order; serve vB now if the phase is live."""
    collection, old, new_version = job.collection, job.old, job.new
    _refuse_if_active(con, collection)
    if _require_collection(con, collection)[0] != old:
        raise StateConflictError(f"collection {collection!r} changed version meanwhile")
    now = time.time()
    cur = con.execute(
        "INSERT INTO jobs (collection, old_version, new_version, strategy, ordering, "
        "options, state, phases, phase_index, phase_ready, created, updated) "
        "VALUES (?, ?, ?, ?, ?, ?, 'running', ?, 0, 0, ?, ?)",
        (collection, old, new_version, job.strategy, job.ordering, json.dumps(job.options),
         json.dumps([p.__dict__ for p in job.phases]), now, now))
    job_id = int(cur.lastrowid)
    if job.phases[0].placement == "live":
        con.execute("UPDATE collections SET serving_version=? WHERE name=?",
                    (new_version, collection))
    _insert_phase(con, _load_job(con, job_id), 0, order, skipped)
    return job_id


def claim_batch(
    store: IndexStore, job_id: int, *, worker: str = "local", lease_s: float = DEFAULT_LEASE_S,
) -> Batch | None:
    """Claim the next batch of a running job for ``worker``, or None when there is none now.

    A worker that claimed a batch and has not committed it gets the same batch again (so a
    restarted worker resumes its batch); a batch whose claim is older than ``lease_s`` seconds
    goes to the next worker that asks.
    """
    _ensure_phase_started(store, job_id)
    now = time.time()
    with store.write() as con:
        job = _load_job(con, job_id)
        if job.state != "running" or not job.phase_ready:
            return None
        p = job.phase_index
        total, bs, next_batch = con.execute(
            "SELECT total, batch_size, next_batch FROM job_phases WHERE job=? AND phase=?",
            (job_id, p)).fetchone()
        row = con.execute(
            "SELECT batch, items FROM job_batches WHERE job=? AND phase=? AND state='claimed' "
            "AND (worker=? OR claimed < ?) ORDER BY worker=? DESC, batch LIMIT 1",
            (job_id, p, worker, now - lease_s, worker)).fetchone()
        if row is not None:
            batch_id, blob = int(row[0]), row[1]
            con.execute("UPDATE job_batches SET worker=?, claimed=? WHERE job=? AND phase=? "
                        "AND batch=?", (worker, now, job_id, p, batch_id))
        else:
            batch_id = int(next_batch)
            if batch_id * bs >= total:
                return None
            keys = [int(r[0]) for r in con.execute(
                "SELECT item FROM job_order WHERE job=? AND phase=? AND position >= ? AND "
                "position < ? ORDER BY position", (job_id, p, batch_id * bs, (batch_id + 1) * bs))]
            revs = _revisions(con, keys)
            pairs = np.array([(k, revs.get(k, -1)) for k in keys], dtype=np.int64).reshape(-1, 2)
            blob = pairs.tobytes()
            con.execute("INSERT INTO job_batches VALUES (?, ?, ?, 'claimed', ?, ?, ?, ?, NULL)",
                        (job_id, p, batch_id, worker, blob, len(keys), now))
            con.execute("UPDATE job_phases SET next_batch=? WHERE job=? AND phase=?",
                        (batch_id + 1, job_id, p))
        return _batch_contents(con, job, p, batch_id, blob)


def commit_batch(
    store: IndexStore, job_id: int, batch_id: int, vectors: Any, *, phase: int | None = None,
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
        job = _load_job(con, job_id)
        p = job.phase_index if phase is None else phase
        if job.state not in ("running", "paused") or p != job.phase_index:
            return False
        row = con.execute("SELECT state, items FROM job_batches WHERE job=? AND phase=? AND "
                          "batch=?", (job_id, p, batch_id)).fetchone()
        if row is None:
            raise ValueError(f"batch {batch_id} of job {job_id} (phase {p}) was never claimed")
        if row[0] == "committed":
            return False
        pairs = np.frombuffer(row[1], dtype=np.int64).reshape(-1, 2)
        dim = _require_version(con, job.new).dim
        arr = np.asarray(vectors, dtype=np.float32)
        if arr.shape != (len(pairs), dim):
            raise ValueError(f"batch {batch_id} needs vectors of shape ({len(pairs)}, {dim}), "
                             f"got {arr.shape}")
        bad = sorted({int(i) for i in failed})
        if bad and (bad[0] < 0 or bad[-1] >= len(pairs)):
            raise ValueError(f"failed rows must lie in [0, {len(pairs)}), got {bad}")
        keep = np.ones(len(pairs), dtype=bool)
        keep[bad] = False
        written = _write_batch(con, job, pairs[keep], arr[keep])
        now = time.time()
        con.execute("UPDATE job_batches SET state='committed', committed=? WHERE job=? AND "
                    "phase=? AND batch=?", (now, job_id, p, batch_id))
        con.execute("UPDATE job_phases SET done = done + ?, written = written + ?, "
                    "failed = failed + ? WHERE job=? AND phase=?",
                    (len(pairs), written, len(bad), job_id, p))
        con.execute("UPDATE jobs SET updated=? WHERE id=?", (now, job_id))
        total, bs = con.execute("SELECT total, batch_size FROM job_phases WHERE job=? AND "
                                "phase=?", (job_id, p)).fetchone()
        committed = con.execute("SELECT count(*) FROM job_batches WHERE job=? AND phase=? AND "
                                "state='committed'", (job_id, p)).fetchone()[0]
        if committed >= math.ceil(total / bs):
            _finish_phase(con, job)
    return True


class BatchVectors(NamedTuple):
    """What a worker computed for a batch: one row per item, and the rows that failed."""

    vectors: np.ndarray
    failed: tuple[int, ...]


def compute_batch(store: IndexStore, batch: Batch) -> BatchVectors:
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
    rel = _transform_relation(store, batch.job)
    side = None if batch.side is None else batch.side[todo]
    out[todo] = store.transformer(rel).apply(batch.old_vectors[todo], side)
    return BatchVectors(out, ())


def run_backfill(
    store: IndexStore, job_id: int, *, worker: str = "local", stop: threading.Event | None = None,
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


def pause(store: IndexStore, job_id: int) -> UpgradeStatus:
    """Stop handing out batches (a batch being computed may still commit)."""
    return _set_state(store, job_id, "paused", allowed=("running",))


def resume(store: IndexStore, job_id: int) -> UpgradeStatus:
    """Hand out batches again after ``pause``."""
    return _set_state(store, job_id, "running", allowed=("paused",))


def rollback(store: IndexStore, job_id: int) -> UpgradeStatus:
    """Return the collection to the old version: every item gets back the vector it had.

    Raises:
        StateConflictError: the job is finalised or rolled back already, or some items hold
            only vectors the old version cannot search (added during the upgrade without a
            source or an old-version vector).
    """
    with store.write() as con:
        job = _load_job(con, job_id)
        if job.state not in ("running", "paused", "completed"):
            raise StateConflictError(f"upgrade job {job_id} is {job.state}; only a running, "
                                     "paused or completed upgrade can be rolled back")
        versions, relations = _version_map(con), _relations(con)
        in_coll = "item IN (SELECT key FROM items WHERE collection=?)"
        rows = con.execute(
            f"SELECT version, count(*) FROM vectors c WHERE slot='current' AND {in_coll} AND "
            "NOT EXISTS (SELECT 1 FROM vectors p WHERE p.item=c.item AND p.slot='previous') "
            "GROUP BY version", (job.collection,)).fetchall()
        for version, n in rows:
            if not can_search(job.old, version, relations, versions):
                raise StateConflictError(
                    f"cannot roll back upgrade job {job_id}: {n} items hold only {version!r} "
                    f"vectors that {job.old!r} cannot search (added during the upgrade "
                    "without a source); delete them or finalise the upgrade")
        con.execute(f"DELETE FROM vectors WHERE slot='current' AND {in_coll} AND item IN "
                    "(SELECT item FROM vectors WHERE slot='previous')", (job.collection,))
        con.execute(f"UPDATE vectors SET slot='current' WHERE slot='previous' AND {in_coll}",
                    (job.collection,))
        con.execute(f"DELETE FROM vectors WHERE slot='next' AND {in_coll}", (job.collection,))
        con.execute("UPDATE collections SET serving_version=? WHERE name=?",
                    (job.old, job.collection))
        bump_epoch(con, job.collection)
        now = time.time()
        con.execute("UPDATE jobs SET state='rolled_back', updated=?, finished=? WHERE id=?",
                    (now, now, job_id))
    logger.info("upgrade job %d rolled back to %s", job_id, job.old)
    return job_status(store, job_id)


def finalize(store: IndexStore, job_id: int) -> UpgradeStatus:
    """Drop the old vectors kept for a rollback; the upgrade can no longer be undone.

    Raises:
        StateConflictError: the job has not completed.
    """
    with store.write() as con:
        job = _load_job(con, job_id)
        if job.state != "completed":
            raise StateConflictError(f"upgrade job {job_id} is {job.state}; only a completed "
                                     "upgrade can be finalised")
        con.execute("DELETE FROM vectors WHERE slot='previous' AND item IN "
                    "(SELECT key FROM items WHERE collection=?)", (job.collection,))
        con.execute("UPDATE jobs SET state='finalized', updated=? WHERE id=?",
                    (time.time(), job_id))
    return job_status(store, job_id)


def release_claims(store: IndexStore, job_id: int, *, worker: str | None = None) -> int:
    """Forget uncommitted claims (of ``worker``, or all) so any worker can take them now."""
    with store.write() as con:
        _load_job(con, job_id)
        cur = con.execute(
            "UPDATE job_batches SET claimed=0 WHERE job=? AND state='claimed'"
            + ("" if worker is None else " AND worker=?"),
            (job_id,) if worker is None else (job_id, worker))
        return int(cur.rowcount)


def latest_job(store: IndexStore, collection: str) -> int:
    """The id of the most recent upgrade job of ``collection``.

    Raises:
        UnknownNameError: unknown collection, or it has never been upgraded.
    """
    with store.read() as con:
        _require_collection(con, collection)
        row = con.execute("SELECT max(id) FROM jobs WHERE collection=?", (collection,)).fetchone()
    if row[0] is None:
        raise UnknownNameError(f"collection {collection!r} has no upgrade job")
    return int(row[0])


def job_status(store: IndexStore, job_id: int) -> UpgradeStatus:
    """The status of an upgrade job (progress of its current phase, rate, ETA).

    Raises:
        UnknownNameError: no such job.
    """
    with store.read() as con:
        job = _load_job(con, job_id)
        p = min(job.phase_index, len(job.phases) - 1)
        row = con.execute("SELECT total, skipped, done, written, failed FROM job_phases "
                          "WHERE job=? AND phase=?", (job_id, p)).fetchone()
        total, skipped, done, written, failed = (int(x) for x in row) if row else (0,) * 5
        recent = con.execute(
            "SELECT size, claimed, committed FROM job_batches WHERE job=? AND phase=? AND "
            "state='committed' ORDER BY committed DESC LIMIT ?",
            (job_id, p, _RATE_WINDOW)).fetchall()
    if job.state in ("completed", "finalized"):
        fraction = 1.0
    else:
        fraction = 1.0 if total == 0 and job.phase_ready else (done / total if total else 0.0)
    rate = _rate(recent)
    eta = None if rate is None or rate <= 0 else max(total - done, 0) / rate
    if job.state in ("completed", "finalized", "rolled_back"):
        eta = 0.0 if job.state != "rolled_back" else None
    return UpgradeStatus(
        job.id, job.collection, job.old, job.new, job.strategy, job.state, p,
        tuple(ph.label() for ph in job.phases), total, done, float(fraction), written, skipped,
        failed, rate, eta, job.created, job.updated, job.finished)


def active_jobs(store: IndexStore) -> list[int]:
    """Ids of every running job, oldest first (what a background worker should process)."""
    with store.read() as con:
        return [int(r[0]) for r in con.execute(
            "SELECT id FROM jobs WHERE state='running' ORDER BY id")]


# ------------------------------------------------------------------------ planning


def _check_ordering(name: str, given_order: Sequence[str] | None) -> None:
    from compatkit.ordering import ORDERINGS

    if name in ANALYSIS_ONLY_ORDERINGS:
        raise ValueError(f"ordering {name!r} needs the new vectors of every item and is for "
                         "analysis only; use random, uncertainty, sigma or given")
    ORDERINGS.get(name)  # unknown names raise with suggestions
    if name == "given" and given_order is None:
        raise ValueError("ordering 'given' needs given_order (a list of item ids)")


def _plan_phases(
    store: IndexStore, strategy: str, old: str, new: str, ordering: str, then_refresh: bool,
    refresh_ordering: str | None, versions: dict[str, VersionInfo], relations: list[Relation],
) -> tuple[Phase, ...]:
    new_searches_old = can_search(new, old, relations, versions)
    needs_embedder = strategy in ("hot-refresh", "cold") or then_refresh
    if needs_embedder and not store.has_embedder(new):
        raise CompatkitError(f"strategy {strategy!r} re-embeds sources with {new!r}, which has "
                             "no embedder; register it from a model artifact")
    if strategy == "hot-refresh":
        if not new_searches_old:
            raise IncompatibleSpacesError(
                f"hot-refresh serves {new!r} at once, so {new!r} must be able to search "
                f"{old!r} vectors; declare {new!r} compatible with {old!r}, or use the "
                "'cold' or 'transform' strategy")
        return (Phase("refresh", "live", ordering),)
    if strategy == "cold":
        return (Phase("refresh", "aside", ordering),)
    if not any(r.kind == "transform" and r.old == old and r.new == new for r in relations):
        raise IncompatibleSpacesError(f"strategy 'transform' needs a transformation {old!r} -> "
                                      f"{new!r}; register one first")
    phases = [Phase("transform", "live" if new_searches_old else "aside", ordering)]
    if then_refresh:
        phases.append(Phase("refresh", "live", refresh_ordering or ordering))
    return tuple(phases)


@dataclass(frozen=True)
class _Candidate:
    key: int
    id: str
    source: str | None
    current: tuple[str, str | None, bytes]
    previous: tuple[str, bytes] | None
    target_done: bool
    side: bytes | None


def _plan_order(store: IndexStore, job: _Job, p: int) -> tuple[list[int], int]:
    """(item keys in backfill order, number of items the phase cannot cover) for phase ``p``.

    Raises:
        IncompatibleSpacesError: items the phase cannot cover would be unsearchable by vB.
    """
    phase = job.phases[p]
    rel = _transform_relation_of(store, job) if phase.kind == "transform" else None
    side_version = rel.side_version if rel is not None else None
    with store.read() as con:
        versions, relations = _version_map(con), _relations(con)
        cands = _candidates(con, job, phase, side_version)
    eligible, blocked = [], {}
    for c in cands:
        if c.target_done:
            continue
        if phase.kind == "refresh":
            ok = c.source is not None
        else:
            ok = c.current[0] == job.old and (side_version is None or c.side is not None)
        if ok:
            eligible.append(c)
        else:
            blocked[c.current[0]] = blocked.get(c.current[0], 0) + 1
    for version, n in blocked.items():
        if phase.placement == "aside" and not can_search(job.new, version, relations, versions):
            why = "no source" if phase.kind == "refresh" else "no transformable vector"
            raise IncompatibleSpacesError(
                f"{n} items of version {version!r} have {why}, so they would keep {version!r} "
                f"vectors that {job.new!r} cannot search; declare {job.new!r} compatible with "
                f"{version!r}, or give these items sources")
    if phase.placement == "live" and p == 0:
        present = {c.current[0] for c in cands}
        for version in present:
            if not can_search(job.new, version, relations, versions):
                raise IncompatibleSpacesError(
                    f"{job.new!r} would serve at once but cannot search the collection's "
                    f"{version!r} vectors; declare the relation or use the 'cold' strategy")
    perm = _compute_order(store, job, phase, eligible, versions)
    return [eligible[i].key for i in perm], sum(blocked.values())


def _candidates(con: sqlite3.Connection, job: _Job, phase: Phase,
                side_version: str | None) -> list[_Candidate]:
    target_slot = "next" if phase.placement == "aside" else "current"
    rows = con.execute(
        "SELECT i.key, i.id, i.source, c.version, c.transformed_from, c.data, pv.version, "
        "pv.data, t.version, t.transformed_from, s.data FROM items i "
        "JOIN vectors c ON c.item = i.key AND c.slot = 'current' "
        "LEFT JOIN vectors pv ON pv.item = i.key AND pv.slot = 'previous' "
        "LEFT JOIN vectors t ON t.item = i.key AND t.slot = ? "
        "LEFT JOIN side_vectors s ON s.item = i.key AND s.version = ? "
        "WHERE i.collection = ? ORDER BY i.key",
        (target_slot, side_version or "", job.collection)).fetchall()
    out = []
    for (key, item_id, source, cv, ctf, cdata, pv, pdata, tv, ttf, sdata) in rows:
        done = tv == job.new and (phase.kind == "transform" or ttf is None)
        out.append(_Candidate(int(key), item_id, source, (cv, ctf, cdata),
                              None if pv is None else (pv, pdata), done, sdata))
    return out


def _compute_order(store: IndexStore, job: _Job, phase: Phase, eligible: list[_Candidate],
                   versions: dict[str, VersionInfo]) -> np.ndarray:
    """A permutation of ``range(len(eligible))`` by ``compatkit.ordering``."""
    from compatkit.ordering import backfill_order

    n = len(eligible)
    if n == 0:
        return np.zeros(0, dtype=np.int64)
    opts = job.options
    name = phase.ordering
    if name == "random":
        return backfill_order(name, n, seed=opts["seed"])
    if name == "given":
        return backfill_order(name, n,
                              order=_given_positions(eligible, opts.get("given_order") or []))
    old = _old_vectors(eligible, job, versions)
    if name == "uncertainty":
        return backfill_order(name, n, old_features=old, classifier=_classifier_of(store, job.old),
                              temperature=opts["temperature"])
    if name == "sigma":
        rel = _transform_relation_of(store, job)
        side = None
        if rel.side_version is not None:
            if any(c.side is None for c in eligible):
                raise CompatkitError(f"ordering 'sigma' needs a {rel.side_version!r} side vector "
                                     "for every item")
            side = stack_blobs([c.side or b"" for c in eligible], versions[rel.side_version].dim)
        return backfill_order(name, n, sigma=store.transformer(rel).sigma(old, side))
    raise ValueError(f"ordering {name!r} is not deployable in the index")


def _given_positions(eligible: list[_Candidate], given_ids: Sequence[str]) -> np.ndarray:
    """Positions of the eligible items in the given id order, then the rest oldest first."""
    index = {c.id: i for i, c in enumerate(eligible)}
    seen: set[str] = set()
    order = []
    for item_id in given_ids:
        if item_id in seen:
            raise ValueError(f"given_order lists item {item_id!r} twice")
        seen.add(item_id)
        if item_id in index:
            order.append(index[item_id])
    listed = set(order)
    order += [i for i in range(len(eligible)) if i not in listed]
    return np.asarray(order, dtype=np.int64)


def _old_vectors(eligible: list[_Candidate], job: _Job,
                 versions: dict[str, VersionInfo]) -> np.ndarray:
    """The old-version vector of each item (the kept previous one, else the current one)."""
    blobs = []
    for c in eligible:
        if c.previous is not None and c.previous[0] == job.old:
            blobs.append(c.previous[1])
        elif c.current[0] == job.old and c.current[1] is None:
            blobs.append(c.current[2])
        else:
            raise CompatkitError(f"item {c.id!r} has no {job.old!r} vector to order by")
    return stack_blobs(blobs, versions[job.old].dim)


def _classifier_of(store: IndexStore, version: str) -> np.ndarray:
    emb = store.embedder(version)
    weights = getattr(emb, "classifier_weights", lambda: None)()
    if weights is None:
        raise CompatkitError(f"ordering 'uncertainty' needs the classifier of {version!r}'s "
                             "model artifact; this version has none")
    return weights


def _transform_relation_of(store: IndexStore, job: _Job) -> Relation:
    for rel in store.relations():
        if rel.kind == "transform" and rel.old == job.old and rel.new == job.new:
            return rel
    raise IncompatibleSpacesError(f"no transformation {job.old!r} -> {job.new!r} is declared")


def _transform_relation(store: IndexStore, job_id: int) -> Relation:
    with store.read() as con:
        job = _load_job(con, job_id)
    return _transform_relation_of(store, job)


def _ensure_phase_started(store: IndexStore, job_id: int) -> None:
    with store.read() as con:
        job = _load_job(con, job_id)
    if job.state not in ("running", "paused") or job.phase_ready:
        return
    order, skipped = _plan_order(store, job, job.phase_index)
    with store.write() as con:
        again = _load_job(con, job_id)
        if again.phase_ready or again.phase_index != job.phase_index or again.state not in (
                "running", "paused"):
            return
        _insert_phase(con, again, job.phase_index, order, skipped)


def _insert_phase(con: sqlite3.Connection, job: _Job, p: int, order: list[int],
                  skipped: int) -> None:
    con.execute("INSERT INTO job_phases (job, phase, total, skipped, batch_size, started) "
                "VALUES (?, ?, ?, ?, ?, ?)",
                (job.id, p, len(order), skipped, job.options["batch_size"], time.time()))
    con.executemany("INSERT INTO job_order VALUES (?, ?, ?, ?)",
                    [(job.id, p, pos, key) for pos, key in enumerate(order)])
    con.execute("UPDATE jobs SET phase_ready=1, phase_index=?, updated=? WHERE id=?",
                (p, time.time(), job.id))
    if not order:
        _finish_phase(con, _load_job(con, job.id))


# ------------------------------------------------------------------------ batches


def _revisions(con: sqlite3.Connection, keys: list[int]) -> dict[int, int]:
    if not keys:
        return {}
    marks = ",".join("?" * len(keys))
    return {int(r[0]): int(r[1]) for r in con.execute(
        f"SELECT key, revision FROM items WHERE key IN ({marks})", keys)}


def _batch_contents(con: sqlite3.Connection, job: _Job, p: int, batch_id: int,
                    blob: bytes) -> Batch:
    pairs = np.frombuffer(blob, dtype=np.int64).reshape(-1, 2)
    keys = [int(k) for k in pairs[:, 0]]
    phase = job.phases[p]
    marks = ",".join("?" * len(keys)) or "NULL"
    found = {int(r[0]): r[1:] for r in con.execute(
        f"SELECT key, id, source, revision FROM items WHERE key IN ({marks})", keys)}
    items = []
    for key, rev in pairs.tolist():
        row = found.get(key)
        skip = row is None or int(row[2]) != rev
        items.append(BatchItem(key, row[0] if row else "", None if skip else row[1], rev, skip))
    if phase.kind == "refresh":
        return Batch(job.id, p, batch_id, "refresh", job.new, tuple(items))
    versions = _version_map(con)
    rel = next(r for r in _relations(con) if r.kind == "transform" and r.old == job.old
               and r.new == job.new)
    d_old = versions[job.old].dim
    old = np.zeros((len(items), d_old), dtype=np.float32)
    side = None
    if rel.side_version is not None:
        side = np.zeros((len(items), versions[rel.side_version].dim), dtype=np.float32)
    vec_rows = {int(r[0]): r[1:] for r in con.execute(
        f"SELECT item, version, data FROM vectors WHERE slot='current' AND item IN ({marks})",
        keys)}
    side_rows = {}
    if rel.side_version is not None:
        side_rows = {int(r[0]): r[1] for r in con.execute(
            f"SELECT item, data FROM side_vectors WHERE version=? AND item IN ({marks})",
            [rel.side_version, *keys])}
    for i, it in enumerate(items):
        v = vec_rows.get(it.key)
        if it.skip or v is None or v[0] != job.old or (side is not None and it.key not in
                                                        side_rows):
            items[i] = BatchItem(it.key, it.id, it.source, it.revision, True)
            continue
        old[i] = stack_blobs([v[1]], d_old)[0]
        if side is not None:
            side[i] = stack_blobs([side_rows[it.key]], side.shape[1])[0]
    return Batch(job.id, p, batch_id, "transform", job.new, tuple(items), old, side)


def _write_batch(con: sqlite3.Connection, job: _Job, pairs: np.ndarray, arr: np.ndarray) -> int:
    """Write the rows of still-current items; returns how many were written."""
    phase = job.phase
    keys = [int(k) for k in pairs[:, 0]]
    marks = ",".join("?" * len(keys)) or "NULL"
    revs = _revisions(con, keys)
    slots: dict[int, dict[str, tuple[str, str | None]]] = {}
    for item, slot, version, tf in con.execute(
            f"SELECT item, slot, version, transformed_from FROM vectors WHERE item IN ({marks})",
            keys):
        slots.setdefault(int(item), {})[slot] = (version, tf)
    target_slot = "next" if phase.placement == "aside" else "current"
    tf_new = job.old if phase.kind == "transform" else None
    todo = []
    for (key, rev), vec in zip(pairs.tolist(), arr, strict=True):
        if revs.get(key) != rev:
            continue  # deleted or replaced since the phase started
        have = slots.get(key, {}).get(target_slot)
        if have is not None and have[0] == job.new and (phase.kind == "transform"
                                                         or have[1] is None):
            continue  # already holds a vB vector (e.g. re-added during the upgrade)
        if phase.kind == "transform" and slots.get(key, {}).get("current", ("",))[0] != job.old:
            continue  # its stored vector changed version since the claim
        todo.append((key, vec))
    if not todo:
        return 0
    checked = as_vectors(np.stack([v for _, v in todo]), arr.shape[1],
                         what=f"committed {job.new!r} vectors")
    written = [k for k, _ in todo]
    if target_slot == "current":  # keep the first old vector of each item for a rollback
        kept = [k for k in written if "previous" in slots.get(k, {})]
        _for_keys(con, "DELETE FROM vectors WHERE slot='current' AND item IN ({})", kept)
        _for_keys(con, "UPDATE vectors SET slot='previous' WHERE slot='current' AND item IN ({})",
                  [k for k in written if "previous" not in slots.get(k, {})])
    else:
        _for_keys(con, "DELETE FROM vectors WHERE slot='next' AND item IN ({})", written)
    con.executemany("INSERT INTO vectors VALUES (?, ?, ?, ?, ?)",
                    [(k, target_slot, job.new, tf_new, to_blob(v))
                     for k, v in zip(written, checked, strict=True)])
    if target_slot == "current":
        log_changes(con, job.collection, written)
    return len(written)


def _for_keys(con: sqlite3.Connection, sql: str, keys: list[int], chunk: int = 500) -> None:
    """Run ``sql`` (with one ``IN ({})`` placeholder list) over ``keys`` in chunks."""
    for start in range(0, len(keys), chunk):
        part = keys[start:start + chunk]
        con.execute(sql.format(",".join("?" * len(part))), part)


def _finish_phase(con: sqlite3.Connection, job: _Job) -> None:
    """Switch an aside phase in, then move to the next phase or complete the job."""
    phase = job.phases[job.phase_index]
    if phase.placement == "aside":
        in_coll = "item IN (SELECT key FROM items WHERE collection=?)"
        con.execute(f"DELETE FROM vectors WHERE slot='previous' AND {in_coll} AND item IN "
                    "(SELECT item FROM vectors WHERE slot='next')", (job.collection,))
        con.execute(f"UPDATE vectors SET slot='previous' WHERE slot='current' AND {in_coll} "
                    "AND item IN (SELECT item FROM vectors WHERE slot='next')", (job.collection,))
        con.execute(f"UPDATE vectors SET slot='current' WHERE slot='next' AND {in_coll}",
                    (job.collection,))
        con.execute("UPDATE collections SET serving_version=? WHERE name=?",
                    (job.new, job.collection))
        bump_epoch(con, job.collection)
    now = time.time()
    if job.phase_index + 1 < len(job.phases):
        con.execute("UPDATE jobs SET phase_index=?, phase_ready=0, updated=? WHERE id=?",
                    (job.phase_index + 1, now, job.id))
    else:
        con.execute("UPDATE jobs SET state='completed', updated=?, finished=? WHERE id=?",
                    (now, now, job.id))
        logger.info("upgrade job %d of %r completed", job.id, job.collection)


# ------------------------------------------------------------------------ helpers


def _load_job(con: sqlite3.Connection, job_id: int) -> _Job:
    row = con.execute(
        "SELECT id, collection, old_version, new_version, strategy, ordering, options, state, "
        "phases, phase_index, phase_ready, created, updated, finished FROM jobs WHERE id=?",
        (int(job_id),)).fetchone()
    if row is None:
        raise UnknownNameError(f"unknown upgrade job {job_id}")
    phases = tuple(Phase(**p) for p in json.loads(row[8]))
    return _Job(int(row[0]), row[1], row[2], row[3], row[4], row[5], json.loads(row[6]),
                row[7], phases, int(row[9]), bool(row[10]), float(row[11]), float(row[12]),
                row[13])


def _refuse_if_active(con: sqlite3.Connection, collection: str) -> None:
    row = con.execute("SELECT id, state FROM jobs WHERE collection=? AND state IN "
                      "('running', 'paused', 'completed') ORDER BY id DESC LIMIT 1",
                      (collection,)).fetchone()
    if row is not None:
        raise StateConflictError(f"collection {collection!r} has upgrade job {row[0]} "
                                 f"({row[1]}); finalise or roll it back first")


def _set_state(store: IndexStore, job_id: int, state: str, *,
               allowed: tuple[str, ...]) -> UpgradeStatus:
    with store.write() as con:
        job = _load_job(con, job_id)
        if job.state not in allowed:
            raise StateConflictError(f"upgrade job {job_id} is {job.state}; it must be "
                                     f"{' or '.join(allowed)} to become {state}")
        con.execute("UPDATE jobs SET state=?, updated=? WHERE id=?", (state, time.time(), job_id))
    return job_status(store, job_id)


def _others_pending(store: IndexStore, job_id: int, worker: str) -> bool:
    with store.read() as con:
        job = _load_job(con, job_id)
        row = con.execute("SELECT count(*) FROM job_batches WHERE job=? AND phase=? AND "
                          "state='claimed' AND worker != ?",
                          (job_id, job.phase_index, worker)).fetchone()
    return bool(row[0])


def _phase_pending(store: IndexStore, job_id: int) -> bool:
    with store.read() as con:
        job = _load_job(con, job_id)
    return job.state == "running" and not job.phase_ready


def _rate(recent: list[tuple[int, float, float]]) -> float | None:
    """Items per second over the most recent committed batches (newest first)."""
    if not recent:
        return None
    if len(recent) == 1:
        size, claimed, committed = recent[0]
        span = committed - claimed
        return size / span if span > 0 else None
    span = recent[0][2] - recent[-1][2]
    items = sum(r[0] for r in recent[:-1])
    return items / span if span > 0 else None
