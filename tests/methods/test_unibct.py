"""UniBCT prototype refinement and method: reference methods.md §7 cases 25–30."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from compatkit.methods.base import MethodBatch, create_method, method_config_from_dict
from compatkit.methods.unibct import build_prototypes, propagation_matrix, refine_prototypes

from .standins import make_context

V0 = torch.tensor([[1.0, 0.0], [0.9, 0.1], [0.0, 1.0]])
NEW29 = F.normalize(torch.tensor([[1.0, 0.0], [0.995, 0.0999], [0.0, 1.0]]), dim=1)


def _random(n, d, seed):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, d, generator=g), torch.randn(n, d, generator=g)


def test_case25_lambda_zero_is_the_plain_mean():
    old, new = _random(5, 3, 0)
    proto, weights = refine_prototypes(old, new, lam=0.0)
    assert torch.allclose(proto, old.mean(0), atol=1e-6)
    assert torch.allclose(weights, torch.full((5,), 0.2, dtype=torch.float64))


@pytest.mark.parametrize("lam", [0.5, 0.9])
@pytest.mark.parametrize("tau", [0.05, 1.0])
def test_case26_identical_vertices(lam, tau):
    v = torch.tensor([0.3, -1.2, 2.0])
    _, new = _random(4, 5, 1)
    proto, _ = refine_prototypes(v.expand(4, 3), new, lam=lam, tau=tau)
    assert torch.allclose(proto, v, atol=1e-6)


def test_case27_single_sample_class():
    old = torch.tensor([[0.4, -0.7]])
    proto, weights = refine_prototypes(old, torch.tensor([[1.0, 2.0]]))
    assert torch.equal(proto, old[0]) and weights.tolist() == [1.0]
    assert torch.isfinite(proto).all()


@pytest.mark.parametrize("lam", [0.0, 0.5, 0.9, 0.99])
def test_case28_rows_sum_to_one(lam):
    _, new = _random(7, 4, 2)
    m = propagation_matrix(new, lam=lam, tau=0.05)
    assert torch.allclose(m.sum(1), torch.ones(7, dtype=torch.float64), atol=1e-10)
    assert (m >= -1e-12).all()


def test_case29_outlier_down_weighting_and_the_column_softmax_trap():
    proto, weights = refine_prototypes(V0, NEW29, lam=0.9, tau=0.05)
    assert weights.tolist() == pytest.approx([0.4773, 0.4893, 0.0333], abs=1e-4)
    assert proto.tolist() == pytest.approx([0.9177, 0.0823], abs=1e-4)
    # the third-party column softmax: weights uniform, prototype = plain mean (0.6333, 0.3667)
    x = NEW29.double()
    s = (x @ x.T / 0.05).masked_fill(torch.eye(3, dtype=torch.bool), float("-inf"))
    m_col = 0.1 * torch.linalg.inv(torch.eye(3, dtype=torch.float64) - 0.9 * s.softmax(dim=0))
    column_proto = m_col.mean(0) @ V0.double()
    assert column_proto.tolist() == pytest.approx([0.6333, 0.3667], abs=1e-4)
    assert (proto.double() - column_proto).abs().max() > 0.2


def test_normalize_new_matters_for_raw_features():
    old, new = _random(5, 3, 3)
    a, _ = refine_prototypes(old, new * 10, normalize_new=True)
    b, _ = refine_prototypes(old, new, normalize_new=True)
    c, _ = refine_prototypes(old, new * 10, normalize_new=False)
    assert torch.allclose(a, b, atol=1e-6) and not torch.allclose(a, c, atol=1e-3)


@pytest.mark.parametrize(("n", "cap", "sizes"), [(6, 3, (3, 3)), (7, 3, (3, 2, 2))])
def test_large_classes_are_chunked_and_size_weighted(n, cap, sizes):
    old, new = _random(n, 3, 4)
    proto, weights = refine_prototypes(old, new, max_class_size=cap)
    expected, start = torch.zeros(3, dtype=torch.float64), 0
    for size in sizes:
        part, _ = refine_prototypes(old[start:start + size], new[start:start + size])
        expected += part.double() * size / n
        start += size
    assert torch.allclose(proto.double(), expected, atol=1e-6)
    assert weights.sum().item() == pytest.approx(1.0)
    assert not torch.allclose(proto, refine_prototypes(old, new)[0], atol=1e-4)


def test_refine_rejects_bad_arguments():
    with pytest.raises(ValueError, match="lam must be in"):
        refine_prototypes(V0, NEW29, lam=1.0)
    with pytest.raises(ValueError, match="same n"):
        refine_prototypes(V0, NEW29[:2])


def test_build_prototypes_plain_and_refined():
    old, new = _random(9, 2, 5)
    labels = torch.tensor([0, 2, 0, 2, 0, 2, 2, 0, 0])  # class 1 has no sample
    batches = [(old[i:i + 4], new[i:i + 4], labels[i:i + 4]) for i in range(0, 9, 4)]
    plain = build_prototypes(batches, 3, refine=False)
    assert torch.allclose(plain[0], old[labels == 0].mean(0), atol=1e-6)
    assert torch.equal(plain[1], torch.zeros(2))
    refined = build_prototypes(batches, 3, refine=True)
    for c in (0, 2):
        rows = labels == c
        assert torch.allclose(refined[c], refine_prototypes(old[rows], new[rows])[0], atol=1e-6)
    assert torch.equal(refined[1], torch.zeros(2))
    with pytest.raises(ValueError, match="empty"):
        build_prototypes([], 3, refine=True)


def test_case30_schedule_recomputes_with_the_current_new_model():
    ctx, images, labels = make_context(new_ids=(3, 4, 5), old_ids=(0, 1), old_classifier=False)
    method = create_method(method_config_from_dict({"name": "unibct", "refine_epochs": [1]}), ctx)
    method.on_train_start()
    method.on_epoch_start(0)
    old_feats = ctx.old_model(images).feature
    means = torch.stack([old_feats[labels == c].mean(0) for c in range(3)])
    assert torch.allclose(method.prototypes, means, atol=1e-6)  # epoch 0: plain means

    with torch.no_grad():
        ctx.model.backbone.weight.mul_(-0.5).add_(0.3)
    ctx.model.train()
    method.on_epoch_start(1)
    assert ctx.model.training
    with torch.no_grad():
        new_feats = ctx.model(images).feature
    expected = build_prototypes([(old_feats, new_feats, labels)], 3, refine=True)
    assert torch.allclose(method.prototypes, expected, atol=1e-6)
    assert not torch.allclose(method.prototypes, means, atol=1e-3)
    assert int(method.built_epoch) == 1

    out = method.step(MethodBatch(images, labels, 1, 0))
    out.total.backward()
    assert not method.prototypes.requires_grad and method.prototypes.grad is None
    assert ctx.model.backbone.weight.grad.abs().sum() > 0
    assert "built_epoch" in method.state_dict() and "prototype_head.weight" in method.state_dict()


@pytest.mark.parametrize("form", ["dot", "cosine", "arcface"])
def test_logit_forms(form):
    ctx, images, labels = make_context(seed=2)
    cfg = {"name": "unibct", "logits": form, "scale": 16.0, "margin": 0.2}
    method = create_method(method_config_from_dict(cfg), ctx)
    method.on_train_start()
    method.on_epoch_start(0)
    out = method.step(MethodBatch(images, labels, 0, 0))
    with torch.no_grad():
        feature = ctx.model(images).feature
    p = method.prototypes
    if form == "dot":
        logits = feature @ p.T
    else:
        cos = F.normalize(feature, dim=1) @ F.normalize(p, dim=1).T
        if form == "arcface":
            theta = torch.acos(cos.gather(1, labels[:, None]).clamp(-1 + 1e-6, 1 - 1e-6))
            cos = cos.scatter(1, labels[:, None], torch.cos(theta + 0.2))
        logits = 16.0 * cos
    assert out.parts["unibct"] == pytest.approx(F.cross_entropy(logits, labels).item(), rel=1e-5)


def test_warmup_gives_weight_zero_and_builds_late():
    ctx, images, labels = make_context()
    cfg = {"name": "unibct", "warmup_compat_epochs": 2, "refine_epochs": [1]}
    method = create_method(method_config_from_dict(cfg), ctx)
    method.on_train_start()
    for epoch in (0, 1):
        method.on_epoch_start(epoch)
        out = method.step(MethodBatch(images, labels, epoch, 0))
        assert out.parts["unibct"] == 0.0 and int(method.built_epoch) == -1
    method.on_epoch_start(2)  # refine epoch 1 is due: refined prototypes at the first use
    assert int(method.built_epoch) == 2
    old_feats = ctx.old_model(images).feature
    with torch.no_grad():
        new_feats = ctx.model(images).feature
    expected = build_prototypes([(old_feats, new_feats, labels)], 4, refine=True)
    assert torch.allclose(method.prototypes, expected, atol=1e-6)


def test_step_before_prototypes_raises_and_dims_checked():
    ctx, images, labels = make_context()
    method = create_method(method_config_from_dict({"name": "unibct"}), ctx)
    with pytest.raises(RuntimeError, match="prototypes not built"):
        method.step(MethodBatch(images, labels, 0, 0))
    ctx, _, _ = make_context(dim=6, old_dim=4)
    with pytest.raises(ValueError, match="equal dimensions"):
        create_method(method_config_from_dict({"name": "unibct"}), ctx).on_train_start()
