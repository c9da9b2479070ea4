"""triplet and triplet_ract losses: reference methods.md §7 case 19, k > 0, gradient paths."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from pydantic import ValidationError

from compatkit.methods.triplet import TripletConfig, TripletLoss

SQRT2 = math.sqrt(2.0)


def _reference(new, old, labels, *, margin, k, with_new):
    n, o = F.normalize(new.double(), dim=1), F.normalize(old.double(), dim=1)
    out = []
    for i in range(len(n)):
        d_pos = float((n[i] - o[i]).norm())
        others = [j for j in range(len(n)) if labels[j] != labels[i]]
        total = 0.0
        for keys in ([o, n] if with_new else [o]):
            nearest = sorted(float((n[i] - keys[j]).norm()) for j in others)[:k]
            if nearest:
                total += sum(max(0.0, d_pos - d + margin) for d in nearest) / len(nearest)
        out.append(total)
    return torch.tensor(out, dtype=torch.float64)


def test_case19_hand_values():
    labels = torch.tensor([0, 1])
    new = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    loss = TripletLoss(margin=0.8)
    easy = loss(new, torch.tensor([[1.0, 0.0], [0.0, 1.0]]), labels, reduction="none")
    assert easy[0].item() == 0.0
    hard = loss(new, torch.tensor([[0.0, 1.0], [1.0, 0.0]]), labels, reduction="none")
    assert hard[0].item() == pytest.approx(SQRT2 + 0.8, abs=1e-6)
    assert hard[0].item() == pytest.approx(2.214214, abs=1e-6)


def test_triplet_ract_adds_the_new_negative_term():
    new = torch.tensor([[1.0, 0.0], [1.0, 0.0]])
    old = torch.tensor([[0.0, 1.0], [0.0, 1.0]])
    labels = torch.tensor([0, 1])
    plain = TripletLoss(margin=0.8)(new, old, labels, reduction="none")
    ract = TripletLoss(margin=0.8, new_negatives=True)(new, old, labels, reduction="none")
    assert plain[0].item() == pytest.approx(0.8, abs=1e-6)  # d_pos = d(n_0, o_1) = √2
    assert ract[0].item() == pytest.approx(0.8 + SQRT2 + 0.8, abs=1e-6)  # d(n_0, n_1) = 0


@pytest.mark.parametrize("k", [1, 2, 10])
@pytest.mark.parametrize("with_new", [False, True])
def test_matches_a_loop_reference_and_averages_only_valid_negatives(k, with_new):
    g = torch.Generator().manual_seed(5)
    new, old = torch.randn(8, 4, generator=g), torch.randn(8, 4, generator=g)
    labels = torch.tensor([0, 0, 0, 0, 0, 1, 2, 2])  # class 0 has 3 negatives, fewer than 10
    got = TripletLoss(margin=0.8, topk_neg=k, new_negatives=with_new)(
        new, old, labels, reduction="none")
    want = _reference(new, old, labels, margin=0.8, k=k, with_new=with_new)
    assert torch.allclose(got.double(), want, atol=1e-5)


def test_k_must_be_positive():
    for k in (0, -1):
        with pytest.raises(ValueError, match="topk_neg > 0"):
            TripletLoss(topk_neg=k)
        with pytest.raises(ValidationError, match="topk_neg"):
            TripletConfig(topk_neg=k)


def test_rows_without_negatives_contribute_zero():
    new, old = torch.randn(3, 4), torch.randn(3, 4)
    assert TripletLoss()(new, old, torch.zeros(3, dtype=torch.int64)).item() == 0.0


@pytest.mark.parametrize("stopgrad", [True, False])
def test_gradients_finite_at_zero_distance_and_stopgrad(stopgrad):
    # anchor 0: d_pos = 0 and d(n_0, o_1) = 0 (hinge active at zero distances); n_1 is a
    # near new negative whose hinge is active too
    new = torch.tensor([[1.0, 0.0], [0.8, 0.6], [0.0, 1.0]], requires_grad=True)
    old = torch.tensor([[1.0, 0.0], [1.0, 0.0], [0.0, 1.0]], requires_grad=True)
    labels = torch.tensor([0, 1, 2])
    per_sample = TripletLoss(new_negatives=True, stopgrad_new_keys=stopgrad)(
        new, old, labels, reduction="none")
    per_sample[0].backward()
    assert old.grad is None
    assert torch.isfinite(new.grad).all()
    others = new.grad[1:].abs().sum().item()
    assert (others == 0.0) if stopgrad else (others > 0.0)


def test_dimension_mismatch_raises():
    with pytest.raises(ValueError, match="d_new = 3 and d_old = 2"):
        TripletLoss()(torch.randn(2, 3), torch.randn(2, 2), torch.tensor([0, 1]))
