import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from compatkit.errors import UnknownNameError
from compatkit.models import (
    CLASSIFIERS,
    ArcFaceClassifier,
    CosFaceClassifier,
    CosineClassifier,
    EmbeddingHead,
    LinearClassifier,
    create_classifier,
)

# rows at angles with cos = 0.6, 1, 0 to the embedding (1, 0)
W = torch.tensor([[0.6, 0.8], [1.0, 0.0], [0.0, 1.0]])
E = torch.tensor([[2.0, 0.0]])


def _head(cls, **kwargs):
    head = cls(2, 3, **kwargs)
    with torch.no_grad():
        head.weight.copy_(W)
    return head


def test_embedding_head_shapes_and_bn_neck():
    plain, neck = EmbeddingHead(16, 4), EmbeddingHead(16, 4, bn_neck=True)
    x = torch.randn(5, 16)
    assert plain(x).shape == neck(x).shape == (5, 4)
    assert plain.fc.bias is not None and isinstance(plain.bn, nn.Identity)
    assert neck.fc.bias is None and isinstance(neck.bn, nn.BatchNorm1d)
    torch.testing.assert_close(neck(x).mean(0), torch.zeros(4), atol=1e-5, rtol=0)


def test_registry_and_normalized_flags():
    assert CLASSIFIERS.names() == ["arcface", "cosface", "cosine", "linear"]
    assert not LinearClassifier.normalized
    assert CosineClassifier.normalized and ArcFaceClassifier.normalized
    assert CosFaceClassifier.normalized
    for name in CLASSIFIERS.names():
        head = create_classifier(name, 8, 5)
        assert head.weight.shape == (5, 8)
        assert head(torch.randn(3, 8), torch.tensor([0, 4, 2])).shape == (3, 5)


def test_linear_gives_raw_logits_and_ignores_labels():
    head = _head(LinearClassifier)
    torch.testing.assert_close(head(E), torch.tensor([[1.2, 2.0, 0.0]]))
    torch.testing.assert_close(head(E, torch.tensor([0])), head(E))


def test_cosine_normalises_features_and_weights():
    head = _head(CosineClassifier, scale=10.0)
    torch.testing.assert_close(head(E), torch.tensor([[6.0, 10.0, 0.0]]))
    x = torch.randn(4, 2)
    with torch.no_grad():
        scaled = _head(CosineClassifier, scale=10.0)
        scaled.weight.mul_(torch.tensor([[3.0], [0.5], [7.0]]))
    torch.testing.assert_close(head(x), scaled(5 * x))
    assert head(x).abs().max() <= 10.0 + 1e-5


def test_arcface_margin_only_on_target():
    head = _head(ArcFaceClassifier)  # s = 30, m = 0.3
    plain = head(E)
    torch.testing.assert_close(plain, torch.tensor([[18.0, 30.0, 0.0]]))
    margin = head(E, torch.tensor([0]))
    # cos(θ + m) = cos θ cos m − sin θ sin m = 0.6·cos 0.3 − 0.8·sin 0.3 = 0.336786
    assert margin[0, 0].item() == pytest.approx(30 * 0.336786, abs=1e-4)
    torch.testing.assert_close(margin[0, 1:], plain[0, 1:])


def test_cosface_subtracts_margin_from_target_only():
    head = _head(CosFaceClassifier, scale=30.0, margin=0.3)
    out = head(E, torch.tensor([2]))
    torch.testing.assert_close(out, torch.tensor([[18.0, 30.0, 30 * (0.0 - 0.3)]]))
    torch.testing.assert_close(head(E), torch.tensor([[18.0, 30.0, 0.0]]))


def _reference_arcface_loss(emb, weight, labels, s=30.0, m=0.3):
    """float64 ArcFace without acos: cos(θ+m) = cos θ cos m − sqrt(1 − cos²θ) sin m."""
    cos = F.normalize(emb, dim=1) @ F.normalize(weight, dim=1).T
    onehot = F.one_hot(labels, weight.shape[0]).bool()
    target = cos * math.cos(m) - torch.sqrt(1 - cos**2) * math.sin(m)
    return F.cross_entropy(s * torch.where(onehot, target, cos), labels)


