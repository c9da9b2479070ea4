"""Stateful property test of the store: random operations against a plain in-memory model.

Hypothesis drives random sequences of add, replace, delete, search, start upgrade (hot-refresh
vA -> vB, cold either way), batches claimed and committed (twice, too), pause, resume,
rollback, finalize, a worker that claims a batch and never commits, and a reopened store (a
restarted process). After every step the store must agree with the model: the same live items,
each with exactly one current vector of an allowed version holding exactly the vector that
version's embedder gives its source, kept old vectors only while a rollback may need them, a
rollback restoring exactly the vectors the items had, and searches returning only live items.
"""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path

import numpy as np
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    initialize,
    invariant,
    precondition,
    rule,
    run_state_machine_as_test,
)

from compatkit.index import IndexStore, ItemInput
from compatkit.index.upgrade import (
    claim_batch,
    commit_batch,
    compute_batch,
    finalize,
    job_status,
    pause,
    resume,
    rollback,
    start_upgrade,
)

from .conftest import hash_versions

IDS = [f"item{i}" for i in range(10)] + ["dir/x y", "ünï"]
ACTIVE = ("running", "paused", "completed")


class StoreMachine(RuleBasedStateMachine):
    """The store under test next to its model: live items (id -> source), the serving version,
    the upgrade job (id, old, new, strategy, state) and the vectors a rollback must restore."""

    def __init__(self) -> None:
        super().__init__()
        self.root = Path(tempfile.mkdtemp(prefix="compatkit-sm-"))
        self.store = self._open()
        hash_versions(self.store)
        self.store.declare_compatible("vB", "vA")
        self.store.create_collection("c", "vA")
        self.embedders = {v: self.store.embedder(v) for v in ("vA", "vB")}
        self.items: dict[str, str] = {}
        self.revision = 0
        self.serving = "vA"
        self.job: dict | None = None
        self.snapshot: dict[str, bytes] = {}  # id -> old current vector at the upgrade start
        self.ghosts = 0
        self.committed: tuple[int, int, int, np.ndarray] | None = None  # job, phase, batch, vecs

    def _open(self) -> IndexStore:
        return IndexStore(self.root, synchronous="NORMAL")

    def teardown(self) -> None:
        self.store.close()
        shutil.rmtree(self.root, ignore_errors=True)

    @property
    def coll(self):
        return self.store.collection("c")

    def _embed(self, version: str, source: str) -> np.ndarray:
        return self.embedders[version].embed_sources([source])[0]

    def _active(self) -> bool:
        return self.job is not None and self.job["state"] in ACTIVE

    def _refresh_job_state(self) -> None:
        """Take the job's state from the store after batches (completion is data-dependent),
        checking that it only moves forward as the model allows."""
        state = job_status(self.store, self.job["id"]).state
        assert state == self.job["state"] or (self.job["state"], state) in {
            ("running", "completed"), ("paused", "completed")}, (self.job["state"], state)
        if state == "completed" and self.job["state"] != "completed":
            self.serving = self.job["new"]  # a cold switch (hot-refresh served it already)
        self.job["state"] = state

    # ------------------------------------------------------------------ items

    @initialize(ids=st.lists(st.sampled_from(IDS), min_size=3, max_size=8, unique=True))
    def fill(self, ids: list[str]) -> None:
        self.add_or_replace(ids)

    @rule(ids=st.lists(st.sampled_from(IDS), min_size=1, max_size=4, unique=True))
    def add_or_replace(self, ids: list[str]) -> None:
        self.revision += 1
        sources = {i: f"{i}@{self.revision}" for i in ids}
        res = self.coll.add([ItemInput(i, source=s, metadata={"rev": self.revision})
                             for i, s in sources.items()])
        assert (res.added, res.replaced) == (sum(i not in self.items for i in ids),
                                             sum(i in self.items for i in ids))
        for i, s in sources.items():
            self.items[i] = s
            if self._active():  # a rollback must give it its old-version vector
                self.snapshot[i] = self._embed(self.job["old"], s).tobytes()

    @rule(ids=st.lists(st.sampled_from(IDS), min_size=1, max_size=3, unique=True))
    def delete(self, ids: list[str]) -> None:
        assert self.coll.delete(ids) == sum(i in self.items for i in ids)
        for i in ids:
            self.items.pop(i, None)
            self.snapshot.pop(i, None)

    @rule(data=st.data(), k=st.integers(1, 15))
    def search(self, data, k: int) -> None:
        if self.items:
            probe = data.draw(st.sampled_from(sorted(self.items)), label="probe")
            query = self._embed(self.serving, self.items[probe])
        else:
            query = self._embed(self.serving, "nothing")
        hits = self.coll.search(query, k=k).hits
        ids = [h.id for h in hits]
        assert len(ids) == len(set(ids)) == min(k, len(self.items))
        assert set(ids) <= set(self.items)
        if self.items and self.serving == "vA" and not self._active():
            assert ids[0] == probe  # all vectors in the query's own space: it finds itself

    # ------------------------------------------------------------------ upgrades

    @precondition(lambda self: not self._active())
    @rule(strategy=st.sampled_from(["hot-refresh", "hot-refresh", "cold"]),
          batch_size=st.integers(1, 4),
          seed=st.integers(0, 3))
    def start(self, strategy: str, batch_size: int, seed: int) -> None:
        old = self.serving
        new = "vB" if old == "vA" else "vA"
        if strategy == "hot-refresh" and old != "vA":
            strategy = "cold"  # only vB searches vA vectors (declared compatible)
        status = start_upgrade(self.store, "c", new, strategy=strategy, batch_size=batch_size,
                               seed=seed)
        self.job = {"id": status.job, "old": old, "new": new, "strategy": strategy,
                    "state": "running"}
        self.snapshot = {i: self.coll.get(i, with_vectors=True).current.vector.tobytes()
                         for i in self.items}
        if strategy == "hot-refresh":
            self.serving = new
        self._refresh_job_state()  # an empty collection completes at once

    @precondition(lambda self: self._active())
    @rule(batches=st.integers(1, 4), worker=st.sampled_from(["w1", "w2"]))
    def work(self, batches: int, worker: str) -> None:
        for _ in range(batches):  # lease 0: a ghost's batch is taken over at once
            batch = claim_batch(self.store, self.job["id"], worker=worker, lease_s=0.0)
            if batch is None:
                break
            vectors = compute_batch(self.store, batch).vectors
            assert commit_batch(self.store, self.job["id"], batch.batch_id, vectors,
                                phase=batch.phase)
            self.committed = (self.job["id"], batch.phase, batch.batch_id, vectors)
        self._refresh_job_state()

    @precondition(lambda self: self.committed is not None)
    @rule()
    def commit_again(self) -> None:
        job, phase, batch_id, vectors = self.committed
        assert not commit_batch(self.store, job, batch_id, vectors, phase=phase)

    @precondition(lambda self: self._active() and self.job["state"] == "running")
    @rule()
    def ghost_claims_and_dies(self) -> None:
        self.ghosts += 1
        claim_batch(self.store, self.job["id"], worker=f"ghost{self.ghosts}")

    @precondition(lambda self: self._active() and self.job["state"] == "running")
    @rule()
    def pause_job(self) -> None:
        assert pause(self.store, self.job["id"]).state == "paused"
        self.job["state"] = "paused"

    @precondition(lambda self: self._active() and self.job["state"] == "paused")
    @rule()
    def resume_job(self) -> None:
        assert resume(self.store, self.job["id"]).state == "running"
        self.job["state"] = "running"

    @precondition(lambda self: self._active())
    @rule()
    def roll_back(self) -> None:
        assert rollback(self.store, self.job["id"]).state == "rolled_back"
        self.job["state"] = "rolled_back"
        self.serving = self.job["old"]
        for i in self.items:  # exactly the vectors the items had (or got for a rollback)
            item = self.coll.get(i, with_vectors=True)
            assert [v.slot for v in item.vectors] == ["current"]
            assert item.current.vector.tobytes() == self.snapshot[i], i
        self.snapshot = {}

    @precondition(lambda self: self._active() and self.job["state"] == "completed")
    @rule()
    def finalize_job(self) -> None:
        assert finalize(self.store, self.job["id"]).state == "finalized"
        self.job["state"] = "finalized"
        self.snapshot = {}

    @rule()
    def reopen_store(self) -> None:
        """A restarted process: a new store object (and search cache) on the same folder."""
        self.store.close()
        self.store = self._open()
        self.embedders = {v: self.store.embedder(v) for v in ("vA", "vB")}

    # ------------------------------------------------------------------ invariants

    @invariant()
    def store_agrees_with_model(self) -> None:
        assert self.coll.serving_version == self.serving
        assert sorted(self.coll.list_ids(limit=100)) == sorted(self.items)
        job = self.job if self._active() else None
        state = None if job is None else job["state"]
        for i, source in self.items.items():
            item = self.coll.get(i, with_vectors=True)
            slots = [v.slot for v in item.vectors]
            assert slots.count("current") == 1, (i, slots)
            assert item.source == source
            current = item.current
            if job is None or state == "completed":
                allowed = {self.serving}
            elif job["strategy"] == "hot-refresh":
                allowed = {job["old"], job["new"]}
            else:
                allowed = {job["old"]}  # cold: the new vectors wait in ``next``
            assert current.version in allowed, (i, current.version, allowed, state)
            np.testing.assert_array_equal(current.vector, self._embed(current.version, source))
            for v in item.vectors:
                if v.slot == "previous":  # kept for a rollback, and only then
                    assert job is not None and v.version == job["old"], (i, v)
                    assert v.vector.tobytes() == self.snapshot[i]
                elif v.slot == "next":  # built aside by a running cold upgrade
                    assert job is not None and job["strategy"] == "cold" and v.version == job[
                        "new"] and state != "completed", (i, v)
                    np.testing.assert_array_equal(v.vector, self._embed(v.version, source))
        stats = self.coll.stats()
        assert stats.items == len(self.items)
        assert sum(stats.current.values()) == len(self.items)
        if job is None:
            assert stats.kept_previous == stats.pending_next == 0
        if self.job is not None:
            status = job_status(self.store, self.job["id"])
            assert 0 <= status.done <= status.total


def test_store_agrees_with_its_model():
    run_state_machine_as_test(StoreMachine, settings=settings(
        max_examples=40, stateful_step_count=30, deadline=None, derandomize=True,
        database=None, suppress_health_check=list(HealthCheck)))
