"""Distributed backfill: two workers (torchrun ranks, Ray Data actors), one killed mid-batch.

The job ends consistent: every item holds exactly one current vector, of the new version, equal
to a cold rebuild; every item is written by exactly one committed batch; and the only items
embedded twice are those of the batch the killed worker was embedding.
"""

from __future__ import annotations

import json
import os
import signal
import sqlite3
import textwrap
import threading
import time
from collections import Counter
from pathlib import Path

import numpy as np
import pytest

from compatkit.errors import CompatkitError
from compatkit.index import IndexStore, claim_batch, job_status
from compatkit.index.distributed import (
    TORCHRUN_PREFIX,
    backfill,
    claimed_workers,
    launch_torchrun,
    load_embedders,
    release_stale,
    run_ray_backfill,
    worker_device,
)

from .conftest import fill, hash_versions

N_ITEMS, BATCH = 120, 10

EMBEDDERS = textwrap.dedent('''
    import json, os, time
    from pathlib import Path
    from compatkit.index import HashEmbedder

    MARKERS = Path(os.environ["CK_MARKERS"])


    class Marked(HashEmbedder):
        """vB's hash embedder recording each call; one call of one worker never returns:
        torchrun rank 1 hangs in its 2nd call (the test kills it; rank 0 waits for rank 1's
        first call, so both work), the first Ray actor to reach its 3rd call exits."""

        calls = 0

        def embed_sources(self, sources):
            Marked.calls += 1
            who = os.environ.get("RANK", "ray")
            record = {"who": who, "pid": os.getpid(), "call": Marked.calls,
                      "sources": list(sources)}
            name = f"{who}-{os.getpid()}-{Marked.calls}.json"
            (MARKERS / (name + ".tmp")).write_text(json.dumps(record))
            os.replace(MARKERS / (name + ".tmp"), MARKERS / name)
            if Marked.calls == 1 and who == "0":
                deadline = time.monotonic() + 60
                while not list(MARKERS.glob("1-*.json")) and time.monotonic() < deadline:
                    time.sleep(0.01)
            if Marked.calls == 2 and who == "1" and not (MARKERS / "killed").exists():
                time.sleep(120)
            if Marked.calls == 3 and who == "ray":
                try:
                    os.close(os.open(MARKERS / "died", os.O_CREAT | os.O_EXCL))
                except FileExistsError:
                    pass
                else:
                    (MARKERS / "victim").write_text(name)
                    os._exit(1)
            time.sleep(0.05)
            return super().embed_sources(sources)


    def embedders():
        return {"vB": Marked("vB", 8, seed=1, anchor_seed=0, anchor_weight=0.7)}
''')


@pytest.fixture()
def workers_env(tmp_path):
    """The embedders module on the workers' path and the folder their markers go to."""
    (tmp_path / "ck_marked.py").write_text(EMBEDDERS)
    markers = tmp_path / "markers"
    markers.mkdir()
    return {"PYTHONPATH": str(tmp_path), "CK_MARKERS": str(markers)}, markers


def _records(markers: Path) -> list[dict]:
    return [json.loads(p.read_text()) for p in sorted(markers.glob("*.json"))]


def _wait_for(predicate, timeout: float = 120.0) -> None:
    end = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > end:
            raise TimeoutError("condition not reached")
        time.sleep(0.01)


def _check_consistent_and_cold_equal(tmp_path: Path, store: IndexStore, coll) -> None:
    """Exactly one current vector per item, all vB, equal to a cold rebuild with vB."""
    con = sqlite3.connect(store.path)
    rows = con.execute("SELECT i.id, count(v.item), min(v.version), max(v.transformed_from) "
                       "FROM items i LEFT JOIN vectors v ON v.item = i.key AND "
                       "v.slot = 'current' GROUP BY i.key").fetchall()
    con.close()
    assert len(rows) == N_ITEMS
    assert {(n, version, tf) for _, n, version, tf in rows} == {(1, "vB", None)}
    cold = IndexStore(tmp_path / "cold")
    hash_versions(cold)
    rebuilt = fill(cold, N_ITEMS, version="vB")
    for i in range(N_ITEMS):
        np.testing.assert_array_equal(coll.get(f"i{i}", with_vectors=True).current.vector,
                                      rebuilt.get(f"i{i}", with_vectors=True).current.vector)
    cold.close()


