"""Load on the index's HTTP service, idle and during a hot-refresh upgrade, next to its engine
(FAISS with the same batching) at the same concurrency; backfill rate next to bare inference.

Part 1 (HTTP): a collection of ``--items`` (default 100k) random 128-d vectors, each with a
source string, served by ``--workers`` uvicorn processes on 127.0.0.1. The load comes from
outside the server: ``wrk`` (a compiled load generator, Debian package ``wrk``) when it is on the
PATH, else client processes (``multiprocessing``, httpx) — the script says which. At each
concurrency of ``--concurrency`` (default 1, 4, 16, 64) it measures search requests (k=10,
vectors of the new version) for ``--seconds``: first on the idle collection, then while a
hot-refresh upgrade vA -> vB runs in a separate worker process. Both versions use
``HashEmbedder`` (cheap and deterministic: the load is on the index, not on a model). In the same
run the engine answers the same queries in-process: ``faiss.IndexFlatIP`` one query per call,
and at each concurrency through the service's own batching (``compatkit.index.batching.
Gatherer``). The backfill rate under load is compared with the same backfill on a copy of the
store with no load. ``--profile`` records the server with py-spy (if installed) during the idle
and the backfill phase at concurrency 16 and prints where the time goes.

Part 2 (backfill vs inference): a real small compatkit model (resnet18_cifar, width 0.25,
random weights) on 32-px PNG sources: the backfill rate of a hot-refresh upgrade through the
index (decode + embed + commit) next to ``embed_images`` on the same images already in memory.

With ``--baseline-src OTHER/src`` it then starts the baseline's server (1 process) and this
tree's (1 and 2 processes) in turn on one store and compares their idle rates.

Run:  PYTHONPATH=src .venv/bin/python benchmarks/serve_load.py --skip-model --workers 2
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import ProcessPoolExecutor
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
import sys, uvicorn
from compatkit.index import IndexStore
from compatkit.index.service import ServiceSettings, create_app
root, port, workers = sys.argv[1], int(sys.argv[2]), int(sys.argv[4])
settings = ServiceSettings(admin_token=sys.argv[3], run_worker=False)
if workers == 1:
    uvicorn.run(create_app(IndexStore(root), settings), host="127.0.0.1", port=port,
                log_level="warning", access_log=False)
else:
    from compatkit.index.service.launch import serve
    serve(root, settings, port=port, workers=workers, log_level="warning")
"""

WORKER = """
import json, sys, time
from compatkit.index import IndexStore, run_backfill
store = IndexStore(sys.argv[1])
job = int(sys.argv[2])
t0 = time.perf_counter()
st = run_backfill(store, job, worker="bench")
print(json.dumps({"state": st.state, "seconds": time.perf_counter() - t0,
                  "written": st.written}), flush=True)
"""

WRK_SCRIPT = """
local bodies = {%s}
local i = 0
wrk.method = "POST"
wrk.headers["Content-Type"] = "application/json"
request = function()
  i = i + 1
  return wrk.format(nil, nil, nil, bodies[(i %% #bodies) + 1])
end
"""


def percentile(values: list[float], q: float) -> float:
    return float(np.percentile(np.asarray(values), q)) if values else float("nan")


def summary(latencies: list[float], failed: int, seconds: float) -> dict:
    return {"ok": len(latencies), "failed": failed, "seconds": seconds,
            "qps": len(latencies) / seconds, "p50_ms": 1e3 * percentile(latencies, 50),
            "p99_ms": 1e3 * percentile(latencies, 99)}


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
    store.close()  # the last connection folds the WAL into the database file
    return vectors


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_healthy(base: str, timeout: float = 120.0) -> None:
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


# ------------------------------------------------------------------ load generators


