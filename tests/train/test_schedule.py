"""Cosine schedule with linear warm-up."""

from __future__ import annotations

import itertools

import pytest

from compatkit.train.schedule import cosine_with_warmup


def test_schedule_shape():
    kw = {"total_steps": 100, "warmup_steps": 10, "base_lr": 1.0,
          "warmup_start_ratio": 0.0, "min_lr_ratio": 0.1}
    assert cosine_with_warmup(0, **kw) == 0.0
    assert cosine_with_warmup(5, **kw) == pytest.approx(0.5)
    assert cosine_with_warmup(10, **kw) == pytest.approx(1.0)
    assert cosine_with_warmup(55, **kw) == pytest.approx(0.55)  # half way: mean of 1 and 0.1
    assert cosine_with_warmup(100, **kw) == pytest.approx(0.1)
    values = [cosine_with_warmup(s, **kw) for s in range(10, 101)]
    assert all(a >= b for a, b in itertools.pairwise(values))


def test_schedule_rejects_empty_runs():
    with pytest.raises(ValueError, match="total_steps"):
        cosine_with_warmup(0, total_steps=0, warmup_steps=0, base_lr=0.1)
