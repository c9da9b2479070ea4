"""Hot-refresh backfilling curves of trained models (from ``benchmarks/methods.py`` runs).

For each backward-compatible model (default: bct, contra, ract) the gallery starts with the old
features and is re-embedded in random, uncertainty (old-classifier entropy) and oracle order;
for FastFill it starts with the transformed old features and is re-embedded in random, σ and
oracle order. Metrics and negative flips against old/old at 21 points, both AUCs, regression
indicators; a table on stdout and one plot per model.

    python benchmarks/hot_refresh.py --runs runs/methods/omniglot_extended_class \
        --plots docs/figures
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import torch

from compatkit.eval import BackfillCurve, backfill_curve, retrieval_metrics
from compatkit.feature_upgrade import sigma_scores
from compatkit.lab_demo import backfill_curves
from compatkit.ordering import backfill_order
from compatkit.train.loop import load_frozen

METRICS = ["map", "cmc@1"]


def fastfill_curves(runs: Path, feats: dict[str, np.ndarray], labels: np.ndarray,
                    steps: int) -> dict[str, BackfillCurve]:
    module, _ = load_frozen(runs / "fastfill" / "model", "cpu")
    old, new = feats["old"], feats["independent"]
    start = feats["transformed_fastfill"]
    sigma = sigma_scores(module.module, old)
    orders = {"random": {"seed": 0}, "sigma": {"sigma": sigma},
              "oracle": {"new_features": new, "old_features": start}}
    return {name: backfill_curve(new, labels, start, new, labels,
                                 backfill_order(name, len(old), **kw), steps=steps,
                                 metrics=METRICS, exclude_self=True, old_query=old,
                                 reference_gallery=old, ordering=name)
            for name, kw in orders.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=Path, required=True)
    parser.add_argument("--models", default="bct,contra,ract")
    parser.add_argument("--steps", type=int, default=21)
    parser.add_argument("--plots", type=Path, default=None)
    args = parser.parse_args()
    torch.set_num_threads(1)
    data = np.load(args.runs / "features.npz")
    feats = {k: data[k] for k in data.files if k != "labels"}
    labels = data["labels"]
    old_model, _ = load_frozen(args.runs / "old" / "model", "cpu")
    old_old = retrieval_metrics(feats["old"], labels, feats["old"], labels, metrics=METRICS,
                                exclude_self=True)
    all_curves: dict[str, dict[str, BackfillCurve]] = {}
    for name in [m for m in args.models.split(",") if m in feats]:
        all_curves[name] = backfill_curves(feats["old"], feats[name], labels,
                                           old_model.classifier, metrics=METRICS,
                                           steps=args.steps)
    if "transformed_fastfill" in feats:
        all_curves["fastfill"] = fastfill_curves(args.runs, feats, labels, args.steps)
    print(f"old/old: mAP {old_old['map']:.4f}, CMC@1 {old_old['cmc@1']:.4f}; "
          f"{len(labels)} test images, {args.steps} points, flips against old/old (top-1)")
    print("| model | order | M(0) mAP | M(1) mAP | AUC mAP trapezoid | AUC mAP mean | "
          "AUC CMC@1 trapezoid | min M − M(0) (mAP) | decreasing steps (mAP) | mean NFR | "
          "max NFR |")
    print("|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for name, curves in all_curves.items():
        for order, c in curves.items():
            m = c.metrics["map"]
            print(f"| {name} | {order} | {m[0]:.4f} | {m[-1]:.4f} | "
                  f"{c.auc['map']['trapezoid']:.4f} | {c.auc['map']['mean']:.4f} | "
                  f"{c.auc['cmc@1']['trapezoid']:.4f} | "
                  f"{c.regression['map']['min_minus_start']:.4f} | "
                  f"{c.regression['map']['decreasing_steps']} | "
                  f"{c.regression['mean_nfr']:.4f} | {c.regression['max_nfr']:.4f} |")
    nfr_rows = []
    for name, curves in all_curves.items():
        c = curves["random"]
        nfr_rows.append(f"| {name} | " + " | ".join(f"{v:.3f}" for v in c.nfr[::4]) + " |")
    fractions = next(iter(next(iter(all_curves.values())).values())).fractions[::4]
    print()
    print("NFR along the random-order curve:")
    print("| model | " + " | ".join(f"{f:.0%}" for f in fractions) + " |")
    print("|---|" + "---:|" * len(fractions))
    print("\n".join(nfr_rows))
    out = {name: {o: c.to_json() for o, c in curves.items()} for name, curves in
           all_curves.items()}
    (args.runs / "hot_refresh.json").write_text(json.dumps(out, indent=1))
    if args.plots is not None:
        from compatkit.eval.plots import plot_backfill_curves

        args.plots.mkdir(parents=True, exist_ok=True)
        for name, curves in all_curves.items():
            new_new = retrieval_metrics(feats[name] if name != "fastfill" else
                                        feats["independent"], labels,
                                        feats[name] if name != "fastfill" else
                                        feats["independent"], labels, metrics=["map"],
                                        exclude_self=True)["map"]
            plot_backfill_curves(curves, args.plots / f"{args.runs.name}_{name}.png",
                                 metric="map", old_old=old_old["map"], new_new=new_new,
                                 title=f"{args.runs.name}: {name}")


if __name__ == "__main__":
    main()
