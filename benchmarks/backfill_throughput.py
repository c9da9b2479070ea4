"""Backfill throughput by engine and worker count (compatkit.index.distributed).

A collection of ``--items`` 32-px RGB PNG sources embedded by a small real model
(resnet18_cifar, width 0.25, random weights) is upgraded hot-refresh to a second model of the
same shape, once per configuration: the local engine (one worker in this process), torchrun
with 1 and 2 ranks, and (``--ray``) Ray Data with 2 actors. Every worker uses one torch
thread. Each run is rolled back before the next, so all start from the same state.

Reported per configuration: wall seconds of the whole call (process start-up and model
loading included) and the steady rate: per worker, the items of its batches after its first
over the time from its first commit to its last, summed over the workers.

Run:  OMP_NUM_THREADS=1 PYTHONPATH=src .venv/bin/python benchmarks/backfill_throughput.py
"""

from __future__ import annotations

import argparse
import os
import sqlite3
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from common import random_model_artifacts

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))


def make_sources(work: Path, n: int, seed: int) -> list[str]:
    """``n`` random 32x32 RGB PNG files; returns their paths."""
    from PIL import Image

    images = np.random.default_rng(seed).integers(0, 256, (n, 32, 32, 3), dtype=np.uint8)
    folder = work / "sources"
    folder.mkdir()
    paths = []
    for i, img in enumerate(images):
        path = folder / f"{i:06d}.png"
        Image.fromarray(img).save(path)
        paths.append(str(path))
    return paths


def steady_rate(db: Path, job: int) -> float:
    """Items per second summed over the workers, each from its first commit to its last
    (its first batch, which pays for loading the model, is left out)."""
    con = sqlite3.connect(db)
    rows = con.execute("SELECT worker, size, committed FROM job_batches WHERE job=? "
                       "ORDER BY committed", (job,)).fetchall()
    con.close()
    by_worker: dict[str, list[tuple[int, float]]] = {}
    for worker, size, committed in rows:
        by_worker.setdefault(worker, []).append((size, committed))
    rate = 0.0
    for batches in by_worker.values():
        if len(batches) > 1:
            rate += sum(s for s, _ in batches[1:]) / (batches[-1][1] - batches[0][1])
    return rate


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--items", type=int, default=16384)
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--ray", action="store_true", help="also run Ray Data with 2 actors")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()

    import torch

    from compatkit.index import IndexStore, ItemInput, rollback
    from compatkit.index.distributed import backfill

    torch.set_num_threads(1)
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    configs = [("local", 1), ("torchrun", 1), ("torchrun", 2)]
    if args.ray:
        configs.append(("ray", 2))
    rows = []
    with tempfile.TemporaryDirectory(prefix="backfill_throughput_") as tmp:
        work = Path(tmp)
        paths = random_model_artifacts(work)
        sources = make_sources(work, args.items, args.seed)
        store = IndexStore(work / "store", synchronous="NORMAL")
        store.register_artifact(paths["old"])
        store.register_artifact(paths["new"])
        coll = store.create_collection("bench", "old")
        t0 = time.perf_counter()
        for start in range(0, len(sources), 1024):
            coll.add([ItemInput(f"i{i}", source=s) for i, s in
                      enumerate(sources[start:start + 1024], start=start)])
        print(f"{args.items} items embedded with the old model in "
              f"{time.perf_counter() - t0:.1f} s", flush=True)
        for engine, workers in configs:
            job = coll.start_upgrade("new", batch_size=args.batch_size, seed=args.seed).job
            t0 = time.perf_counter()
            status = backfill(store, job, engine=engine, workers=workers, device="cpu")
            wall = time.perf_counter() - t0
            if status.state != "completed" or status.written != args.items:
                raise RuntimeError(f"{engine} x{workers}: job ended {status.state} with "
                                   f"{status.written}/{args.items} written")
            rate = steady_rate(store.path, job)
            rows.append((engine, workers, wall, args.items / wall, rate))
            print(rows[-1], flush=True)
            rollback(store, job)
        store.close()

    print(f"\n## Backfill throughput: hot-refresh of {args.items} 32-px PNG items, "
          f"resnet18_cifar width 0.25, batches of {args.batch_size}, 1 torch thread per "
          "worker\n")
    print("| engine | workers | wall s (start-up included) | items/s (wall) | "
          "items/s (steady, summed over workers) |")
    print("|---|---:|---:|---:|---:|")
    for engine, workers, wall, wall_rate, rate in rows:
        print(f"| {engine} | {workers} | {wall:.1f} | {wall_rate:,.0f} | {rate:,.0f} |")
    print(f"\ncpu: {os.cpu_count()} cores visible (shared); python {sys.version.split()[0]}; "
          f"torch {torch.__version__}")


if __name__ == "__main__":
    main()
