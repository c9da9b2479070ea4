"""Train every registered compatibility method on one dataset/scenario and tabulate the results.

For each method: self-test M(φ_n, φ_n), cross-test M(φ_n, φ_o), transformed-test
M(φ_n, ψ(φ_o)) where it applies, the old/old and new/new (paragon) references, negative flips
against old/old (top-1, leave-one-out on the held-out test set), and for the
backward-compatible methods the random-order hot-refresh curve (AUC, mean and max NFR).
Runs are reused when a folder already holds a model trained with the same config, and the
test-set features are saved to ``<out>/features.npz`` for ``benchmarks/hot_refresh.py``.
With ``--seeds 0,1,2`` every new model (and transformation) is trained once per seed against
the same old model (seed s > 0 under ``<out>/seed<s>/``), and ``<out>/summary.md`` gives
mean ± std of every column and each headline claim's verdict (``compatkit.eval.seeds``).

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
from compatkit.eval.seeds import SeedStats, aggregate, claims_markdown, judge_claims
from compatkit.feature_upgrade import apply_transformation
from compatkit.inference import embed_images
from compatkit.lab_demo import RECIPES, STAGES, TRANSFORM, recipe_tree, stage_method
from compatkit.ordering import backfill_order
from compatkit.train.config import load_config, merge_trees
from compatkit.train.loop import load_frozen, train_or_reuse
from compatkit.train.prepare import evaluation_images

METRICS = ["map", "cmc@1", "cmc@5", "map@r"]
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
    parser.add_argument("--seeds", default="0",
                        help="comma-separated seeds of the new models (the old model, and "
                             "SimCLR's side-information model, keep the recipe's seed)")
    parser.add_argument("--set", dest="overrides", action="append", default=[])
    parser.add_argument("--threads", type=int, default=None)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    try:
        seeds = [int(s) for s in args.seeds.split(",") if s.strip()]
    except ValueError:
        parser.error(f"--seeds must be comma-separated integers, got {args.seeds!r}")
    if not seeds or len(set(seeds)) != len(seeds):
        parser.error(f"--seeds needs distinct seeds, got {args.seeds!r}")
    wanted = [m for m in args.methods.split(",") if m]
    out: Path = args.out
    started = time.perf_counter()

    def stage(name: str, method: dict[str, Any], side: str = "new",
              extra: dict[str, Any] | None = None, seed: int | None = None):
        seed_extra = {} if seed is None else {"train": {"seed": seed}}
        cfg = stage_config(args.dataset, args.root, args.scenario, name, method, side,
                           merge_trees(extra or {}, seed_extra), args.overrides)
        folder = out if seed in (None, 0) else out / f"seed{seed}"
        t0 = time.perf_counter()
        result = train_or_reuse(cfg, folder / name)
        print(f"[{time.perf_counter() - t0:7.1f} s] {folder.name}/{name}", flush=True)
        return result, cfg

    old, old_cfg = stage("old", {"name": "independent"}, "old")
    side_run = stage("simclr", stage_method("simclr", {}), "old")[0] \
        if "fct_side" in wanted else None
    test = evaluation_images(old_cfg.data, "test")
    old_model, old_manifest = load_frozen(old.artifact_dir, "cpu")
    old_feats = embed_images(old_model, test.images, old_manifest.input)
    side_feats = None
    if side_run is not None:
        side_model, side_manifest = load_frozen(side_run.artifact_dir, "cpu")
        side_feats = embed_images(side_model.module.features, test.images, side_manifest.input)

    results = []
    for seed in seeds:
        runs, transforms, not_applicable = train_seed(stage, seed, wanted, old, side_run)
        result = evaluate_seed(runs, transforms, test.images, test.labels, old_feats,
                               side_feats)
        result.update({"dataset": args.dataset, "scenario": args.scenario, "seed": seed,
                       "not_applicable": not_applicable,
                       "seconds": round(time.perf_counter() - started, 1)})
        folder = out if seed == 0 else out / f"seed{seed}"
        folder.mkdir(parents=True, exist_ok=True)
        features = result.pop("features")
        (folder / "results.json").write_text(json.dumps(result, indent=2))
        np.savez(folder / "features.npz", labels=test.labels, **features)
        table = format_table(result)
        (folder / "table.md").write_text(table + "\n")
        print(table, flush=True)
        results.append(result)
    if len(results) > 1:
        summary = summarize(results)
        (out / "summary.json").write_text(json.dumps(summary, indent=2))
        text = format_summary(summary)
        (out / "summary.md").write_text(text + "\n")
        print(text)


def train_seed(stage: Any, seed: int, wanted: list[str], old: Any,
               side_run: Any) -> tuple[dict[str, Any], dict[str, tuple[str, Any]], dict[str, str]]:
    """Train the new models of one seed against the shared old model: the paragon, the
    backward-compatible methods, then the transformations of ``STAGES`` on top of them."""
    paragon, _ = stage("independent", {"name": "independent"}, seed=seed)
    epochs = paragon.manifest.config["train"]["epochs"]
    runs: dict[str, Any] = {"independent": paragon}
    not_applicable: dict[str, str] = {}
    with_old = {"old_model": str(old.artifact_dir)}
    for name in [m for m in BACKWARD if m in wanted]:
        method = {**STAGES[name].method} if name in STAGES else {"name": name}
        method.update(METHOD_OVERRIDES.get(name, {}))
        if method.get("refine_epochs") == "HALF":
            method["refine_epochs"] = [epochs // 2]
        try:
            runs[name], _ = stage(name, method, extra=with_old, seed=seed)
        except MethodNotApplicableError as exc:  # e.g. PCT in open-class
            not_applicable[name] = str(exc)
            print(f"[ n/a ] {name}: {exc}", flush=True)
    built = {**runs, "simclr": side_run}
    transforms: dict[str, tuple[str, Any]] = {}
    for name in ("bict", "fct", "fct_side", "fastfill"):
        spec = STAGES[name]
        if name not in wanted or any(built.get(src) is None for _, src in spec.frozen):
            continue
        frozen = {role: str(built[src].artifact_dir) for role, src in spec.frozen}
        method = stage_method(name, paragon.manifest.config)
        transforms[name] = (dict(spec.frozen)["new"], stage(name, method, extra={
            **with_old, **TRANSFORM, "frozen_models": frozen}, seed=seed)[0])
    return runs, transforms, not_applicable


def evaluate_seed(runs: dict[str, Any], transforms: dict[str, tuple[str, Any]],
                  images: np.ndarray, labels: np.ndarray, old_feats: np.ndarray,
                  side_feats: np.ndarray | None) -> dict[str, Any]:
    """Self, cross and transformed tests, flips and the random-order hot-refresh curve of every
    trained model on the held-out test set (leave-one-out); ``features`` for hot_refresh.py."""
    def features(artifact: Path) -> np.ndarray:
        model, manifest = load_frozen(artifact, "cpu")
        return embed_images(model, images, manifest.input)

    feats = {"old": old_feats, **{name: features(run.artifact_dir) for name, run in runs.items()}}
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
    for name in [*runs, *transforms]:
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
        row["backfill_dip_map"] = curve.regression["map"]["min_minus_start"]
        rows.append(row)
    return {"old_old": old_old, "rows": rows, "test_images": len(labels),
            "test_classes": len(np.unique(labels)),
            "features": {**feats, **{f"transformed_{k}": v for k, v in transformed.items()}}}


def claim_margins(result: dict[str, Any]) -> dict[str, float]:
    """The headline claims of one seed as margins that are positive when the claim holds."""
    oo = result["old_old"]["map"]
    rows = {r["method"]: r for r in result["rows"]}
    out = {}
    for name, r in rows.items():
        out[f"{name}: M(new, {'ψ(old)' if 'transformed' in r else 'old'}) > M(old, old) "
            "(mAP)"] = r.get("transformed", r["cross"])["map"] - oo
    if {"ract", "contra"} <= rows.keys():
        out["ract: fewer negative flips than contra (NFR cross)"] = (
            rows["contra"]["nfr_cross"] - rows["ract"]["nfr_cross"])
        out["ract: self-test within 0.05 of contra's (mAP)"] = (
            rows["ract"]["self"]["map"] - rows["contra"]["self"]["map"] + 0.05)
    if {"unibct", "bct"} <= rows.keys():
        out["unibct: cross-test above bct's (mAP)"] = (
            rows["unibct"]["cross"]["map"] - rows["bct"]["cross"]["map"])
    if {"fct", "fct_side"} <= rows.keys():
        out["fct_side: transformed gallery above fct's (mAP)"] = (
            rows["fct_side"]["transformed"]["map"] - rows["fct"]["transformed"]["map"])
    return out


def summarize(results: list[dict[str, Any]]) -> dict[str, Any]:
    """Mean ± std of every column over the seeds and each claim's verdict (eval.seeds)."""
    rows = [_stats_json(aggregate([res["rows"][i] for res in results]))
            for i in range(len(results[0]["rows"]))]
    claims = judge_claims([claim_margins(res) for res in results])
    first = results[0]
    return {"dataset": first["dataset"], "scenario": first["scenario"],
            "seeds": [r["seed"] for r in results], "old_old": first["old_old"],
            "test_images": first["test_images"], "test_classes": first["test_classes"],
            "rows": rows, "claims": claims}


