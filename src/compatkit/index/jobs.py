"""Upgrade job records: jobs, their phases and stored orders, and the lease queue of batches.

A phase's order is stored once (``job_order``) and handed out in batches: ``claim`` gives a
worker its own uncommitted batch again, else a batch whose lease expired, else the next one;
``record_commit`` marks a batch committed with the phase's progress, and finishes the phase
(switching an aside phase in) when its last batch commits. Every function takes the open
transaction of its caller (``compatkit.index.upgrade``), except the read-only lookups.
"""

from __future__ import annotations

import json
import logging
import math
import sqlite3
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np

from compatkit.errors import IncompatibleSpacesError, UnknownNameError
from compatkit.index.db import (
    Database,
    item_rows,
    relations,
    require_collection,
    set_serving_version,
    version_map,
)
from compatkit.index.errors import StateConflictError
from compatkit.index.slots import current_vectors, side_vectors_of, switch_in_next
from compatkit.index.vectors import stack_blobs
from compatkit.index.versions import Relation

logger = logging.getLogger(__name__)

#: States of a job that is not finished: it blocks another upgrade of its collection.
UNFINISHED = ("running", "paused", "completed")
_RATE_WINDOW = 20


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
class Job:
    """An upgrade job's row: versions, strategy, options, state and its phases."""

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
        """The current phase (the last one once the job is done)."""
        return self.phases[min(self.phase_index, len(self.phases) - 1)]


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


def transform_relation(rels: Sequence[Relation], old: str, new: str) -> Relation:
    """The declared transformation ``old`` -> ``new``. Raises IncompatibleSpacesError."""
    for rel in rels:
        if rel.kind == "transform" and rel.old == old and rel.new == new:
            return rel
    raise IncompatibleSpacesError(f"no transformation {old!r} -> {new!r} is declared")


# --------------------------------------------------------------------- jobs


def load_job(con: sqlite3.Connection, job_id: int) -> Job:
    """The job ``job_id``. Raises UnknownNameError."""
    row = con.execute(
        "SELECT id, collection, old_version, new_version, strategy, ordering, options, state, "
        "phases, phase_index, phase_ready, created, updated, finished FROM jobs WHERE id=?",
        (int(job_id),)).fetchone()
    if row is None:
        raise UnknownNameError(f"unknown upgrade job {job_id}")
    phases = tuple(Phase(**p) for p in json.loads(row[8]))
    return Job(int(row[0]), row[1], row[2], row[3], row[4], row[5], json.loads(row[6]),
               row[7], phases, int(row[9]), bool(row[10]), float(row[11]), float(row[12]),
               row[13])


def unfinished_job(con: sqlite3.Connection, collection: str) -> Job | None:
    """The collection's job that is running, paused or completed (not finalised), if any."""
    marks = ",".join("?" * len(UNFINISHED))
    row = con.execute(f"SELECT max(id) FROM jobs WHERE collection=? AND state IN ({marks})",
                      (collection, *UNFINISHED)).fetchone()
    return None if row[0] is None else load_job(con, row[0])


def refuse_if_unfinished(con: sqlite3.Connection, collection: str) -> None:
    """Raise StateConflictError if the collection has an unfinished job."""
    job = unfinished_job(con, collection)
    if job is not None:
        raise StateConflictError(f"collection {collection!r} has upgrade job {job.id} "
                                 f"({job.state}); finalise or roll it back first")


def insert_job(con: sqlite3.Connection, job: Job) -> int:
    """Insert ``job`` (its id, state and times are ignored) as running; returns its id."""
    now = time.time()
    cur = con.execute(
        "INSERT INTO jobs (collection, old_version, new_version, strategy, ordering, "
        "options, state, phases, phase_index, phase_ready, created, updated) "
        "VALUES (?, ?, ?, ?, ?, ?, 'running', ?, 0, 0, ?, ?)",
        (job.collection, job.old, job.new, job.strategy, job.ordering, json.dumps(job.options),
         json.dumps([p.__dict__ for p in job.phases]), now, now))
    return int(cur.lastrowid)


def set_state(con: sqlite3.Connection, job: Job, state: str, *, finished: bool = False) -> None:
    """Move ``job`` to ``state`` (stamping its finish time if ``finished``)."""
    now = time.time()
    if finished:
        con.execute("UPDATE jobs SET state=?, updated=?, finished=? WHERE id=?",
                    (state, now, now, job.id))
    else:
        con.execute("UPDATE jobs SET state=?, updated=? WHERE id=?", (state, now, job.id))


