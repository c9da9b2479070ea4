"""Results over several training seeds: mean ± standard deviation, and whether a claim holds.

Pure functions on numbers, so that every benchmark judges its claims by the same rule: a claim
is a margin (e.g. M(new, old) − M(old, old)) measured once per seed; it **holds** when the
margin has the same sign for every seed and its mean exceeds two standard deviations,
**reversed** when the same is true with the opposite sign, and is **within noise** otherwise.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal

Verdict = Literal["holds", "reversed", "within noise", "one seed"]


@dataclass(frozen=True)
class SeedStats:
    """Mean and sample standard deviation (n − 1; 0 for one value) of one number over seeds."""

    mean: float
    std: float
    n: int

    def format(self, digits: int = 4) -> str:
        """``"0.7718 ± 0.0042"``, or the bare mean for a single seed."""
        if self.n == 1:
            return f"{self.mean:.{digits}f}"
        return f"{self.mean:.{digits}f} ± {self.std:.{digits}f}"


def seed_stats(values: Sequence[float]) -> SeedStats:
    """Mean and sample standard deviation of one number measured once per seed.

    Raises:
        ValueError: no values, or a value that is not finite.
    """
    vals = [float(v) for v in values]
    if not vals:
        raise ValueError("seed_stats needs at least one value, got none")
    if not all(math.isfinite(v) for v in vals):
        raise ValueError(f"seed values must be finite, got {vals}")
    n = len(vals)
    mean = sum(vals) / n
    var = sum((v - mean) ** 2 for v in vals) / (n - 1) if n > 1 else 0.0
    return SeedStats(mean, math.sqrt(var), n)


def claim_verdict(margins: Sequence[float]) -> Verdict:
    """Judge a claim "margin > 0" from one margin per seed (module docstring's rule).

    A single seed cannot tell signal from noise and is reported as ``"one seed"``.
    """
    stats = seed_stats(margins)
    if stats.n == 1:
        return "one seed"
    if all(m > 0 for m in margins) and stats.mean > 2 * stats.std:
        return "holds"
    if all(m < 0 for m in margins) and -stats.mean > 2 * stats.std:
        return "reversed"
    return "within noise"


def aggregate(per_seed: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """Nested results of several seeds (same keys) → the same nesting with a ``SeedStats`` at
    every number; other leaves (names, flags) are kept when every seed agrees on them.

    Raises:
        ValueError: no results, or seeds whose keys differ.
    """
    if not per_seed:
        raise ValueError("aggregate needs the results of at least one seed")
    keys = list(per_seed[0])
    for i, result in enumerate(per_seed[1:], start=1):
        if list(result) != keys:
            raise ValueError(f"seed result {i} has keys {sorted(result)}, expected "
                             f"{sorted(keys)}")
    out: dict[str, Any] = {}
    for key in keys:
        values = [r[key] for r in per_seed]
        if all(isinstance(v, Mapping) for v in values):
            out[key] = aggregate(values)
        elif all(isinstance(v, int | float) and not isinstance(v, bool) for v in values):
            out[key] = seed_stats(values)
        elif all(v == values[0] for v in values):
            out[key] = values[0]
        else:
            raise ValueError(f"{key!r} differs between seeds and is not a number: {values}")
    return out


def judge_claims(per_seed: Sequence[Mapping[str, float]]) -> list[dict[str, Any]]:
    """Claims measured once per seed (``{claim: margin}``, same claims for every seed) → one
    record per claim: its margins, their mean and std, and the verdict.

    Raises:
        ValueError: no seeds, or seeds that measured different claims.
    """
    if not per_seed:
        raise ValueError("judge_claims needs the margins of at least one seed")
    names = list(per_seed[0])
    for i, margins in enumerate(per_seed[1:], start=1):
        if sorted(margins) != sorted(names):
            raise ValueError(f"seed {i} measured claims {sorted(margins)}, expected "
                             f"{sorted(names)}")
    out = []
    for name in names:
        margins = [float(m[name]) for m in per_seed]
        stats = seed_stats(margins)
        out.append({"claim": name, "margins": margins, "mean": stats.mean, "std": stats.std,
                    "verdict": claim_verdict(margins)})
    return out


def claims_markdown(claims: Sequence[Mapping[str, Any]]) -> list[str]:
    """``judge_claims``' records as the lines of a markdown table."""
    lines = ["| claim | margin per seed | mean ± std | verdict |", "|---|---|---|:---:|"]
    for c in claims:
        margins = ", ".join(f"{m:+.4f}" for m in c["margins"])
        lines.append(f"| {c['claim']} | {margins} | {c['mean']:+.4f} ± {c['std']:.4f} | "
                     f"{c['verdict']} |")
    return lines
