"""The method registry and config selection by name."""

from __future__ import annotations

import pytest

from compatkit.errors import UnknownNameError
from compatkit.methods import METHODS, MethodConfig, method_config_from_dict, register_method
from compatkit.methods.base import Method


def test_registry_lists_the_first_three_methods():
    assert {"independent", "l2", "bct"} <= set(METHODS.names())


def test_config_is_chosen_by_name_and_refuses_unknown_keys():
    cfg = method_config_from_dict({"name": "bct", "weight": 0.5})
    assert cfg.name == "bct" and cfg.weight == 0.5
    with pytest.raises(ValueError, match="temprature"):
        method_config_from_dict({"name": "l2", "temprature": 0.05})


def test_unknown_method_suggests_close_names():
    with pytest.raises(UnknownNameError, match="did you mean bct"):
        method_config_from_dict({"name": "bctt"})


def test_register_refuses_duplicates_and_mismatched_names():
    with pytest.raises(ValueError, match="already registered"):
        register_method("bct")(METHODS.get("bct"))

    class OtherConfig(MethodConfig):
        name: str = "other"

    class Other(Method):
        config_cls = OtherConfig

    with pytest.raises(ValueError, match="registers as 'different'"):
        register_method("different")(Other)


def test_compatibility_declarations():
    """Methods that train the new embedding towards the old one declare compatibility in the
    artifact; the classification-level baselines (pct, lwf) and independent do not."""
    declared = {name for name in METHODS.names() if METHODS.get(name).backward_compatible}
    assert declared == {"l2", "bct", "bct_ract", "contra", "ract", "triplet", "triplet_ract",
                        "unibct", "pct_oc"}
