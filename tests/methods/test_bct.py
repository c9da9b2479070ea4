"""BCT influence loss: reference methods.md §7 case 21, plus the synthesis helpers."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from compatkit.methods import MethodBatch, MethodContext, create_method, method_config_from_dict
from compatkit.methods.bct import (
    class_mean_features,
    influence_weight,
    synthesize_new_class_rows,
)
from compatkit.models import FrozenModel, create_model


def _model(num_classes: int, classifier: str = "linear", seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return create_model(backbone="resnet10_cifar", width=0.125, embed_dim=8, in_chans=1,
                        num_classes=num_classes, classifier=classifier)


class _OldManifest:
    def __init__(self, class_ids):
        self.class_ids = tuple(class_ids)


def _context(new, old, old_ids, new_ids, images, labels):
    def batches():
        yield images, labels

    return MethodContext(model=new, forward=new, old_model=FrozenModel(old),
                         old_manifest=_OldManifest(old_ids), class_ids=tuple(new_ids),
                         device=torch.device("cpu"), epochs=1, train_batches=batches)


def test_class_mean_features_streams_batches():
    feats = torch.tensor([[1.0, 0.0], [3.0, 2.0], [0.0, 4.0]])
    labels = torch.tensor([0, 0, 2])
    means, counts = class_mean_features([(feats[:2], labels[:2]), (feats[2:], labels[2:])], 3, 2)
    assert torch.allclose(means, torch.tensor([[2.0, 1.0], [0.0, 0.0], [0.0, 4.0]]))
    assert counts.tolist() == [2.0, 0.0, 1.0]


def test_synthesized_rows_are_class_means_normalised_only_for_normalised_classifiers():
    means = torch.tensor([[3.0, 4.0], [1.0, 1.0], [0.0, 2.0]])
    raw = synthesize_new_class_rows(means, [5, 7, 9], old_class_ids=[7], normalize=False)
    assert set(raw) == {5, 9}
    assert torch.equal(raw[5], means[0])
    normed = synthesize_new_class_rows(means, [5, 7, 9], old_class_ids=[7], normalize=True)
    assert torch.allclose(normed[5], torch.tensor([0.6, 0.8]))
    assert torch.allclose(normed[9], torch.tensor([0.0, 1.0]))


def test_influence_weight_keeps_old_rows_and_appends_synthesized():
    old_w = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    w = influence_weight(old_w, [3, 1], [1, 2, 3], {2: torch.tensor([0.5, 0.5])})
    assert torch.equal(w, torch.tensor([[0.0, 1.0], [0.5, 0.5], [1.0, 0.0]]))


def test_influence_weight_raises_for_a_class_without_any_row():
    with pytest.raises(ValueError, match="class 4 has neither"):
        influence_weight(torch.eye(2), [0, 1], [0, 4], {})


@pytest.mark.parametrize("classifier", ["linear", "cosine"])
def test_bct_step_no_gradient_to_old_classifier_and_synthesis(classifier):
    old = _model(2, classifier, seed=1)
    new = _model(3, classifier, seed=2)
    torch.manual_seed(0)
    images = torch.randn(6, 1, 16, 16)
    labels = torch.tensor([0, 0, 1, 1, 2, 2])  # rows of new classes (10, 11, 12)
    old_w_before = old.classifier.weight.detach().clone()
    ctx = _context(new, old, old_ids=[11, 10], new_ids=[10, 11, 12], images=images,
                   labels=labels)
    method = create_method(method_config_from_dict({"name": "bct"}), ctx)
    method.on_train_start()
    w = method.influence_head.weight
    assert not w.requires_grad
    # old rows are the old classifier's rows, mapped by global class id
    assert torch.equal(w[0], old_w_before[1])
    assert torch.equal(w[1], old_w_before[0])
    # class 12 is unknown to the old model: its row is the mean old feature of its images
    with torch.no_grad():
        old_feats = old.raw_embedding(images[4:])
    expected = old_feats.mean(0)
    if classifier == "cosine":
        expected = F.normalize(expected, dim=0)
    assert torch.allclose(w[2], expected, atol=1e-5)

    out = method.step(MethodBatch(images, labels, 0, 0))
    out.total.backward()
    assert set(out.parts) == {"cls", "bct"}
    assert old.classifier.weight.grad is None
    assert torch.equal(old.classifier.weight, old_w_before)
    assert new.classifier.weight.grad is not None
    assert all(p.grad is None for p in old.parameters())


def test_bct_refuses_new_classes_when_synthesis_is_off():
    old, new = _model(2, seed=1), _model(3, seed=2)
    images, labels = torch.randn(3, 1, 16, 16), torch.tensor([0, 1, 2])
    ctx = _context(new, old, [0, 1], [0, 1, 2], images, labels)
    method = create_method(
        method_config_from_dict({"name": "bct", "synthesize_new_classes": False}), ctx
    )
    with pytest.raises(ValueError, match="synthesize_new_classes is false"):
        method.on_train_start()


def test_bct_needs_an_old_model():
    new = _model(3)
    ctx = MethodContext(model=new, forward=new, old_model=None, old_manifest=None,
                        class_ids=(0, 1, 2), device=torch.device("cpu"), epochs=1,
                        train_batches=lambda: iter(()))
    with pytest.raises(ValueError, match="needs an old model"):
        create_method(method_config_from_dict({"name": "bct"}), ctx)