def _stats_json(value: Any) -> Any:
    if isinstance(value, SeedStats):
        return {"mean": value.mean, "std": value.std, "n": value.n}
    if isinstance(value, dict):
        return {k: _stats_json(v) for k, v in value.items()}
    return value


def format_summary(summary: dict[str, Any]) -> str:
    """The seeds' table (mean ± std) and the claims with their verdicts, as markdown."""
    oo = summary["old_old"]

    def f(stat: dict[str, float]) -> str:
        return SeedStats(stat["mean"], stat["std"], stat["n"]).format(3)

    seeds = ",".join(str(s) for s in summary["seeds"])
    lines = [
        f"**{summary['dataset']} / {summary['scenario']}**, new-model seeds {seeds} against "
        f"one old model — {summary['test_images']} test images of {summary['test_classes']} "
        f"classes; old/old mAP {oo['map']:.4f}, CMC@1 {oo['cmc@1']:.4f}. Mean ± sample std.",
        "",
        "| method | self mAP | cross mAP | transformed mAP | self CMC@1 | cross CMC@1 | "
        "NFR cross | NFR self | hot-refresh AUC mAP | max NFR |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in summary["rows"]:
        tr = f(r["transformed"]["map"]) if "transformed" in r else "–"
        lines.append(
            f"| {r['method']} | {f(r['self']['map'])} | {f(r['cross']['map'])} | {tr} | "
            f"{f(r['self']['cmc@1'])} | {f(r['cross']['cmc@1'])} | {f(r['nfr_cross'])} | "
            f"{f(r['nfr_self'])} | {f(r['backfill_auc_map'])} | {f(r['backfill_max_nfr'])} |")
    lines += ["", *claims_markdown(summary["claims"])]
    return "\n".join(lines)


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
