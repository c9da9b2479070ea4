"""ResNet backbones (He et al. 2016) returning a pooled feature, with CIFAR and ImageNet stems.

- ``stem="cifar"``: one 3×3 stride-1 conv, no max-pool (32-px inputs; output stride 8).
- ``stem="imagenet"``: 7×7 stride-2 conv + 3×3 stride-2 max-pool (224-px inputs; stride 32).

``width`` scales every stage width (base 64, 128, 256, 512) and the stem. The pooled feature
has ``num_features = round(512·width)·expansion`` channels (expansion 1 for BasicBlock, 4 for
Bottleneck); pooling is average or GeM (``models/pooling.py``).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import ClassVar, Literal, NamedTuple

from torch import Tensor, nn

from compatkit.models.backbones import register_backbone
from compatkit.models.pooling import POOLINGS, create_pooling

Stem = Literal["cifar", "imagenet"]
STEMS = ("cifar", "imagenet")
BASE_WIDTHS = (64, 128, 256, 512)


def _conv3x3(in_ch: int, out_ch: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(in_ch, out_ch, kernel_size=3, stride=stride, padding=1, bias=False)


def _downsample(in_ch: int, out_ch: int, stride: int) -> nn.Module | None:
    if stride == 1 and in_ch == out_ch:
        return None
    return nn.Sequential(
        nn.Conv2d(in_ch, out_ch, kernel_size=1, stride=stride, bias=False), nn.BatchNorm2d(out_ch)
    )


class BasicBlock(nn.Module):
    """Two 3×3 convs with a residual connection.

    Shapes: (B, in_ch, H, W) -> (B, planes, H/s, W/s).
    """

    expansion: ClassVar[int] = 1

    def __init__(self, in_ch: int, planes: int, stride: int = 1) -> None:
        super().__init__()
        out_ch = planes * self.expansion
        self.conv1 = _conv3x3(in_ch, planes, stride)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = _conv3x3(planes, out_ch)
        self.bn2 = nn.BatchNorm2d(out_ch)
        self.act = nn.ReLU(inplace=True)
        self.downsample = _downsample(in_ch, out_ch, stride)

    def zero_init_last(self) -> None:
        nn.init.zeros_(self.bn2.weight)

    def forward(self, x: Tensor) -> Tensor:
        shortcut = x if self.downsample is None else self.downsample(x)
        out = self.act(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.act(out + shortcut)


class Bottleneck(nn.Module):
    """1×1 reduce, 3×3 (stride here), 1×1 expand ×4, residual.

    Shapes: (B, in_ch, H, W) -> (B, 4·planes, H/s, W/s).
    """

    expansion: ClassVar[int] = 4

    def __init__(self, in_ch: int, planes: int, stride: int = 1) -> None:
        super().__init__()
        out_ch = planes * self.expansion
        self.conv1 = nn.Conv2d(in_ch, planes, kernel_size=1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = _conv3x3(planes, planes, stride)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv3 = nn.Conv2d(planes, out_ch, kernel_size=1, bias=False)
        self.bn3 = nn.BatchNorm2d(out_ch)
        self.act = nn.ReLU(inplace=True)
        self.downsample = _downsample(in_ch, out_ch, stride)

    def zero_init_last(self) -> None:
        nn.init.zeros_(self.bn3.weight)

    def forward(self, x: Tensor) -> Tensor:
        shortcut = x if self.downsample is None else self.downsample(x)
        out = self.act(self.bn1(self.conv1(x)))
        out = self.act(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        return self.act(out + shortcut)


class ResNet(nn.Module):
    """ResNet feature extractor: stem, four residual stages, global pooling.

    Args:
        block: ``BasicBlock`` or ``Bottleneck``.
        layers: blocks per stage, e.g. (2, 2, 2, 2) for ResNet-18.
        stem: "cifar" (3×3 stride 1, no max-pool) or "imagenet" (7×7 stride 2 + max-pool).
        width: multiplier on the stem and stage widths (base 64). Default 1.0.
        in_chans: input channels. Default 3.
        pooling: "avg" or "gem". Default "avg".
        zero_init_last: zero the last BN scale of each block, so blocks start as identities
            (as timm does). Default True.

    Shapes:
        x: (B, in_chans, H, W) -> forward_features / forward: (B, num_features).
    """

    def __init__(
        self,
        block: type[BasicBlock | Bottleneck],
        layers: Sequence[int],
        *,
        stem: Stem = "cifar",
        width: float = 1.0,
        in_chans: int = 3,
        pooling: str = "avg",
        zero_init_last: bool = True,
    ) -> None:
        super().__init__()
        if stem not in STEMS:
            raise ValueError(f"unknown stem {stem!r}; expected one of {', '.join(STEMS)}")
        if len(layers) != 4 or any(int(n) < 1 for n in layers):
            raise ValueError(f"layers must be 4 positive block counts, got {tuple(layers)}")
        if not width > 0:
            raise ValueError(f"width must be > 0, got {width}")
        if in_chans < 1:
            raise ValueError(f"in_chans must be >= 1, got {in_chans}")
        if pooling not in POOLINGS:
            raise ValueError(f"unknown pooling {pooling!r}; expected one of {', '.join(POOLINGS)}")
        widths = [max(1, round(base * width)) for base in BASE_WIDTHS]
        self.stem_type = stem
        self.widths = tuple(widths)

        stem_ch = widths[0]
        if stem == "cifar":
            self.conv1 = _conv3x3(in_chans, stem_ch)
            self.maxpool: nn.Module = nn.Identity()
        else:
            self.conv1 = nn.Conv2d(
                in_chans, stem_ch, kernel_size=7, stride=2, padding=3, bias=False
            )
            self.maxpool = nn.MaxPool2d(kernel_size=3, stride=2, padding=1)
        self.bn1 = nn.BatchNorm2d(stem_ch)
        self.act = nn.ReLU(inplace=True)

        in_ch = stem_ch
        stages = []
        for i, (planes, n_blocks) in enumerate(zip(widths, layers, strict=True)):
            stride = 1 if i == 0 else 2
            blocks = []
            for j in range(int(n_blocks)):
                blocks.append(block(in_ch, planes, stride if j == 0 else 1))
                in_ch = planes * block.expansion
            stages.append(nn.Sequential(*blocks))
        self.layer1, self.layer2, self.layer3, self.layer4 = stages
        self.num_features = in_ch
        self.pool = create_pooling(pooling)
        self._init_weights(zero_init_last)

    def _init_weights(self, zero_init_last: bool) -> None:
        for module in self.modules():
            if isinstance(module, nn.Conv2d):
                nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(module, nn.BatchNorm2d):
                nn.init.ones_(module.weight)
                nn.init.zeros_(module.bias)
        if zero_init_last:
            for module in self.modules():
                if isinstance(module, BasicBlock | Bottleneck):
                    module.zero_init_last()

    def forward_maps(self, x: Tensor) -> Tensor:
        """The last stage's feature map.

        Shapes: (B, in_chans, H, W) -> (B, num_features, H/8, W/8) with the CIFAR stem,
        (B, num_features, H/32, W/32) with the ImageNet stem (rounded up).
        """
        if x.ndim != 4 or x.shape[1] != self.conv1.in_channels:
            raise ValueError(
                f"expected input of shape (B, {self.conv1.in_channels}, H, W), "
                f"got {tuple(x.shape)}"
            )
        x = self.maxpool(self.act(self.bn1(self.conv1(x))))
        return self.layer4(self.layer3(self.layer2(self.layer1(x))))

    def forward_features(self, x: Tensor) -> Tensor:
        """The pooled feature. Shapes: (B, in_chans, H, W) -> (B, num_features)."""
        return self.pool(self.forward_maps(x))

    def forward(self, x: Tensor) -> Tensor:
        return self.forward_features(x)


class _Arch(NamedTuple):
    block: type[BasicBlock | Bottleneck]
    layers: tuple[int, int, int, int]
    stem: Stem


def _create_resnet(arch: _Arch, *, width: float, in_chans: int, pooling: str) -> ResNet:
    return ResNet(
        arch.block, arch.layers, stem=arch.stem, width=width, in_chans=in_chans, pooling=pooling
    )


_ARCHS: dict[str, _Arch] = {
    "resnet10_cifar": _Arch(BasicBlock, (1, 1, 1, 1), "cifar"),
    "resnet18_cifar": _Arch(BasicBlock, (2, 2, 2, 2), "cifar"),
    "resnet34_cifar": _Arch(BasicBlock, (3, 4, 6, 3), "cifar"),
    "resnet50_cifar": _Arch(Bottleneck, (3, 4, 6, 3), "cifar"),
    "resnet18": _Arch(BasicBlock, (2, 2, 2, 2), "imagenet"),
    "resnet34": _Arch(BasicBlock, (3, 4, 6, 3), "imagenet"),
    "resnet50": _Arch(Bottleneck, (3, 4, 6, 3), "imagenet"),
    "resnet101": _Arch(Bottleneck, (3, 4, 23, 3), "imagenet"),
}


@register_backbone("resnet10_cifar")
def resnet10_cifar(*, width: float = 1.0, in_chans: int = 3, pooling: str = "avg") -> ResNet:
    """ResNet-10 (BasicBlock [1,1,1,1]) with a 3×3 stem for 32-px inputs."""
    return _create_resnet(_ARCHS["resnet10_cifar"], width=width, in_chans=in_chans, pooling=pooling)


@register_backbone("resnet18_cifar")
def resnet18_cifar(*, width: float = 1.0, in_chans: int = 3, pooling: str = "avg") -> ResNet:
    """ResNet-18 (BasicBlock [2,2,2,2]) with a 3×3 stem for 32-px inputs."""
    return _create_resnet(_ARCHS["resnet18_cifar"], width=width, in_chans=in_chans, pooling=pooling)


@register_backbone("resnet34_cifar")
def resnet34_cifar(*, width: float = 1.0, in_chans: int = 3, pooling: str = "avg") -> ResNet:
    """ResNet-34 (BasicBlock [3,4,6,3]) with a 3×3 stem for 32-px inputs."""
    return _create_resnet(_ARCHS["resnet34_cifar"], width=width, in_chans=in_chans, pooling=pooling)


@register_backbone("resnet50_cifar")
def resnet50_cifar(*, width: float = 1.0, in_chans: int = 3, pooling: str = "avg") -> ResNet:
    """ResNet-50 (Bottleneck [3,4,6,3]) with a 3×3 stem for 32-px inputs."""
    return _create_resnet(_ARCHS["resnet50_cifar"], width=width, in_chans=in_chans, pooling=pooling)


@register_backbone("resnet18")
def resnet18(*, width: float = 1.0, in_chans: int = 3, pooling: str = "avg") -> ResNet:
    """ResNet-18 (BasicBlock [2,2,2,2]) with the 7×7 ImageNet stem for 224-px inputs."""
    return _create_resnet(_ARCHS["resnet18"], width=width, in_chans=in_chans, pooling=pooling)


@register_backbone("resnet34")
def resnet34(*, width: float = 1.0, in_chans: int = 3, pooling: str = "avg") -> ResNet:
    """ResNet-34 (BasicBlock [3,4,6,3]) with the 7×7 ImageNet stem for 224-px inputs."""
    return _create_resnet(_ARCHS["resnet34"], width=width, in_chans=in_chans, pooling=pooling)


@register_backbone("resnet50")
def resnet50(*, width: float = 1.0, in_chans: int = 3, pooling: str = "avg") -> ResNet:
    """ResNet-50 (Bottleneck [3,4,6,3]) with the 7×7 ImageNet stem for 224-px inputs."""
    return _create_resnet(_ARCHS["resnet50"], width=width, in_chans=in_chans, pooling=pooling)


@register_backbone("resnet101")
def resnet101(*, width: float = 1.0, in_chans: int = 3, pooling: str = "avg") -> ResNet:
    """ResNet-101 (Bottleneck [3,4,23,3]) with the 7×7 ImageNet stem for 224-px inputs."""
    return _create_resnet(_ARCHS["resnet101"], width=width, in_chans=in_chans, pooling=pooling)
