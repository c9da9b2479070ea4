import pytest
import torch
import torch.nn.functional as F
from torch import nn

from compatkit.models import FrozenModel, ModelOutput, create_model

SMALL = {"backbone": "resnet10_cifar", "width": 0.125, "embed_dim": 8, "num_classes": 4}


def _snapshot(module):
    return {k: v.clone() for k, v in module.state_dict().items()}


def test_case_35_old_model_stays_frozen_through_training():
    # reference/methods.md §7 case 35
    torch.manual_seed(0)
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(6, 3, 16, 16, generator=gen)
    labels = torch.tensor([0, 1, 2, 3, 0, 1])
    old_model = create_model(**SMALL, bn_neck=True)
    old_model.train()
    for _ in range(2):  # non-trivial BN statistics, as after the old model's training
        old_model(x + 1.0)
    frozen = FrozenModel(old_model)
    new_model = create_model(**SMALL, bn_neck=True)
    parent = nn.ModuleDict({"new": new_model, "old": frozen})
    parent.train()  # a trainer switching everything to training mode

    assert not any(p.requires_grad for p in frozen.parameters())
    assert not frozen.training and not any(m.training for m in frozen.modules())
    before_state = _snapshot(frozen)
    before_out = frozen(x)

    optimizer = torch.optim.SGD(new_model.parameters(), lr=0.1)
    for _ in range(2):
        new_out = new_model(x)
        old_emb = frozen.embed(x)
        compat = (new_out.embedding - old_emb).square().sum()
        loss = F.cross_entropy(new_out.logits, labels) + compat
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()

    after_state = frozen.state_dict()
    for key, value in before_state.items():
        assert torch.equal(value, after_state[key]), key  # incl. BN running stats and counters
    assert all(p.grad is None for p in frozen.parameters())
    after_out = frozen(x)
    assert torch.equal(before_out.embedding, after_out.embedding)
    assert torch.equal(before_out.logits, after_out.logits)
    assert new_model.training  # only the old model is pinned to eval mode


def test_train_true_cannot_unfreeze():
    frozen = FrozenModel(create_model(**SMALL))
    assert frozen.train(True) is frozen
    assert not frozen.training and not frozen.module.backbone.bn1.training


def test_outputs_are_detached_even_for_inputs_with_grad():
    frozen = FrozenModel(create_model(**SMALL))
    x = torch.randn(2, 3, 16, 16, requires_grad=True)
    out = frozen(x)
    assert isinstance(out, ModelOutput)
    assert not out.embedding.requires_grad and not out.logits.requires_grad
    assert not frozen.embed(x).requires_grad


def test_attributes_are_read_from_the_wrapped_model():
    model = create_model(**SMALL)
    frozen = FrozenModel(model)
    assert frozen.classifier is model.classifier
    assert frozen.embed_dim == 8 and frozen.spec == model.spec
    assert FrozenModel(frozen).module is model  # no double wrapping
    with pytest.raises(AttributeError):
        _ = frozen.no_such_attribute


def test_wraps_any_module_and_embed_needs_an_embed_method():
    linear = nn.Linear(3, 2)
    frozen = FrozenModel(linear)
    assert not frozen(torch.randn(4, 3)).requires_grad
    with pytest.raises(AttributeError, match="Linear has no embed"):
        frozen.embed(torch.randn(4, 3))
