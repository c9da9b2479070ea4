"""benchmarks/hot_refresh.py: the curve claims it judges over seeds, on hand-made summaries."""

from __future__ import annotations

from types import ModuleType

import pytest


@pytest.fixture(scope="module")
def bench(load_benchmark) -> ModuleType:
    return load_benchmark("hot_refresh")


def _curve(auc_map: float, auc_cmc1: float, dip: float, max_nfr: float) -> dict[str, float]:
    return {"auc_map": auc_map, "auc_cmc1": auc_cmc1, "dip": dip, "max_nfr": max_nfr}


def test_curve_claims_margins(bench: ModuleType) -> None:
    summary = {
        "bct": {"random": _curve(0.60, 0.80, -0.10, 0.20),
                "uncertainty": _curve(0.62, 0.75, -0.05, 0.25)},
        "ract": {"random": _curve(0.70, 0.85, 0.0, 0.08)},
        "fastfill": {"random": _curve(0.50, 0.70, -0.2, 0.4),
                     "sigma": _curve(0.49, 0.72, -0.2, 0.4)},
    }
    claims = bench.curve_claims(summary)
    assert claims == pytest.approx({
        "bct: uncertainty order's area above random's (AUC mAP)": 0.02,
        "bct: uncertainty order's area above random's (AUC CMC@1)": -0.05,
        "fastfill: sigma order's area above random's (AUC mAP)": -0.01,
        "fastfill: sigma order's area above random's (AUC CMC@1)": 0.02,
        "ract: random-order dip shallower than bct's (mAP)": 0.10,
        "ract: random-order max NFR below bct's": 0.12,
    })


def test_curve_claims_need_both_sides(bench: ModuleType) -> None:
    # no contra and no smart order: nothing to compare, so no claim is invented
    assert bench.curve_claims({"ract": {"random": _curve(0.7, 0.8, 0.0, 0.1)}}) == {}
