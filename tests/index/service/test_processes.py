"""Several server processes on one store (``launch.serve(workers=2)``): a worker process killed
with SIGKILL under write and search load loses no acknowledged write, and the other process
keeps answering; a search begun after a write was acknowledged finds it, whichever process
answers."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import numpy as np
import pytest

from compatkit.index import IndexStore, ItemInput

from ..conftest import DIM, hash_versions

httpx = pytest.importorskip("httpx")

SRC = Path(__file__).resolve().parents[3] / "src"
TOKEN = "process-test-token-0123"
SERVER = textwrap.dedent("""
    import sys
    from compatkit.index.service import ServiceSettings
    from compatkit.index.service.launch import serve
    serve(sys.argv[1], ServiceSettings(admin_token=sys.argv[3], run_worker=False),
          port=int(sys.argv[2]), workers=2, log_level="warning")
""")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _workers(pid: int) -> list[int]:
    """The uvicorn worker processes of the server ``pid`` (not multiprocessing's tracker)."""
    path = Path(f"/proc/{pid}/task/{pid}/children")
    children = [int(p) for p in path.read_text().split()] if path.exists() else []
    return [c for c in children
            if b"spawn_main" in Path(f"/proc/{c}/cmdline").read_bytes()]


def _wait_for(predicate, timeout: float = 60.0) -> None:
    end = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > end:
            raise TimeoutError("condition not reached")
        time.sleep(0.05)


@pytest.mark.skipif(not Path("/proc/self/task").exists(), reason="needs /proc")
def test_a_killed_server_process_loses_no_acknowledged_write(tmp_path):
    root = tmp_path / "store"
    store = IndexStore(root)
    hash_versions(store)
    coll = store.create_collection("c", "vA")
    rng = np.random.default_rng(0)
    coll.add([ItemInput(f"seed{i}", vector=rng.standard_normal(DIM)) for i in range(50)])
    store.close()
    port = _free_port()
    base = f"http://127.0.0.1:{port}"
    env = {**os.environ, "PYTHONPATH": str(SRC), "OMP_NUM_THREADS": "1"}
    server = subprocess.Popen([sys.executable, "-c", SERVER, str(root), str(port), TOKEN],
                              env=env)
    acked: list[str] = []
    stale: list[str] = []  # acknowledged, then not found by a search that began after
    searched = [0]
    stop = threading.Event()

    def healthy() -> bool:
        try:
            return httpx.get(f"{base}/health", timeout=1).status_code == 200
        except httpx.HTTPError:
            return False

    def writer(w: int) -> None:
        with httpx.Client(base_url=base, timeout=10,
                          headers={"Authorization": f"Bearer {TOKEN}"}) as http:
            i = 0
            while not stop.is_set():
                item = f"w{w}-{i}"
                vector = np.random.default_rng(i).standard_normal(DIM).tolist()
                try:
                    r = http.post("/collections/c/items",
                                  json={"items": [{"id": item, "vector": vector}]})
                    if r.status_code == 200:
                        acked.append(item)
                        # a new connection: any of the processes may answer
                        found = httpx.post(f"{base}/collections/c/search", timeout=10,
                                           json={"vector": vector, "k": 3})
                        if item not in {h["id"] for h in found.json()["hits"]}:
                            stale.append(item)
                except httpx.HTTPError:
                    pass  # not acknowledged: may or may not be stored
                i += 1

    def searcher() -> None:
        with httpx.Client(base_url=base, timeout=10) as http:
            while not stop.is_set():
                try:
                    r = http.post("/collections/c/search",
                                  json={"vector": [1.0] * DIM, "k": 5})
                    if r.status_code == 200 and len(r.json()["hits"]) == 5:
                        searched[0] += 1
                except httpx.HTTPError:
                    pass

    threads = [threading.Thread(target=writer, args=(w,)) for w in range(2)]
    threads += [threading.Thread(target=searcher) for _ in range(2)]
    try:
        _wait_for(healthy)
        _wait_for(lambda: len(_workers(server.pid)) == 2)
        for t in threads:
            t.start()
        _wait_for(lambda: len(acked) >= 10)
        victim = _workers(server.pid)[0]
        os.kill(victim, signal.SIGKILL)
        killed_at = len(acked)
        _wait_for(lambda: len(acked) >= killed_at + 10)  # the survivor keeps acknowledging
    finally:
        stop.set()
        for t in threads:
            if t.ident is not None:
                t.join(30)
        server.send_signal(signal.SIGINT)
        try:
            server.wait(30)
        except subprocess.TimeoutExpired:
            server.kill()
    assert searched[0] > 0
    assert stale == []
    reopened = IndexStore(root)
    coll = reopened.collection("c")
    for item in acked:
        assert coll.get(item).id == item
    assert coll.count() >= 50 + len(acked)
    reopened.close()


def test_serve_refuses_a_bad_worker_count(tmp_path):
    from compatkit.index.service import ServiceSettings
    from compatkit.index.service.launch import serve

    with pytest.raises(ValueError, match="workers must be a positive integer, got 0"):
        serve(tmp_path, ServiceSettings(admin_token=TOKEN), workers=0)


def test_a_worker_app_needs_its_configuration(monkeypatch):
    from compatkit.index.service.launch import SERVE_ENV, app_from_env

    monkeypatch.delenv(SERVE_ENV, raising=False)
    with pytest.raises(ValueError, match=SERVE_ENV):
        app_from_env()


def test_a_worker_app_opens_the_store_with_its_own_claim_name(tmp_path, monkeypatch):
    import json

    from compatkit.index.service.launch import SERVE_ENV, app_from_env

    monkeypatch.setenv(SERVE_ENV, json.dumps({"store": str(tmp_path / "s"), "settings": {
        "admin_token": TOKEN, "run_worker": False, "worker_name": "svc"}}))
    app = app_from_env()
    assert app.state.settings.worker_name == f"svc-{os.getpid()}"
    assert app.state.settings.admin_token.get_secret_value() == TOKEN
    assert Path(app.state.store.root) == tmp_path / "s"
    app.state.store.close()
