"""Speed and memory of the metrics engine against the bare similarity matmul.

Clustered random data (class centres plus Gaussian noise, L2-normalised), then in one process
and with the same thread count: the bare query × gallery matmul walked in gallery chunks, and
full-ranking mAP + CMC@1,5 through ``compatkit.eval.retrieval_metrics``. Goals: ratio <= 3x,
peak RSS < 4 GiB. Both are timed ``--repeats`` times, interleaved, and the best of each is
kept, as wall time and as CPU time of this process (steadier on a shared machine).

    PYTHONPATH=src python benchmarks/eval_engine.py --threads 1   # 10k x 100k, d=128
    PYTHONPATH=src python benchmarks/eval_engine.py --nq 100000 --exclude-self
"""

from __future__ import annotations

import argparse
import resource

import numpy as np
import torch

from common import Stopwatch, print_quantities
from compatkit.eval.metrics import retrieval_metrics


def clustered(n: int, centres: np.ndarray, noise: float, rng: np.random.Generator):
    """(n, d) float32 points around random class centres, and their int64 labels."""
    labels = rng.integers(0, centres.shape[0], n)
    x = centres[labels] + noise * rng.standard_normal((n, centres.shape[1]), dtype=np.float32)
    return x.astype(np.float32), labels.astype(np.int64)



def bare_matmul_seconds(
    q: torch.Tensor, g: torch.Tensor, chunk: int, query_block: int
) -> tuple[float, float]:
    """(wall, CPU) seconds of the (nq, ng) similarity matmul in the engine's blocks, into one
    buffer."""
    q = torch.nn.functional.normalize(q, dim=1)
    g = torch.nn.functional.normalize(g, dim=1)
    buf = torch.empty(min(query_block, q.shape[0]), chunk, device=q.device)
    with Stopwatch() as sw:
        for qs in range(0, q.shape[0], query_block):
            qb = q[qs : qs + query_block]
            for start in range(0, g.shape[0], chunk):
                part = g[start : start + chunk]
                torch.matmul(qb, part.T, out=buf[: qb.shape[0], : part.shape[0]])
        if q.device.type == "cuda":
            torch.cuda.synchronize(q.device)
    return sw.wall, sw.cpu


def peak_rss_gib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB on Linux


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--nq", type=int, default=10_000)
    p.add_argument("--ng", type=int, default=100_000)
    p.add_argument("--dim", type=int, default=128)
    p.add_argument("--classes", type=int, default=1000)
    p.add_argument("--noise", type=float, default=1.6, help="per-coordinate noise std")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--chunk-size", type=int, default=4096)
    p.add_argument("--query-block", type=int, default=2048)
    p.add_argument("--exclude-self", action="store_true", help="queries = gallery (needs nq=ng)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--repeats", type=int, default=1, help="interleaved runs; best kept")
    p.add_argument("--device", default="cpu", help="where the features live (cpu, cuda)")
    args = p.parse_args()
    torch.set_num_threads(args.threads)

    rng = np.random.default_rng(args.seed)
    centres = rng.standard_normal((args.classes, args.dim), dtype=np.float32)
    g, gl = clustered(args.ng, centres, args.noise, rng)
    if args.exclude_self:
        q, ql = g, gl
    else:
        q, ql = clustered(args.nq, centres, args.noise, rng)
    rss_data = peak_rss_gib()
    dev = torch.device(args.device)
    q, ql, g, gl = (torch.from_numpy(a).to(dev) for a in (q, ql, g, gl))

    mm, ev = [], []
    for _ in range(args.repeats):
        mm.append(
            bare_matmul_seconds(q, g, args.chunk_size, args.query_block)
        )
        with Stopwatch() as sw:
            result = retrieval_metrics(
                q,
                ql,
                g,
                gl,
                metrics=("map", "cmc@1", "cmc@5"),
                exclude_self=args.exclude_self,
                chunk_size=args.chunk_size,
                query_block=args.query_block,
            )
        ev.append((sw.wall, sw.cpu))
    (mm_wall, mm_cpu), (ev_wall, ev_cpu) = (tuple(map(min, zip(*x, strict=True))) for x in (mm, ev))
    rows = [
        ("queries x gallery, d", f"{q.shape[0]} x {g.shape[0]}, {args.dim}"),
        (
            "threads / chunk / query block",
            f"{args.threads} / {args.chunk_size} / {args.query_block}",
        ),
        ("repeats (best kept) / device", f"{args.repeats} / {args.device}"),
        ("bare matmul, wall / CPU (s)", f"{mm_wall:.2f} / {mm_cpu:.2f}"),
        ("mAP + CMC@1,5, wall / CPU (s)", f"{ev_wall:.2f} / {ev_cpu:.2f}"),
        ("ratio wall (goal <= 3x)", f"{ev_wall / mm_wall:.2f}x"),
        ("ratio CPU time", f"{ev_cpu / mm_cpu:.2f}x"),
        ("peak RSS after data (GiB)", f"{rss_data:.2f}"),
        ("peak RSS (GiB, goal < 4)", f"{peak_rss_gib():.2f}"),
        *[(name, f"{value:.4f}") for name, value in result.items()],
    ]
    print_quantities(rows)


if __name__ == "__main__":
    main()
