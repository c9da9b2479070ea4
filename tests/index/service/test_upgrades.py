"""Upgrades over HTTP: start, status, pause, resume, rollback, finalise; the worker thread."""

from __future__ import annotations

import time
import warnings

from compatkit.index import run_backfill
from compatkit.index.service import ServiceSettings, create_app

from .conftest import AUTH, TOKEN

with warnings.catch_warnings():
    warnings.simplefilter("ignore")
    from fastapi.testclient import TestClient


def test_lifecycle(client, store):
    r = client.post("/collections/c/upgrades", headers=AUTH, json={"version": "vB",
                                                                   "batch_size": 2})
    assert r.status_code == 201
    job = r.json()
    assert (job["job"], job["state"], job["total"], job["phases"]) == (
        1, "running", 5, ["refresh(live, random)"])
    assert client.get("/collections/c").json()["serving_version"] == "vB"
    r = client.post("/collections/c/upgrades", headers=AUTH, json={"version": "vB"})
    assert (r.status_code, r.json()) == (409, {"detail": (
        "collection 'c' has upgrade job 1 (running); finalise or roll it back first")})
    assert client.post("/collections/c/upgrades/1/pause", headers=AUTH).json()["state"] == \
        "paused"
    r = client.post("/collections/c/upgrades/1/pause", headers=AUTH)
    assert (r.status_code, r.json()) == (409, {"detail": (
        "upgrade job 1 is paused; it must be running to become paused")})
    client.post("/collections/c/upgrades/1/resume", headers=AUTH)
    run_backfill(store, 1, max_batches=1)
    status = client.get("/collections/c/upgrades/current").json()
    assert (status["done"], status["fraction"]) == (2, 0.4)
    r = client.post("/collections/c/upgrades/1/finalize", headers=AUTH)
    assert (r.status_code, r.json()) == (409, {"detail": (
        "upgrade job 1 is running; only a completed upgrade can be finalised")})
    r = client.post("/collections/c/upgrades/1/rollback", headers=AUTH)
    assert r.json()["state"] == "rolled_back"
    assert client.get("/collections/c").json()["current"] == {"vA": 5}


def test_unknown_jobs_and_collections(client, store):
    store.create_collection("d", "vA")
    client.post("/collections/c/upgrades", headers=AUTH, json={"version": "vB"})
    r = client.get("/collections/d/upgrades/1")
    assert (r.status_code, r.json()) == (404, {"detail": "collection 'd' has no upgrade job 1"})
    r = client.get("/collections/d/upgrades/current")
    assert (r.status_code, r.json()) == (404, {"detail": "collection 'd' has no upgrade job"})
    r = client.get("/collections/c/upgrades/7")
    assert (r.status_code, r.json()) == (404, {"detail": "unknown upgrade job 7"})
    r = client.post("/collections/c/upgrades", headers=AUTH, json={"version": "vB",
                                                                   "strategy": "warm"})
    assert r.status_code == 422
    assert r.json()["detail"].startswith("invalid request: body.strategy: Input should be")


def test_background_worker_completes_the_upgrade(store):
    from ..conftest import fill

    fill(store, 30)
    app = create_app(store, ServiceSettings(admin_token=TOKEN, worker_poll_s=0.05))
    with TestClient(app) as client:
        assert client.get("/health").json()["worker"] == "running"
        client.post("/collections/c/upgrades", headers=AUTH, json={"version": "vB",
                                                                   "batch_size": 4})
        deadline = time.monotonic() + 30
        while client.get("/collections/c/upgrades/current").json()["state"] != "completed":
            assert time.monotonic() < deadline
            time.sleep(0.05)
        assert client.get("/collections/c").json()["current"] == {"vB": 30}
        metrics = client.get("/metrics").text
        assert "compatkit_backfill_batches_total 8" in metrics
    assert app.state.worker is not None and not app.state.worker.alive
