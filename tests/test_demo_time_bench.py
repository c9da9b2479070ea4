"""benchmarks/demo_time.py: the ordering checks it reads from a demo's metrics.json."""

from __future__ import annotations

from types import ModuleType

import pytest


@pytest.fixture(scope="module")
def bench(load_benchmark) -> ModuleType:
    return load_benchmark("demo_time")


def _metrics(old_old: float, bct_old: float, ind_old: float, chance: float) -> dict:
    cells = {("old", "old"): old_old, ("bct", "old"): bct_old, ("independent", "old"): ind_old,
             ("bct", "bct"): 0.9}
    return {"chance_map": chance, "matrix": [
        {"query_model": q, "gallery_model": g, "map": v} for (q, g), v in cells.items()]}


def test_independent_far_below_is_judged_above_chance(bench):
    # CIFAR-10's demo (10 classes): 0.149 is more than half of 0.236, but its margin over
    # chance (0.049) is under half of old/old's (0.137 / 2)
    row = bench.demo_ordering(_metrics(0.2363, 0.2510, 0.1488, 0.0999))
    assert row["bct_above_old"] and row["independent_far_below"]
    assert (row["old_old"], row["bct_old"], row["independent_old"]) == (0.2363, 0.2510, 0.1488)
    close = bench.demo_ordering(_metrics(0.2363, 0.2200, 0.1800, 0.0999))
    assert not close["bct_above_old"] and not close["independent_far_below"]
    # with chance near 0 the rule is the plain half
    assert bench.demo_ordering(_metrics(0.60, 0.61, 0.29, 0.0))["independent_far_below"]
    assert not bench.demo_ordering(_metrics(0.60, 0.61, 0.31, 0.0))["independent_far_below"]
