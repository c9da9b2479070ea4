import sys
import types

import pytest
import torch
from torch import nn

from compatkit.errors import CompatkitError, UnknownNameError
from compatkit.models import BACKBONES, create_backbone, list_backbones, register_backbone
from compatkit.models.resnet import BasicBlock, Bottleneck, ResNet

WIDTH = 0.125  # stage widths 8, 16, 32, 64


def _expected_features(model: ResNet) -> int:
    expansion = 4 if isinstance(model.layer4[0], Bottleneck) else 1
    return round(512 * WIDTH) * expansion


@pytest.mark.parametrize("name", list_backbones())
def test_every_backbone_forward_backward(name):
    torch.manual_seed(0)
    model = create_backbone(name, width=WIDTH)
    size = 16 if model.stem_type == "cifar" else 32
    x = torch.randn(2, 3, size, size)
    out = model.forward_features(x)
    assert out.shape == (2, model.num_features)
    assert model.num_features == _expected_features(model)
    out.square().mean().backward()
    grads = [p.grad for p in model.parameters()]
    assert all(g is not None and torch.isfinite(g).all() for g in grads)
    assert model.conv1.weight.grad.abs().sum() > 0


def test_registry_holds_the_eight_resnets():
    assert list_backbones() == sorted([
        "resnet10_cifar", "resnet18_cifar", "resnet34_cifar", "resnet50_cifar",
        "resnet18", "resnet34", "resnet50", "resnet101",
    ])


@pytest.mark.parametrize(
    ("name", "size", "maps"),
    [("resnet18_cifar", 32, 4), ("resnet18_cifar", 16, 2),
     ("resnet18", 64, 2), ("resnet18", 32, 1)],
)
def test_stem_output_strides(name, size, maps):
    # cifar stem: stride 8 overall (no max-pool); imagenet stem: stride 32
    model = create_backbone(name, width=WIDTH)
    assert model.forward_maps(torch.randn(2, 3, size, size)).shape == (2, 64, maps, maps)


def test_stems_differ_as_specified():
    cifar, imagenet = create_backbone("resnet18_cifar"), create_backbone("resnet18")
    assert cifar.conv1.kernel_size == (3, 3) and cifar.conv1.stride == (1, 1)
    assert isinstance(cifar.maxpool, nn.Identity)
    assert imagenet.conv1.kernel_size == (7, 7) and imagenet.conv1.stride == (2, 2)
    assert isinstance(imagenet.maxpool, nn.MaxPool2d)


def _basic_resnet_params(layers, widths, in_chans, stem_kernel):
    """Parameter count of a BasicBlock ResNet from the layer sizes (convs have no bias)."""
    total = in_chans * widths[0] * stem_kernel**2 + 2 * widths[0]
    in_ch = widths[0]
    for i, (w, n) in enumerate(zip(widths, layers, strict=True)):
        for j in range(n):
            total += in_ch * w * 9 + 2 * w + w * w * 9 + 2 * w
            if j == 0 and (i > 0 or in_ch != w):
                total += in_ch * w + 2 * w
            in_ch = w
    return total


@pytest.mark.parametrize(("width", "expected"), [(0.25, 700_176), (0.375, 1_573_272)])
def test_narrow_resnet18_cifar_parameter_count(width, expected):
    widths = [round(b * width) for b in (64, 128, 256, 512)]
    assert _basic_resnet_params((2, 2, 2, 2), widths, 3, 3) == expected
    model = create_backbone("resnet18_cifar", width=width)
    assert sum(p.numel() for p in model.parameters()) == expected


def test_full_width_counts_match_the_standard_architectures():
    # torchvision's ResNet-18 / ResNet-50 without the 1000-way fc layer
    count = lambda m: sum(p.numel() for p in m.parameters())  # noqa: E731
    assert count(create_backbone("resnet18")) == 11_689_512 - 513_000
    assert count(create_backbone("resnet50")) == 25_557_032 - 2_049_000


def test_in_chans_gem_pooling_and_input_check():
    model = create_backbone("resnet10_cifar", width=WIDTH, in_chans=1, pooling="gem")
    assert model.forward_features(torch.randn(2, 1, 16, 16)).shape == (2, 64)
    with pytest.raises(ValueError, match=r"\(B, 1, H, W\).*\(2, 3, 16, 16\)"):
        model(torch.randn(2, 3, 16, 16))


def test_same_seed_same_weights():
    torch.manual_seed(3)
    a = create_backbone("resnet10_cifar", width=WIDTH).state_dict()
    torch.manual_seed(3)
    b = create_backbone("resnet10_cifar", width=WIDTH).state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_bad_constructor_arguments():
    with pytest.raises(ValueError, match="width must be > 0, got 0"):
        create_backbone("resnet18_cifar", width=0)
    with pytest.raises(ValueError, match="unknown pooling 'max'"):
        create_backbone("resnet18_cifar", pooling="max")
    with pytest.raises(ValueError, match="unknown stem 'tiny'"):
        ResNet(BasicBlock, (1, 1, 1, 1), stem="tiny")
    with pytest.raises(TypeError):
        create_backbone("resnet18_cifar", embed_dim=3)


def test_unknown_backbone_lists_close_names():
    with pytest.raises(UnknownNameError, match=r"resnet18_cifr.*did you mean.*resnet18_cifar"):
        create_backbone("resnet18_cifr")
    with pytest.raises(ValueError, match="unknown backbone 'vgg16'"):
        create_backbone("vgg16")


def test_duplicate_registration_raises():
    with pytest.raises(ValueError, match="'resnet18' is already registered"):
        register_backbone("resnet18")(lambda **kw: None)
    assert "resnet18" in BACKBONES


class _FakeTimmNet(nn.Module):
    def __init__(self, in_chans):
        super().__init__()
        self.conv = nn.Conv2d(in_chans, 6, 3, padding=1)
        self.num_features = 6

    def forward_features(self, x):
        return self.conv(x)


def test_timm_names_build_through_timm_lazily(monkeypatch):
    calls = []
    fake = types.ModuleType("timm")
    fake.is_model = lambda name: name == "tinynet"
    fake.list_models = lambda: ["tinynet", "bignet"]

    def create_model(name, **kwargs):
        calls.append((name, kwargs))
        return _FakeTimmNet(kwargs["in_chans"])

    fake.create_model = create_model
    monkeypatch.setitem(sys.modules, "timm", fake)
    model = create_backbone("timm:tinynet", in_chans=1, pooling="gem")
    assert calls == [("tinynet", {"pretrained": False, "num_classes": 0, "global_pool": "",
                                  "in_chans": 1})]
    assert model.forward_features(torch.randn(2, 1, 5, 5)).shape == (2, 6)
    with pytest.raises(UnknownNameError, match="did you mean timm:tinynet"):
        create_backbone("timm:tinynt")
    with pytest.raises(ValueError, match="fixed width"):
        create_backbone("timm:tinynet", width=0.5)


def test_timm_names_without_timm_raise_a_clear_error(monkeypatch):
    monkeypatch.setitem(sys.modules, "timm", None)  # makes `import timm` fail
    with pytest.raises(CompatkitError, match="needs timm, which cannot be imported"):
        create_backbone("timm:resnet50")
