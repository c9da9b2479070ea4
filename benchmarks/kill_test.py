"""Kill test: a hot-refresh upgrade that survives SIGKILLs of its servers and worker.

A collection of ``--items`` items (32-px RGB PNG sources, ``--images`` distinct files shared
round-robin) served by a real small model ``old`` (resnet18_cifar, width 0.25, random weights;
the old vectors are that model's embeddings, computed once per distinct image) is upgraded
hot-refresh to ``new`` (the same architecture, declared compatible). Three processes embed the
batches: two HTTP servers (uvicorn, each with its background worker, ``server-a`` and
``server-b``) and one worker process (``compatkit index work``'s loop, ``w1``). A client
process sends search queries (new-version vectors, k=10) the whole time, to server A and, when
A does not answer (killed or restarting), to server B (failover).

At ``--kills`` random moments (random fractions of the upgrade's progress) one of the three
processes, chosen at random, is SIGKILLed and started again under the same name (so it resumes
the batch it held); the next kill waits until both servers answer again, so the client always
has one. When the job completes, every item is verified: exactly one current vector, of version
``new``, equal to ``new``'s embedding of its image; its kept ``previous`` vector equal to its old
vector (a rollback would restore it); and every item written by exactly one committed batch.

Printed: kills survived, items lost (missing or wrong), items written twice, batches in the
hands of a killed process (their embedding was redone after the restart), queries answered and
failed.

Run:  OMP_NUM_THREADS=1 nice -n 10 PYTHONPATH=src .venv/bin/python benchmarks/kill_test.py \\
          --items 100000 --kills 20
"""

from __future__ import annotations

import argparse
import json
import os
import random
import signal
import socket
import sqlite3
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from common import random_model_artifacts

ROOT = Path(__file__).resolve().parents[1]
SRC = ROOT / "src"
sys.path.insert(0, str(SRC))

TOKEN = "kill-test-token-0123456789"
K = 10

SERVER = """
import sys, torch, uvicorn
torch.set_num_threads(1)
from compatkit.index import IndexStore
from compatkit.index.service import ServiceSettings, create_app
store = IndexStore(sys.argv[1], synchronous="NORMAL")
settings = ServiceSettings(admin_token=sys.argv[3], run_worker=True, worker_name=sys.argv[4],
                           worker_poll_s=0.2)
uvicorn.run(create_app(store, settings), host="127.0.0.1", port=int(sys.argv[2]),
            log_level="warning", access_log=False)
"""

WORKER = """
import sys, torch
torch.set_num_threads(1)
from compatkit.index import IndexStore, run_backfill
store = IndexStore(sys.argv[1], synchronous="NORMAL")
status = run_backfill(store, int(sys.argv[2]), worker=sys.argv[3])
print(status.state, flush=True)
"""

CLIENT = """
import json, os, sys, time
import httpx, numpy as np
bases, stop_file, out_file = sys.argv[1].split(","), sys.argv[2], sys.argv[3]
seed, k = int(sys.argv[4]), int(sys.argv[5])
rng = np.random.default_rng(seed)
answered = failed = failovers = 0
errors = []
clients = [httpx.Client(base_url=b, timeout=30.0) for b in bases]
while not os.path.exists(stop_file):
    q = rng.standard_normal(128)
    body = {"vector": (q / np.linalg.norm(q)).tolist(), "version": "new", "k": k,
            "with_metadata": False}
    for n, http in enumerate(clients):
        try:
            r = http.post("/collections/kill/search", json=body)
        except httpx.HTTPError as err:  # killed or restarting: fail over to the next server
            failovers += 1
            if n == len(clients) - 1:
                failed += 1
                errors.append(f"all servers down: {type(err).__name__}")
            continue
        if r.status_code == 200 and len(r.json()["hits"]) == k:
            answered += 1
        else:
            failed += 1
            errors.append(f"{r.status_code}: {r.text[:200]}")
        break
json.dump({"answered": answered, "failed": failed, "failovers": failovers,
           "errors": errors[:10]}, open(out_file, "w"))
"""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def healthy(port: int) -> bool:
    import httpx

    try:
        return httpx.get(f"http://127.0.0.1:{port}/health", timeout=2.0).status_code == 200
    except httpx.HTTPError:
        return False


def wait_healthy(port: int, timeout: float = 180.0) -> None:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if healthy(port):
            return
        time.sleep(0.2)
    raise RuntimeError(f"the server on port {port} did not become healthy")