def latest_job_id(con: sqlite3.Connection, collection: str) -> int:
    """The id of the collection's most recent job.

    Raises:
        UnknownNameError: unknown collection, or it has never been upgraded.
    """
    require_collection(con, collection)
    row = con.execute("SELECT max(id) FROM jobs WHERE collection=?", (collection,)).fetchone()
    if row[0] is None:
        raise UnknownNameError(f"collection {collection!r} has no upgrade job")
    return int(row[0])


def running_job_ids(con: sqlite3.Connection) -> list[int]:
    """Ids of every running job, oldest first."""
    return [int(r[0]) for r in con.execute("SELECT id FROM jobs WHERE state='running' ORDER BY id")]


# --------------------------------------------------------------------- phases


def insert_phase(con: sqlite3.Connection, job: Job, p: int, order: list[int],
                 skipped: int) -> None:
    """Store phase ``p``'s order and make it ready (finishing it at once if empty)."""
    con.execute("INSERT INTO job_phases (job, phase, total, skipped, batch_size, started) "
                "VALUES (?, ?, ?, ?, ?, ?)",
                (job.id, p, len(order), skipped, job.options["batch_size"], time.time()))
    con.executemany("INSERT INTO job_order VALUES (?, ?, ?, ?)",
                    [(job.id, p, pos, key) for pos, key in enumerate(order)])
    con.execute("UPDATE jobs SET phase_ready=1, phase_index=?, updated=? WHERE id=?",
                (p, time.time(), job.id))
    if not order:
        finish_phase(con, load_job(con, job.id))


def finish_phase(con: sqlite3.Connection, job: Job) -> None:
    """Switch an aside phase in, then move to the next phase or complete the job."""
    phase = job.phases[job.phase_index]
    if phase.placement == "aside":
        switch_in_next(con, job.collection)
        set_serving_version(con, job.collection, job.new)
    now = time.time()
    if job.phase_index + 1 < len(job.phases):
        con.execute("UPDATE jobs SET phase_index=?, phase_ready=0, updated=? WHERE id=?",
                    (job.phase_index + 1, now, job.id))
    else:
        con.execute("UPDATE jobs SET state='completed', updated=?, finished=? WHERE id=?",
                    (now, now, job.id))
        logger.info("upgrade job %d of %r completed", job.id, job.collection)


# --------------------------------------------------------------------- the lease queue


def claim(con: sqlite3.Connection, job: Job, worker: str, lease_s: float) -> Batch | None:
    """The next batch of the job's current phase for ``worker`` (see the module docstring),
    or None when every batch is handed out."""
    now = time.time()
    p = job.phase_index
    total, bs, next_batch = con.execute(
        "SELECT total, batch_size, next_batch FROM job_phases WHERE job=? AND phase=?",
        (job.id, p)).fetchone()
    row = con.execute(
        "SELECT batch, items FROM job_batches WHERE job=? AND phase=? AND state='claimed' "
        "AND (worker=? OR claimed < ?) ORDER BY worker=? DESC, batch LIMIT 1",
        (job.id, p, worker, now - lease_s, worker)).fetchone()
    if row is not None:
        batch_id, blob = int(row[0]), row[1]
        con.execute("UPDATE job_batches SET worker=?, claimed=? WHERE job=? AND phase=? "
                    "AND batch=?", (worker, now, job.id, p, batch_id))
        return _batch_contents(con, job, p, batch_id, blob)
    batch_id = int(next_batch)
    if batch_id * bs >= total:
        return None
    keys = [int(r[0]) for r in con.execute(
        "SELECT item FROM job_order WHERE job=? AND phase=? AND position >= ? AND "
        "position < ? ORDER BY position", (job.id, p, batch_id * bs, (batch_id + 1) * bs))]
    revs = {k: row[2] for k, row in item_rows(con, keys).items()}
    pairs = np.array([(k, revs.get(k, -1)) for k in keys], dtype=np.int64).reshape(-1, 2)
    blob = pairs.tobytes()
    con.execute("INSERT INTO job_batches VALUES (?, ?, ?, 'claimed', ?, ?, ?, ?, NULL)",
                (job.id, p, batch_id, worker, blob, len(keys), now))
    con.execute("UPDATE job_phases SET next_batch=? WHERE job=? AND phase=?",
                (batch_id + 1, job.id, p))
    return _batch_contents(con, job, p, batch_id, blob)


