"""lwf: soft cross-entropy from the old classifier's posterior on old features."""

from __future__ import annotations

import math

import pytest
import torch

from compatkit.methods.base import MethodBatch, create_method, method_config_from_dict
from compatkit.methods.lwf import LwFConfig, LwFLoss

from .standins import make_context


def test_hand_value_softmax_over_classes():
    old = torch.tensor([[math.log(3.0), 0.0], [0.0, 0.0]])
    new = torch.tensor([[0.0, 0.0], [2.0, 0.0]])
    got = LwFLoss(temperature=1.0, distillation_temperature=1.0)(new, old, reduction="none")
    # row 0: target (3/4, 1/4), prediction (1/2, 1/2) -> log 2
    # row 1: target (1/2, 1/2), prediction softmax(2, 0)
    log_p = [2 - math.log(math.exp(2) + 1), -math.log(math.exp(2) + 1)]
    assert got.tolist() == pytest.approx([math.log(2), -0.5 * sum(log_p)], abs=1e-6)


def test_temperatures_apply_to_their_own_side():
    old = torch.tensor([[2.0, 0.0]])
    new = torch.tensor([[1.0, 0.0]])
    got = LwFLoss(temperature=0.5, distillation_temperature=4.0)(new, old)
    target = torch.softmax(old / 4.0, dim=1)
    expected = -(target * torch.log_softmax(new / 0.5, dim=1)).sum()
    assert got.item() == pytest.approx(expected.item(), rel=1e-6)


def test_defaults_and_bad_temperature():
    assert LwFConfig().temperature == 2.0 and LwFConfig().distillation_temperature == 2.0
    with pytest.raises(ValueError, match="temperatures must be > 0"):
        LwFLoss(temperature=0.0)


def test_method_trains_new_model_through_frozen_old_classifier():
    ctx, images, labels = make_context(normalized=True)
    method = create_method(method_config_from_dict({"name": "lwf"}), ctx)
    method.on_train_start()
    out = method.step(MethodBatch(images, labels, 0, 0))
    out.total.backward()
    old = ctx.old_model
    with torch.no_grad():
        feature = ctx.model(images).feature
    expected = LwFLoss()(old.classifier(feature), old(images).logits)
    assert out.parts["lwf"] == pytest.approx(expected.item(), rel=1e-6)
    assert all(p.grad is None for p in old.parameters())
    assert all(p.grad is None for p in method.old_head.parameters())
    assert ctx.model.backbone.weight.grad.abs().sum() > 0


def test_method_needs_old_classifier_and_equal_dims():
    ctx, _, _ = make_context(old_classifier=False)
    with pytest.raises(ValueError, match="classifier"):
        create_method(method_config_from_dict({"name": "lwf"}), ctx).on_train_start()
    ctx, _, _ = make_context(dim=6, old_dim=5)
    with pytest.raises(ValueError, match="equal dimensions"):
        create_method(method_config_from_dict({"name": "lwf"}), ctx).on_train_start()
