"""The lab demo (``compatkit demo``): an old model, a new independent model and new compatible
models, compared with the field's compatibility matrix and simulated backfill curves on one
dataset. The system demo, a live index upgraded while it serves, is ``compatkit.index.demo``.

Every stage is an ordinary training run (the one loop) in its own folder under ``out_dir``;
a stage whose folder already holds a model trained with the same config is reused.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from compatkit.eval import (
    BackfillCurve,
    EmbeddingSet,
    backfill_curve,
    compatibility_matrix,
)
from compatkit.inference import embed_images
from compatkit.ordering import backfill_order
from compatkit.train.config import RunConfig, load_config, merge_trees
from compatkit.train.loop import load_frozen, train_or_reuse
from compatkit.train.prepare import evaluation_images

log = logging.getLogger(__name__)

COMMON: dict[str, Any] = {
    "model": {"backbone": "resnet10_cifar", "width": 0.25, "embed_dim": 128,
              "classifier": "cosine"},
    "optim": {"name": "sgd", "lr": 0.1, "weight_decay": 5e-4, "warmup_epochs": 1},
    "train": {"batch_size": 64, "seed": 0},
    "eval": {"metrics": ["map", "cmc@1", "cmc@5", "map@r"]},
}

# Recipes sized for 2 CPU cores, shared with benchmarks/methods.py: a base config dict per
# dataset, and what the old stage changes (it trains on fewer images, so it gets more epochs).
# --set overrides refine both.
RECIPES: dict[str, dict[str, Any]] = {
    "synthetic": {
        "data": {"scenario": "extended_class", "old_ratio": 0.3, "test_class_ratio": 0.3,
                 "crop_padding": 2, "flip": False},
        "train": {"epochs": 10},
    },
    "omniglot": {
        "data": {"scenario": "extended_class", "old_ratio": 0.3, "test_class_ratio": 0.3,
                 "crop_padding": 2, "flip": False},
        "train": {"epochs": 12},
    },
    "cifar10": {
        "data": {"scenario": "extended_class", "old_ratio": 0.5, "train_per_class": 500},
        "train": {"epochs": 12},
    },
}
OLD_STAGE: dict[str, dict[str, Any]] = {
    "synthetic": {"train": {"epochs": 15}},
    "omniglot": {"train": {"epochs": 30}},
    "cifar10": {"train": {"epochs": 20}},
}
DEFAULT_RECIPE: dict[str, Any] = {"data": {"scenario": "extended_class"}, "train": {"epochs": 10}}


@dataclass(frozen=True)
class DemoResult:
    """Where the demo wrote its report and the compatibility matrix it measured."""

    out_dir: Path
    report: Path
    metrics: dict[str, Any]


def demo_config(dataset: str, root: str | None, stage: str, method: dict[str, Any],
                overrides: Sequence[str] = (), old_dir: Path | None = None) -> RunConfig:
    """The resolved run config of one demo stage (``old`` or a new-model method)."""
    base = recipe_tree(dataset, root, "old" if stage == "old" else "new")
    base = merge_trees(base, {"name": stage, "method": method})
    if old_dir is not None:
        base["old_model"] = str(old_dir)
    return load_config(None, overrides, base=base)


def recipe_tree(dataset: str, root: str | None, side: str) -> dict[str, Any]:
    """The unresolved config tree of the dataset's recipe for a model of ``side`` (old/new)."""
    base = merge_trees(COMMON, RECIPES.get(dataset, DEFAULT_RECIPE))
    if side == "old":
        base = merge_trees(base, OLD_STAGE.get(dataset, {}))
    return merge_trees(base, {"data": {"name": dataset, "root": root, "side": side}})


def run_lab_demo(
    dataset: str = "synthetic", root: str | None = None, out_dir: str | Path = "runs/demo", *,
    methods: Sequence[str] = ("independent", "l2", "bct"), overrides: Sequence[str] = (),
    progress: bool = True,
) -> DemoResult:
    """Train old → new models per method, evaluate every (query, gallery) pair, write a report."""
    out_dir = Path(out_dir)
    started = time.perf_counter()
    progress_set = [f"train.progress={str(progress).lower()}"]
    stages: dict[str, Path] = {}
    timings: dict[str, float] = {}
    old_cfg = demo_config(dataset, root, "old", {"name": "independent"},
                          [*overrides, *progress_set])
    stages["old"] = _run_stage(old_cfg, out_dir / "old", timings)
    for name in methods:
        cfg = demo_config(dataset, root, name, {"name": name}, [*overrides, *progress_set],
                          old_dir=stages["old"])
        stages[name] = _run_stage(cfg, out_dir / name, timings)

    test = evaluation_images(old_cfg.data, "test")
    feats: dict[str, np.ndarray] = {}
    for name, artifact in stages.items():
        model, manifest = load_frozen(artifact, "cpu")
        feats[name] = embed_images(model, test.images, manifest.input)
    sets = {name: EmbeddingSet(f, test.labels, f, test.labels) for name, f in feats.items()}
    matrix = compatibility_matrix(sets, metrics=old_cfg.eval.metrics, distance="cosine",
                                  exclude_self=True, reference="old", paragon="independent")
    metrics = matrix.to_json()
    old_model, _ = load_frozen(stages["old"], "cpu")
    curves = {name: backfill_curves(feats["old"], feats[name], test.labels, old_model.classifier,
                                    metrics=old_cfg.eval.metrics[:2])
              for name in methods if name != "independent"}
    metrics["backfill"] = {name: {order: c.to_json() for order, c in by_order.items()}
                           for name, by_order in curves.items()}
    metrics["dataset"] = dataset
    metrics["test_images"] = len(test)
    metrics["test_classes"] = len(np.unique(test.labels))
    metrics["train_seconds"] = timings
    metrics["total_seconds"] = round(time.perf_counter() - started, 1)
    (out_dir / "metrics.json").write_text(json.dumps(metrics, indent=2))
    report = _write_report(out_dir, dataset, matrix.to_markdown(), metrics, stages, curves)
    _plot(out_dir, matrix, curves)
    return DemoResult(out_dir, report, metrics)


