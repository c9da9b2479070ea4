"""Crash and resume: a backfill worker killed with SIGKILL (mid-batch, and at a random moment)
is restarted and the collection ends exactly as a cold rebuild, no item skipped or written twice.
Searches keep answering during a backfill, each item exactly once."""

from __future__ import annotations

import os
import signal
import sqlite3
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import numpy as np
import pytest

from compatkit.index import IndexStore, ItemInput, job_status, run_backfill

from .conftest import DIM, fill, hash_versions

SRC = Path(__file__).resolve().parents[2] / "src"
N_ITEMS, BATCH = 240, 20

WORKER = textwrap.dedent("""
    import os, sys, time
    from pathlib import Path
    from compatkit.index import HashEmbedder, IndexStore, run_backfill

    root, markers, delay, job = sys.argv[1], Path(sys.argv[2]), float(sys.argv[3]), int(sys.argv[4])

    class Slow(HashEmbedder):
        calls = 0

        def embed_sources(self, sources):
            Slow.calls += 1
            (markers / f"{os.getpid()}-{Slow.calls}").touch()
            time.sleep(delay)
            return super().embed_sources(sources)

    vb = Slow("vB", 8, seed=1, anchor_seed=0, anchor_weight=0.7)
    store = IndexStore(root, embedders={"vB": vb})
    print(run_backfill(store, job, worker="w").state, flush=True)
""")


def _spawn(tmp_path: Path, store: IndexStore, job: int, delay: float) -> subprocess.Popen:
    script = tmp_path / "worker.py"
    script.write_text(WORKER)
    markers = tmp_path / "markers"
    markers.mkdir(exist_ok=True)
    env = {**os.environ, "PYTHONPATH": str(SRC)}
    return subprocess.Popen([sys.executable, str(script), str(store.root), str(markers),
                             str(delay), str(job)], env=env, stdout=subprocess.PIPE, text=True)


def _wait_for(predicate, timeout: float = 60.0) -> None:
    end = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > end:
            raise TimeoutError("condition not reached")
        time.sleep(0.01)


def _check_consistent(path: Path) -> None:
    """Every item has exactly one current vector and no vector lacks its item."""
    con = sqlite3.connect(path)
    per_item = con.execute("SELECT i.key, count(v.item) FROM items i LEFT JOIN vectors v "
                           "ON v.item = i.key AND v.slot = 'current' GROUP BY i.key").fetchall()
    orphans = con.execute("SELECT count(*) FROM vectors WHERE item NOT IN "
                          "(SELECT key FROM items)").fetchone()[0]
    con.close()
    assert {n for _, n in per_item} == {1} and orphans == 0


def test_killed_worker_resumes_to_a_cold_rebuild(tmp_path, store):
    coll = fill(store, N_ITEMS)
    job = coll.start_upgrade("vB", batch_size=BATCH, seed=5).job
    markers = tmp_path / "markers"

    # 1. kill while the worker is inside its 4th batch (claimed, embedded, not committed)
    proc = _spawn(tmp_path, store, job, delay=0.05)
    _wait_for(lambda: markers.exists() and len(list(markers.iterdir())) >= 4)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    _check_consistent(store.path)
    done = job_status(store, job).done
    assert done == 3 * BATCH  # three batches committed, the fourth lost with the process

    # 2. kill again at an arbitrary moment (possibly inside a commit)
    proc = _spawn(tmp_path, store, job, delay=0.0)
    _wait_for(lambda: job_status(store, job).done > done)
    time.sleep(float(np.random.default_rng(0).uniform(0.0, 0.05)))
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    _check_consistent(store.path)
    assert job_status(store, job).done % BATCH == 0

    # 3. a restarted worker finishes the job
    proc = _spawn(tmp_path, store, job, delay=0.0)
    out, _ = proc.communicate(timeout=120)
    assert proc.returncode == 0 and out.strip() == "completed"
    _check_consistent(store.path)
    status = job_status(store, job)
    assert (status.state, status.done, status.written) == ("completed", N_ITEMS, N_ITEMS)

    # every item was written by exactly one committed batch: 1 change for its add + 1
    con = sqlite3.connect(store.path)
    counts = {n for (n,) in con.execute("SELECT count(*) FROM changes GROUP BY item")}
    batches = con.execute("SELECT count(*), sum(state = 'committed') FROM job_batches").fetchone()
    con.close()
    assert counts == {2}
    assert batches == (N_ITEMS // BATCH, N_ITEMS // BATCH)

    # the collection equals a cold rebuild with vB
    cold = IndexStore(tmp_path / "cold")
    hash_versions(cold)
    rebuilt = fill(cold, N_ITEMS, version="vB")
    for i in range(N_ITEMS):
        a = coll.get(f"i{i}", with_vectors=True).current
        b = rebuilt.get(f"i{i}", with_vectors=True).current
        assert (a.version, a.transformed_from) == ("vB", None)
        np.testing.assert_array_equal(a.vector, b.vector)
    probe = store.embedder("vB").embed_sources(["probe"])[0]
    assert coll.search(probe, version="vB", k=10).hits == rebuilt.search(probe, k=10).hits


@pytest.mark.parametrize("index", ["flat", "hnsw"])
def test_searches_answer_every_item_once_during_a_backfill(tmp_path, index):
    from compatkit.index import HashEmbedder

    class Slow(HashEmbedder):
        def embed_sources(self, sources):
            time.sleep(0.003)
            return super().embed_sources(sources)

    st = IndexStore(tmp_path / "s", embedders={"vB": Slow("vB", DIM, seed=1)})
    hash_versions(st)
    st.declare_compatible("vB", "vA")
    coll = st.create_collection("c", "vA", index=index)
    n = 120
    coll.add([ItemInput(f"i{i}", source=f"src{i}") for i in range(n)])
    job = coll.start_upgrade("vB", batch_size=4).job
    stop, errors, seen_versions = threading.Event(), [], []
    queries = np.random.default_rng(0).standard_normal((3, DIM)).astype(np.float32)

    def client(q: np.ndarray, churn: str) -> None:
        try:
            while not stop.is_set():
                hits = coll.search(q, version="vB", k=n + len(queries)).hits
                ids = [h.id for h in hits if not h.id.startswith("churn")]
                if index == "flat":  # exact: every item answers, once
                    assert sorted(ids) == sorted(f"i{i}" for i in range(n))
                assert len({h.id for h in hits}) == len(hits)
                seen_versions.append(frozenset(h.version for h in hits))
                coll.add([ItemInput(churn, source=churn)])  # writes interleave too
                coll.delete([churn])
        except BaseException as err:
            errors.append(err)

    threads = [threading.Thread(target=client, args=(q, f"churn{j}"))
               for j, q in enumerate(queries)]
    for t in threads:
        t.start()
    status = run_backfill(st, job)
    stop.set()
    for t in threads:
        t.join()
    assert not errors, errors[0]
    assert status.state == "completed"
    assert frozenset({"vA", "vB"}) in seen_versions  # queries answered mid-backfill
    assert coll.stats().current == {"vB": n}
