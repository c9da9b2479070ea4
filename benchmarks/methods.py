"""Train every registered compatibility method on one dataset/scenario and tabulate the results.

For each method: self-test M(φ_n, φ_n), cross-test M(φ_n, φ_o), transformed-test
M(φ_n, ψ(φ_o)) where it applies, the old/old and new/new (paragon) references, negative flips
against old/old (top-1, leave-one-out on the held-out test set), and for the
backward-compatible methods the random-order hot-refresh curve (AUC, mean and max NFR).
Runs are reused when a folder already holds a model trained with the same config, and the
test-set features are saved to ``<out>/features.npz`` for ``benchmarks/hot_refresh.py``.

    python benchmarks/methods.py --dataset omniglot --root ../shared/data/omniglot \
        --scenario extended_class --out runs/methods/omniglot_extended_class
    python benchmarks/methods.py --dataset cifar10 --root ../shared/data/cifar10 \
        --scenario extended_class --out runs/methods/cifar10_extended_class
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from compatkit.errors import MethodNotApplicableError
from compatkit.eval import backfill_curve, flip_rates, retrieval_metrics
from compatkit.eval.flips import top_k_correct
from compatkit.feature_upgrade import apply_transformation
from compatkit.inference import embed_images
from compatkit.lab_demo import RECIPES, recipe_tree
from compatkit.ordering import backfill_order
from compatkit.train.config import load_config, merge_trees
from compatkit.train.loop import load_frozen, train_or_reuse
from compatkit.train.prepare import evaluation_images

METRICS = ["map", "cmc@1", "cmc@5", "map@r"]
TRANSFORM: dict[str, Any] = {
    "optim": {"name": "adamw", "lr": 5e-4, "weight_decay": 3.0517578125e-05},
}
# Point-to-point and classifier-level methods trained on the new side against the old model.
BACKWARD = ["l2", "bct", "contra", "ract", "triplet", "triplet_ract", "bct_ract", "unibct",
            "pct", "lwf"]
METHOD_OVERRIDES: dict[str, dict[str, Any]] = {
    # UniBCT: refine the prototypes with the new model half-way (MixBCT refines at 10 and 20
    # of 35 epochs after a 10-epoch warm-up; scaled to our epochs)
    "unibct": {"refine_epochs": "HALF"},
}


def stage_config(dataset: str, root: str | None, scenario: str, name: str,
                 method: dict[str, Any], side: str, extra: dict[str, Any] | None = None,
                 overrides: list[str] | None = None):
    """The demo's recipe for ``dataset`` (old or new side), in ``scenario``, with ``method``."""
    base = merge_trees(recipe_tree(dataset, root, side), {
        "name": name, "method": method, "data": {"scenario": scenario},
        "train": {"progress": False}, "eval": {"metrics": METRICS}})
    if extra:
        base = merge_trees(base, extra)
    return load_config(None, overrides or [], base=base)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dataset", default="omniglot", choices=sorted(RECIPES))
    parser.add_argument("--root", default=None)
    parser.add_argument("--scenario", default="extended_class",
                        choices=["extended_class", "open_class", "extended_data", "open_data"])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--methods", default=",".join(
        ["independent", *BACKWARD, "bict", "fct", "fct_side", "fastfill"]))
    parser.add_argument("--set", dest="overrides", action="append", default=[])
    parser.add_argument("--threads", type=int, default=None)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    wanted = [m for m in args.methods.split(",") if m]
    out: Path = args.out
    started = time.perf_counter()

    def stage(name: str, method: dict[str, Any], side: str = "new",
              extra: dict[str, Any] | None = None):
        cfg = stage_config(args.dataset, args.root, args.scenario, name, method, side, extra,
                           args.overrides)
        t0 = time.perf_counter()
        result = train_or_reuse(cfg, out / name)
        print(f"[{time.perf_counter() - t0:7.1f} s] {name}", flush=True)
        return result, cfg

    old, old_cfg = stage("old", {"name": "independent"}, "old")
    paragon, _ = stage("independent", {"name": "independent"})
    epochs = paragon.manifest.config["train"]["epochs"]
    runs: dict[str, Any] = {"independent": paragon}
    not_applicable: dict[str, str] = {}
    with_old = {"old_model": str(old.artifact_dir)}
    for name in [m for m in BACKWARD if m in wanted]:
        method = {"name": name, **METHOD_OVERRIDES.get(name, {})}
        if method.get("refine_epochs") == "HALF":
            method["refine_epochs"] = [epochs // 2]
        try:
            runs[name], _ = stage(name, method, extra=with_old)
        except MethodNotApplicableError as exc:  # e.g. PCT in open-class
            not_applicable[name] = str(exc)
            print(f"[ n/a ] {name}: {exc}", flush=True)
    transforms: dict[str, tuple[str, Any]] = {}
    if "bict" in wanted and "bct" in runs:
        transforms["bict"] = ("bct", stage("bict", {"name": "bict", "inner": 512}, extra={
            **with_old, **TRANSFORM, "frozen_models": {"new": str(runs["bct"].artifact_dir)}})[0])
    side_run = None
    if "fct_side" in wanted:
        side_run, _ = stage("simclr", {"name": "simclr"}, "old")
    for name, method, frozen in [
        ("fct", {"name": "fct", "inner": 512}, {}),
        ("fct_side", {"name": "fct", "inner": 512},
         {"side": str(side_run.artifact_dir)} if side_run else {}),
        # our features are L2-normalised, so mean_d MSE is about 1/d of ml-fct's raw-feature
        # scale; μ_sim = d (the squared distance) restores its balance against the CE term
        ("fastfill", {"name": "fastfill", "inner": 512,
                      "mu_sim": float(paragon.manifest.embed_dim)}, {}),
    ]:
        if name in wanted:
            transforms[name] = ("independent", stage(name, method, extra={
                **with_old, **TRANSFORM,
                "frozen_models": {"new": str(paragon.artifact_dir), **frozen}})[0])

    # --- evaluation on the held-out test set (leave-one-out) ---
    test = evaluation_images(old_cfg.data, "test")
    labels = test.labels

    def features(artifact: Path) -> np.ndarray:
        model, manifest = load_frozen(artifact, "cpu")
        return embed_images(model, test.images, manifest.input)

    feats = {"old": features(old.artifact_dir)}
    for name, run in runs.items():
        feats[name] = features(run.artifact_dir)
    side_feats = None
    if side_run is not None:
        side_model, side_manifest = load_frozen(side_run.artifact_dir, "cpu")
        side_feats = embed_images(side_model.module.features, test.images, side_manifest.input)
    transformed: dict[str, np.ndarray] = {}
    for name, (_, run) in transforms.items():
        module, _ = load_frozen(run.artifact_dir, "cpu")
        side = side_feats if name == "fct_side" else None
        transformed[name] = apply_transformation(module.module, feats["old"], side)

    def metrics(q: np.ndarray, g: np.ndarray) -> dict[str, float]:
        return retrieval_metrics(q, labels, g, labels, metrics=METRICS, exclude_self=True)

    def correct(q: np.ndarray, g: np.ndarray) -> np.ndarray:
        return top_k_correct(q, labels, g, labels, k=1, exclude_self=True)

    old_old = metrics(feats["old"], feats["old"])
    old_correct = correct(feats["old"], feats["old"])
    rows = []
    for name in ["independent", *[m for m in BACKWARD if m in runs], *transforms]:
        query_name = transforms[name][0] if name in transforms else name
        q = feats[query_name]
        row: dict[str, Any] = {"method": name, "self": metrics(q, q)}
        gallery = transformed.get(name, feats["old"])
        row["cross"] = metrics(q, feats["old"])
        if name in transformed:
            row["transformed"] = metrics(q, gallery)
        row["nfr_cross"] = flip_rates(old_correct, correct(q, gallery)).nfr
        row["nfr_self"] = flip_rates(old_correct, correct(q, q)).nfr
        curve = backfill_curve(q, labels, gallery, q, labels,
                               backfill_order("random", len(q), seed=0), steps=11,
                               metrics=["map"], exclude_self=True, old_query=feats["old"],
                               reference_gallery=feats["old"], reference="old_old",
                               ordering="random")
        row["backfill_auc_map"] = curve.auc["map"]["trapezoid"]
        row["backfill_mean_nfr"] = curve.regression["mean_nfr"]
        row["backfill_max_nfr"] = curve.regression["max_nfr"]
        rows.append(row)
    result = {"dataset": args.dataset, "scenario": args.scenario, "seed": 0,
              "not_applicable": not_applicable,
              "old_old": old_old, "rows": rows,
              "test_images": len(labels), "test_classes": len(np.unique(labels)),
              "seconds": round(time.perf_counter() - started, 1)}
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps(result, indent=2))
    np.savez(out / "features.npz", labels=labels, **feats,
             **{f"transformed_{k}": v for k, v in transformed.items()})
    table = format_table(result)
    (out / "table.md").write_text(table + "\n")
    print(table)


