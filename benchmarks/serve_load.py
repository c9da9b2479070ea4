"""Load on the index's HTTP service during a hot-refresh upgrade, next to FAISS used directly;
backfill rate next to bare model inference.

Part 1 (HTTP): a collection of ``--items`` (default 100k) random 128-d vectors, each with a
source string, served by uvicorn in a subprocess on 127.0.0.1. Client threads send search
requests (k=10, vectors of the new version) for a bounded number of requests and seconds:
first on the idle collection, then while a hot-refresh upgrade vA -> vB runs in a separate
worker process. Both versions use ``HashEmbedder`` (cheap and deterministic: the load is on the
index, not on a model). The same queries through ``faiss.IndexFlatIP`` directly give the floor.

Part 2 (backfill vs inference): a real small compatkit model (resnet18_cifar, width 0.25,
random weights) on 32-px PNG sources: the backfill rate of a hot-refresh upgrade through the
index (decode + embed + commit) next to ``embed_images`` on the same images already in memory.

Run:  PYTHONPATH=src .venv/bin/python benchmarks/serve_load.py
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

from common import random_model_artifacts

ROOT = Path(__file__).resolve().parents[1]
SRC = ROOT / "src"
sys.path.insert(0, str(SRC))

TOKEN = "benchmark-token-0123456789"
AUTH = {"Authorization": f"Bearer {TOKEN}"}
DIM = 128
K = 10

SERVER = """
import logging, sys, uvicorn
from compatkit.index import IndexStore
from compatkit.index.service import ServiceSettings, create_app
store = IndexStore(sys.argv[1])
app = create_app(store, ServiceSettings(admin_token=sys.argv[3], run_worker=False))
uvicorn.run(app, host="127.0.0.1", port=int(sys.argv[2]), log_level="warning",
            access_log=False)
"""

WORKER = """
import json, sys, time
from compatkit.index import IndexStore, job_status, run_backfill
store = IndexStore(sys.argv[1])
job = int(sys.argv[2])
t0 = time.perf_counter()
st = run_backfill(store, job, worker="bench")
print(json.dumps({"state": st.state, "seconds": time.perf_counter() - t0,
                  "written": st.written}), flush=True)