def _check_committed_once(store: IndexStore, job: int) -> None:
    con = sqlite3.connect(store.path)
    batches = con.execute("SELECT count(*), sum(state = 'committed'), sum(size) FROM job_batches "
                          "WHERE job=?", (job,)).fetchone()
    con.close()
    assert batches == (N_ITEMS // BATCH, N_ITEMS // BATCH, N_ITEMS)
    status = job_status(store, job)
    assert (status.state, status.done, status.written, status.failed) == (
        "completed", N_ITEMS, N_ITEMS, 0)


def _check_embedded_once_but_the_victim(records: list[dict], victim: dict) -> None:
    """Each item embedded once, plus once more for the batch the killed worker held."""
    counts = Counter(s for r in records for s in r["sources"])
    expected = Counter({f"src{i}": 1 for i in range(N_ITEMS)})
    expected.update(victim["sources"])
    assert counts == expected
    assert len(victim["sources"]) == BATCH


@pytest.mark.slow
@pytest.mark.ddp
def test_torchrun_two_workers_one_killed_ends_as_a_cold_rebuild(tmp_path, store, workers_env):
    env, markers = workers_env
    coll = fill(store, N_ITEMS)
    job = coll.start_upgrade("vB", strategy="hot-refresh", batch_size=BATCH, seed=3).job
    result: dict = {}

    def launch() -> None:
        try:
            result["status"] = launch_torchrun(store.root, job, workers=2, env=env,
                                               embedders="ck_marked:embedders", max_restarts=1,
                                               device="cpu", timeout_s=240)
        except BaseException as err:
            result["error"] = err

    launcher = threading.Thread(target=launch)
    launcher.start()
    _wait_for(lambda: any(r["who"] == "1" and r["call"] == 2 for r in _records(markers))
              or not launcher.is_alive())
    victim = next(r for r in _records(markers) if r["who"] == "1" and r["call"] == 2)
    assert job_status(store, job).done < N_ITEMS  # mid-run
    (markers / "killed").touch()
    os.kill(victim["pid"], signal.SIGKILL)  # rank 1 dies inside its 2nd batch
    launcher.join(timeout=300)
    assert "error" not in result, result.get("error")
    assert result["status"].state == "completed"

    _check_consistent_and_cold_equal(tmp_path, store, coll)
    _check_committed_once(store, job)
    con = sqlite3.connect(store.path)  # hot-refresh: one change for the add, one write
    assert {n for (n,) in con.execute("SELECT count(*) FROM changes GROUP BY item")} == {2}
    con.close()
    records = _records(markers)
    assert {r["who"] for r in records} == {"0", "1"}  # both ranks worked
    _check_embedded_once_but_the_victim(records, victim)


@pytest.mark.slow
def test_ray_two_actors_one_died_ends_as_a_cold_rebuild(tmp_path, store, workers_env):
    env, markers = workers_env
    coll = fill(store, N_ITEMS)
    job = coll.start_upgrade("vB", strategy="cold", batch_size=BATCH, seed=4).job
    status = run_ray_backfill(store.root, job, workers=2, env=env,
                              embedders="ck_marked:embedders", device="cpu")
    assert status.state == "completed"
    assert coll.serving_version == "vB"
    _check_consistent_and_cold_equal(tmp_path, store, coll)
    _check_committed_once(store, job)
    victim_name = (markers / "victim").read_text()
    victim = json.loads((markers / victim_name).read_text())
    records = _records(markers)
    assert len({r["pid"] for r in records if r["pid"] != victim["pid"]}) >= 1
    _check_embedded_once_but_the_victim(records, victim)


# ------------------------------------------------------------------ small pieces


def test_local_engine_is_run_backfill_in_process(store):
    coll = fill(store, 30)
    job = coll.start_upgrade("vB", batch_size=7).job
    status = backfill(store, job)
    assert (status.state, status.done, status.written) == ("completed", 30, 30)
    assert coll.stats().current == {"vB": 30}


def test_bad_engine_arguments(store):
    with pytest.raises(ValueError, match="engine must be one of local, torchrun, ray, got 'mpi'"):
        backfill(store, 1, engine="mpi")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="workers must be a positive integer, got 0"):
        backfill(store, 1, engine="torchrun", workers=0)
    with pytest.raises(ValueError, match="the local engine runs 1 worker in this process, got 2"):
        backfill(store, 1, workers=2)
    with pytest.raises(ValueError, match="embedders must be 'module:function', got 'nocolon'"):
        load_embedders("nocolon")
    with pytest.raises(ValueError, match="device must be 'auto', 'cpu' or 'cuda', got 'tpu'"):
        worker_device("tpu", 0)
    assert worker_device("cpu", 3) == "cpu"


def test_stale_claims_of_a_prefix_are_released(store):
    coll = fill(store, 40)
    job = coll.start_upgrade("vB", batch_size=10).job
    a = claim_batch(store, job, worker=f"{TORCHRUN_PREFIX}0")
    b = claim_batch(store, job, worker=f"{TORCHRUN_PREFIX}1")
    other = claim_batch(store, job, worker="server")
    assert claimed_workers(store, job, TORCHRUN_PREFIX) == [f"{TORCHRUN_PREFIX}0",
                                                             f"{TORCHRUN_PREFIX}1"]
    assert release_stale(store, job, TORCHRUN_PREFIX) == 2
    assert claimed_workers(store, job, TORCHRUN_PREFIX) == []
    # the released batches go to the next worker at once; the server's claim stays its own
    got = {claim_batch(store, job, worker=f"next{i}").batch_id for i in range(2)}
    assert got == {a.batch_id, b.batch_id}
    assert claimed_workers(store, job, "server") == ["server"]
    assert other.batch_id not in got


def test_torchrun_failure_is_reported(tmp_path, store):
    coll = fill(store, 10)
    job = coll.start_upgrade("vB", batch_size=5).job
    with pytest.raises(CompatkitError, match=rf"torchrun backfill of job {job} exited with code"):
        launch_torchrun(store.root, job, workers=1, embedders="no_such_module:f",
                        max_restarts=0, device="cpu", timeout_s=120)
    assert job_status(store, job).done == 0
