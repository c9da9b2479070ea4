"""FCT: the controls of fct-fastfill-peers.md §6.5 on Gaussian features, the method's step,
BN switch, relations and evaluation embedders, and one tiny end-to-end run of the loop."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F

from compatkit.methods.base import MethodBatch, MethodContext, create_method
from compatkit.methods.fct import (
    FCT,
    FCTConfig,
    default_freeze_bn_epoch,
    per_sample_mse,
)
from compatkit.models import Transformation

from .standins import IMAGE_SHAPE, StandinFrozen, StandinModel

# ---------------------------------------------------------------- Gaussian controls (no images)


def class_gaussians(seed: int, *, classes: int = 10, per_class: int = 40, dim: int = 8,
                    noise: float = 0.5):
    """(features (N, dim), labels (N,)) around random unit-variance class means."""
    g = torch.Generator().manual_seed(seed)
    means = torch.randn(classes, dim, generator=g)
    labels = torch.arange(classes).repeat_interleave(per_class)
    return means[labels] + noise * torch.randn(len(labels), dim, generator=g), labels


def fit(t: Transformation, old, target, side=None, *, steps: int = 400, lr: float = 3e-3,
        seed: int = 0) -> Transformation:
    """A plain Adam/MSE loop over tensors (minibatches of 100), then eval mode."""
    torch.set_num_threads(1)  # tiny matrices: threads only contend on a shared machine
    torch.manual_seed(seed)
    opt = torch.optim.Adam(t.parameters(), lr=lr)
    g = torch.Generator().manual_seed(seed)
    t.train()
    for _ in range(steps):
        idx = torch.randperm(len(old), generator=g)[:100]
        pred = t(old[idx], None if side is None else side[idx]).embedding
        loss = F.mse_loss(pred, target[idx])
        opt.zero_grad()
        loss.backward()
        opt.step()
    return t.eval()


@torch.no_grad()
def loo_top1(query, gallery, labels) -> float:
    """Leave-one-out 1-NN accuracy by cosine similarity (query i never matches gallery i)."""
    sims = F.normalize(query, dim=1) @ F.normalize(gallery, dim=1).T
    sims.fill_diagonal_(-float("inf"))
    return (labels[sims.argmax(1)] == labels).float().mean().item()


@torch.no_grad()
def relative_mse(t, old, target, side=None) -> float:
    return (F.mse_loss(t(old, side).embedding, target) / target.var()).item()


def test_identity_control_drives_the_loss_to_zero():
    torch.manual_seed(0)
    old, labels = class_gaussians(0)
    t = Transformation(8, 8, inner=64)
    assert relative_mse(t.eval(), old, old) > 0.5  # untrained
    t = fit(t, old, old)
    assert relative_mse(t, old, old) < 0.05
    with torch.no_grad():
        transformed = t(old).embedding
    assert loo_top1(old, transformed, labels) == pytest.approx(loo_top1(old, old, labels), abs=0.03)


def test_linear_control_is_recovered_without_side_info():
    torch.manual_seed(1)
    old, labels = class_gaussians(1)
    q, _ = torch.linalg.qr(torch.randn(8, 8))
    a = q @ torch.diag(torch.linspace(0.5, 2.0, 8))
    new = old @ a.T
    t = fit(Transformation(8, 8, inner=64), old, new)
    assert relative_mse(t, old, new) < 0.05
    with torch.no_grad():
        transformed = t(old).embedding
    self_test = loo_top1(new, new, labels)
    assert loo_top1(new, transformed, labels) == pytest.approx(self_test, abs=0.05)
    # the raw old gallery is not compatible: the transformation is what makes cross ≈ self
    assert loo_top1(new, old, labels) < self_test - 0.2


def test_side_info_helps_only_when_the_new_model_needs_what_the_old_one_lost():
    """Class c = (a, b): φ_old sees only factor a, ψ only factor b, φ_new needs both."""
    torch.manual_seed(2)
    g = torch.Generator().manual_seed(2)
    a_means, b_means = torch.randn(5, 4, generator=g), 2 * torch.randn(2, 4, generator=g)
    n = 800
    a, b = torch.arange(n) % 5, (torch.arange(n) // 5) % 2
    labels = 2 * a + b
    old = a_means[a] + 0.3 * torch.randn(n, 4, generator=g)
    side = b_means[b] + 0.3 * torch.randn(n, 4, generator=g)
    mix = torch.randn(8, 8, generator=g) / 8 ** 0.5
    new = torch.cat([old, side], dim=1) @ mix.T
    tr, te = slice(0, 400), slice(400, n)  # fit on one half, measure on unseen samples
    without = fit(Transformation(4, 8, inner=64), old[tr], new[tr])
    with_side = fit(Transformation(4, 8, d_side=4, inner=64), old[tr], new[tr], side[tr])
    err_without = relative_mse(without, old[te], new[te])
    err_with = relative_mse(with_side, old[te], new[te], side[te])
    assert err_with < 0.1 and err_without > 3 * err_with
    with torch.no_grad():
        top1_without = loo_top1(new[te], without(old[te]).embedding, labels[te])
        top1_with = loo_top1(new[te], with_side(old[te], side[te]).embedding, labels[te])
    assert top1_with > top1_without + 0.1
    # control: when φ_new needs nothing beyond φ_old, side-information brings nothing
    from_old = old @ torch.randn(4, 8, generator=g) / 2
    plain = fit(Transformation(4, 8, inner=64), old[tr], from_old[tr])
    helped = fit(Transformation(4, 8, d_side=4, inner=64), old[tr], from_old[tr], side[tr])
    assert relative_mse(plain, old[te], from_old[te]) < 0.1
    assert relative_mse(helped, old[te], from_old[te], side[te]) < 0.1


# ---------------------------------------------------------------- the method on stand-in models

NUM_CLASSES = 4


def fct_context(*, d_old=6, d_new=6, d_side=None, epochs=4, cfg=None, seed=0):
    """An FCT method on stand-in frozen models, built as the loop builds it."""
    torch.manual_seed(seed)
    old = StandinFrozen(StandinModel(d_old, 3))
    new = StandinFrozen(StandinModel(d_new, NUM_CLASSES))
    frozen = {"new": new}
    if d_side is not None:
        frozen["side"] = StandinFrozen(StandinModel(d_side, None))
    cfg = cfg or FCTConfig(inner=16)
    module = FCT.build_trained_module(None, num_classes=NUM_CLASSES, in_chans=1,
                                      frozen={**frozen, "old": old}, method_cfg=cfg)
    ctx = MethodContext(model=module, forward=module, old_model=old,
                        old_manifest=SimpleNamespace(model_version="v-old"),
                        class_ids=tuple(range(NUM_CLASSES)), device=torch.device("cpu"),
                        epochs=epochs, train_batches=lambda: iter(()), frozen=frozen)
    return create_method(cfg, ctx), ctx


def batch(epoch=0, n=8, seed=1):
    g = torch.Generator().manual_seed(seed)
    return MethodBatch(torch.randn(n, *IMAGE_SHAPE, generator=g),
                       torch.arange(n) % NUM_CLASSES, epoch, 0)


def test_build_sizes_the_transformation_from_the_frozen_models():
    _, ctx = fct_context(d_old=6, d_new=5, d_side=3)
    t = ctx.model
    assert (t.d_old, t.d_new, t.d_side, t.sigma_dim) == (6, 5, 3, 0)
    assert t.mixer[0].out_features == 16  # cfg.inner
    _, no_side = fct_context(d_old=6, d_new=5)
    assert no_side.model.side_branch is None
    with pytest.raises(ValueError, match=r"frozen_models\.new"):
        FCT.build_trained_module(None, num_classes=4, in_chans=1,
                                 frozen={"old": ctx.old_model}, method_cfg=FCTConfig())


def test_step_is_the_mse_to_the_frozen_new_embedding_and_trains_only_the_transformation():
    method, ctx = fct_context(d_side=3)
    b = batch()
    out = method.step(b)
    old = ctx.old_model.embed(b.images)
    side = ctx.frozen["side"].embed(b.images)
    target = ctx.frozen["new"].embed(b.images)
    with torch.no_grad():  # train-mode BN uses this batch's statistics: same batch, same values
        expected = ((ctx.model(old, side).embedding - target) ** 2).mean()
    assert out.total.item() == pytest.approx(expected.item(), rel=1e-5)
    assert out.parts == {"mse": pytest.approx(expected.item(), rel=1e-5)}
    out.total.backward()
    assert all(p.grad is not None for p in ctx.model.parameters())
    frozen_params = [*ctx.old_model.parameters(), *ctx.frozen["new"].parameters()]
    assert all(p.grad is None and not p.requires_grad for p in frozen_params)


def test_per_sample_mse_by_hand():
    pred = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    target = torch.tensor([[0.0, 0.0], [0.0, 3.0]])
    assert per_sample_mse(pred, target).tolist() == [0.5, 2.0]
    with pytest.raises(ValueError, match="one shape"):
        per_sample_mse(pred, target[:, :1])


def test_default_freeze_epoch_is_half_the_epochs():
    assert default_freeze_bn_epoch(80) == 40
    assert default_freeze_bn_epoch(5) == 2
    assert default_freeze_bn_epoch(1) == 1  # a one-epoch run keeps training-mode statistics


@pytest.mark.parametrize("configured, expected_first_frozen", [(None, 2), (1, 1), (0, 0)])
def test_bn_runs_in_eval_mode_from_the_configured_epoch(configured, expected_first_frozen):
    method, ctx = fct_context(cfg=FCTConfig(inner=16, freeze_bn_epoch=configured), epochs=4)
    bn = ctx.model.old_branch[1]
    for epoch in range(4):
        method.on_epoch_start(epoch)
        ctx.model.train()  # the loop switches the module to train mode after on_epoch_start
        before = bn.running_mean.clone()
        method.step(batch(epoch, seed=epoch + 10))
        frozen = epoch >= expected_first_frozen
        assert ctx.model.training is (not frozen)
        assert torch.equal(bn.running_mean, before) is frozen


def test_relations_name_the_old_and_new_versions():
    rel = FCT.relations(SimpleNamespace(model_version="v1"),
                        {"new": SimpleNamespace(model_version="v2")})
    assert rel == {"transforms_from": "v1", "transforms_to": "v2"}


def test_evaluation_embedders():
    method, ctx = fct_context(d_side=3)
    emb = method.evaluation_embedders()
    assert set(emb.galleries) == {"self", "transformed", "cross"}
    assert emb.galleries["self"] is emb.query
    x = batch().images
    assert torch.equal(emb.query(x), ctx.frozen["new"].embed(x))
    assert not ctx.model.training
    with torch.no_grad():
        expected = ctx.model(ctx.old_model.embed(x), ctx.frozen["side"].embed(x)).embedding
    assert torch.allclose(emb.galleries["transformed"](x), expected)
    assert torch.equal(emb.old(x), ctx.old_model.embed(x))
    method, _ = fct_context(d_old=6, d_new=5)
    assert set(method.evaluation_embedders().galleries) == {"self", "transformed"}


def test_transformed_gallery_is_normalised_when_the_new_space_is():
    method, ctx = fct_context()
    ctx.model.normalize = True
    out = method.evaluation_embedders().galleries["transformed"](batch().images)
    assert torch.allclose(out.norm(dim=1), torch.ones(len(out)))


@pytest.mark.parametrize("name", ["fct", "fastfill", "bict", "simclr"])
def test_configs_are_registered_and_strict(name):
    from compatkit.methods import bict, fastfill, simclr  # noqa: F401 (register)
    from compatkit.methods.base import method_config_from_dict

    assert method_config_from_dict({"name": name}).name == name
    with pytest.raises(ValueError, match="temprature"):
        method_config_from_dict({"name": name, "temprature": 0.05})


def test_missing_new_model_is_a_clear_error():
    _, ctx = fct_context()
    ctx.frozen = {}
    with pytest.raises(ValueError, match=r"frozen_models\.new"):
        create_method(FCTConfig(), ctx)


# ---------------------------------------------------------------- end to end through the loop

TINY = [
    "data.options={num_classes: 200, images_per_class: 5}",
    "data.image_size=16",
    "data.test_class_ratio=0.2",
    "data.crop_padding=1",
    "model.backbone=resnet10_cifar",
    "model.width=0.125",
    "model.embed_dim=16",
    "train.batch_size=64",
    "train.progress=false",
    "train.embed_batch_size=256",
    "eval.metrics=[map, cmc@1]",
]
TRANSFORM = ["optim.name=adamw", "optim.lr=0.001", "optim.weight_decay=3.0517578125e-05"]


def tiny_config(*extra: str):
    from compatkit.train.config import load_config

    return load_config(None, [*TINY, *extra])


@pytest.fixture(scope="module")
def base_runs(tmp_path_factory):
    """An old model (old side), a new model (new side) and a SimCLR side-info model (old side)."""
    from compatkit.methods import simclr  # noqa: F401 (registers the method)
    from compatkit.train.loop import train

    torch.set_num_threads(1)
    root = tmp_path_factory.mktemp("fct_base")
    old = train(tiny_config("name=old", "data.side=old", "train.epochs=1"), root / "old")
    new = train(tiny_config("name=new", "train.epochs=1"), root / "new")
    side = train(tiny_config("name=side", "method={name: simclr}", "data.side=old",
                             "train.epochs=1"), root / "side")
    return SimpleNamespace(old=old, new=new, side=side)


def _embed(artifact_dir, images):
    """Features of the test images with any artifact (model or side-info)."""
    import numpy as np

    from compatkit.artifacts import FeatureSet, load_module
    from compatkit.inference import embed_images

    module, manifest = load_module(artifact_dir)
    feats = embed_images(module, images.images, manifest.input)
    return FeatureSet(feats, images.labels.astype(np.int64), manifest)


def test_fct_run_with_side_info_end_to_end(base_runs, tmp_path):
    from compatkit.artifacts import load_module
    from compatkit.eval import retrieval_metrics
    from compatkit.feature_upgrade import upgrade_features
    from compatkit.train.loop import train
    from compatkit.train.prepare import evaluation_images

    runs = base_runs
    result = train(tiny_config("name=fct", "method={name: fct, inner: 64}", "train.epochs=2",
                               *TRANSFORM, f"old_model={runs.old.artifact_dir}",
                               f"frozen_models.new={runs.new.artifact_dir}",
                               f"frozen_models.side={runs.side.artifact_dir}"), tmp_path)
    m = result.manifest
    assert (m.kind, m.method, m.embed_dim) == ("transformation", "fct", 16)
    assert m.transforms_from == runs.old.manifest.model_version
    assert m.transforms_to == runs.new.manifest.model_version
    assert m.normalized  # the new model's embeddings are L2-normalised
    assert set(result.metrics) == {"self", "cross", "transformed", "old_old"}
    assert result.metrics["self"] == pytest.approx(runs.new.metrics["self"])
    assert result.metrics["old_old"] == pytest.approx(runs.old.metrics["self"])
    assert result.history[1]["mse"] < result.history[0]["mse"]
    module, _ = load_module(result.artifact_dir)
    assert isinstance(module, Transformation) and module.d_side == 16
    # upgrading the stored old gallery (plus side-info) reproduces the run's transformed test
    images = evaluation_images(tiny_config().data)
    gallery, side = _embed(runs.old.artifact_dir, images), _embed(runs.side.artifact_dir, images)
    query = _embed(runs.new.artifact_dir, images)
    upgraded = upgrade_features(gallery, [result.artifact_dir], side=side)
    assert upgraded.manifest.model_version == query.manifest.model_version
    got = retrieval_metrics(query.features, query.labels, upgraded.features, upgraded.labels,
                            metrics=("map", "cmc@1"), exclude_self=True)
    assert got == pytest.approx(result.metrics["transformed"], abs=1e-6)
