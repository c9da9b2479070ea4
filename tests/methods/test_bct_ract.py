"""bct_ract: reference methods.md §7 case 22, and BCT's influence rows reused."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from compatkit.methods.base import MethodBatch, create_method, method_config_from_dict
from compatkit.methods.bct_ract import bct_ract_logits, bct_ract_loss

from .standins import make_context


def test_case22_logits_layout_and_hand_value():
    influence = torch.tensor([[2.0, 0.0]])
    new = torch.tensor([[5.0, 1.0]])
    labels = torch.tensor([0])
    z = bct_ract_logits(influence, new, labels)
    assert z.shape == (1, 4)
    assert z[0, :2].tolist() == [2.0, 0.0] and z[0, 3].item() == 1.0
    assert z[0, 2].item() == torch.finfo(torch.float32).min  # true class of the new block
    expected = math.log(math.exp(2) + 1 + math.e) - 2  # target: first block, class 0
    assert bct_ract_loss(influence, new, labels).item() == pytest.approx(expected, abs=1e-6)


def test_case22_true_class_new_logit_is_masked():
    g = torch.Generator().manual_seed(0)
    influence, new = torch.randn(5, 4, generator=g), torch.randn(5, 4, generator=g)
    labels = torch.tensor([0, 1, 2, 3, 1])
    base = bct_ract_loss(influence, new, labels)
    changed = new.clone()
    changed[torch.arange(5), labels] += 100.0
    assert bct_ract_loss(influence, changed, labels).item() == base.item()
    new.requires_grad_(True)
    bct_ract_loss(influence, new, labels).backward()
    assert (new.grad[torch.arange(5), labels] == 0).all()
    assert new.grad.abs().sum() > 0


def test_case22_never_below_plain_bct():
    g = torch.Generator().manual_seed(1)
    for _ in range(5):
        influence, new = torch.randn(8, 6, generator=g) * 3, torch.randn(8, 6, generator=g) * 3
        labels = torch.randint(0, 6, (8,), generator=g)
        per_sample = bct_ract_loss(influence, new, labels, reduction="none")
        bct = F.cross_entropy(influence, labels, reduction="none")
        assert (per_sample >= bct).all()


def test_shape_mismatch_raises():
    with pytest.raises(ValueError, match="one shape"):
        bct_ract_logits(torch.zeros(2, 3), torch.zeros(2, 4), torch.tensor([0, 1]))


def test_method_reuses_bct_rows_and_trains_only_the_new_model():
    ctx, images, labels = make_context(new_ids=(0, 1, 2, 3), old_ids=(2, 0, 1))
    bct = create_method(method_config_from_dict({"name": "bct"}), ctx)
    bct.on_train_start()
    method = create_method(method_config_from_dict({"name": "bct_ract"}), ctx)
    method.on_train_start()
    assert torch.equal(method.influence_head.weight, bct.influence_head.weight)
    out = method.step(MethodBatch(images, labels, 0, 0))
    out.total.backward()
    assert set(out.parts) == {"cls", "bct_ract"}
    assert method.influence_head.weight.grad is None
    assert ctx.model.backbone.weight.grad.abs().sum() > 0
    # total = cls + weight · comp, and comp ≥ the BCT influence loss of the same batch
    bct_parts = bct.step(MethodBatch(images, labels, 0, 0)).parts
    assert out.parts["bct_ract"] >= bct_parts["bct"]
    assert out.total.item() == pytest.approx(out.parts["cls"] + out.parts["bct_ract"], rel=1e-6)
