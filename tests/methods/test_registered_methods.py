"""Every method of this package: one step on stand-ins; weight 0 equals independent (case 24)."""

from __future__ import annotations

import pytest
import torch

import compatkit.methods.bct_ract
import compatkit.methods.contrastive
import compatkit.methods.lwf
import compatkit.methods.pct
import compatkit.methods.triplet
import compatkit.methods.unibct  # noqa: F401  (registers the methods)
from compatkit.methods import independent  # noqa: F401
from compatkit.methods.base import METHODS, MethodBatch, create_method, method_config_from_dict

from .standins import make_context

NAMES = ["contra", "ract", "triplet", "triplet_ract", "bct_ract", "unibct", "pct", "pct_oc",
         "lwf"]


def test_all_names_are_registered_with_strict_configs():
    for name in NAMES:
        assert name in METHODS
        with pytest.raises(ValueError, match="temprature"):
            method_config_from_dict({"name": name, "temprature": 0.05})


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("normalized", [False, True])
def test_one_step_reaches_only_the_new_model(name, normalized):
    ctx, images, labels = make_context(normalized=normalized)
    method = create_method(method_config_from_dict({"name": name}), ctx)
    method.on_train_start()
    method.on_epoch_start(0)
    out = method.step(MethodBatch(images[:8], labels[:8], 0, 0))
    assert out.total.ndim == 0 and torch.isfinite(out.total)
    assert set(out.parts) == {"cls", name}
    out.total.backward()
    grads = [p.grad for p in ctx.model.parameters()]
    assert all(g is not None and torch.isfinite(g).all() for g in grads)
    assert ctx.model.backbone.weight.grad.abs().sum() > 0
    assert all(p.grad is None for p in ctx.old_model.parameters())
    assert all(p.grad is None for p in method.parameters())


@pytest.mark.parametrize("name", ["contra", "ract", "triplet_ract", "unibct", "pct", "lwf"])
def test_case24_weight_zero_reproduces_independent_training(name):
    def train(cfg):
        ctx, images, labels = make_context(seed=7)
        method = create_method(method_config_from_dict(cfg), ctx)
        method.on_train_start()
        method.on_epoch_start(0)
        opt = torch.optim.SGD(ctx.model.parameters(), lr=0.5)
        for step in range(2):
            opt.zero_grad()
            sl = slice(8 * step, 8 * step + 8)
            method.step(MethodBatch(images[sl], labels[sl], 0, step)).total.backward()
            opt.step()
        return [p.detach().clone() for p in ctx.model.parameters()]

    reference = train({"name": "independent"})
    zero = train({"name": name, "weight": 0.0})
    one = train({"name": name})
    assert all(torch.equal(a, b) for a, b in zip(reference, zero, strict=True))
    assert not all(torch.equal(a, b) for a, b in zip(reference, one, strict=True))
