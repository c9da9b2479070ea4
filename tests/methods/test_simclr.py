"""SimCLR's NT-Xent against hand values and a brute-force loop; the method's two views."""

from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from compatkit.methods.base import MethodBatch, MethodContext, create_method
from compatkit.methods.simclr import SimCLR, SimCLRConfig, ViewKeys, nt_xent_loss
from compatkit.models import SideInfoModel


def brute_force_nt_xent(z1, z2, temperature):
    """The definition, one anchor at a time over the 2N views (positive = other view)."""
    z = F.normalize(torch.cat([z1, z2]), dim=1)
    n = len(z1)
    total = 0.0
    for i in range(2 * n):
        pos = (i + n) % (2 * n)
        denom = sum(math.exp(float(z[i] @ z[k]) / temperature) for k in range(2 * n) if k != i)
        total += -math.log(math.exp(float(z[i] @ z[pos]) / temperature) / denom)
    return total / (2 * n)


def test_hand_values():
    # one image: the positive is the only other view, so the loss is exactly 0
    assert nt_xent_loss(torch.tensor([[1.0, 0.0]]), torch.tensor([[0.6, 0.8]])).item() == 0.0
    # two orthogonal images, identical views, τ = 1: every anchor has −log(e / (e + 2))
    z = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    assert nt_xent_loss(z, z.clone(), temperature=1.0).item() == pytest.approx(
        math.log(math.e + 2) - 1, abs=1e-6)  # 0.551445


def test_matches_brute_force_and_ignores_scale():
    g = torch.Generator().manual_seed(0)
    z1, z2 = torch.randn(6, 5, generator=g), torch.randn(6, 5, generator=g)
    loss = nt_xent_loss(z1, z2, temperature=0.5)
    assert loss.item() == pytest.approx(brute_force_nt_xent(z1, z2, 0.5), rel=1e-5)
    assert nt_xent_loss(3 * z1, 0.2 * z2, temperature=0.5).item() == pytest.approx(loss.item(),
                                                                                    rel=1e-5)


def test_global_keys_split_equals_the_full_batch():
    """Two 'processes' of 3 images each, keys = the global batch: their mean is the full loss."""
    g = torch.Generator().manual_seed(1)
    z1, z2 = torch.randn(6, 4, generator=g), torch.randn(6, 4, generator=g)
    keys = ViewKeys(z1, z2, 0)
    parts = [nt_xent_loss(z1[:3], z2[:3], temperature=0.2, keys=keys),
             nt_xent_loss(z1[3:], z2[3:], temperature=0.2, keys=keys._replace(offset=3))]
    full = nt_xent_loss(z1, z2, temperature=0.2)
    assert ((parts[0] + parts[1]) / 2).item() == pytest.approx(full.item(), rel=1e-6)
    with pytest.raises(ValueError, match="offset"):
        nt_xent_loss(z1[:3], z2[:3], keys=keys._replace(offset=4))


def test_gradient_reaches_both_views():
    g = torch.Generator().manual_seed(2)
    z1 = torch.randn(4, 3, generator=g).requires_grad_(True)
    z2 = torch.randn(4, 3, generator=g).requires_grad_(True)
    nt_xent_loss(z1, z2).backward()
    assert z1.grad.abs().sum() > 0 and z2.grad.abs().sum() > 0


def test_bad_inputs():
    with pytest.raises(ValueError, match="temperature"):
        nt_xent_loss(torch.ones(2, 2), torch.ones(2, 2), temperature=0.0)
    with pytest.raises(ValueError, match="one shape"):
        nt_xent_loss(torch.ones(2, 2), torch.ones(3, 2))


class TinyProjector(nn.Module):
    """A stand-in side-info model: forward = normalised projection, features = the feature."""

    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(12, 4)

    def features(self, x):
        return self.lin(x.flatten(1))

    def forward(self, x):
        return F.normalize(self.features(x), dim=1)


def simclr_context(augment, cfg=None):
    torch.manual_seed(0)
    model = TinyProjector()
    ctx = MethodContext(model=model, forward=model, old_model=None, old_manifest=None,
                        class_ids=(0, 1), device=torch.device("cpu"), epochs=1,
                        train_batches=lambda: iter(()), augment=augment)
    return create_method(cfg or SimCLRConfig(), ctx), model


def test_step_uses_the_loop_batch_and_a_second_augmented_view():
    calls = []

    def augment(raw):
        calls.append(raw)
        return raw.float() / 255 - 0.5

    method, model = simclr_context(augment, SimCLRConfig(temperature=0.3))
    g = torch.Generator().manual_seed(3)
    raw = torch.randint(0, 256, (5, 3, 2, 2), dtype=torch.uint8, generator=g)
    images = torch.randn(5, 3, 2, 2, generator=g)
    out = method.step(MethodBatch(images, torch.zeros(5, dtype=torch.long), 0, 0, raw))
    assert len(calls) == 1 and torch.equal(calls[0], raw)
    expected = nt_xent_loss(model(images), model(raw.float() / 255 - 0.5), temperature=0.3)
    assert out.total.item() == pytest.approx(expected.item(), rel=1e-6)
    assert set(out.parts) == {"nt_xent"}
    # labels are unused: other labels, same loss
    again = method.step(MethodBatch(images, torch.arange(5), 0, 0, raw))
    assert again.total.item() == pytest.approx(out.total.item(), rel=1e-6)


def test_step_needs_raw_images_and_an_augmentation():
    method, _ = simclr_context(lambda raw: raw.float())
    with pytest.raises(ValueError, match="raw"):
        method.step(MethodBatch(torch.zeros(2, 3, 2, 2), torch.zeros(2, dtype=torch.long), 0, 0))
    with pytest.raises(ValueError, match="augment"):
        simclr_context(None)


def test_build_and_evaluation():
    model_cfg = SimpleNamespace(backbone="resnet10_cifar", embed_dim=12, width=0.125,
                                pooling="avg")
    module = SimCLR.build_trained_module(model_cfg, num_classes=3, in_chans=1, frozen={},
                                         method_cfg=SimCLRConfig(proj_dim=8, proj_hidden=16))
    assert isinstance(module, SideInfoModel)
    assert (module.side_dim, module.proj_dim, module.spec["in_chans"]) == (12, 8, 1)
    assert SimCLR.artifact_kind == "side_info" and SimCLRConfig().temperature == 0.1
    method, model = simclr_context(lambda raw: raw.float())
    emb = method.evaluation_embedders()
    assert set(emb.galleries) == {"self"} and emb.old is None
    assert emb.galleries["self"] is emb.query
    x = torch.randn(3, 3, 2, 2)
    assert torch.equal(emb.query(x), model.features(x))


def test_simclr_run_through_the_loop(tmp_path):
    from compatkit.artifacts import load_module
    from compatkit.train.loop import train

    from .test_fct import tiny_config

    torch.set_num_threads(1)
    result = train(tiny_config("name=psi", "method={name: simclr, proj_dim: 8}",
                               "data.side=old", "train.epochs=1"), tmp_path)
    m = result.manifest
    assert (m.kind, m.method, m.embed_dim, m.normalized) == ("side_info", "simclr", 16, False)
    assert set(result.metrics) == {"self"}
    assert 0.0 <= result.metrics["self"]["map"] <= 1.0
    assert math.isfinite(result.history[0]["nt_xent"]) and result.history[0]["nt_xent"] > 0
    module, _ = load_module(result.artifact_dir)
    assert isinstance(module, SideInfoModel) and module.proj_dim == 8
