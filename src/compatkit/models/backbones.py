"""The backbone registry and factory (after timm's ``register_model`` / ``create_model``).

A backbone is an ``nn.Module`` with an int attribute ``num_features`` and a method
``forward_features(x) -> (B, num_features)`` returning the pooled feature. Variants register
a factory function taking ``*, width, in_chans, pooling``; names ``timm:<model>`` build a
timm model when timm is importable (never imported before such a name is asked for).
"""

from __future__ import annotations

import difflib
import importlib
from collections.abc import Callable
from typing import Any

from torch import Tensor, nn

from compatkit.errors import CompatkitError, UnknownNameError
from compatkit.models.pooling import POOLINGS, create_pooling
from compatkit.registry import Registry

BACKBONES: Registry[Callable[..., nn.Module]] = Registry("backbone")
TIMM_PREFIX = "timm:"


def register_backbone(name: str) -> Callable[[Callable[..., nn.Module]], Callable[..., nn.Module]]:
    """Decorator: register a backbone factory under ``name`` (a name already taken raises)."""
    return BACKBONES.register(name)


def list_backbones() -> list[str]:
    """Registered backbone names, sorted (timm names are not listed)."""
    return BACKBONES.names()


def create_backbone(name: str, **kwargs: Any) -> nn.Module:
    """Build the backbone registered as ``name`` (or ``timm:<model>`` when timm is installed).

    Args:
        name: a registered name such as ``"resnet18_cifar"``, or ``"timm:<timm model name>"``.
        **kwargs: the factory's keywords: ``width``, ``in_chans``, ``pooling``.

    Raises:
        UnknownNameError: an unknown name; the message lists the closest registered names.
        CompatkitError: a ``timm:`` name while timm cannot be imported.
    """
    if name in BACKBONES:
        return BACKBONES.get(name)(**kwargs)
    if name.startswith(TIMM_PREFIX):
        return TimmBackbone(name[len(TIMM_PREFIX):], **kwargs)
    raise UnknownNameError(BACKBONES.unknown_message(name))


class TimmBackbone(nn.Module):
    """A timm model as a compatkit backbone: classifier removed, our pooling on its feature map.

    Shapes:
        x: (B, in_chans, H, W) -> forward_features: (B, num_features).
    """

    def __init__(
        self, model_name: str, *, width: float = 1.0, in_chans: int = 3, pooling: str = "avg"
    ) -> None:
        super().__init__()
        if width != 1.0:
            raise ValueError(f"timm backbones have a fixed width; got width={width}, expected 1.0")
        if pooling not in POOLINGS:
            raise ValueError(f"unknown pooling {pooling!r}; expected one of {', '.join(POOLINGS)}")
        try:
            timm = importlib.import_module("timm")
        except ImportError as exc:
            raise CompatkitError(
                f"backbone {TIMM_PREFIX}{model_name} needs timm, which cannot be imported here "
                f"({exc}); install it with a torchvision that matches torch: "
                "pip install 'compatkit[timm]'"
            ) from exc
        if not timm.is_model(model_name):
            close = difflib.get_close_matches(model_name, timm.list_models(), n=3, cutoff=0.6)
            hint = f"; did you mean {', '.join(TIMM_PREFIX + c for c in close)}?" if close else ""
            raise UnknownNameError(f"unknown timm model {model_name!r}{hint}")
        self.model = timm.create_model(
            model_name, pretrained=False, num_classes=0, global_pool="", in_chans=in_chans
        )
        self.num_features = int(self.model.num_features)
        self.pool = create_pooling(pooling)

    def forward_maps(self, x: Tensor) -> Tensor:
        """The unpooled feature map. Shapes: (B, in_chans, H, W) -> (B, num_features, h, w)."""
        maps = self.model.forward_features(x)
        if maps.ndim != 4:
            raise ValueError(
                f"timm model returned features of shape {tuple(maps.shape)}; only convolutional "
                "models with (B, C, H, W) feature maps are supported"
            )
        return maps

    def forward_features(self, x: Tensor) -> Tensor:
        """The pooled feature. Shapes: (B, in_chans, H, W) -> (B, num_features)."""
        return self.pool(self.forward_maps(x))

    def forward(self, x: Tensor) -> Tensor:
        return self.forward_features(x)