def test_arcface_loss_and_gradients_match_an_independent_formula():
    torch.manual_seed(0)
    head = ArcFaceClassifier(6, 4)
    emb = torch.randn(5, 6, requires_grad=True)
    labels = torch.tensor([0, 1, 2, 3, 1])
    loss = F.cross_entropy(head(emb, labels), labels)
    loss.backward()
    emb64 = emb.detach().double().requires_grad_(True)
    w64 = head.weight.detach().double().requires_grad_(True)
    ref = _reference_arcface_loss(emb64, w64, labels)
    ref.backward()
    assert loss.item() == pytest.approx(ref.item(), rel=1e-5)
    torch.testing.assert_close(emb.grad.double(), emb64.grad, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(head.weight.grad.double(), w64.grad, rtol=1e-4, atol=1e-6)


def _aligned_batch(dtype):
    """Embeddings equal to (cos = 1) or opposite to (cos = −1) their target rows."""
    weight = torch.tensor([[1.0, 0.0, 0.0], [0.0, 1.0, 0.0], [0.0, 0.0, 1.0]])
    emb = torch.stack([weight[0], -weight[1], weight[2] * 4]).to(dtype)
    return weight, emb.requires_grad_(True), torch.tensor([0, 1, 2])


@pytest.mark.parametrize("cls", [ArcFaceClassifier, CosFaceClassifier, CosineClassifier])
def test_margin_heads_are_finite_at_cos_plus_minus_one_in_float16(cls):
    weight, emb, labels = _aligned_batch(torch.float16)
    head = cls(3, 3).half()
    with torch.no_grad():
        head.weight.copy_(weight)
    logits = head(emb, labels)
    assert logits.dtype == torch.float32  # computed in float32
    loss = F.cross_entropy(logits, labels)
    loss.backward()
    assert torch.isfinite(loss)
    assert torch.isfinite(emb.grad).all() and torch.isfinite(head.weight.grad).all()


def test_arcface_is_finite_at_cos_plus_minus_one_under_bf16_autocast():
    weight, emb, labels = _aligned_batch(torch.float32)
    head = ArcFaceClassifier(3, 3)
    with torch.no_grad():
        head.weight.copy_(weight)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        logits = head(emb, labels)
        loss = F.cross_entropy(logits, labels)
    assert logits.dtype == torch.float32
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(logits).all()
    assert torch.isfinite(emb.grad).all() and torch.isfinite(head.weight.grad).all()
    # cos = 1 on the target: the margin still lowers the logit (clamped θ ≈ 0)
    assert logits[0, 0].item() == pytest.approx(30 * math.cos(0.3), abs=0.05)


def test_label_and_shape_errors():
    head = create_classifier("arcface", 4, 3)
    with pytest.raises(ValueError, match=r"\(B, 4\), got \(2, 5\)"):
        head(torch.randn(2, 5))
    with pytest.raises(ValueError, match=r"labels must have shape \(2,\), got \(2, 1\)"):
        head(torch.randn(2, 4), torch.zeros(2, 1, dtype=torch.long))
    with pytest.raises(TypeError, match=r"integer tensor.*float32"):
        head(torch.randn(2, 4), torch.zeros(2))
    with pytest.raises(ValueError, match="scale must be > 0"):
        create_classifier("cosine", 4, 3, scale=0)
    with pytest.raises(UnknownNameError, match="did you mean arcface"):
        create_classifier("arcfase", 4, 3)
    with pytest.raises(TypeError):
        create_classifier("linear", 4, 3, scale=30.0)


def test_scale_and_margin_keywords_reach_the_head():
    head = create_classifier("cosface", 2, 3, scale=5.0, margin=0.1)
    with torch.no_grad():
        head.weight.copy_(W)
    torch.testing.assert_close(head(E, torch.tensor([1])), torch.tensor([[3.0, 4.5, 0.0]]))
