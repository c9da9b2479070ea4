"""FastFill: the loss on hand-made values, the σ head, the method's step, and σ as a predictor of
the alignment error (fct-fastfill-peers.md §2.2, §6.2)."""

from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F

from compatkit.feature_upgrade import sigma_scores
from compatkit.methods.base import MethodBatch, MethodContext, create_method
from compatkit.methods.fastfill import (
    FastFill,
    FastFillConfig,
    alignment_loss,
    fastfill_loss,
    uncertainty_weighted_loss,
)
from compatkit.methods.fct import FCT, FCTConfig
from compatkit.models import Transformation

from .standins import IMAGE_SHAPE, StandinFrozen, StandinModel

NUM_CLASSES = 4


def test_loss_on_hand_made_values():
    """ℓ_sim = [0.5, 0]; LS-CE_0.1 = [0.226928, log 2]; s = [0, log 2]; μ_unc = 0.5.

    L = mean[½·0.726928 + 0, ½·½·0.693147 + ½·0.693147] = mean[0.363464, 0.519860].
    """
    pred = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    target = torch.tensor([[0.0, 0.0], [0.0, 1.0]])
    log_sigma = torch.tensor([[0.0], [math.log(2.0)]])
    logits = torch.tensor([[2.0, 0.0], [0.0, 0.0]])
    labels = torch.tensor([0, 1])
    loss = fastfill_loss(pred, target, log_sigma, logits, labels)
    assert loss.item() == pytest.approx(0.441662, abs=1e-6)
    # without the discriminative term: mean[½·0.5, ½·½·0 + ½·log 2]
    no_disc = fastfill_loss(pred, target, log_sigma, None, None)
    assert no_disc.item() == pytest.approx((0.25 + 0.5 * math.log(2)) / 2, abs=1e-6)
    assert fastfill_loss(pred, target, log_sigma, logits, labels, mu_disc=0.0).item() == \
        pytest.approx(no_disc.item(), abs=1e-7)


def test_uncertainty_optimum_is_log_of_loss_over_twice_mu():
    per_sample = torch.tensor([0.1, 1.0, 4.0])
    mu = 0.5
    s_star = torch.log(per_sample / (2 * mu)).unsqueeze(1).requires_grad_(True)
    uncertainty_weighted_loss(per_sample, s_star, mu_unc=mu).backward()
    assert torch.allclose(s_star.grad, torch.zeros(3, 1), atol=1e-7)
    # σ grows with the loss: the learned s orders samples by their alignment error
    s = torch.zeros(3, 1, requires_grad=True)
    opt = torch.optim.SGD([s], lr=1.0)
    for _ in range(300):
        opt.zero_grad()
        uncertainty_weighted_loss(per_sample, s, mu_unc=mu).backward()
        opt.step()
    assert torch.allclose(s.detach(), s_star.detach(), atol=1e-3)


def test_vector_sigma_broadcasts_the_per_sample_loss():
    per_sample = torch.tensor([1.0, 2.0])
    s = torch.tensor([[0.0, 1.0], [2.0, 0.0]])
    expected = sum(0.5 * math.exp(-s[i, k].item()) * per_sample[i].item() + 0.5 * s[i, k].item()
                   for i in range(2) for k in range(2)) / 4
    assert uncertainty_weighted_loss(per_sample, s).item() == pytest.approx(expected, rel=1e-6)
    with pytest.raises(ValueError, match="log_sigma"):
        uncertainty_weighted_loss(per_sample, s[0])


def test_alignment_variants_by_hand():
    pred = torch.tensor([[3.0, 0.0], [0.0, 2.0]])
    target = torch.tensor([[1.0, 0.0], [0.0, -2.0]])
    assert alignment_loss(pred, target, "mse").tolist() == [2.0, 8.0]
    assert alignment_loss(pred, target, "l1").tolist() == [1.0, 2.0]
    assert alignment_loss(pred, target, "cosine").tolist() == pytest.approx([0.0, 2.0])
    with pytest.raises(ValueError, match="similarity"):
        alignment_loss(pred, target, "l3")


def fastfill_context(cfg=None, *, new_classes=NUM_CLASSES, seed=0):
    torch.manual_seed(seed)
    old = StandinFrozen(StandinModel(6, 3))
    new = StandinFrozen(StandinModel(5, new_classes))
    cfg = cfg or FastFillConfig(inner=16)
    module = FastFill.build_trained_module(None, num_classes=NUM_CLASSES, in_chans=1,
                                           frozen={"new": new, "old": old}, method_cfg=cfg)
    ctx = MethodContext(model=module, forward=module, old_model=old,
                        old_manifest=SimpleNamespace(model_version="v1"),
                        class_ids=tuple(range(NUM_CLASSES)), device=torch.device("cpu"),
                        epochs=2, train_batches=lambda: iter(()), frozen={"new": new})
    return create_method(cfg, ctx), ctx


