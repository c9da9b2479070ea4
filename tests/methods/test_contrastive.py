"""contra and RACT losses: reference methods.md §7 cases 14–18 and 36 (loss side)."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from compatkit.methods.contrastive import ContrastiveLoss, RACTLoss
from compatkit.methods.distributed import CompatKeys

N14 = torch.tensor([[1.0, 0.0], [1.0, 0.0]])
O14 = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
L14 = torch.tensor([0, 1])


def _reference(new, old, labels, *, temperature, k, with_new):
    """Per-anchor loss recomputed with plain Python loops over the batch."""
    n, o = F.normalize(new.double(), dim=1), F.normalize(old.double(), dim=1)
    out = []
    for i in range(len(n)):
        others = [j for j in range(len(n)) if labels[j] != labels[i]]
        blocks = [sorted((float(n[i] @ o[j]) for j in others), reverse=True)]
        if with_new:
            blocks.append(sorted((float(n[i] @ n[j]) for j in others), reverse=True))
        terms = [float(n[i] @ o[i])] + [s for b in blocks for s in (b[:k] if k > 0 else b)]
        denom = sum(math.exp(s / temperature) for s in terms)
        out.append(-math.log(math.exp(terms[0] / temperature) / denom))
    return torch.tensor(out, dtype=torch.float64)


def test_case14_ract_and_contra_hand_values():
    ract = RACTLoss(temperature=1.0, topk_neg=0)(N14, O14, L14, reduction="none")
    contra = ContrastiveLoss(temperature=1.0, topk_neg=0)(N14, O14, L14, reduction="none")
    assert ract.tolist() == pytest.approx([0.861995, 1.861995], abs=1e-6)
    assert contra.tolist() == pytest.approx([0.313262, 1.313262], abs=1e-6)
    assert RACTLoss(temperature=1.0, topk_neg=0)(N14, O14, L14).item() == pytest.approx(
        1.361995, abs=1e-6)
    assert ContrastiveLoss(temperature=1.0, topk_neg=0)(N14, O14, L14).item() == pytest.approx(
        0.813262, abs=1e-6)
    assert (ract > contra).all()


@pytest.mark.parametrize("k", [0, 1, 3])
@pytest.mark.parametrize("temperature", [0.05, 1.0])
def test_losses_match_a_loop_reference(k, temperature):
    g = torch.Generator().manual_seed(3)
    new, old = torch.randn(9, 5, generator=g), torch.randn(9, 5, generator=g)
    labels = torch.tensor([0, 0, 1, 1, 1, 2, 3, 3, 4])
    for loss, with_new in ((RACTLoss, True), (ContrastiveLoss, False)):
        got = loss(temperature=temperature, topk_neg=k)(new, old, labels, reduction="none")
        want = _reference(new, old, labels, temperature=temperature, k=k, with_new=with_new)
        assert torch.allclose(got.double(), want, atol=1e-5)


def test_case15_one_class_gives_exactly_zero():
    g = torch.Generator().manual_seed(0)
    new, old = torch.randn(5, 4, generator=g), torch.randn(5, 4, generator=g)
    labels = torch.full((5,), 7)
    assert RACTLoss()(new, old, labels).item() == 0.0
    assert ContrastiveLoss()(new, old, labels).item() == 0.0


@pytest.mark.parametrize("loss_cls", [RACTLoss, ContrastiveLoss])
def test_case16_masked_padding_in_topk_changes_nothing(loss_cls):
    g = torch.Generator().manual_seed(1)
    new, old = torch.randn(6, 4, generator=g), torch.randn(6, 4, generator=g)
    labels = torch.tensor([0, 0, 0, 0, 1, 2])  # class-0 anchors have 2 valid negatives
    exact = loss_cls(temperature=0.05, topk_neg=2)(new, old, labels, reduction="none")
    for k in (3, 10, 0):
        padded = loss_cls(temperature=0.05, topk_neg=k)(new, old, labels, reduction="none")
        assert torch.allclose(padded[:4], exact[:4], atol=1e-6, rtol=0)


def test_case16_fp16_inputs_stay_finite():
    g = torch.Generator().manual_seed(2)
    new, old = torch.randn(6, 4, generator=g), torch.randn(6, 4, generator=g)
    labels = torch.tensor([0, 0, 0, 0, 1, 2])
    loss32 = RACTLoss(topk_neg=10)(new, old, labels)
    loss16 = RACTLoss(topk_neg=10)(new.half(), old.half(), labels)
    assert loss16.dtype == torch.float32 and torch.isfinite(loss16)
    assert loss16.item() == pytest.approx(loss32.item(), rel=1e-2)


def test_case17_no_gradient_to_old_features():
    new = torch.randn(6, 4, requires_grad=True)
    old = torch.randn(6, 4, requires_grad=True)
    labels = torch.tensor([0, 1, 2, 0, 1, 2])
    (RACTLoss()(new, old, labels) + ContrastiveLoss()(new, old, labels)).backward()
    assert old.grad is None
    assert new.grad is not None and new.grad.abs().sum() > 0


@pytest.mark.parametrize("stopgrad", [True, False])
def test_case17_stopgrad_new_keys(stopgrad):
    g = torch.Generator().manual_seed(4)
    new = torch.randn(4, 3, generator=g).requires_grad_(True)
    old = torch.randn(4, 3, generator=g)
    labels = torch.tensor([0, 1, 2, 3])
    per_sample = RACTLoss(temperature=0.1, topk_neg=0, stopgrad_new_keys=stopgrad)(
        new, old, labels, reduction="none")
    per_sample[0].backward()
    others = new.grad[1:].abs().sum().item()
    assert new.grad[0].abs().sum() > 0
    assert (others == 0.0) if stopgrad else (others > 1e-4)


def test_case18_temperature_limits():
    new = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    old = torch.tensor([[1.0, 0.1], [0.1, 1.0]])  # positive strictly the largest logit
    labels = torch.tensor([0, 1])
    assert RACTLoss(temperature=1e-3)(new, old, labels).item() < 1e-6
    tie_old = torch.tensor([[0.0, 1.0], [0.0, 1.0]])  # anchor 1: negative o_0 equals positive
    tie = ContrastiveLoss(temperature=1e-3)(new, tie_old, labels, reduction="none")
    assert tie[1].item() >= math.log(2) - 1e-6


def test_keys_extend_the_negatives():
    new, old, labels = N14, O14, L14
    extra = CompatKeys(new=torch.cat([new, torch.tensor([[1.0, 0.0]])]),
                       old=torch.cat([old, torch.tensor([[1.0, 0.0]])]),
                       labels=torch.tensor([0, 1, 2]), offset=0)
    got = RACTLoss(temperature=1.0, topk_neg=0)(new, old, labels, keys=extra, reduction="none")
    e = math.e  # anchor 0 gains one more e from o_2 and one from n_2
    assert got[0].item() == pytest.approx(math.log((4 * e + 1) / e), abs=1e-6)


def test_case36_dimension_mismatch_and_bad_keys_raise():
    with pytest.raises(ValueError, match="d_new = 4 and d_old = 3"):
        RACTLoss()(torch.randn(2, 4), torch.randn(2, 3), torch.tensor([0, 1]))
    with pytest.raises(ValueError, match="d_new = 4 and d_old = 3"):
        ContrastiveLoss()(torch.randn(2, 4), torch.randn(2, 3), torch.tensor([0, 1]))
    keys = CompatKeys(torch.randn(3, 2), torch.randn(3, 2), torch.tensor([0, 1, 2]), offset=2)
    with pytest.raises(ValueError, match="offset 2"):
        RACTLoss()(torch.randn(2, 2), torch.randn(2, 2), torch.tensor([0, 1]), keys=keys)
    with pytest.raises(ValueError, match="temperature must be > 0"):
        RACTLoss(temperature=0.0)


@pytest.mark.parametrize("loss", [RACTLoss(), ContrastiveLoss()])
def test_similarities_stay_float32_under_autocast(loss):
    g = torch.Generator().manual_seed(6)
    new, old = torch.randn(8, 16, generator=g), torch.randn(8, 16, generator=g)
    labels = torch.tensor([0, 1, 2, 3, 0, 1, 2, 3])
    reference = loss(new, old, labels)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        mixed = loss(new, old, labels)
    assert mixed.dtype == torch.float32
    assert mixed.item() == pytest.approx(reference.item(), rel=1e-6)
