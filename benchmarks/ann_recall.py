"""Approximate search at size: recall@k and latency of IVF and HNSW groups against exact search.

A clustered collection of ``--n`` L2-normalised ``--dim``-d vectors (``--clusters`` centres
drawn on the sphere, each point a centre plus Gaussian noise of norm about ``--spread``) goes
into the index's own search structure (``compatkit.index.backends.VectorGroup``) once per
kind. Queries are fresh draws from the same mixture. The exact top-k of a flat group is the
ground truth; recall@k is the mean overlap |approx ∩ exact| / k over ``--queries`` queries;
latency is one query per call (as the service searches), over ``--timing-queries`` queries.

Run (each under ~5 minutes on one thread):
    OMP_NUM_THREADS=1 PYTHONPATH=src .venv/bin/python benchmarks/ann_recall.py --kinds ivf
    OMP_NUM_THREADS=1 PYTHONPATH=src .venv/bin/python benchmarks/ann_recall.py --kinds hnsw
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))


def clustered(n: int, dim: int, clusters: int, spread: float, seed: int,
              centres: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """(vectors (n, dim) float32 L2-normalised, centres (clusters, dim))."""
    rng = np.random.default_rng(seed)
    if centres is None:
        centres = rng.standard_normal((clusters, dim)).astype(np.float32)
        centres /= np.linalg.norm(centres, axis=1, keepdims=True)
    out = np.empty((n, dim), dtype=np.float32)
    for start in range(0, n, 100_000):  # in chunks: float64 noise for 1M x 128 is 1 GB
        m = min(100_000, n - start)
        noise = rng.standard_normal((m, dim), dtype=np.float32) * (spread / np.sqrt(dim))
        block = centres[rng.integers(0, len(centres), m)] + noise
        out[start:start + m] = block / np.linalg.norm(block, axis=1, keepdims=True)
    return out, centres


def recall_at_k(found: np.ndarray, truth: np.ndarray) -> float:
    """Mean over queries of |found ∩ truth| / k. Shapes: (nq, k) both."""
    k = truth.shape[1]
    return float(np.mean([len(set(f.tolist()) & set(t.tolist())) / k
                          for f, t in zip(found, truth, strict=True)]))


def ms_per_query(group, queries: np.ndarray, k: int) -> float:
    """Median wall time of one single-query search, in milliseconds."""
    times = []
    for q in queries:
        t0 = time.perf_counter()
        group.search(q[None, :], k)
        times.append(time.perf_counter() - t0)
    return 1000.0 * float(np.median(times))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--n", type=int, default=1_000_000)
    p.add_argument("--dim", type=int, default=128)
    p.add_argument("--clusters", type=int, default=1000)
    p.add_argument("--spread", type=float, default=1.5, help="noise norm around a centre")
    p.add_argument("--queries", type=int, default=1000, help="queries for recall")
    p.add_argument("--timing-queries", type=int, default=200, help="queries timed one by one")
    p.add_argument("--k", type=int, default=10)
    p.add_argument("--kinds", default="ivf,hnsw", help="comma list of ivf, hnsw")
    p.add_argument("--nlist", type=int, default=None, help="IVF lists (default: 4*sqrt(n))")
    p.add_argument("--nprobe", default="8,16,32,64", help="comma list")
    p.add_argument("--hnsw-m", type=int, default=32)
    p.add_argument("--ef-construction", default="200",
                   help="comma list (the default is BackendOptions's)")
    p.add_argument("--ef-search", default="64,128,256,512", help="comma list")
    p.add_argument("--threads", type=int, default=1, help="FAISS OpenMP threads")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()

    import faiss

    from compatkit.index.backends import BackendOptions, VectorGroup, ivf_nlist

    faiss.omp_set_num_threads(args.threads)
    t0 = time.perf_counter()
    x, centres = clustered(args.n, args.dim, args.clusters, args.spread, args.seed)
    q, _ = clustered(args.queries, args.dim, args.clusters, args.spread, args.seed + 1, centres)
    keys = np.arange(args.n, dtype=np.int64)
    print(f"data: {args.n:,} x {args.dim} in {args.clusters} clusters (spread {args.spread}), "
          f"{args.queries} queries, made in {time.perf_counter() - t0:.1f} s", flush=True)

    rows = []
    t0 = time.perf_counter()
    flat = VectorGroup(args.dim)
    flat.add(keys, x)
    build = time.perf_counter() - t0
    truth = flat.search(q, args.k).keys
    flat_ms = ms_per_query(flat, q[:args.timing_queries], args.k)
    rows.append(("flat (exact)", "IndexFlatIP", build, 1.0, flat_ms))
    del flat

    kinds = [s for s in args.kinds.split(",") if s]
    if "ivf" in kinds:
        nlist = ivf_nlist(args.n, args.nlist)
        opts = BackendOptions(kind="ivf", ivf_min_size=1, nlist=nlist)
        t0 = time.perf_counter()
        group = VectorGroup(args.dim, opts)
        group.add(keys, x)
        build = time.perf_counter() - t0
        if group.structure != "ivf":
            raise RuntimeError(f"expected an IVF group, got {group.structure}")
        for nprobe in (int(s) for s in args.nprobe.split(",")):
            group.options = opts._replace(nprobe=nprobe)
            rec = recall_at_k(group.search(q, args.k).keys, truth)
            ms = ms_per_query(group, q[:args.timing_queries], args.k)
            rows.append(("ivf", f"IndexIVFFlat nlist={nlist} nprobe={nprobe}", build, rec, ms))
            print(rows[-1], flush=True)
        del group
    if "hnsw" in kinds:
        for ef_construction in (int(s) for s in args.ef_construction.split(",")):
            opts = BackendOptions(kind="hnsw", hnsw_m=args.hnsw_m,
                                  ef_construction=ef_construction)
            t0 = time.perf_counter()
            group = VectorGroup(args.dim, opts)
            group.add(keys, x)
            build = time.perf_counter() - t0
            for ef in (int(s) for s in args.ef_search.split(",")):
                group.options = opts._replace(ef_search=ef)
                rec = recall_at_k(group.search(q, args.k).keys, truth)
                ms = ms_per_query(group, q[:args.timing_queries], args.k)
                rows.append(("hnsw", f"IndexHNSWFlat M={args.hnsw_m} "
                             f"efConstruction={ef_construction} efSearch={ef}", build, rec, ms))
                print(rows[-1], flush=True)
            del group

    print(f"\n## Approximate search, {args.n:,} x {args.dim} clustered, recall@{args.k} against "
          f"exact over {args.queries} queries, latency one query per call "
          f"(median of {args.timing_queries}), {args.threads} FAISS thread(s)\n")
    print(f"| index | settings | build s | recall@{args.k} | ms/query |")
    print("|---|---|---:|---:|---:|")
    for kind, settings, build, rec, ms in rows:
        print(f"| {kind} | {settings} | {build:.1f} | {rec:.3f} | {ms:.3f} |")
    print(f"\ncpu: {os.cpu_count()} cores visible (shared); faiss {faiss.__version__}; "
          f"build includes IVF k-means on at most 64 points per list")


if __name__ == "__main__":
    main()