def test_sigma_head_is_present_for_fastfill_only():
    _, ctx = fastfill_context()
    assert ctx.model.sigma_head is not None and ctx.model.sigma_dim == 1
    _, wide = fastfill_context(FastFillConfig(inner=16, sigma_dim=5))
    assert wide.model.sigma_head.out_features == 5
    plain = FCT.build_trained_module(None, num_classes=4, in_chans=1, method_cfg=FCTConfig(),
                                     frozen={"old": ctx.old_model, "new": ctx.frozen["new"]})
    assert plain.sigma_head is None
    assert FastFillConfig().label_smoothing == 0.1
    assert (FastFillConfig().mu_disc, FastFillConfig().mu_unc) == (1.0, 0.5)


def test_step_equals_the_formula_with_the_frozen_new_classifier():
    method, ctx = fastfill_context()
    method.on_train_start()
    g = torch.Generator().manual_seed(3)
    images = torch.randn(8, *IMAGE_SHAPE, generator=g)
    labels = torch.arange(8) % NUM_CLASSES
    out = method.step(MethodBatch(images, labels, 0, 0))
    new = ctx.frozen["new"]
    with torch.no_grad():
        t = ctx.model(ctx.old_model.embed(images))
        ce = F.cross_entropy(t.embedding @ new.classifier.weight.T, labels, label_smoothing=0.1,
                             reduction="none")
        mse = ((t.embedding - new.embed(images)) ** 2).mean(1)
        expected = (0.5 * torch.exp(-t.log_sigma[:, 0]) * (mse + ce) + 0.5 * t.log_sigma[:, 0])
    assert out.total.item() == pytest.approx(expected.mean().item(), rel=1e-5)
    out.total.backward()
    assert ctx.model.sigma_head.weight.grad is not None
    assert new.classifier.weight.grad is None


def test_classifier_checks():
    method, _ = fastfill_context(new_classes=7)
    with pytest.raises(ValueError, match="7 classes"):
        method.on_train_start()
    method, _ = fastfill_context(FastFillConfig(inner=16, mu_disc=0.0), new_classes=7)
    method.on_train_start()  # no discriminative term: any classifier is fine


def test_learned_sigma_ranks_hard_samples_first():
    """Items whose new feature has an unpredictable part (old[:, 0] > 0) get a larger s(x)."""
    torch.set_num_threads(1)
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(0)
    old = torch.randn(600, 4, generator=g)
    hard = old[:, 0] > 0
    noise = torch.randn(600, 4, generator=g) * hard.unsqueeze(1)
    new = old + noise
    t = Transformation(4, 4, inner=32, sigma_dim=1)
    opt = torch.optim.Adam(t.parameters(), lr=3e-3)
    for _ in range(400):
        idx = torch.randperm(600, generator=g)[:128]
        out = t(old[idx])
        loss = fastfill_loss(out.embedding, new[idx], out.log_sigma)
        opt.zero_grad()
        loss.backward()
        opt.step()
    scores = sigma_scores(t, old.numpy())
    assert scores.shape == (600,)
    order = torch.from_numpy(scores).argsort(descending=True)
    first_half_hard = hard[order[:300]].float().mean().item()
    assert first_half_hard > 0.9


def test_fastfill_run_yields_a_backfill_order(tmp_path):
    """A tiny loop run: σ head in the artifact, σ scores from the stored old features."""
    from compatkit.artifacts import load_module
    from compatkit.train.loop import train
    from compatkit.train.prepare import evaluation_images

    from .test_fct import TRANSFORM, _embed, tiny_config

    torch.set_num_threads(1)
    old = train(tiny_config("name=old", "data.side=old", "train.epochs=1"), tmp_path / "old")
    new = train(tiny_config("name=new", "train.epochs=1"), tmp_path / "new")
    result = train(tiny_config("name=ff", "method={name: fastfill, inner: 32}", "train.epochs=1",
                               *TRANSFORM, f"old_model={old.artifact_dir}",
                               f"frozen_models.new={new.artifact_dir}"), tmp_path / "ff")
    assert result.manifest.method == "fastfill"
    assert {"fastfill", "sim", "log_sigma"} <= set(result.history[0])
    module, _ = load_module(result.artifact_dir)
    assert module.sigma_dim == 1
    gallery = _embed(old.artifact_dir, evaluation_images(tiny_config().data))
    scores = sigma_scores(module, gallery.features)
    assert scores.shape == (len(gallery.features),) and scores.std() > 0