def format_table(result: dict[str, Any]) -> str:
    """One markdown table: per method self/cross/transformed mAP and CMC@1, flips, backfill."""
    oo = result["old_old"]
    lines = [
        f"**{result['dataset']} / {result['scenario']}** — {result['test_images']} test images "
        f"of {result['test_classes']} classes, leave-one-out; old/old mAP {oo['map']:.4f}, "
        f"CMC@1 {oo['cmc@1']:.4f}.",
        "",
        "| method | self mAP | cross mAP | transformed mAP | self CMC@1 | cross CMC@1 | "
        "compatible | NFR cross | NFR self | hot-refresh AUC mAP | mean NFR | max NFR |",
        "|---|---:|---:|---:|---:|---:|:---:|---:|---:|---:|---:|---:|",
    ]
    for r in result["rows"]:
        tested = r.get("transformed", r["cross"])
        ok = "yes" if tested["map"] > oo["map"] else "no"
        tr = f"{r['transformed']['map']:.4f}" if "transformed" in r else "–"
        lines.append(
            f"| {r['method']} | {r['self']['map']:.4f} | {r['cross']['map']:.4f} | {tr} | "
            f"{r['self']['cmc@1']:.4f} | {r['cross']['cmc@1']:.4f} | {ok} | "
            f"{r['nfr_cross']:.4f} | {r['nfr_self']:.4f} | {r['backfill_auc_map']:.4f} | "
            f"{r['backfill_mean_nfr']:.4f} | {r['backfill_max_nfr']:.4f} |")
    for name, reason in result.get("not_applicable", {}).items():
        lines.append(f"\n{name}: not applicable here ({reason}).")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
