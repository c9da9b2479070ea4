"""Seed aggregation and the verdict rule, on hand-made numbers."""

from __future__ import annotations

import math

import pytest

from compatkit.eval.seeds import (
    SeedStats,
    aggregate,
    claim_verdict,
    claims_markdown,
    judge_claims,
    seed_stats,
)


def test_seed_stats_by_hand() -> None:
    s = seed_stats([0.70, 0.72, 0.74])
    assert s.n == 3 and s.mean == pytest.approx(0.72)
    assert s.std == pytest.approx(0.02)  # sample std: sqrt((0.02² + 0 + 0.02²) / 2)
    assert s.format() == "0.7200 ± 0.0200"
    one = seed_stats([0.5])
    assert (one.mean, one.std, one.n) == (0.5, 0.0, 1) and one.format(2) == "0.50"


@pytest.mark.parametrize(("margins", "verdict"), [
    ([0.03, 0.04, 0.05], "holds"),            # mean 0.04 > 2 · 0.01
    ([-0.03, -0.04, -0.05], "reversed"),
    ([0.01, 0.02, 0.09], "within noise"),     # same sign, but mean 0.04 < 2 · std 0.0436
    ([0.05, 0.06, -0.01], "within noise"),    # one seed disagrees on the sign
    ([0.0, 0.1, 0.1], "within noise"),        # zero is no sign
    ([0.02], "one seed"),
])
def test_claim_verdict_rule(margins: list[float], verdict: str) -> None:
    assert claim_verdict(margins) == verdict


def test_claim_verdict_at_the_two_std_edge() -> None:
    # the two margins m ± d have mean m and sample std d·√2
    d = 0.01
    std = d * math.sqrt(2)
    assert claim_verdict([2 * std + 1e-6 - d, 2 * std + 1e-6 + d]) == "holds"
    assert claim_verdict([2 * std - 1e-6 - d, 2 * std - 1e-6 + d]) == "within noise"


def test_aggregate_nested_rows() -> None:
    rows = [
        {"method": "bct", "self": {"map": 0.70, "cmc@1": 0.9}, "nfr": 0.10, "ok": True},
        {"method": "bct", "self": {"map": 0.74, "cmc@1": 0.9}, "nfr": 0.20, "ok": True},
    ]
    agg = aggregate(rows)
    assert agg["method"] == "bct" and agg["ok"] is True
    assert agg["self"]["map"].mean == pytest.approx(0.72)
    assert agg["self"]["map"].std == pytest.approx(0.04 / math.sqrt(2))
    assert agg["self"]["cmc@1"] == SeedStats(0.9, 0.0, 2)
    assert agg["nfr"].mean == pytest.approx(0.15)


def test_judge_claims_and_their_table() -> None:
    per_seed = [{"a beats b": 0.03, "c beats d": -0.02}, {"c beats d": -0.03, "a beats b": 0.05}]
    claims = judge_claims(per_seed)
    assert [c["claim"] for c in claims] == ["a beats b", "c beats d"]
    a, c = claims
    assert a["margins"] == [0.03, 0.05] and a["mean"] == pytest.approx(0.04)
    assert a["std"] == pytest.approx(0.02 / math.sqrt(2)) and a["verdict"] == "holds"
    assert c["verdict"] == "reversed"
    lines = claims_markdown(claims)
    assert lines[0] == "| claim | margin per seed | mean ± std | verdict |"
    assert lines[2] == "| a beats b | +0.0300, +0.0500 | +0.0400 ± 0.0141 | holds |"
    assert judge_claims([{"x": 0.1}])[0]["verdict"] == "one seed"


def test_bad_input_is_named() -> None:
    with pytest.raises(ValueError, match="at least one seed"):
        judge_claims([])
    with pytest.raises(ValueError, match="seed 1 measured claims"):
        judge_claims([{"a": 0.1}, {"b": 0.1}])
    with pytest.raises(ValueError, match="at least one"):
        seed_stats([])
    with pytest.raises(ValueError, match="finite"):
        seed_stats([0.1, float("nan")])
    with pytest.raises(ValueError, match="keys"):
        aggregate([{"a": 1.0}, {"b": 1.0}])
    with pytest.raises(ValueError, match="'method' differs"):
        aggregate([{"method": "bct"}, {"method": "l2"}])
