"""The mixed gallery behind a query adapter: accuracy along the backfill, with and without
score calibration (issue 13 point 3; docs/adapter-serving.md).

Two independently trained Omniglot models (the lab's recipe: ``old`` on the old classes, ``new`` on
all of them) stand for a model upgrade whose spaces do not meet. The query adapter new -> old is
fitted by ``compatkit.adapters`` (kind ``linear``, then kind ``mlp``) on the training pool's paired
features; score calibrations are fitted on the same pairs. The test set (leave-one-out) is then
backfilled in a random order: backfilled items answer new queries directly, the others through the
adapter, merged into one top-k exactly as the index merges them
(``compatkit.eval.bridged.bridged_backfill_curve``). Rows: no adapter (new queries scored against
old vectors as they are), the adapter without calibration, with mean/std matching of all the
sample's scores, with a least-squares regression of the direct scores on the adapted ones, and with
mean/std matching of each sample query's top 10 % scores (what the index fits and stores,
``compatkit.score_calibration``); then the same for the ``mlp`` adapter (the FCT transformation's
architecture). Last, the serving path itself: the MLP adapter is registered in an ``IndexStore``
with its calibration, and the index's live top-1 over collections frozen at some backfill fractions
is printed next to the bridged curve's (they must be equal).

    OMP_NUM_THREADS=1 nice -n 10 python benchmarks/adapter_backfill.py \\
        --root ../shared/data/omniglot --out runs/adapter_backfill/omniglot
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from compatkit.adapters import FitOptions, FittedAdapter, fit_adapter, save_adapter
from compatkit.eval import backfill_curve, retrieval_metrics
from compatkit.eval.bridged import bridged_backfill_curve
from compatkit.feature_upgrade import apply_transformation
from compatkit.index.vectors import l2_normalize
from compatkit.inference import embed_images
from compatkit.ordering import backfill_order
from compatkit.score_calibration import ScoreCalibration, fit_score_calibration
from compatkit.train.loop import load_frozen, train_or_reuse
from compatkit.train.prepare import evaluation_images
from methods import stage_config

FRACTIONS = [i / 10 for i in range(11)]
INDEX_FRACTIONS = [0.0, 0.3, 0.7, 1.0]


def regression_calibration(mapped: np.ndarray, target: np.ndarray,
                           source: np.ndarray) -> ScoreCalibration:
    """Least squares of the direct scores s_i·s_j on the adapted ones m_i·t_j (i ≠ j)."""
    off = ~np.eye(len(mapped), dtype=bool)
    adapted = (l2_normalize(mapped) @ l2_normalize(target).T)[off]
    direct = (l2_normalize(source) @ l2_normalize(source).T)[off]
    slope, intercept = np.polyfit(adapted.astype(np.float64), direct.astype(np.float64), 1)
    return ScoreCalibration(float(slope), float(intercept), len(mapped))


def fit_query_adapter(kind: str, pairs_new: np.ndarray, pairs_old: np.ndarray,
                      ridge: float) -> FittedAdapter:
    """The query adapter new -> old of ``kind``, fitted by ``compatkit.adapters`` on the pairs."""
    return fit_adapter(pairs_old, pairs_new, kind, "new-to-old", options=FitOptions(ridge=ridge))


def index_check(work: Path, fitted: FittedAdapter, pairs_new: np.ndarray,
                pairs_old: np.ndarray, test_new: np.ndarray, test_old: np.ndarray,
                labels: np.ndarray, order: np.ndarray) -> list[tuple[float, float, float]]:
    """The serving path on the same features: the MLP adapter saved as a transformation
    artifact, registered with a calibration, collections frozen at some backfill fractions,
    every test image a query. Returns (fraction, the index's top-1 accuracy, the bridged
    curve's cmc@1) rows; the two must be equal."""
    import shutil

    from compatkit.index import IndexStore, ItemInput
    from compatkit.ordering import backfill_count

    shutil.rmtree(work, ignore_errors=True)
    adapter = save_adapter(fitted, work / "adapter")
    store = IndexStore(work / "store", synchronous="NORMAL")
    store.register_version("old", dim=test_old.shape[1])
    store.register_version("new", dim=test_new.shape[1])
    rel = store.register_artifact(adapter, calibrate=True, from_vectors=pairs_new,
                                  to_vectors=pairs_old)
    curve = bridged_backfill_curve(
        test_new, store.transformer(rel).apply(test_new), labels, test_old, test_new, labels,
        order, calibration=rel.calibration, fractions=INDEX_FRACTIONS, metrics=["cmc@1"],
        exclude_self=True)
    rows = []
    for step, fraction in enumerate(INDEX_FRACTIONS):
        coll = store.create_collection(f"at{step}", "new")
        done = set(order[:backfill_count(len(labels), fraction)].tolist())
        coll.add([ItemInput(str(i), vector=test_new[i] if i in done else test_old[i],
                            version="new" if i in done else "old") for i in range(len(labels))])
        correct = []
        for i, res in enumerate(coll.search_batch(test_new, version="new", k=2)):
            best = next(h for h in res.hits if h.id != str(i))  # leave-one-out
            correct.append(labels[int(best.id)] == labels[i])
        rows.append((fraction, float(np.mean(correct)), curve.metrics["cmc@1"][step]))
    store.close()
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--root", default="../shared/data/omniglot")
    parser.add_argument("--out", type=Path, default=Path("runs/adapter_backfill/omniglot"))
    parser.add_argument("--ridge", type=float, default=1e-3)
    parser.add_argument("--pairs", type=int, default=2000,
                        help="paired training items the adapter and calibration are fitted on")
    parser.add_argument("--seeds", default="0,1,2", help="backfill order seeds")
    parser.add_argument("--tails", default="0.02,0.05,0.1,0.2,0.5,1.0",
                        help="calibration tails (fractions of each query's scores) to sweep")
    args = parser.parse_args()
    torch.set_num_threads(1)
    started = time.perf_counter()
    runs = {}
    for name, side in (("old", "old"), ("new", "new")):
        cfg = stage_config("omniglot", args.root, "extended_class", name,
                           {"name": "independent"}, side)
        runs[name] = train_or_reuse(cfg, args.out / name)
        data_cfg = cfg.data
    train, test = evaluation_images(data_cfg, "train"), evaluation_images(data_cfg, "test")

    def features(name: str, images: np.ndarray) -> np.ndarray:
        model, manifest = load_frozen(runs[name].artifact_dir, "cpu")
        return embed_images(model, images, manifest.input)

    rng = np.random.default_rng(0)
    pick = np.sort(rng.permutation(len(train.labels))[:args.pairs])
    pairs_old, pairs_new = features("old", train.images[pick]), features("new", train.images[pick])
    test_old, test_new = features("old", test.images), features("new", test.images)
    labels = test.labels
    linear = fit_query_adapter("linear", pairs_new, pairs_old, args.ridge)
    mapped = apply_transformation(linear.module, pairs_new)
    calibrations: dict[str, ScoreCalibration | None] = {
        "adapter, no calibration": None,
        "adapter + mean/std, all scores": fit_score_calibration(mapped, pairs_old, pairs_new,
                                                                tail=1.0),
        "adapter + regression, all scores": regression_calibration(mapped, pairs_old,
                                                                   pairs_new),
        "adapter + mean/std, top 10 % (index default)": fit_score_calibration(
            mapped, pairs_old, pairs_new),
    }
    adapted = apply_transformation(linear.module, test_new)
    mlp = fit_query_adapter("mlp", pairs_new, pairs_old, args.ridge)
    mlp_mapped = apply_transformation(mlp.module, pairs_new)
    mlp_adapted = apply_transformation(mlp.module, test_new)
    mlp_calibrations: dict[str, ScoreCalibration | None] = {
        "MLP adapter, no calibration": None,
        "MLP adapter + mean/std, all scores": fit_score_calibration(
            mlp_mapped, pairs_old, pairs_new, tail=1.0),
        "MLP adapter + mean/std, top 10 % (index default)": fit_score_calibration(
            mlp_mapped, pairs_old, pairs_new),
    }

    def m(q: np.ndarray, g: np.ndarray) -> float:
        return retrieval_metrics(q, labels, g, labels, metrics=["map"], exclude_self=True)["map"]

    refs = {"old/old": m(test_old, test_old), "new/new": m(test_new, test_new),
            "new/old (no adapter)": m(test_new, test_old),
            "A(new)/old (linear adapter)": m(adapted, test_old),
            "A(new)/old (MLP adapter)": m(mlp_adapted, test_old)}
    rows: dict[str, Any] = {}
    sweep: dict[str, list[float]] = {}
    seeds = [int(s) for s in args.seeds.split(",") if s]
    tails = [float(t) for t in args.tails.split(",") if t]
    for seed in seeds:
        order = backfill_order("random", len(labels), seed=seed)
        curves = {"no adapter": backfill_curve(
            test_new, labels, test_old, test_new, labels, order, fractions=FRACTIONS,
            metrics=["map", "cmc@1"], exclude_self=True, old_query=test_old)}
        for queries, cals in ((adapted, calibrations), (mlp_adapted, mlp_calibrations)):
            for name, cal in cals.items():
                curves[name] = bridged_backfill_curve(
                    test_new, queries, labels, test_old, test_new, labels, order,
                    calibration=cal, old_query=test_old, fractions=FRACTIONS,
                    metrics=["map", "cmc@1"], exclude_self=True)
        for name, curve in curves.items():
            rows.setdefault(name, []).append(curve.to_json())
        for tail in tails:
            cal = fit_score_calibration(mapped, pairs_old, pairs_new, tail=tail)
            sweep.setdefault(str(tail), []).append(bridged_backfill_curve(
                test_new, adapted, labels, test_old, test_new, labels, order, calibration=cal,
                fractions=FRACTIONS, metrics=["map"], exclude_self=True).auc["map"]["trapezoid"])
    checks = index_check(args.out / "index_check", mlp, pairs_new, pairs_old, test_new,
                         test_old, labels, backfill_order("random", len(labels), seed=seeds[0]))
    result = {
        "index_check_top1": checks,
        "pairs": len(pick), "test_images": len(labels), "test_classes": len(set(labels)),
        "ridge": args.ridge, "seeds": seeds, "references_map": refs,
        "calibrations": {k: None if v is None else v.to_json()
                         for k, v in {**calibrations, **mlp_calibrations}.items()},
        "curves": rows, "tail_sweep_area": sweep,
        "seconds": round(time.perf_counter() - started, 1)}
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "adapter_backfill.json").write_text(json.dumps(result, indent=2))
    print(format_table(result))