def make_images(folder: Path, n: int, seed: int) -> tuple[list[str], np.ndarray]:
    """``n`` random 32x32 RGB PNG files: their paths and the (n, 3, 32, 32) uint8 images."""
    from PIL import Image

    images = np.random.default_rng(seed).integers(0, 256, (n, 32, 32, 3), dtype=np.uint8)
    folder.mkdir(parents=True)
    paths = []
    for i, img in enumerate(images):
        path = folder / f"{i:05d}.png"
        Image.fromarray(img).save(path)
        paths.append(str(path))
    return paths, np.ascontiguousarray(images.transpose(0, 3, 1, 2))


class Fleet:
    """The servers and the worker: start, SIGKILL, restart, stop."""

    def __init__(self, store: Path, job: int, log_dir: Path) -> None:
        self.store, self.job, self.log_dir = store, job, log_dir
        self.ports = {"server-a": free_port(), "server-b": free_port()}
        self.procs: dict[str, subprocess.Popen] = {}
        self.env = {**os.environ, "PYTHONPATH": str(SRC), "OMP_NUM_THREADS": "1"}

    def start(self, name: str) -> None:
        if name in self.ports:
            cmd = [sys.executable, "-c", SERVER, str(self.store), str(self.ports[name]), TOKEN,
                   name]
        else:
            cmd = [sys.executable, "-c", WORKER, str(self.store), str(self.job), name]
        log = open(self.log_dir / f"{name}.log", "a")  # noqa: SIM115 - kept by the process
        self.procs[name] = subprocess.Popen(cmd, env=self.env, stdout=log, stderr=log)

    def kill(self, name: str) -> None:
        proc = self.procs[name]
        if proc.poll() is None:
            proc.send_signal(signal.SIGKILL)
        proc.wait()

    def wait_servers(self) -> None:
        for port in self.ports.values():
            wait_healthy(port)

    def stop(self) -> None:
        for proc in self.procs.values():
            if proc.poll() is None:
                proc.terminate()
        for proc in self.procs.values():
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                proc.kill()


def held_batches(db: Path, job: int, worker: str) -> int:
    """Batches ``worker`` claimed and has not committed (lost work if it dies now)."""
    con = sqlite3.connect(db, timeout=60)
    n = con.execute("SELECT count(*) FROM job_batches WHERE job=? AND worker=? AND "
                    "state='claimed'", (job, worker)).fetchone()[0]
    con.close()
    return int(n)