"""


def percentile(values: list[float], q: float) -> float:
    return float(np.percentile(np.asarray(values), q)) if values else float("nan")


def build_store(root: Path, n: int, seed: int) -> np.ndarray:
    """vA/vB hash versions, vB compatible with vA, collection "bench" of n random vA vectors."""
    from compatkit.index import HashEmbedder, IndexStore, ItemInput

    store = IndexStore(root)
    store.register_version("vA", dim=DIM, embedder=HashEmbedder("vA", DIM, seed=0))
    store.register_version("vB", dim=DIM, embedder=HashEmbedder("vB", DIM, seed=1,
                                                                 anchor_seed=0,
                                                                 anchor_weight=0.7))
    store.declare_compatible("vB", "vA")
    coll = store.create_collection("bench", "vA")
    rng = np.random.default_rng(seed)
    vectors = rng.standard_normal((n, DIM)).astype(np.float32)
    for start in range(0, n, 5000):
        coll.add([ItemInput(f"item{i}", source=f"item{i}", vector=vectors[i])
                  for i in range(start, min(start + 5000, n))])
    store.close()
    return vectors


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_healthy(base: str, timeout: float = 60.0) -> None:
    import httpx

    end = time.monotonic() + timeout
    while time.monotonic() < end:
        try:
            if httpx.get(f"{base}/health", timeout=1.0).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.1)
    raise RuntimeError("the server did not become healthy")


def http_load(base: str, queries: np.ndarray, *, clients: int, max_requests: int,
              max_seconds: float, stop: threading.Event | None = None) -> dict:
    """Search requests from ``clients`` threads until a bound (or ``stop``) is reached."""
    import httpx

    latencies: list[float] = []
    failures = [0]
    lock = threading.Lock()
    issued = [0]
    deadline = time.perf_counter() + max_seconds
    bodies = [json.dumps({"vector": q.tolist(), "version": "vB", "k": K,
                          "with_metadata": False}) for q in queries]

    def client(cid: int) -> None:
        with httpx.Client(base_url=base, timeout=30.0) as http:
            i = cid
            while time.perf_counter() < deadline and not (stop is not None and stop.is_set()):
                with lock:
                    if issued[0] >= max_requests:
                        return
                    issued[0] += 1
                t0 = time.perf_counter()
                r = http.post("/collections/bench/search", content=bodies[i % len(bodies)],
                              headers={"content-type": "application/json"})
                dt = time.perf_counter() - t0
                with lock:
                    if r.status_code == 200 and len(r.json()["hits"]) == K:
                        latencies.append(dt)
                    else:
                        failures[0] += 1
                i += clients

    threads = [threading.Thread(target=client, args=(c,)) for c in range(clients)]
    t0 = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - t0
    return {"ok": len(latencies), "failed": failures[0], "seconds": wall,
            "qps": len(latencies) / wall, "p50_ms": 1e3 * percentile(latencies, 50),
            "p99_ms": 1e3 * percentile(latencies, 99)}


def faiss_direct(vectors: np.ndarray, queries: np.ndarray, n_queries: int) -> dict:
    """The same exact top-k through one ``IndexFlatIP``, one query per call."""
    import faiss

    from compatkit.index.vectors import l2_normalize

    index = faiss.IndexFlatIP(DIM)
    index.add(l2_normalize(vectors))
    qs = l2_normalize(queries)
    latencies = []
    t_all = time.perf_counter()
    for i in range(n_queries):
        t0 = time.perf_counter()
        index.search(qs[i % len(qs)][None, :], K)
        latencies.append(time.perf_counter() - t0)
    wall = time.perf_counter() - t_all
    return {"ok": n_queries, "failed": 0, "seconds": wall, "qps": n_queries / wall,
            "p50_ms": 1e3 * percentile(latencies, 50), "p99_ms": 1e3 * percentile(latencies, 99)}


def http_part(args: argparse.Namespace, work: Path) -> None:
    import faiss
    import httpx

    faiss.omp_set_num_threads(1)
    t0 = time.perf_counter()
    vectors = build_store(work / "store", args.items, args.seed)
    print(f"# built {args.items} items in {time.perf_counter() - t0:.1f} s", flush=True)
    queries = np.random.default_rng(args.seed + 1).standard_normal((256, DIM)).astype(np.float32)
    env = {**os.environ, "PYTHONPATH": str(SRC), "OMP_NUM_THREADS": "1"}
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    server = subprocess.Popen([sys.executable, "-c", SERVER, str(work / "store"), str(port),
                               TOKEN], env=env)
    rows = {}
    try:
        wait_healthy(base)
        httpx.post(f"{base}/collections/bench/search", timeout=120, json={
            "vector": queries[0].tolist(), "k": K})  # builds the server's FAISS cache
        rows["FAISS IndexFlatIP in-process, nq=1"] = faiss_direct(vectors, queries,
                                                                  args.faiss_queries)
        rows["HTTP search, idle collection"] = http_load(
            base, queries, clients=args.clients, max_requests=args.requests // 2,
            max_seconds=args.seconds / 2)
        r = httpx.post(f"{base}/collections/bench/upgrades", headers=AUTH, timeout=120,
                       json={"version": "vB", "batch_size": args.batch_size, "seed": 0})
        job = r.json()["job"]
        t_upgrade = time.perf_counter()
        worker = subprocess.Popen([sys.executable, "-c", WORKER, str(work / "store"), str(job)],
                                  env=env, stdout=subprocess.PIPE, text=True)
        done = threading.Event()
        threading.Thread(target=lambda: (worker.wait(), done.set()), daemon=True).start()
        frac0 = httpx.get(f"{base}/collections/bench/upgrades/current").json()["fraction"]
        rows["HTTP search, during hot-refresh backfill"] = http_load(
            base, queries, clients=args.clients, max_requests=args.requests,
            max_seconds=args.seconds, stop=done)
        frac1 = httpx.get(f"{base}/collections/bench/upgrades/current").json()["fraction"]
        out, _ = worker.communicate(timeout=600)
        result = json.loads(out.strip().splitlines()[-1])
        status = httpx.get(f"{base}/collections/bench/upgrades/current").json()
        backfill_wall = time.perf_counter() - t_upgrade
    finally:
        server.terminate()
        server.wait(30)

    print(f"\n## Search, {args.items:,} items, d={DIM}, k={K}, {args.clients} client threads "
          f"(bounds: {args.requests} requests / {args.seconds:.0f} s per phase)\n")
    print("| path | queries/s | p50 ms | p99 ms | answered | failed |")
    print("|---|---:|---:|---:|---:|---:|")
    for name, r in rows.items():
        print(f"| {name} | {r['qps']:.0f} | {r['p50_ms']:.2f} | {r['p99_ms']:.2f} | {r['ok']} | "
              f"{r['failed']} |")
    print(f"\nThe load during the upgrade ran while the backfill went from {100 * frac0:.1f}% "
          f"to {100 * frac1:.1f}%.")
    print(f"Backfill (hash embedder, worker process, batches of {args.batch_size}, under the "
          f"load): {result['written']:,} items in {result['seconds']:.1f} s = "
          f"{result['written'] / result['seconds']:,.0f} items/s; job state {status['state']}, "
          f"{backfill_wall:.1f} s from start to completion.")


def model_part(args: argparse.Namespace, work: Path) -> None:
    import torch
    from PIL import Image

    from compatkit.artifacts import read_manifest
    from compatkit.index import ArtifactEmbedder, IndexStore, ItemInput, rollback, run_backfill
    from compatkit.inference import embed_images

    torch.set_num_threads(1)
    paths = random_model_artifacts(work)
    spec = read_manifest(paths["new"]).input
    n = args.model_items
    images = np.random.default_rng(0).integers(0, 256, (n, 3, 32, 32), dtype=np.uint8)
    src = work / "sources"
    src.mkdir()
    sources = []
    for i, img in enumerate(images):
        path = src / f"{i:05d}.png"
        Image.fromarray(img.transpose(1, 2, 0)).save(path)
        sources.append(str(path))

    new = ArtifactEmbedder(paths["new"], batch_size=args.model_batch)
    embed_images(new.model, images[:64], spec)  # warm-up

    store = IndexStore(work / "model-store")
    store.register_artifact(paths["old"])
    store.register_artifact(paths["new"])
    coll = store.create_collection("m", "old")
    old_vecs = ArtifactEmbedder(paths["old"]).embed_images(images)
    coll.add([ItemInput(str(i), source=s, vector=v)
              for i, (s, v) in enumerate(zip(sources, old_vecs, strict=True))])
    bare_rates, backfill_rates = [], []
    for _ in range(args.repeats):  # interleaved, best of each: the CPU is shared
        t0 = time.perf_counter()
        embed_images(new.model, images, spec, batch_size=args.model_batch)
        bare_rates.append(n / (time.perf_counter() - t0))
        job = coll.start_upgrade("new", batch_size=args.model_batch).job
        t0 = time.perf_counter()
        st = run_backfill(store, job)
        backfill_rates.append(st.written / (time.perf_counter() - t0))
        rollback(store, job)  # back to the old vectors for the next repetition
    bare, backfill = max(bare_rates), max(backfill_rates)
    print(f"\n## Backfill vs bare inference: resnet18_cifar width 0.25 (random weights), "
          f"32-px RGB, {n} items, batches of {args.model_batch}, 1 torch thread, best of "
          f"{args.repeats} interleaved runs\n")
    print("| path | items/s |")
    print("|---|---:|")
    print(f"| embed_images on in-memory uint8 arrays (bare inference) | {bare:,.0f} |")
    print(f"| hot-refresh backfill through the index (PNG decode + embed + commit) | "
          f"{backfill:,.0f} |")
    print(f"\nBackfill reaches {100 * backfill / bare:.0f}% of bare inference.")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--items", type=int, default=100_000)
    p.add_argument("--clients", type=int, default=4)
    p.add_argument("--requests", type=int, default=4000, help="bound per load phase")
    p.add_argument("--seconds", type=float, default=60.0, help="bound per load phase")
    p.add_argument("--batch-size", type=int, default=512)
    p.add_argument("--faiss-queries", type=int, default=2000)
    p.add_argument("--model-items", type=int, default=2048)
    p.add_argument("--model-batch", type=int, default=256)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--skip-http", action="store_true")
    p.add_argument("--skip-model", action="store_true")
    args = p.parse_args()
    with tempfile.TemporaryDirectory(prefix="serve_load_") as tmp:
        if not args.skip_http:
            http_part(args, Path(tmp))
        if not args.skip_model:
            model_part(args, Path(tmp))
    print(f"\ncpu: {os.cpu_count()} cores visible (shared); python {sys.version.split()[0]}; "
          "latencies are client-side wall times, p50/p99 by numpy.percentile")


if __name__ == "__main__":
    main()
