"""The demo pipeline: tiny end-to-end run, its outputs, and the shipped recipes."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from compatkit.lab_demo import (
    DEMO_SIZES,
    RECIPES,
    STAGES,
    DemoBudget,
    chance_map,
    demo_budget,
    demo_config,
    demo_test_images,
    largest_cap_per_class,
    plan_budget,
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


def test_demo_budget_sizing_rule():
    ten = np.repeat(np.arange(10), 6000)  # a 60,000-image dataset of 10 classes
    b = demo_budget(ten, epochs=10)
    assert (b.pool_images, b.train_per_class, b.kept_images, b.epochs) == (60000, 800, 8000, 10)
    assert b.overrides() == ["data.train_per_class=800", "train.epochs=10"]
    assert "800 images per class" in b.describe() and "--full" in b.describe()
    full = demo_budget(ten, epochs=10, full=True)
    assert (full.train_per_class, full.kept_images, full.epochs) == (None, 60000, 10)
    assert full.overrides() == ["train.epochs=10"]
    # unequal classes: the largest common cap that fits, 100 + 2·450 = 1000
    uneven = np.repeat([0, 1, 2], [100, 5000, 5000])
    assert demo_budget(uneven, epochs=10, max_images=1000).train_per_class == 450
    # a small dataset is kept whole
    small = demo_budget(np.repeat(np.arange(5), 10), epochs=10)
    assert (small.train_per_class, small.kept_images) == (None, 50)
    # 5,000 classes × 4: even 2 per class keeps 10,000 > 8,000, so the epochs shrink
    many = demo_budget(np.repeat(np.arange(5000), 4), epochs=10)
    assert (many.train_per_class, many.kept_images, many.epochs) == (2, 10000, 8)


def test_demo_budget_applies_to_datasets_without_a_recipe(monkeypatch):
    tiny = ["data.options={num_classes: 100, images_per_class: 40}"]
    assert plan_budget("synthetic", None, tiny) is None  # tuned recipe: no budget
    monkeypatch.delitem(RECIPES, "synthetic")
    budget = plan_budget("synthetic", None, tiny)  # 70 training classes × 40 = 2,800 images
    assert budget == DemoBudget(2800, 2800, None, 10)
    monkeypatch.setattr("compatkit.lab_demo.BUDGET_IMAGES", 1400)
    budget = plan_budget("synthetic", None, tiny)
    assert (budget.train_per_class, budget.kept_images) == (20, 1400)
    assert plan_budget("synthetic", None, tiny, full=True).train_per_class is None
    assert plan_budget("synthetic", None, [*tiny, "train.epochs=2"]) is None  # the user sizes it


def test_tuned_recipe_too_large_for_the_demo_is_sized_down(monkeypatch):
    seen = {}

    def pool(data, split):
        seen["train_per_class"] = data.train_per_class
        return SimpleNamespace(labels=np.repeat(np.arange(10), 5000))

    monkeypatch.setattr("compatkit.lab_demo.evaluation_images", pool)
    budget = plan_budget("cifar10", "../shared/data/cifar10")
    assert seen["train_per_class"] is None  # sized on the whole pool, not the recipe's cap
    assert budget == DemoBudget(50000, 5000, 500, 12, 20)
    assert budget.overrides("old") == ["data.train_per_class=500", "train.epochs=20"]
    assert budget.overrides("new") == ["data.train_per_class=500", "train.epochs=12"]
    assert "20 epochs for the old model and 12 for the new ones" in budget.describe()
    # the demo's CIFAR-10 stages resolve to the recipe with the demo's sizing on top
    old = demo_config("cifar10", "r", "old", {"name": "independent"}, budget.overrides("old"))
    bct = demo_config("cifar10", "r", "bct", {"name": "bct"}, budget.overrides("new"))
    assert (old.data.train_per_class, old.train.epochs) == (500, 20)
    assert (bct.data.train_per_class, bct.train.epochs) == (500, 12)
    recipe = demo_config("cifar10", "r", "bct", {"name": "bct"})
    assert (recipe.data.train_per_class, recipe.train.epochs) == (2000, 20)
    assert plan_budget("cifar10", "r", full=True) is None  # --full: the recipe as it is
    assert plan_budget("cifar10", "r", ["train.epochs=3"]) is None  # the user sizes it


def test_largest_cap_per_class():
    assert largest_cap_per_class(np.array([100, 5000, 5000]), 1000, 2) == 450
    assert largest_cap_per_class(np.array([1000] * 10), 5000, 2) == 500
    assert largest_cap_per_class(np.array([3, 3]), 100, 2) == 3  # everything fits
    assert largest_cap_per_class(np.array([10] * 10), 5, 2) == 2  # never below the minimum


def test_chance_map_is_each_query_share_of_its_class():
    # 10 classes × 1,000 (CIFAR-10's test set): 999 of the 9,999 others
    assert chance_map(np.repeat(np.arange(10), 1000)) == pytest.approx(999 / 9999)
    # classes of 3 and 1: three queries at 2/3, one at 0 → 6 / 12
    assert chance_map(np.array([0, 0, 0, 1])) == pytest.approx(0.5)
    with pytest.raises(ValueError, match="at least 2"):
        chance_map(np.array([3]))


def test_demo_test_set_is_cut_to_its_budget():
    cfg = demo_config("synthetic", None, "old", {"name": "independent"},
                      ["data.options={num_classes: 100, images_per_class: 10}"])
    whole, pool = demo_test_images(cfg.data, max_images=10_000)
    assert len(whole) == pool == 300  # 30 held-out classes × 10
    cut, pool = demo_test_images(cfg.data, max_images=100)
    assert (len(cut), pool) == (90, 300)  # 3 per class is the largest cap that fits
    assert set(np.unique(cut.labels, return_counts=True)[1]) == {3}
    again, _ = demo_test_images(cfg.data, max_images=100)
    np.testing.assert_array_equal(cut.images, again.images)  # drawn with the split seed
    assert set(cut.labels) == set(whole.labels)  # every class kept
    assert len(demo_test_images(cfg.data, full=True, max_images=100)[0]) == 300


def test_demo_applies_its_sizing_per_side(tmp_path, monkeypatch):
    torch.set_num_threads(1)
    monkeypatch.setitem(DEMO_SIZES, "synthetic",
                        {"train_per_class": 4, "epochs": 1, "old_epochs": 2})
    monkeypatch.setattr("compatkit.lab_demo.BUDGET_TEST_IMAGES", 150)
    result = run_lab_demo(
        "synthetic", None, tmp_path, progress=False, methods=("independent", "bct"),
        overrides=["data.options={num_classes: 200, images_per_class: 6}",
                   "data.image_size=16", "model.width=0.125", "train.batch_size=32"])
    old = load_config(tmp_path / "old" / "config.yaml")
    bct = load_config(tmp_path / "bct" / "config.yaml")
    assert (old.train.epochs, old.data.train_per_class) == (2, 4)
    assert (bct.train.epochs, bct.data.train_per_class) == (1, 4)
    # 140 training classes × 6 images, capped at 4 per class
    assert result.metrics["budget"] == {"pool_images": 840, "kept_images": 560,
                                        "train_per_class": 4, "epochs": 1, "old_epochs": 2}
    assert "at most 4 images per class (560 of 840" in result.report.read_text()
    # 60 test classes × 6 images cut to 2 per class: the matrix is measured on those 120
    assert (result.metrics["test_images"], result.metrics["test_pool_images"]) == (120, 360)
    assert "Subsampled from 360 test images" in result.report.read_text()
    assert result.metrics["chance_map"] == pytest.approx(1 / 119)  # 1 of 119 others