def backfill_curves(
    old: np.ndarray, new: np.ndarray, labels: np.ndarray, old_classifier: Any, *,
    metrics: Sequence[str], steps: int = 11, seed: int = 0,
) -> dict[str, BackfillCurve]:
    """Hot-refresh curves of a new model over the old gallery for the random, uncertainty
    and oracle orders (leave-one-out on the test set, flips against old/old)."""
    weight = old_classifier.weight.detach().float().cpu().numpy()
    temperature = 1.0
    if old_classifier.normalized:  # posterior of a cosine head: softmax(s · cos)
        weight = weight / np.linalg.norm(weight, axis=1, keepdims=True)
        temperature = 1.0 / float(getattr(old_classifier, "scale", 1.0))
    inputs = {
        "random": {"seed": seed},
        "uncertainty": {"old_features": old, "classifier": weight, "temperature": temperature},
        "oracle": {"new_features": new, "old_features": old},
    }
    return {
        order: backfill_curve(new, labels, old, new, labels,
                              backfill_order(order, len(old), **kwargs), steps=steps,
                              metrics=metrics, exclude_self=True, old_query=old,
                              reference="old_old", ordering=order)
        for order, kwargs in inputs.items()
    }


def _run_stage(cfg: RunConfig, run_dir: Path, timings: dict[str, float]) -> Path:
    t0 = time.perf_counter()
    result = train_or_reuse(cfg, run_dir)
    reused = (run_dir / "model" / "manifest.json").stat().st_mtime < t0
    timings[cfg.name] = 0.0 if reused else round(time.perf_counter() - t0, 1)
    return result.artifact_dir


def _write_report(out_dir: Path, dataset: str, table: str, metrics: dict[str, Any],
                  stages: dict[str, Path], curves: dict[str, dict[str, BackfillCurve]]) -> Path:
    backfill = []
    for name, by_order in curves.items():
        backfill += [f"### {name} queries, gallery backfilled from old to {name}", "",
                     "| order | " + " | ".join(f"AUC {m} (trapezoid)" for m in
                                               next(iter(by_order.values())).metrics)
                     + " | max NFR | mean NFR |",
                     "|---|" + "---|" * (len(next(iter(by_order.values())).metrics) + 2)]
        for order, c in by_order.items():
            aucs = " | ".join(f"{c.auc[m]['trapezoid']:.4f}" for m in c.metrics)
            backfill.append(f"| {order} | {aucs} | {c.regression['max_nfr']:.4f} | "
                            f"{c.regression['mean_nfr']:.4f} |")
        backfill.append("")
    lines = [
        f"# compatkit demo — {dataset}",
        "",
        f"Test set: {metrics['test_images']} images of {metrics['test_classes']} classes "
        "never seen in training; every image queries all the others (leave-one-out).",
        "Rows: the model that embeds the queries; columns: the model that embedded the gallery.",
        "",
        table,
        "",
        "## Hot-refresh backfilling",
        "",
        "Queries by the new model; the gallery starts with old features and is re-embedded in "
        "the given order (flips against the old/old system).",
        "",
        *backfill,
        "## Runs",
        "",
        *(f"- `{name}`: `{path}` ({metrics['train_seconds'].get(name, 0.0)} s)"
          for name, path in stages.items()),
        "",
        f"Total time: {metrics['total_seconds']} s.",
    ]
    report = out_dir / "report.md"
    report.write_text("\n".join(lines) + "\n")
    return report


def _plot(out_dir: Path, matrix: Any, curves: dict[str, dict[str, BackfillCurve]]) -> None:
    try:
        from compatkit.eval.plots import plot_backfill_curves, plot_compatibility_matrix
    except ImportError:  # plots are an optional extra
        log.warning("matplotlib is not installed: no plot (pip install 'compatkit[plots]')")
        return
    plot_compatibility_matrix(matrix, out_dir / "compatibility.png")
    for name, by_order in curves.items():
        metric = next(iter(next(iter(by_order.values())).metrics))
        plot_backfill_curves(by_order, out_dir / f"backfill_{name}.png", metric=metric,
                             old_old=matrix.value("old", "old", metric),
                             new_new=matrix.value(name, name, metric),
                             title=f"{name}: hot-refresh backfill")