def wrk_load(base: str, script: Path, concurrency: int, seconds: float) -> dict:
    """``wrk`` at ``concurrency`` open connections for ``seconds`` (closed loop)."""
    out = subprocess.run(
        ["wrk", "-t", str(min(concurrency, 2)), "-c", str(concurrency), "-d",
         f"{max(1, round(seconds))}s", "--latency", "--timeout", "30s", "-s", str(script),
         f"{base}/collections/bench/search"], capture_output=True, text=True, check=True).stdout
    done = re.search(r"(\d+) requests in ([\d.]+)(m?s)", out)
    n, wall = int(done.group(1)), float(done.group(2)) * (1e-3 if done.group(3) == "ms" else 1)
    bad = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
    errors = re.search(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)",
                       out)
    failed = (int(bad.group(1)) if bad else 0) + (sum(map(int, errors.groups())) if errors else 0)
    dist = dict(re.findall(r"^\s+(50|99)%\s+([\d.]+[a-z]+)\s*$", out, flags=re.M))
    if "50" not in dist or "99" not in dist:
        raise RuntimeError(f"cannot read wrk's latency distribution from:\n{out}")
    return {"ok": n - failed, "failed": failed, "seconds": wall, "qps": (n - failed) / wall,
            "p50_ms": _ms(dist["50"]), "p99_ms": _ms(dist["99"])}


def _ms(text: str) -> float:
    value, unit = re.fullmatch(r"([\d.]+)(us|ms|s|m)", text).groups()
    return float(value) * {"us": 1e-3, "ms": 1.0, "s": 1e3, "m": 6e4}[unit]


def _client_process(base: str, threads: int, seconds: float, bodies: list[str]) -> tuple:
    import httpx

    latencies: list[float] = []
    failed = [0]
    lock = threading.Lock()
    deadline = time.perf_counter() + seconds

    def client(cid: int) -> None:
        with httpx.Client(base_url=base, timeout=30.0) as http:
            i = cid
            while time.perf_counter() < deadline:
                t0 = time.perf_counter()
                r = http.post("/collections/bench/search", content=bodies[i % len(bodies)],
                              headers={"content-type": "application/json"})
                dt = time.perf_counter() - t0
                with lock:
                    if r.status_code == 200:
                        latencies.append(dt)
                    else:
                        failed[0] += 1
                i += threads

    pool = [threading.Thread(target=client, args=(c,)) for c in range(threads)]
    for t in pool:
        t.start()
    for t in pool:
        t.join()
    return latencies, failed[0]