def format_table(result: dict[str, Any]) -> str:
    """Markdown: the references, then mAP per backfill fraction (mean over seeds) and area."""
    lines = [f"pairs {result['pairs']}, test {result['test_images']} images of "
             f"{result['test_classes']} classes, seeds {result['seeds']}", "",
             "| reference | mAP |", "|---|---:|"]
    lines += [f"| {k} | {v:.4f} |" for k, v in result["references_map"].items()]
    for name, cal in result["calibrations"].items():
        if cal is not None:
            lines.append(f"\n{name}: scale {cal['scale']:.4f}, shift {cal['shift']:+.4f}")
    head = " | ".join(f"{f:.1f}" for f in FRACTIONS)
    lines += ["", f"| mAP at backfill fraction | {head} | area | mean NFR |",
              "|---|" + "---:|" * (len(FRACTIONS) + 2)]
    for name, runs in result["curves"].items():
        maps = np.mean([r["metrics"]["map"] for r in runs], axis=0)
        area = np.mean([r["auc"]["map"]["trapezoid"] for r in runs])
        nfr = np.mean([r["regression"]["mean_nfr"] for r in runs])
        lines.append(f"| {name} | " + " | ".join(f"{v:.4f}" for v in maps)
                     + f" | {area:.4f} | {nfr:.4f} |")
    lines += ["", "| backfill fraction (MLP adapter) | index top-1 | bridged curve cmc@1 |",
              "|---:|---:|---:|"]
    lines += [f"| {f:.1f} | {a:.4f} | {b:.4f} |" for f, a, b in result["index_check_top1"]]
    lines += ["", "| calibration tail | " + " | ".join(result["tail_sweep_area"]) + " |",
              "|---|" + "---:|" * len(result["tail_sweep_area"]),
              "| mAP area | " + " | ".join(f"{np.mean(v):.4f}"
                                          for v in result["tail_sweep_area"].values()) + " |"]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
