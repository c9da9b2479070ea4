"""Hot-refresh backfilling curves of trained models (from ``benchmarks/methods.py`` runs).

For each backward-compatible model (default: bct, contra, ract) the gallery starts with the old
features and is re-embedded in random, uncertainty (old-classifier entropy) and oracle order;
for FastFill it starts with the transformed old features and is re-embedded in random, σ and
oracle order. Metrics and negative flips against old/old at 21 points, both AUCs, regression
indicators; a table on stdout and one plot per model. Several ``--runs`` (one folder per
new-model seed, all against one old model) add mean ± std and the curve claims' verdicts.

    python benchmarks/hot_refresh.py --runs runs/methods/omniglot_extended_class \
        --runs runs/methods/omniglot_extended_class/seed1 --plots docs/figures
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import torch

from compatkit.eval import BackfillCurve, backfill_curve, retrieval_metrics
from compatkit.eval.seeds import claims_markdown, judge_claims, seed_stats
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


def seed_curves(runs: Path, old_classifier: torch.nn.Module, models: list[str],
                steps: int) -> tuple[dict[str, dict[str, BackfillCurve]], dict[str, np.ndarray],
                                     np.ndarray]:
    """Every model's curves (random, uncertainty or σ, oracle) for one seed's run folder."""
    data = np.load(runs / "features.npz")
    feats = {k: data[k] for k in data.files if k != "labels"}
    labels = data["labels"]
    curves = {name: backfill_curves(feats["old"], feats[name], labels, old_classifier,
                                    metrics=METRICS, steps=steps)
              for name in models if name in feats}
    if "transformed_fastfill" in feats:
        curves["fastfill"] = fastfill_curves(runs, feats, labels, steps)
    return curves, feats, labels


def curve_summary(c: BackfillCurve) -> dict[str, float]:
    """The numbers the tables report for one curve."""
    m = c.metrics["map"]
    return {"start": m[0], "end": m[-1], "auc_map": c.auc["map"]["trapezoid"],
            "auc_map_mean": c.auc["map"]["mean"], "auc_cmc1": c.auc["cmc@1"]["trapezoid"],
            "dip": c.regression["map"]["min_minus_start"],
            "decreasing": c.regression["map"]["decreasing_steps"],
            "mean_nfr": c.regression["mean_nfr"], "max_nfr": c.regression["max_nfr"]}


def curve_claims(summary: dict[str, dict[str, dict[str, float]]]) -> dict[str, float]:
    """One seed's hot-refresh claims as margins that are positive when the claim holds.

    ``summary`` is ``{model: {order: curve_summary(...)}}``.
    """
    claims: dict[str, float] = {}
    for name, orders in summary.items():
        smart = "sigma" if name == "fastfill" else "uncertainty"
        if smart in orders and "random" in orders:
            for key, label in (("auc_map", "AUC mAP"), ("auc_cmc1", "AUC CMC@1")):
                claims[f"{name}: {smart} order's area above random's ({label})"] = (
                    orders[smart][key] - orders["random"][key])
    if "ract" in summary:
        ract = summary["ract"]["random"]
        for other in ("bct", "contra"):
            if other in summary:
                theirs = summary[other]["random"]
                claims[f"ract: random-order dip shallower than {other}'s (mAP)"] = (
                    ract["dip"] - theirs["dip"])
                claims[f"ract: random-order max NFR below {other}'s"] = (
                    theirs["max_nfr"] - ract["max_nfr"])
    return claims


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=Path, action="append", required=True,
                        help="a methods.py run folder; repeat once per new-model seed")
    parser.add_argument("--models", default="bct,contra,ract")
    parser.add_argument("--steps", type=int, default=21)
    parser.add_argument("--plots", type=Path, default=None)
    args = parser.parse_args()
    torch.set_num_threads(1)
    old_model, _ = load_frozen(args.runs[0] / "old" / "model", "cpu")  # shared by every seed
    models = [m for m in args.models.split(",") if m]
    per_seed = [seed_curves(runs, old_model.classifier, models, args.steps)
                for runs in args.runs]
    summaries = [{name: {o: curve_summary(c) for o, c in curves.items()}
                  for name, curves in seed[0].items()} for seed in per_seed]
    all_curves, feats, labels = per_seed[0]
    old_old = retrieval_metrics(feats["old"], labels, feats["old"], labels, metrics=METRICS,
                                exclude_self=True)
    print(f"old/old: mAP {old_old['map']:.4f}, CMC@1 {old_old['cmc@1']:.4f}; "
          f"{len(labels)} test images, {args.steps} points, flips against old/old (top-1); "
          f"{len(args.runs)} seed(s), mean ± std")
    columns = ["start", "end", "auc_map", "auc_map_mean", "auc_cmc1", "dip", "decreasing",
               "mean_nfr", "max_nfr"]
    print("| model | order | M(0) mAP | M(1) mAP | AUC mAP trapezoid | AUC mAP mean | "
          "AUC CMC@1 trapezoid | min M − M(0) (mAP) | decreasing steps (mAP) | mean NFR | "
          "max NFR |")
    print("|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for name, orders in summaries[0].items():
        for order in orders:
            cells = [seed_stats([s[name][order][c] for s in summaries]).format(
                1 if c == "decreasing" else 4) for c in columns]
            print(f"| {name} | {order} | " + " | ".join(cells) + " |")
    nfr_rows = []
    for name, curves in all_curves.items():
        c = curves["random"]
        nfr_rows.append(f"| {name} | " + " | ".join(f"{v:.3f}" for v in c.nfr[::4]) + " |")
    fractions = next(iter(next(iter(all_curves.values())).values())).fractions[::4]
    print()
    print(f"NFR along the random-order curve ({args.runs[0]}):")
    print("| model | " + " | ".join(f"{f:.0%}" for f in fractions) + " |")
    print("|---|" + "---:|" * len(fractions))
    print("\n".join(nfr_rows))
    if len(summaries) > 1:
        print()
        print("\n".join(claims_markdown(judge_claims([curve_claims(s) for s in summaries]))))
    for runs, (curves, _, _) in zip(args.runs, per_seed, strict=True):
        out = {name: {o: c.to_json() for o, c in cs.items()} for name, cs in curves.items()}
        (runs / "hot_refresh.json").write_text(json.dumps(out, indent=1))
    if args.plots is not None:
        from compatkit.eval.plots import plot_backfill_curves

        args.plots.mkdir(parents=True, exist_ok=True)
        name_stem = args.runs[0].name
        for name, curves in all_curves.items():
            new_feats = feats["independent" if name == "fastfill" else name]
            new_new = retrieval_metrics(new_feats, labels, new_feats, labels, metrics=["map"],
                                        exclude_self=True)["map"]
            plot_backfill_curves(curves, args.plots / f"{name_stem}_{name}.png",
                                 metric="map", old_old=old_old["map"], new_new=new_new,
                                 title=f"{name_stem}: {name}")


if __name__ == "__main__":
    main()