def process_load(base: str, bodies: list[str], concurrency: int, seconds: float) -> dict:
    """Client processes (at most 4, threads inside) at ``concurrency`` for ``seconds``."""
    procs = min(concurrency, 4)
    per = [concurrency // procs + (i < concurrency % procs) for i in range(procs)]
    t0 = time.perf_counter()
    with ProcessPoolExecutor(procs) as pool:
        parts = list(pool.map(_client_process, [base] * procs, per, [seconds] * procs,
                              [bodies] * procs))
    wall = time.perf_counter() - t0
    return summary([x for lat, _ in parts for x in lat], sum(f for _, f in parts), wall)


class Load:
    """The load generator: wrk when installed, else client processes."""

    def __init__(self, base: str, queries: np.ndarray, work: Path, force_python: bool) -> None:
        self.base = base
        self.bodies = [json.dumps({"vector": q.tolist(), "version": "vB", "k": K,
                                   "with_metadata": False}) for q in queries]
        self.wrk = None if force_python else shutil.which("wrk")
        self.script = work / "search.lua"
        self.script.write_text(WRK_SCRIPT % ", ".join(f"[==[{b}]==]" for b in self.bodies))

    @property
    def name(self) -> str:
        return ("wrk (compiled, closed loop)" if self.wrk else
                "client processes (httpx; wrk not found: `apt-get install wrk` for a lighter one)")

    def run(self, concurrency: int, seconds: float) -> dict:
        if self.wrk:
            return wrk_load(self.base, self.script, concurrency, seconds)
        return process_load(self.base, self.bodies, concurrency, seconds)


# ------------------------------------------------------------------ the engine alone


def faiss_direct(vectors: np.ndarray, queries: np.ndarray, seconds: float) -> tuple:
    """The exact top-k through one ``IndexFlatIP``, one query per call, one thread; and a
    function measuring the same index at a concurrency through the service's batching (and
    the index's switch to one matrix product from ``FLAT_BLAS_MIN_QUERIES`` queries)."""
    import faiss

    from compatkit.index.backends import flat_blas_threshold
    from compatkit.index.batching import Gatherer
    from compatkit.index.vectors import l2_normalize

    faiss.cvar.distance_compute_blas_threshold = flat_blas_threshold(DIM)
    index = faiss.IndexFlatIP(DIM)
    index.add(l2_normalize(vectors))
    qs = l2_normalize(queries)
    latencies = []
    t_all = time.perf_counter()
    i = 0
    while time.perf_counter() - t_all < seconds:
        t0 = time.perf_counter()
        index.search(qs[i % len(qs)][None, :], K)
        latencies.append(time.perf_counter() - t0)
        i += 1
    single = summary(latencies, 0, time.perf_counter() - t_all)

    def run(batch: list[dict]) -> None:
        _, ids = index.search(np.stack([r["q"] for r in batch]), K)
        for r, row in zip(batch, ids, strict=True):
            r["ids"] = row

    gatherer = Gatherer(run, size=lambda r: 1, max_size=256)

    def batched(concurrency: int) -> dict:
        lat: list[float] = []
        lock = threading.Lock()
        deadline = time.perf_counter() + seconds

        def client(cid: int) -> None:
            j = cid
            while time.perf_counter() < deadline:
                t0 = time.perf_counter()
                gatherer.submit({"q": qs[j % len(qs)]})
                with lock:
                    lat.append(time.perf_counter() - t0)
                j += concurrency

        threads = [threading.Thread(target=client, args=(c,)) for c in range(concurrency)]
        t0 = time.perf_counter()
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        return summary(lat, 0, time.perf_counter() - t0)

    return single, batched


# ------------------------------------------------------------------ profiling


def start_profile(pid: int, seconds: float, out: Path) -> subprocess.Popen | None:
    """py-spy recording the server (and its worker processes) for ``seconds``, if installed."""
    spy = shutil.which("py-spy") or shutil.which("py-spy", path=str(Path(sys.executable).parent))
    if spy is None:
        print("# --profile: py-spy not found (pip install py-spy); no profile", flush=True)
        return None
    return subprocess.Popen([spy, "record", "--pid", str(pid), "--subprocesses", "-d",
                             str(max(1, round(seconds))), "-r", "200", "--format", "raw",
                             "--nonblocking", "-o", str(out)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def print_profile(spy: subprocess.Popen | None, out: Path, title: str) -> None:
    if spy is None:
        return
    spy.wait(120)
    if out.is_file():
        from profile_breakdown import print_breakdown

        print(f"\n### Where the server's time goes: {title}")
        print_breakdown(out)


# ------------------------------------------------------------------ the run


def backfill(root: Path, env: dict, job: int) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-c", WORKER, str(root), str(job)], env=env,
                            stdout=subprocess.PIPE, text=True)


def http_part(args: argparse.Namespace, work: Path) -> None:
    import faiss
    import httpx

    from compatkit.index import IndexStore

    faiss.omp_set_num_threads(1)
    t0 = time.perf_counter()
    vectors = build_store(work / "store", args.items, args.seed)
    print(f"# built {args.items} items in {time.perf_counter() - t0:.1f} s", flush=True)
    queries = np.random.default_rng(args.seed + 1).standard_normal((256, DIM)).astype(np.float32)
    env = {**os.environ, "PYTHONPATH": str(args.src), "OMP_NUM_THREADS": "1"}

    # the same backfill on a copy, with no load: the reference rate
    shutil.copytree(work / "store", work / "quiet")
    quiet = IndexStore(work / "quiet")
    job = quiet.collection("bench").start_upgrade("vB", batch_size=args.batch_size, seed=0).job
    quiet.close()
    proc = backfill(work / "quiet", env, job)
    quiet_result = json.loads(proc.communicate(timeout=1200)[0].strip().splitlines()[-1])
    shutil.rmtree(work / "quiet")
    quiet_rate = quiet_result["written"] / quiet_result["seconds"]
    print(f"# backfill with no load: {quiet_rate:,.0f} items/s", flush=True)

    port = free_port()
    base = f"http://127.0.0.1:{port}"
    server = subprocess.Popen([sys.executable, "-c", SERVER, str(work / "store"), str(port),
                               TOKEN, str(args.workers)], env=env)
    load = Load(base, queries, work, args.python_clients)
    single, engine_batched = faiss_direct(vectors, queries, args.engine_seconds)
    engine, idle, during, fractions = {}, {}, {}, {}
    try:
        wait_healthy(base)
        for _ in range(4 * args.workers):  # build every worker's FAISS cache
            httpx.post(f"{base}/collections/bench/search", timeout=300,
                       json={"vector": queries[0].tolist(), "k": K})
        for c in args.concurrency:
            engine[c] = engine_batched(c)
            spy = (start_profile(server.pid, args.seconds, work / "idle.prof")
                   if args.profile and c == 16 else None)
            idle[c] = load.run(c, args.seconds)
            print(f"# idle c={c}: {idle[c]['qps']:.0f} q/s", flush=True)
            print_profile(spy, work / "idle.prof", "idle, concurrency 16")
        r = httpx.post(f"{base}/collections/bench/upgrades", headers=AUTH, timeout=300,
                       json={"version": "vB", "batch_size": args.batch_size, "seed": 0})
        job = r.json()["job"]
        worker = backfill(work / "store", env, job)
        done = threading.Event()
        threading.Thread(target=lambda: (worker.wait(), done.set()), daemon=True).start()
        phase_s = min(args.seconds, max(2.0, 0.8 * quiet_result["seconds"] /
                                        len(args.concurrency)))
        spy = None

        def fraction() -> float:
            return httpx.get(f"{base}/collections/bench/upgrades/current",
                             timeout=60).json()["fraction"]

        for c in args.concurrency:
            if done.is_set():
                break
            f0 = fraction()
            if args.profile and c == 16:
                spy = start_profile(server.pid, phase_s, work / "backfill.prof")
            during[c] = load.run(c, phase_s)
            fractions[c] = (f0, fraction(), done.is_set())
            print(f"# backfill c={c}: {during[c]['qps']:.0f} q/s", flush=True)
        while not done.is_set():  # keep the backfill under load to its end
            load.run(16, 2.0)
        out, _ = worker.communicate(timeout=1200)
        result = json.loads(out.strip().splitlines()[-1])
        status = httpx.get(f"{base}/collections/bench/upgrades/current", timeout=60).json()
    finally:
        server.terminate()
        server.wait(60)
    print_profile(spy, work / "backfill.prof", "during the backfill, concurrency 16")

    print(f"\n## Search, {args.items:,} items, d={DIM}, k={K}; {args.workers} server "
          f"process(es); load: {load.name}; {args.seconds:.0f} s per idle phase, "
          f"{phase_s:.0f} s per backfill phase\n")
    print(f"FAISS IndexFlatIP in-process, one query per call, 1 thread: {single['qps']:.0f} q/s, "
          f"p50 {single['p50_ms']:.2f} ms, p99 {single['p99_ms']:.2f} ms\n")
    print("| concurrency | engine: FAISS + same batching q/s (p50 / p99 ms) | HTTP idle q/s "
          "(p50 / p99 ms) | HTTP during backfill q/s (p50 / p99 ms) | backfill during phase | "
          "p99 backfill / idle | failed |")
    print("|---:|---:|---:|---:|---|---:|---:|")
    for c in args.concurrency:
        e, i = engine[c], idle[c]
        d = during.get(c)
        cell = (f"{d['qps']:.0f} ({d['p50_ms']:.1f} / {d['p99_ms']:.1f})" if d else "backfill over")
        f = fractions.get(c)
        frac = (f"{100 * f[0]:.0f}% → {100 * f[1]:.0f}%" + (" (ended)" if f[2] else "")
                if f else "")
        ratio = f"{d['p99_ms'] / i['p99_ms']:.2f}×" if d else ""
        failed = i["failed"] + (d["failed"] if d else 0)
        print(f"| {c} | {e['qps']:.0f} ({e['p50_ms']:.1f} / {e['p99_ms']:.1f}) | "
              f"{i['qps']:.0f} ({i['p50_ms']:.1f} / {i['p99_ms']:.1f}) | {cell} | {frac} | "
              f"{ratio} | {failed} |")
    rate = result["written"] / result["seconds"]
    print(f"\nBackfill (hash embedder, one worker process, batches of {args.batch_size}): "
          f"{rate:,.0f} items/s under load vs {quiet_rate:,.0f} items/s with no load "
          f"({100 * rate / quiet_rate:.0f}%); job state {status['state']}.")


def interleaved_part(args: argparse.Namespace, work: Path) -> None:
    """Idle search rate of the baseline tree (1 process) and of this tree (1 and 2 processes),
    started in turn on one store for ``--rounds`` rounds: a fairer comparison than separate runs
    on a machine whose load changes from minute to minute."""
    import httpx

    build_store(work / "ab-store", args.items, args.seed)
    queries = np.random.default_rng(args.seed + 1).standard_normal((256, DIM)).astype(np.float32)
    configs = [(f"baseline ({args.baseline_src}), 1 process", args.baseline_src, 1),
               ("this tree, 1 process", args.src, 1), ("this tree, 2 processes", args.src, 2)]
    rates: dict[tuple[str, int], list[dict]] = {}
    for _ in range(args.rounds):
        for name, src, workers in configs:
            env = {**os.environ, "PYTHONPATH": str(src), "OMP_NUM_THREADS": "1"}
            port = free_port()
            base = f"http://127.0.0.1:{port}"
            server = subprocess.Popen([sys.executable, "-c", SERVER, str(work / "ab-store"),
                                       str(port), TOKEN, str(workers)], env=env)
            try:
                wait_healthy(base)
                for _ in range(4 * workers):
                    httpx.post(f"{base}/collections/bench/search", timeout=300,
                               json={"vector": queries[0].tolist(), "k": K})
                load = Load(base, queries, work, args.python_clients)
                for c in args.concurrency:
                    rates.setdefault((name, c), []).append(load.run(c, args.ab_seconds))
            finally:
                server.terminate()
                server.wait(60)
    print(f"\n## Idle search, {args.items:,} items, configurations in turn, {args.rounds} rounds "
          f"of {args.ab_seconds:.0f} s per concurrency; median q/s (p99 ms) over rounds\n")
    print("| server | " + " | ".join(f"c={c}" for c in args.concurrency) + " |")
    print("|---|" + "---:|" * len(args.concurrency))
    for name, _, _ in configs:
        cells = []
        for c in args.concurrency:
            runs = rates[(name, c)]
            cells.append(f"{np.median([r['qps'] for r in runs]):.0f} "
                         f"({np.median([r['p99_ms'] for r in runs]):.0f})")
        print(f"| {name} | " + " | ".join(cells) + " |")


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
    p.add_argument("--workers", type=int, default=1, help="server processes")
    p.add_argument("--concurrency", type=int, nargs="+", default=[1, 4, 16, 64])
    p.add_argument("--seconds", type=float, default=10.0, help="per idle phase (and at most "
                   "per backfill phase)")
    p.add_argument("--engine-seconds", type=float, default=3.0, help="per engine phase")
    p.add_argument("--batch-size", type=int, default=512)
    p.add_argument("--python-clients", action="store_true",
                   help="client processes even when wrk is installed")
    p.add_argument("--profile", action="store_true", help="py-spy the server at concurrency 16")
    p.add_argument("--src", type=Path, default=SRC, help="the compatkit source tree the server "
                   "runs (another checkout's src/ gives its baseline; --workers 1 only there)")
    p.add_argument("--baseline-src", type=Path, default=None,
                   help="also compare idle rates with this tree's server, in turn")
    p.add_argument("--rounds", type=int, default=2, help="rounds of that comparison")
    p.add_argument("--ab-seconds", type=float, default=5.0, help="per phase of it")
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
        if args.baseline_src is not None:
            interleaved_part(args, Path(tmp))
        if not args.skip_model:
            model_part(args, Path(tmp))
    print(f"\ncpu: {os.cpu_count()} cores visible (shared); python {sys.version.split()[0]}; "
          "latencies are client-side wall times")


if __name__ == "__main__":
    main()
