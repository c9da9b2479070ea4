"""PCT focal distillation (case 23) and OpenCompatible's ``pct_oc``."""

from __future__ import annotations

import math

import pytest
import torch

from compatkit.errors import MethodNotApplicableError
from compatkit.methods.base import MethodBatch, create_method, method_config_from_dict
from compatkit.methods.pct import (
    FocalDistillationLoss,
    focal_feature_l2,
    focal_weights,
    focus_mask,
    logit_distillation,
)

from .standins import make_context


def test_case23_weights():
    weights = focal_weights(torch.tensor([True, False]), alpha=1.0, beta=5.0)
    assert weights.tolist() == [6.0, 1.0]


def test_case23_beta_zero_is_alpha_times_plain_distillation():
    g = torch.Generator().manual_seed(0)
    new, old = torch.randn(4, 5, generator=g), torch.randn(4, 5, generator=g)
    focus = torch.tensor([True, False, True, True])
    plain = logit_distillation(new, old, temperature=3.0).mean()
    got = FocalDistillationLoss(alpha=2.0, beta=0.0, temperature=3.0)(new, old, focus)
    assert got.item() == pytest.approx(2.0 * plain.item(), rel=1e-6)
    weighted = FocalDistillationLoss(alpha=1.0, beta=5.0, temperature=3.0)(new, old, focus,
                                                                           reduction="none")
    per_sample = logit_distillation(new, old, temperature=3.0)
    assert torch.allclose(weighted, torch.tensor([6.0, 1.0, 6.0, 6.0]) * per_sample)


@pytest.mark.parametrize("temperature", [1.0, 2.0])
def test_kl_hand_value_with_t_squared(temperature):
    new = torch.tensor([[0.0, 0.0]])
    old = torch.tensor([[math.log(3.0), 0.0]])
    a = 3.0 ** (1.0 / temperature)
    p = [a / (a + 1), 1 / (a + 1)]
    kl = sum(pi * math.log(pi / 0.5) for pi in p)
    got = logit_distillation(new, old, temperature=temperature)
    assert got.item() == pytest.approx(temperature**2 * kl, rel=1e-5)


def test_lm_distance_and_no_gradient_to_old():
    new = torch.tensor([[1.0, 2.0]], requires_grad=True)
    old = torch.tensor([[0.0, 0.0]], requires_grad=True)
    d = logit_distillation(new, old, distance="lm")
    assert d.item() == pytest.approx(0.5 * (1 + 4) / 2)
    d.sum().backward()
    assert old.grad is None and new.grad is not None


def test_focus_types():
    old_ok = torch.tensor([True, True, False, False])
    new_ok = torch.tensor([True, False, True, False])
    assert focus_mask("old_correct", old_correct=old_ok, new_correct=new_ok).tolist() == [
        True, True, False, False]
    assert focus_mask("neg_flip", old_correct=old_ok, new_correct=new_ok).tolist() == [
        False, True, False, False]
    assert focus_mask("new_incorrect", old_correct=old_ok, new_correct=new_ok).tolist() == [
        False, True, False, True]
    with pytest.raises(ValueError, match="focus must be"):
        focus_mask("old", old_correct=old_ok, new_correct=new_ok)


def test_bad_arguments():
    with pytest.raises(ValueError, match="distance must be"):
        FocalDistillationLoss(distance="l1")
    with pytest.raises(ValueError, match="one shape"):
        logit_distillation(torch.zeros(2, 3), torch.zeros(2, 4))


def test_focal_feature_l2_hand_value():
    new = torch.tensor([[1.0, 2.0], [0.0, 0.0]])
    old = torch.zeros(2, 2)
    got = focal_feature_l2(new, old, torch.tensor([True, False]), alpha=1.0, beta=5.0)
    assert got.item() == pytest.approx((6 * 2.5 + 1 * 0.0) / 2)


class _Recorder(torch.nn.Module):
    """Wraps a loss and records its inputs."""

    def __init__(self, loss):
        super().__init__()
        self.inner, self.calls = loss, []

    def forward(self, *args, **kwargs):
        self.calls.append(args)
        return self.inner(*args, **kwargs)


def test_pct_weight_follows_the_old_model_and_maps_classes_by_id():
    ctx, images, labels = make_context(new_ids=(0, 1, 2, 3), old_ids=(2, 0, 1), seed=3, n=32)
    method = create_method(method_config_from_dict({"name": "pct", "temperature": 2.0}), ctx)
    method.on_train_start()
    method.loss = _Recorder(method.loss)
    out = method.step(MethodBatch(images, labels, 0, 0))
    new_logits_seen, old_logits_seen, focus = method.loss.calls[0]

    old_logits = ctx.old_model(images).logits
    old_pred = torch.tensor((2, 0, 1))[old_logits.argmax(1)]
    old_correct = old_pred == labels  # new ids are 0..3, so rows equal global ids
    with torch.no_grad():
        new_logits = ctx.model(images).logits
    new_correct = new_logits.argmax(1) == labels
    assert (old_correct != new_correct).any()  # the test can tell the two apart
    assert torch.equal(focus, old_correct)
    # shared classes 0, 1, 2: new rows [0, 1, 2] against old rows [1, 2, 0]
    assert torch.allclose(old_logits_seen, old_logits[:, [1, 2, 0]])
    assert torch.allclose(new_logits_seen.detach(), new_logits[:, [0, 1, 2]])
    out.total.backward()
    assert ctx.model.backbone.weight.grad.abs().sum() > 0
    assert all(p.grad is None for p in ctx.old_model.parameters())


def test_pct_refuses_open_class_and_missing_old_classifier():
    ctx, _, _ = make_context(new_ids=(5, 6), old_ids=(0, 1))
    with pytest.raises(MethodNotApplicableError, match="open-class"):
        create_method(method_config_from_dict({"name": "pct"}), ctx).on_train_start()
    ctx, _, _ = make_context(old_classifier=False)
    with pytest.raises(ValueError, match="classifier") as missing:
        create_method(method_config_from_dict({"name": "pct"}), ctx).on_train_start()
    assert not isinstance(missing.value, MethodNotApplicableError)  # a broken input, not a split


def test_pct_oc_uses_new_model_correctness_and_raw_features():
    ctx, images, labels = make_context(seed=3, n=32)
    method = create_method(method_config_from_dict({"name": "pct_oc"}), ctx)
    method.on_train_start()
    out = method.step(MethodBatch(images, labels, 0, 0))
    with torch.no_grad():
        new = ctx.model(images)
    old = ctx.old_model(images)
    new_correct = new.logits.argmax(1) == labels
    expected = focal_feature_l2(new.feature, old.feature, new_correct)
    assert out.parts["pct_oc"] == pytest.approx(expected.item(), rel=1e-6)
    ctx_bad, _, _ = make_context(dim=6, old_dim=4)
    with pytest.raises(ValueError, match="equal dimensions"):
        create_method(method_config_from_dict({"name": "pct_oc"}), ctx_bad).on_train_start()
