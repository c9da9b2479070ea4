"""Multi-stage experiments: the BiCT λ_b sweep and the evaluation of a chained upgrade."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from compatkit.artifacts import FeatureSet, Manifest, read_manifest, save_module
from compatkit.errors import CompatkitError, IncompatibleSpacesError
from compatkit.experiments import BiCTSweepRow, bict_sweep, chained_upgrade, format_sweep
from compatkit.feature_upgrade import upgrade_features
from compatkit.models import Transformation

TINY = [
    "data.options={num_classes: 200, images_per_class: 5}", "data.image_size=16",
    "data.test_class_ratio=0.2", "data.crop_padding=1", "model.backbone=resnet10_cifar",
    "model.width=0.125", "model.embed_dim=16", "train.batch_size=64", "train.progress=false",
    "train.embed_batch_size=256", "eval.metrics=[map, cmc@1]",
]


def _trained_like(t: Transformation, seed: int) -> Transformation:
    """Random BN statistics, so eval-mode outputs depend on them."""
    g = torch.Generator().manual_seed(seed)
    for m in t.modules():
        if isinstance(m, torch.nn.BatchNorm1d):
            m.running_mean.copy_(torch.randn(m.num_features, generator=g))
            m.running_var.copy_(torch.rand(m.num_features, generator=g) + 0.5)
    return t.eval()


def save_transformation(path, t: Transformation, version: str, src: str, dst: str):
    save_module(path, t, Manifest(kind="transformation", model_version=version, spec=t.spec,
                                  embed_dim=t.d_out, normalized=False, method="bict",
                                  transforms_from=src, transforms_to=dst))
    return path


def _row(lam, value):
    return BiCTSweepRow(lam, {"map": 0.5}, {"map": value}, {}, {"map": 0.25}, "n", "t")


def test_format_sweep_table():
    table = format_sweep([_row(0.0, 0.1), _row(1.0, 0.3)])
    lines = table.splitlines()
    assert lines[0].startswith("| λ_b | self") and lines[0].endswith("old/old (map) |")
    assert lines[2] == "| 0 | 0.5000 | 0.1000 | – | 0.2500 |"
    assert lines[3] == "| 1 | 0.5000 | 0.3000 | – | 0.2500 |"


def test_sweep_refuses_bad_lambdas(tmp_path):
    with pytest.raises(ValueError, match="at least one"):
        bict_sweep([], [], tmp_path, old_model="x")
    with pytest.raises(ValueError, match=r"\[-0.5\]"):
        bict_sweep([], [1.0, -0.5], tmp_path, old_model="x")


def _clustered(version: str, dim: int, seed: int = 0) -> FeatureSet:
    g = np.random.default_rng(seed)
    labels = np.arange(60) % 6
    means = g.standard_normal((6, dim))
    feats = (means[labels] + 0.3 * g.standard_normal((60, dim))).astype(np.float32)
    manifest = Manifest(kind="model", model_version=version, spec={}, embed_dim=dim,
                        normalized=False)
    return FeatureSet(feats, labels, manifest)


def test_chained_upgrade_v1_to_v3(tmp_path):
    torch.manual_seed(0)
    p12 = save_transformation(tmp_path / "t12", _trained_like(Transformation(6, 5, inner=8), 1),
                              "t12", "v1", "v2")
    p23 = save_transformation(tmp_path / "t23", _trained_like(Transformation(5, 4, inner=8), 2),
                              "t23", "v2", "v3")
    gallery = _clustered("v1", 6)
    # queries of v3 that coincide with the upgraded gallery: upgraded test = self test exactly
    exact = upgrade_features(gallery, [p12, p23])
    query = FeatureSet(exact.features, gallery.labels, Manifest(
        kind="model", model_version="v3", spec={}, embed_dim=4, normalized=False))
    report = chained_upgrade(query, gallery, [p12, p23])
    assert report.upgraded == report.self_test
    assert report.features.manifest.lineage == ("v1", "t12", "v2", "t23", "v3")
    assert set(report.old_old) == {"map", "cmc@1"}
    assert 0.0 < report.old_old["map"] <= 1.0
    with pytest.raises(IncompatibleSpacesError, match="ends at v2"):
        chained_upgrade(query, gallery, [p12])
    shuffled = FeatureSet(query.features, query.labels[::-1].copy(), query.manifest)
    with pytest.raises(CompatkitError, match="same items"):
        chained_upgrade(shuffled, gallery, [p12, p23])


def test_bict_sweep_end_to_end(tmp_path):
    from compatkit.methods import bict  # noqa: F401 (registers the method)
    from compatkit.train.config import load_config
    from compatkit.train.loop import train

    torch.set_num_threads(1)
    old = train(load_config(None, [*TINY, "name=old", "data.side=old", "train.epochs=1"]),
                tmp_path / "old")
    rows = bict_sweep([*TINY, "train.epochs=1"], [0.0, 1.0], tmp_path / "sweep",
                      old_model=old.artifact_dir,
                      bict_overrides=["optim.name=adamw", "optim.lr=0.001",
                                      "method={name: bict, inner: 32}"])
    assert [r.lambda_b for r in rows] == [0.0, 1.0]
    for r in rows:
        for test in (r.self_test, r.backward, r.forward, r.old_old):
            assert set(test) == {"map", "cmc@1"} and 0.0 <= test["map"] <= 1.0
        assert r.old_old == pytest.approx(old.metrics["self"])
        stage_one, stage_two = read_manifest(r.new_model), read_manifest(r.transformation)
        assert stage_one.method == "bct" and stage_one.config["method"]["weight"] == r.lambda_b
        assert stage_two.method == "bict" and stage_two.config["method"]["inner"] == 32
        assert stage_two.transforms_from == old.manifest.model_version
        assert stage_two.transforms_to == stage_one.model_version
        assert r.self_test == pytest.approx(stage_one.metrics["self"])
        assert r.backward == pytest.approx(stage_one.metrics["cross"])
    assert rows[0].self_test != rows[1].self_test  # λ_b changes the new model
    saved = json.loads((tmp_path / "sweep" / "bict_sweep.json").read_text())
    assert [s["lambda_b"] for s in saved] == [0.0, 1.0]


RECIPES = [f"configs/{ds}/{stage}.yaml" for ds in ("omniglot", "cifar10")
           for stage in ("old", "independent", "bct", "simclr", "fct", "fct_side", "fastfill",
                         "bict")]
RECIPES += [f"configs/synthetic/{stage}.yaml"
            for stage in ("simclr", "fct", "fct_side", "fastfill", "bict")]


@pytest.mark.parametrize("recipe", RECIPES)
def test_pipeline_recipes_validate(recipe):
    from pathlib import Path

    from compatkit.methods import bict, fastfill, fct, simclr  # noqa: F401 (register)
    from compatkit.train.config import load_config

    path = Path(__file__).resolve().parents[1] / recipe
    cfg = load_config(path)
    stage = path.stem
    assert cfg.method.name == {"old": "independent", "independent": "independent",
                               "fct_side": "fct"}.get(stage, stage)
    if stage in ("fct", "fct_side", "fastfill", "bict"):
        assert cfg.old_model and "new" in cfg.frozen_models and cfg.data.side == "new"
        assert ("side" in cfg.frozen_models) is (stage == "fct_side")
    if stage in ("old", "simclr"):
        assert cfg.data.side == "old"


def test_sweep_composes_the_stage_recipes(tmp_path, monkeypatch):
    """With the omniglot recipes: λ_b and the model paths are the sweep's, the rest the recipes'."""
    from pathlib import Path
    from types import SimpleNamespace

    import compatkit.train.loop as loop
    from compatkit.methods import bict  # noqa: F401 (registers the method)

    seen = []

    def fake_train(cfg, out_dir):
        seen.append(cfg)
        metrics = {"self": {"map": 0.5}, "cross": {"map": 0.2}, "transformed": {"map": 0.3},
                   "old_old": {"map": 0.25}}
        return SimpleNamespace(artifact_dir=Path(out_dir) / "model", metrics=metrics)

    monkeypatch.setattr(loop, "train", fake_train)
    root = Path(__file__).resolve().parents[1] / "configs" / "omniglot"
    rows = bict_sweep(["train.epochs=1"], [0.5], tmp_path, old_model="runs/x/old/model",
                      bct_config=root / "bct.yaml", bict_config=root / "bict.yaml")
    one, two = seen
    assert (one.method.name, one.method.weight, one.method.synthesize_new_classes) == \
        ("bct", 0.5, True)
    assert one.optim.name == "sgd" and one.train.epochs == 1
    assert (two.method.name, two.method.inner, two.optim.name) == ("bict", 512, "adamw")
    assert one.old_model == two.old_model == "runs/x/old/model"
    assert two.frozen_models == {"new": str(tmp_path / "lambda_0.5" / "bct" / "model")}
    assert rows[0].forward == {"map": 0.3} and rows[0].backward == {"map": 0.2}