def verify(store_dir: Path, job: int, n_items: int, old: np.ndarray, new: np.ndarray) -> dict:
    """Check every item against the vectors it must hold; count lost and twice-written ones."""
    from compatkit.index.store import DB_NAME
    from compatkit.index.vectors import from_blob

    con = sqlite3.connect(store_dir / DB_NAME)
    keys = {int(k): i for k, i in con.execute("SELECT key, id FROM items WHERE collection='kill'")}
    slots: dict[int, dict[str, tuple[str, bytes]]] = {}
    for item, slot, version, data in con.execute("SELECT item, slot, version, data FROM vectors"):
        slots.setdefault(int(item), {})[slot] = (version, data)
    written_by: dict[int, int] = {}
    for (blob,) in con.execute("SELECT items FROM job_batches WHERE job=? AND "
                               "state='committed'", (job,)):
        for key in np.frombuffer(blob, dtype=np.int64).reshape(-1, 2)[:, 0].tolist():
            written_by[key] = written_by.get(key, 0) + 1
    written = con.execute("SELECT sum(written) FROM job_phases WHERE job=?", (job,)).fetchone()[0]
    con.close()
    lost, max_diff = [], 0.0
    ids = {item_id: key for key, item_id in keys.items()}
    for i in range(n_items):
        key = ids.get(f"i{i}")
        have = slots.get(key, {}) if key is not None else {}
        cur, prev = have.get("current"), have.get("previous")
        if cur is None or cur[0] != "new" or prev is None or prev[0] != "old" or "next" in have:
            lost.append(f"i{i}")
            continue
        diff = float(np.abs(from_blob(cur[1], 128) - new[i % len(new)]).max())
        max_diff = max(max_diff, diff)
        if diff > 1e-4 or not np.array_equal(from_blob(prev[1], 128), old[i % len(old)]):
            lost.append(f"i{i}")
    return {"items": len(keys), "lost": len(lost), "lost_examples": lost[:5],
            "written_twice": sum(1 for c in written_by.values() if c > 1),
            "never_written": n_items - len(written_by), "written": int(written or 0),
            "max_abs_diff_vs_new_model": max_diff}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--items", type=int, default=100_000)
    p.add_argument("--kills", type=int, default=20)
    p.add_argument("--images", type=int, default=2048, help="distinct PNG files")
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--timeout", type=float, default=3600.0, help="give up after (s)")
    args = p.parse_args()

    import torch

    from compatkit.index import IndexStore, ItemInput, job_status
    from compatkit.index.embedders import ArtifactEmbedder

    torch.set_num_threads(1)
    rng = random.Random(args.seed)
    t_start = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="kill_test_") as tmp:
        work = Path(tmp)
        paths = random_model_artifacts(work)
        sources, images = make_images(work / "sources", args.images, args.seed)
        old = ArtifactEmbedder(paths["old"]).embed_images(images)
        new = ArtifactEmbedder(paths["new"]).embed_images(images)
        store = IndexStore(work / "store", synchronous="NORMAL")
        store.register_artifact(paths["old"])
        store.register_artifact(paths["new"])
        coll = store.create_collection("kill", "old")
        for start in range(0, args.items, 10_000):  # old vectors given: no old embedding
            coll.add([ItemInput(f"i{i}", source=sources[i % args.images],
                                vector=old[i % args.images], version="old")
                      for i in range(start, min(start + 10_000, args.items))])
        job = coll.start_upgrade("new", strategy="hot-refresh", batch_size=args.batch_size,
                                 seed=args.seed).job
        store.close()
        print(f"{args.items} items, job {job} started after "
              f"{time.perf_counter() - t_start:.0f} s", flush=True)

        fleet = Fleet(work / "store", job, work)
        for name in ("server-a", "server-b", "w1"):
            fleet.start(name)
        fleet.wait_servers()
        stop_file, client_out = work / "stop", work / "client.json"
        bases = ",".join(f"http://127.0.0.1:{port}" for port in fleet.ports.values())
        client = subprocess.Popen([sys.executable, "-c", CLIENT, bases, str(stop_file),
                                   str(client_out), str(args.seed), str(K)], env=fleet.env)
        store = IndexStore(work / "store", synchronous="NORMAL")
        moments = sorted(rng.uniform(0.03, 0.93) for _ in range(args.kills))
        kills, survived, in_hand = [], 0, 0
        t_upgrade = time.perf_counter()
        deadline = t_upgrade + args.timeout
        for moment in moments:
            while (status := job_status(store, job)).fraction < moment:
                if status.state == "completed" or time.perf_counter() > deadline:
                    break
                time.sleep(0.2)
            if status.state == "completed":
                break
            name = rng.choice(["server-a", "server-b", "w1"])
            fleet.kill(name)
            in_hand += held_batches(store.path, job, name)
            kills.append((round(status.fraction, 3), name))
            print(f"kill {len(kills)}: {name} at {100 * status.fraction:.1f}%", flush=True)
            fleet.start(name)
            fleet.wait_servers()  # the client always has a server for the next kill
            survived += 1
        while job_status(store, job).state != "completed" and time.perf_counter() < deadline:
            if fleet.procs["w1"].poll() is not None and job_status(store, job).state == "running":
                fleet.start("w1")  # it exits when no batch is left; restart if it died early
            time.sleep(0.5)
        upgrade_s = time.perf_counter() - t_upgrade
        final = job_status(store, job)
        store.close()
        stop_file.touch()
        client.wait(120)
        fleet.stop()
        queries = json.loads(client_out.read_text())
        check = verify(work / "store", job, args.items, old, new)

    print(json.dumps({"kills": kills, "job": final.as_dict(), "verify": check,
                      "queries": queries}, default=str))
    print(f"\n## Kill test: hot-refresh of {args.items:,} items (resnet18_cifar w0.25, "
          f"{args.images} distinct 32-px PNGs), {args.kills} SIGKILLs planned\n")
    print("| quantity | value |\n|---|---|")
    for name, value in [
        ("job state", final.state),
        ("kills survived (process restarted, job completed)",
         f"{survived if final.state == 'completed' else 0} of {len(kills)}"),
        ("kills by process", ", ".join(f"{n} {sum(k[1] == n for k in kills)}"
                                       for n in ("server-a", "server-b", "w1"))),
        ("items verified", f"{check['items']:,}"),
        ("items lost (missing, wrong or unrestorable vector)", check["lost"]),
        ("items written twice", check["written_twice"]),
        ("items never written", check["never_written"]),
        ("batches in a killed process's hands (re-embedded after restart)", in_hand),
        ("largest |stored - new model| over all items",
         f"{check['max_abs_diff_vs_new_model']:.2e}"),
        ("queries answered", f"{queries['answered']:,}"),
        ("queries failed", queries["failed"]),
        ("queries failed over from server A to B", f"{queries['failovers']:,}"),
        ("upgrade wall time (s)", f"{upgrade_s:.0f}"),
        ("items/s over the upgrade, kills included", f"{args.items / upgrade_s:,.0f}"),
    ]:
        print(f"| {name} | {value} |")
    print(f"\ncpu: {os.cpu_count()} cores visible (shared); load average "
          f"{os.getloadavg()[0]:.1f}; python {sys.version.split()[0]}; torch {torch.__version__}")


if __name__ == "__main__":
    main()
