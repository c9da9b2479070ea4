"""Typed configs: defaults → YAML → overrides, unknown keys refused, frozen."""

from __future__ import annotations

import pydantic
import pytest

from compatkit.errors import CompatkitError
from compatkit.train.config import config_to_yaml, load_config, merge_trees, parse_override


def test_yaml_then_overrides(tmp_path):
    recipe = tmp_path / "r.yaml"
    recipe.write_text("method: {name: bct, weight: 2.0}\ntrain: {epochs: 7}\n")
    cfg = load_config(recipe, ["train.epochs=3", "optim.lr=0.05"])
    assert cfg.method.name == "bct" and cfg.method.weight == 2.0
    assert cfg.train.epochs == 3 and cfg.optim.lr == 0.05
    again = load_config(None, [], base=__import__("yaml").safe_load(config_to_yaml(cfg)))
    assert again == cfg


def test_unknown_keys_are_errors_naming_the_key(tmp_path):
    with pytest.raises(CompatkitError, match="temprature"):
        load_config(None, ["method={name: l2, temprature: 0.05}"])
    with pytest.raises(CompatkitError, match="epoch"):
        load_config(None, ["train.epoch=3"])


def test_bad_values_and_combinations():
    with pytest.raises(CompatkitError, match="amp"):
        load_config(None, ["train.device=cpu", "train.amp=true"])
    with pytest.raises(CompatkitError, match="device"):
        load_config(None, ["train.device=tpu"])
    with pytest.raises(CompatkitError, match=r"key\.path=value"):
        parse_override("train.epochs")
    with pytest.raises(CompatkitError, match="does not exist"):
        load_config("/nonexistent.yaml")


def test_config_is_frozen():
    cfg = load_config()
    with pytest.raises(pydantic.ValidationError):
        cfg.train.epochs = 5


def test_merge_trees_is_nested_and_copies():
    base = {"a": {"b": 1, "c": 2}, "d": [1]}
    merged = merge_trees(base, {"a": {"c": 3}})
    assert merged == {"a": {"b": 1, "c": 3}, "d": [1]}
    merged["d"].append(2)
    assert base["d"] == [1]
