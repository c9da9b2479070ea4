"""The end-to-end demo: an old model, a new independent model and new compatible models,
compared with the field's compatibility matrix on one dataset.

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

from compatkit.artifacts import read_manifest
from compatkit.eval import EmbeddingSet, compatibility_matrix
from compatkit.inference import embed_images
from compatkit.train.config import RunConfig, load_config, merge_trees
from compatkit.train.loop import load_frozen, train
from compatkit.train.prepare import evaluation_images

log = logging.getLogger(__name__)

COMMON: dict[str, Any] = {
    "model": {"backbone": "resnet18_cifar", "width": 0.25, "embed_dim": 128,
              "classifier": "cosine"},
    "optim": {"name": "sgd", "lr": 0.1, "weight_decay": 5e-4, "warmup_epochs": 1},
    "train": {"batch_size": 128, "seed": 0},
    "eval": {"metrics": ["map", "cmc@1", "cmc@5", "map@r"]},
}

# Recipes sized for 2 CPU cores; each is a base config dict that --set overrides refine.
RECIPES: dict[str, dict[str, Any]] = {
    "synthetic": {
        "data": {"name": "synthetic", "scenario": "extended_class", "old_ratio": 0.3,
                 "test_class_ratio": 0.3, "crop_padding": 2, "flip": False},
        "model": {"backbone": "resnet10_cifar"},
        "train": {"epochs": 6},
    },
    "omniglot": {
        "data": {"name": "omniglot", "scenario": "extended_class", "old_ratio": 0.3,
                 "test_class_ratio": 0.3, "crop_padding": 2, "flip": False},
        "train": {"epochs": 20, "batch_size": 64},
    },
    "cifar10": {
        "data": {"name": "cifar10", "scenario": "extended_class", "old_ratio": 0.5},
        "train": {"epochs": 8},
    },
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
    base = merge_trees(COMMON, RECIPES.get(dataset, DEFAULT_RECIPE))
    base = merge_trees(base, {"name": stage, "method": method,
                         "data": {"name": dataset, "root": root,
                                  "side": "old" if stage == "old" else "new"}})
    if old_dir is not None:
        base["old_model"] = str(old_dir)
    return load_config(None, overrides, base=base)


def run_demo(
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
    sets = {}
    for name, artifact in stages.items():
        model, manifest = load_frozen(artifact, "cpu")
        feats = embed_images(model, test.images, manifest.input)
        sets[name] = EmbeddingSet(feats, test.labels, feats, test.labels)
    matrix = compatibility_matrix(sets, metrics=old_cfg.eval.metrics, distance="cosine",
                                  exclude_self=True, reference="old", paragon="independent")
    metrics = matrix.to_json()
    metrics["dataset"] = dataset
    metrics["test_images"] = len(test)
    metrics["test_classes"] = len(np.unique(test.labels))
    metrics["train_seconds"] = timings
    metrics["total_seconds"] = round(time.perf_counter() - started, 1)
    (out_dir / "metrics.json").write_text(json.dumps(metrics, indent=2))
    report = _write_report(out_dir, dataset, matrix.to_markdown(), metrics, stages)
    _plot(out_dir, matrix)
    return DemoResult(out_dir, report, metrics)


def _run_stage(cfg: RunConfig, run_dir: Path, timings: dict[str, float]) -> Path:
    artifact = run_dir / "model"
    done = (artifact / "manifest.json").is_file()
    if done and read_manifest(artifact).config == cfg.model_dump(mode="json"):
        log.info("reusing %s (same config)", artifact)
        timings[cfg.name] = 0.0
        return artifact
    t0 = time.perf_counter()
    log.info("training stage %s → %s", cfg.name, run_dir)
    result = train(cfg, run_dir)
    timings[cfg.name] = round(time.perf_counter() - t0, 1)
    return result.artifact_dir


def _write_report(out_dir: Path, dataset: str, table: str, metrics: dict[str, Any],
                  stages: dict[str, Path]) -> Path:
    lines = [
        f"# compatkit demo — {dataset}",
        "",
        f"Test set: {metrics['test_images']} images of {metrics['test_classes']} classes "
        "never seen in training; every image queries all the others (leave-one-out).",
        "Rows: the model that embeds the queries; columns: the model that embedded the gallery.",
        "",
        table,
        "",
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


def _plot(out_dir: Path, matrix: Any) -> None:
    try:
        from compatkit.eval.plots import plot_compatibility_matrix
    except ImportError:  # plots are an optional extra
        log.warning("matplotlib is not installed: no plot (pip install 'compatkit[plots]')")
        return
    plot_compatibility_matrix(matrix, out_dir / "compatibility.png")