def claimed_pairs(con: sqlite3.Connection, job_id: int, p: int,
                  batch_id: int) -> tuple[str, np.ndarray] | None:
    """(state, (key, revision) pairs (n, 2) int64) of a claimed batch, or None if never claimed."""
    row = con.execute("SELECT state, items FROM job_batches WHERE job=? AND phase=? AND "
                      "batch=?", (job_id, p, batch_id)).fetchone()
    if row is None:
        return None
    return row[0], np.frombuffer(row[1], dtype=np.int64).reshape(-1, 2)


def record_commit(con: sqlite3.Connection, job: Job, p: int, batch_id: int, *, size: int,
                  written: int, failed: int) -> None:
    """Mark the batch committed with the phase's progress; finish the phase after its last."""
    now = time.time()
    con.execute("UPDATE job_batches SET state='committed', committed=? WHERE job=? AND "
                "phase=? AND batch=?", (now, job.id, p, batch_id))
    con.execute("UPDATE job_phases SET done = done + ?, written = written + ?, "
                "failed = failed + ? WHERE job=? AND phase=?",
                (size, written, failed, job.id, p))
    con.execute("UPDATE jobs SET updated=? WHERE id=?", (now, job.id))
    total, bs = con.execute("SELECT total, batch_size FROM job_phases WHERE job=? AND "
                            "phase=?", (job.id, p)).fetchone()
    committed = con.execute("SELECT count(*) FROM job_batches WHERE job=? AND phase=? AND "
                            "state='committed'", (job.id, p)).fetchone()[0]
    if committed >= math.ceil(total / bs):
        finish_phase(con, job)


def release(con: sqlite3.Connection, job_id: int, worker: str | None = None) -> int:
    """Expire the uncommitted claims (of ``worker``, or all); returns how many."""
    cur = con.execute(
        "UPDATE job_batches SET claimed=0 WHERE job=? AND state='claimed'"
        + ("" if worker is None else " AND worker=?"),
        (job_id,) if worker is None else (job_id, worker))
    return int(cur.rowcount)


def others_pending(con: sqlite3.Connection, job: Job, worker: str) -> bool:
    """Whether workers other than ``worker`` hold uncommitted batches of the current phase."""
    row = con.execute("SELECT count(*) FROM job_batches WHERE job=? AND phase=? AND "
                      "state='claimed' AND worker != ?",
                      (job.id, job.phase_index, worker)).fetchone()
    return bool(row[0])


def workers_with_claims(con: sqlite3.Connection, job_id: int, prefix: str) -> list[str]:
    """Names starting with ``prefix`` that hold uncommitted, unreleased claims of the job."""
    rows = con.execute("SELECT DISTINCT worker FROM job_batches WHERE job=? AND "
                       "state='claimed' AND claimed > 0 AND substr(worker, 1, ?) = ?",
                       (int(job_id), len(prefix), prefix)).fetchall()
    return sorted(r[0] for r in rows)


def _batch_contents(con: sqlite3.Connection, job: Job, p: int, batch_id: int,
                    blob: bytes) -> Batch:
    pairs = np.frombuffer(blob, dtype=np.int64).reshape(-1, 2)
    keys = [int(k) for k in pairs[:, 0]]
    phase = job.phases[p]
    found = item_rows(con, keys)
    items = []
    for key, rev in pairs.tolist():
        row = found.get(key)
        skip = row is None or row[2] != rev
        items.append(BatchItem(key, row[0] if row else "", None if skip else row[1], rev, skip))
    if phase.kind == "refresh":
        return Batch(job.id, p, batch_id, "refresh", job.new, tuple(items))
    versions = version_map(con)
    rel = transform_relation(relations(con), job.old, job.new)
    d_old = versions[job.old].dim
    old = np.zeros((len(items), d_old), dtype=np.float32)
    side = None
    side_rows: dict[int, bytes] = {}
    if rel.side_version is not None:
        side = np.zeros((len(items), versions[rel.side_version].dim), dtype=np.float32)
        side_rows = side_vectors_of(con, rel.side_version, keys)
    vec_rows = {int(r[0]): (r[1], r[3]) for r in current_vectors(con, job.collection, keys)}
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


# --------------------------------------------------------------------- status


def job_status(db: Database, job_id: int) -> UpgradeStatus:
    """The status of an upgrade job (progress of its current phase, rate, ETA).

    Raises:
        UnknownNameError: no such job.
    """
    with db.read() as con:
        job = load_job(con, job_id)
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
