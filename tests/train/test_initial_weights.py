"""``model.init``: training starts from exactly the given weights (artifact, state dict or
TorchScript backbone), and ``run.json`` records their source and sha256; ``timm:NAME``
backbones fail clearly where timm cannot import."""

from __future__ import annotations

import json
import warnings

import pytest
import torch
from safetensors.torch import save_file
from torch import nn

from compatkit.artifacts import InputSpec, Manifest, file_sha256, save_module
from compatkit.errors import CompatkitError
from compatkit.methods.independent import Independent
from compatkit.models import BACKBONES, create_model
from compatkit.models.initial_weights import load_initial_weights
from compatkit.registry import Registry
from compatkit.train.config import load_config
from compatkit.train.loop import train

TINY = [
    "data.options={num_classes: 40, images_per_class: 5}",
    "data.image_size=16",
    "data.test_class_ratio=0.2",
    "data.crop_padding=1",
    "model.backbone=resnet10_cifar",
    "model.width=0.125",
    "model.embed_dim=16",
    "train.batch_size=32",
    "train.epochs=1",
    "train.progress=false",
    "eval.enabled=false",
]
SPEC = {"backbone": "resnet10_cifar", "width": 0.125, "embed_dim": 16, "in_chans": 1}


class TinyBackbone(nn.Module):
    """A backbone registered by this test (stands in for one trained elsewhere)."""

    def __init__(self, *, width: float = 1.0, in_chans: int = 1, pooling: str = "avg") -> None:
        super().__init__()
        self.conv = nn.Conv2d(in_chans, 6, 3, padding=1)
        self.num_features = 6

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(x).mean(dim=(2, 3))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_features(x)


@pytest.fixture()
def tiny_backbone(monkeypatch):
    """``byom_tiny`` in the backbone registry while the test runs (a copy: nothing leaks)."""
    from compatkit.models import backbones

    registry = Registry("backbone")
    for name in BACKBONES:
        registry.add(name, BACKBONES.get(name))
    registry.register("byom_tiny")(TinyBackbone)
    monkeypatch.setattr(backbones, "BACKBONES", registry)
    return "byom_tiny"


@pytest.fixture()
def first_state(monkeypatch):
    """The trained module's state dict when training starts (before the first step)."""
    seen: dict[str, dict[str, torch.Tensor]] = {}

    def spy(self) -> None:
        seen["state"] = {k: v.detach().clone() for k, v in self.ctx.model.state_dict().items()}

    monkeypatch.setattr(Independent, "on_train_start", spy)
    torch.set_num_threads(1)
    return seen


def _same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor], keys) -> None:
    for k in keys:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=0, msg=k)


def test_training_starts_from_an_artifacts_weights(tmp_path, first_state):
    torch.manual_seed(7)
    source = create_model(**SPEC, num_classes=5).eval()
    manifest = Manifest(model_version="pre", spec=source.spec, embed_dim=16, normalized=True,
                        input=InputSpec(image_size=16, in_chans=1, mean=(0.5,), std=(0.25,)))
    artifact = save_module(tmp_path / "pre", source, manifest)
    run = train(load_config(None, [*TINY, f"model.init={artifact}"]), tmp_path / "run")
    state = first_state["state"]
    expected = source.state_dict()
    # every tensor but the classifier (5 classes there, the run's own number here) is copied
    _same(state, expected, [k for k in expected if not k.startswith("classifier.")])
    assert state["classifier.weight"].shape[0] != 5
    init = json.loads((run.run_dir / "run.json").read_text())["init"]
    assert init == {"path": str((artifact / "model.safetensors").resolve()),
                    "sha256": file_sha256(artifact / "model.safetensors"),
                    "kind": "artifact", "loaded": len(expected) - 1,
                    "skipped": ["classifier.weight"]}


def test_training_starts_from_a_torchscript_backbone(tmp_path, first_state, tiny_backbone):
    torch.manual_seed(3)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        scripted = torch.jit.script(TinyBackbone())
        torch.jit.save(scripted, str(tmp_path / "backbone.pt"))
    run = train(load_config(None, [*TINY, f"model.backbone={tiny_backbone}",
                                   f"model.init={tmp_path / 'backbone.pt'}"]), tmp_path / "run")
    state = first_state["state"]
    for k, v in scripted.state_dict().items():
        torch.testing.assert_close(state[f"backbone.{k}"], v, rtol=0, atol=0)
    init = json.loads((run.run_dir / "run.json").read_text())["init"]
    assert (init["kind"], init["loaded"], init["sha256"]) == (
        "torchscript", 2, file_sha256(tmp_path / "backbone.pt"))


def test_state_dict_files_load_whole_models_or_backbones(tmp_path):
    torch.manual_seed(1)
    source = create_model(**SPEC, num_classes=4)
    save_file({k: v.contiguous() for k, v in source.state_dict().items()},
              str(tmp_path / "full.safetensors"))
    torch.save({"state_dict": source.backbone.state_dict()}, tmp_path / "backbone.pth")
    for name, kind, n in (("full.safetensors", "state_dict", len(source.state_dict())),
                          ("backbone.pth", "state_dict", len(source.backbone.state_dict()))):
        target = create_model(**SPEC, num_classes=4)
        out = load_initial_weights(target, tmp_path / name)
        assert (out.kind, out.loaded, out.skipped) == (kind, n, ())
        _same(target.backbone.state_dict(), source.backbone.state_dict(),
              source.backbone.state_dict())


def test_sources_that_do_not_fit_are_clear_errors(tmp_path):
    model = create_model(**SPEC)
    with pytest.raises(CompatkitError, match=f"model.init {tmp_path / 'none.pt'} does not exist"):
        load_initial_weights(model, tmp_path / "none.pt")
    wider = create_model(**{**SPEC, "width": 0.25})
    save_file({k: v.contiguous() for k, v in wider.state_dict().items()},
              str(tmp_path / "wider.safetensors"))
    with pytest.raises(CompatkitError, match=r"does not fit the model: backbone\.bn1\.bias "
                                             r"\(16,\) \(model: \(8,\)\); .* more"):
        load_initial_weights(model, tmp_path / "wider.safetensors")
    torch.save([1, 2], tmp_path / "list.pt")
    with pytest.raises(CompatkitError, match="holds a list, not a state dict"):
        load_initial_weights(model, tmp_path / "list.pt")
    (tmp_path / "folder").mkdir()
    with pytest.raises(CompatkitError, match="not a compatkit artifact or run folder"):
        load_initial_weights(model, tmp_path / "folder")
    save_file({"other.weight": torch.zeros(2)}, str(tmp_path / "other.safetensors"))
    with pytest.raises(CompatkitError, match=r"other\.weight \(2,\) \(model: absent\)"):
        load_initial_weights(model, tmp_path / "other.safetensors")


def test_timm_backbones_fail_clearly_without_timm(tmp_path, monkeypatch):
    import sys

    monkeypatch.setitem(sys.modules, "timm", None)  # `import timm` fails as it does here
    cfg = load_config(None, [*TINY, "model.backbone=timm:resnet18", "model.width=1.0"])
    with pytest.raises(CompatkitError, match=r"backbone timm:resnet18 needs timm, which cannot "
                                             r"be imported here .*compatkit\[timm\]"):
        train(cfg, tmp_path / "run")
