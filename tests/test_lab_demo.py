"""The demo pipeline: tiny end-to-end run, its outputs, and the shipped recipes."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from compatkit.lab_demo import (
    RECIPES,
    STAGES,
    demo_config,
    run_lab_demo,
    stage_tree,
    write_configs,
)
from compatkit.train.config import load_config

CONFIGS = Path(__file__).resolve().parents[1] / "configs"


@pytest.mark.parametrize("stage", ["old", "independent", "l2", "bct"])
def test_shipped_recipes_equal_the_demo_stages(stage):
    method = dict(STAGES[stage].method)
    demo = demo_config("synthetic", None, stage, method)
    recipe = load_config(CONFIGS / "synthetic" / f"{stage}.yaml")
    assert recipe.name == f"synthetic-{stage}"
    skip = {"old_model", "name"}
    assert recipe.model_dump(exclude=skip) == demo.model_dump(exclude=skip)


def test_configs_are_generated_from_the_recipes(tmp_path):
    """configs/ is what ``python -m compatkit.lab_demo`` writes from RECIPES × STAGES."""
    assert write_configs(CONFIGS, check=True) == []
    written = write_configs(tmp_path)
    assert len(written) == len(RECIPES) * len(STAGES)
    assert write_configs(tmp_path, check=True) == []
    path = tmp_path / "omniglot" / "bct.yaml"
    path.write_text(path.read_text().replace("weight: 1.0", "weight: 2.0"))
    assert write_configs(tmp_path, check=True) == [path]


def test_stage_tree_wires_the_stages_it_builds_on():
    tree = stage_tree("omniglot", "data/omniglot", "fct_side", runs={"old": "o", "simclr": "s"})
    assert tree["old_model"] == "o"
    assert tree["frozen_models"] == {"new": "runs/omniglot/independent/model", "side": "s"}
    assert tree["optim"]["name"] == "adamw" and tree["data"]["side"] == "new"
    fastfill = stage_tree("cifar10", None, "fastfill")
    assert fastfill["method"]["mu_sim"] == float(fastfill["model"]["embed_dim"])
    old = stage_tree("omniglot", None, "old")
    assert old["data"]["side"] == "old" and "old_model" not in old


def test_tiny_demo_writes_matrix_report_and_plots(tmp_path):
    torch.set_num_threads(1)
    result = run_lab_demo(
        "synthetic", None, tmp_path, progress=False,
        overrides=["train.epochs=1", "data.options={num_classes: 200, images_per_class: 6}",
                   "data.image_size=16", "model.width=0.125", "train.batch_size=64"],
    )
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    pairs = {(row["query_model"], row["gallery_model"]) for row in metrics["matrix"]}
    names = ["old", "independent", "l2", "bct"]
    assert pairs == {(q, g) for q in names for g in names}
    for row in metrics["matrix"]:
        for metric in ("map", "cmc@1", "cmc@5", "map@r"):
            assert 0.0 <= row[metric] <= 1.0
    assert set(metrics["backfill"]) == {"l2", "bct"}
    curve = metrics["backfill"]["bct"]["random"]
    row = {(r["query_model"], r["gallery_model"]): r for r in metrics["matrix"]}
    # end points of the hot-refresh curve: cross-test at 0, self-test at 1
    assert curve["metrics"]["map"][0] == pytest.approx(row[("bct", "old")]["map"], abs=1e-9)
    assert curve["metrics"]["map"][-1] == pytest.approx(row[("bct", "bct")]["map"], abs=1e-9)
    report = result.report.read_text()
    assert "| query \\ gallery | old | independent | l2 | bct |" in report
    for png in ("compatibility.png", "backfill_bct.png", "backfill_l2.png"):
        assert (tmp_path / png).stat().st_size > 1000
    # a second run reuses every stage trained with the same config
    again = run_lab_demo("synthetic", None, tmp_path, progress=False, overrides=[
        "train.epochs=1", "data.options={num_classes: 200, images_per_class: 6}",
        "data.image_size=16", "model.width=0.125", "train.batch_size=64"])
    assert set(again.metrics["train_seconds"].values()) == {0.0}
