"""BiCT stage two: the forward transformation's losses, build and relations (methods.md §2.5)."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F

from compatkit.methods.base import MethodBatch, MethodContext, create_method
from compatkit.methods.bict import BiCT, BiCTConfig

from .standins import IMAGE_SHAPE, StandinFrozen, StandinModel

NUM_CLASSES = 4


def bict_context(cfg=None, *, d_old=6, d_new=6, seed=0):
    torch.manual_seed(seed)
    old = StandinFrozen(StandinModel(d_old, 3))
    new = StandinFrozen(StandinModel(d_new, NUM_CLASSES))
    cfg = cfg or BiCTConfig(inner=16)
    module = BiCT.build_trained_module(None, num_classes=NUM_CLASSES, in_chans=1,
                                       frozen={"old": old, "new": new}, method_cfg=cfg)
    ctx = MethodContext(model=module, forward=module, old_model=old,
                        old_manifest=SimpleNamespace(model_version="v1"),
                        class_ids=tuple(range(NUM_CLASSES)), device=torch.device("cpu"),
                        epochs=2, train_batches=lambda: iter(()), frozen={"new": new})
    return create_method(cfg, ctx), ctx


def _batch():
    g = torch.Generator().manual_seed(5)
    return MethodBatch(torch.randn(8, *IMAGE_SHAPE, generator=g),
                       torch.arange(8) % NUM_CLASSES, 0, 0)


def _reference(ctx, images):
    with torch.no_grad():  # train-mode BN on the same batch gives the step's values
        pred = ctx.model(ctx.old_model.embed(images)).embedding
    return pred, ctx.frozen["new"].embed(images)


def test_defaults_follow_the_reference():
    cfg = BiCTConfig()
    assert (cfg.regression, cfg.cls_weight, cfg.inner) == ("mse", 0.0, 2048)
    assert BiCT.artifact_kind == "transformation" and BiCT.needs_old_model


def test_build_has_no_side_branch_and_refuses_side_info():
    _, ctx = bict_context(d_old=6, d_new=5)
    assert (ctx.model.d_old, ctx.model.d_new, ctx.model.side_branch) == (6, 5, None)
    with pytest.raises(ValueError, match="no side-information"):
        BiCT.build_trained_module(None, num_classes=4, in_chans=1, method_cfg=BiCTConfig(),
                                  frozen={"old": ctx.old_model, "new": ctx.frozen["new"],
                                          "side": ctx.old_model})


@pytest.mark.parametrize("regression", ["mse", "cosine", "mse+cosine"])
def test_regression_terms(regression):
    method, ctx = bict_context(BiCTConfig(inner=16, regression=regression))
    b = _batch()
    out = method.step(b)
    pred, target = _reference(ctx, b.images)
    mse = F.mse_loss(pred, target).item()
    cos = (1 - F.cosine_similarity(pred, target, dim=1)).mean().item()
    expected = {"mse": mse, "cosine": cos, "mse+cosine": mse + cos}[regression]
    assert out.total.item() == pytest.approx(expected, rel=1e-5)
    assert set(out.parts) == set(regression.split("+"))


def test_classification_term_goes_through_the_frozen_new_classifier():
    method, ctx = bict_context(BiCTConfig(inner=16, cls_weight=0.5, label_smoothing=0.1))
    method.on_train_start()
    b = _batch()
    out = method.step(b)
    pred, target = _reference(ctx, b.images)
    ce = F.cross_entropy(pred @ ctx.frozen["new"].classifier.weight.T, b.labels,
                         label_smoothing=0.1)
    assert out.total.item() == pytest.approx(F.mse_loss(pred, target).item() + 0.5 * ce.item(),
                                             rel=1e-5)
    out.total.backward()
    assert ctx.frozen["new"].classifier.weight.grad is None


def test_classification_term_needs_a_matching_classifier():
    torch.manual_seed(0)
    method, ctx = bict_context(BiCTConfig(inner=16, cls_weight=1.0))
    ctx.frozen["new"] = StandinFrozen(StandinModel(6, NUM_CLASSES + 1))
    with pytest.raises(ValueError, match="classifier"):
        method.on_train_start()


def test_relations_and_evaluation():
    rel = BiCT.relations(SimpleNamespace(model_version="bct-v1"),
                         {"new": SimpleNamespace(model_version="bct-v2")})
    assert rel == {"transforms_from": "bct-v1", "transforms_to": "bct-v2"}
    method, _ = bict_context()
    assert set(method.evaluation_embedders().galleries) == {"self", "cross", "transformed"}
