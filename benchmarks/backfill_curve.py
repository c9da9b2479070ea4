"""Cost of a backfilling curve against one full evaluation.

Clustered random data with an old and a new model of the same items (the new one less noisy),
random backfill order. In one process and with the same thread count: one full evaluation
(``retrieval_metrics`` of new queries against the new gallery) and a 21-point curve
(``backfill_curve``, old/old flips included). Goal: curve <= 3x one evaluation. For context
it also times the curve's two end points' work: the cross-test evaluation (new queries, old
gallery) and the old/old top-1 reference of the flips. All are timed ``--repeats`` times,
interleaved, and the best of each is kept, as wall time and as CPU time of this process
(steadier on a shared machine).

    PYTHONPATH=src python benchmarks/backfill_curve.py --threads 1  # 10k x 100k, d=128
    PYTHONPATH=src python benchmarks/backfill_curve.py --nq 1000    # quicker
"""

from __future__ import annotations

import argparse
import resource

import numpy as np
import torch

from common import Stopwatch, print_quantities
from compatkit.eval.curve import backfill_curve
from compatkit.eval.flips import top_k_correct
from compatkit.eval.metrics import retrieval_metrics
from compatkit.ordering import backfill_order


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--nq", type=int, default=10_000)
    p.add_argument("--ng", type=int, default=100_000)
    p.add_argument("--dim", type=int, default=128)
    p.add_argument("--classes", type=int, default=1000)
    p.add_argument("--steps", type=int, default=21)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--chunk-size", type=int, default=4096)
    p.add_argument("--query-block", type=int, default=2048)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--repeats", type=int, default=1, help="interleaved runs; best kept")
    p.add_argument("--device", default="cpu", help="where the features live (cpu, cuda)")
    args = p.parse_args()
    torch.set_num_threads(args.threads)

    rng = np.random.default_rng(args.seed)
    centres = rng.standard_normal((args.classes, args.dim), dtype=np.float32)
    gl = rng.integers(0, args.classes, args.ng)
    ql = rng.integers(0, args.classes, args.nq)

    def embed(labels: np.ndarray, noise: float) -> np.ndarray:
        n = labels.shape[0]
        return centres[labels] + noise * rng.standard_normal((n, args.dim), dtype=np.float32)

    old_g, new_g = embed(gl, 2.0), embed(gl, 1.6)
    old_q, new_q = embed(ql, 2.0), embed(ql, 1.6)
    dev = torch.device(args.device)
    old_g, new_g, old_q, new_q, gl, ql = (torch.from_numpy(a).to(dev)
                                          for a in (old_g, new_g, old_q, new_q, gl, ql))
    order = backfill_order("random", args.ng, seed=args.seed)
    metrics = ("map", "cmc@1", "cmc@5")
    common = {"chunk_size": args.chunk_size, "query_block": args.query_block}

    ev, cross, ref, cu = [], [], [], []
    for _ in range(args.repeats):
        with Stopwatch() as sw:
            full = retrieval_metrics(new_q, ql, new_g, gl, metrics=metrics, **common)
        ev.append((sw.wall, sw.cpu))
        with Stopwatch() as sw:
            retrieval_metrics(new_q, ql, old_g, gl, metrics=metrics, **common)
        cross.append((sw.wall, sw.cpu))
        with Stopwatch() as sw:
            top_k_correct(old_q, ql, old_g, gl, **common)
        ref.append((sw.wall, sw.cpu))
        with Stopwatch() as sw:
            curve = backfill_curve(
                new_q,
                ql,
                old_g,
                new_g,
                gl,
                order,
                steps=args.steps,
                metrics=metrics,
                old_query=old_q,
                ordering="random",
                **common,
            )
        cu.append((sw.wall, sw.cpu))
    (ev_wall, ev_cpu), (cr_wall, cr_cpu), (ref_wall, ref_cpu), (cu_wall, cu_cpu) = (
        tuple(map(min, zip(*x, strict=True))) for x in (ev, cross, ref, cu)
    )
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    rows = [
        ("queries x gallery, d", f"{args.nq} x {args.ng}, {args.dim}"),
        (
            "threads / chunk / query block",
            f"{args.threads} / {args.chunk_size} / {args.query_block}",
        ),
        ("repeats (best kept) / device", f"{args.repeats} / {args.device}"),
        ("one full evaluation (new/new), wall / CPU (s)", f"{ev_wall:.2f} / {ev_cpu:.2f}"),
        ("cross-test evaluation (new/old), wall / CPU (s)", f"{cr_wall:.2f} / {cr_cpu:.2f}"),
        ("old/old top-1 reference alone, wall / CPU (s)", f"{ref_wall:.2f} / {ref_cpu:.2f}"),
        (
            f"{args.steps}-point curve incl. old/old flips, wall / CPU (s)",
            f"{cu_wall:.2f} / {cu_cpu:.2f}",
        ),
        ("ratio to new/new, wall (goal <= 3x)", f"{cu_wall / ev_wall:.2f}x"),
        ("ratio to new/new, CPU time", f"{cu_cpu / ev_cpu:.2f}x"),
        ("ratio to new/new + new/old, wall", f"{cu_wall / (ev_wall + cr_wall):.2f}x"),
        ("peak RSS (GiB)", f"{rss:.2f}"),
        (
            "mAP old/new -> new/new",
            f"{curve.metrics['map'][0]:.4f} -> {curve.metrics['map'][-1]:.4f}",
        ),
        ("curve end == full evaluation", str(curve.metrics["map"][-1] == full["map"])),
        (
            "AUC mAP trapezoid / mean",
            f"{curve.auc['map']['trapezoid']:.4f} / {curve.auc['map']['mean']:.4f}",
        ),
        ("max NFR", f"{curve.regression['max_nfr']:.4f}"),
    ]
    print_quantities(rows)


if __name__ == "__main__":
    main()
