"""Global pooling of convolutional feature maps: average and generalised-mean (GeM).

GeM follows reference/methods.md §1 (OpenCompatible backbone): fixed ``p = 3``, ``eps = 1e-6``,
``GeM(x) = (mean_{h,w} clamp(x, eps)^p)^{1/p}``.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

POOLINGS = ("avg", "gem")


class GeM(nn.Module):
    """Generalised-mean pooling over the spatial dimensions.

    ``p = 1`` is average pooling and ``p → ∞`` tends to max pooling. The power is taken in
    float32 (a cube of fp16 activations overflows easily); the result has the input's dtype.

    Args:
        p: the exponent. Default 3.
        eps: activations are clamped to at least ``eps`` before the power. Default 1e-6.
        learnable: make ``p`` a trainable parameter. Default False (fixed, as in the reference).

    Shapes:
        x: (B, C, H, W) -> (B, C).
    """

    def __init__(self, p: float = 3.0, eps: float = 1e-6, learnable: bool = False) -> None:
        super().__init__()
        if p <= 0:
            raise ValueError(f"GeM exponent p must be > 0, got {p}")
        if eps <= 0:
            raise ValueError(f"GeM eps must be > 0, got {eps}")
        p_tensor = torch.tensor(float(p))
        if learnable:
            self.p = nn.Parameter(p_tensor)
        else:
            self.register_buffer("p", p_tensor)
        self.eps = eps

    def forward(self, x: Tensor) -> Tensor:
        if x.ndim != 4:
            raise ValueError(f"GeM expects a (B, C, H, W) feature map, got shape {tuple(x.shape)}")
        p = self.p.float()
        with torch.autocast(device_type=x.device.type, enabled=False):
            pooled = x.float().clamp(min=self.eps).pow(p).mean(dim=(-2, -1)).pow(1.0 / p)
        return pooled.to(x.dtype)

    def extra_repr(self) -> str:
        kind = "learnable" if isinstance(self.p, nn.Parameter) else "fixed"
        return f"p={float(self.p):.4g} ({kind}), eps={self.eps}"


class AvgPool(nn.Module):
    """Global average pooling. Shapes: x: (B, C, H, W) -> (B, C)."""

    def forward(self, x: Tensor) -> Tensor:
        if x.ndim != 4:
            raise ValueError(
                f"AvgPool expects a (B, C, H, W) feature map, got shape {tuple(x.shape)}"
            )
        return x.mean(dim=(-2, -1))


def create_pooling(name: str) -> nn.Module:
    """The global pooling layer called ``name`` ("avg" or "gem" with p = 3).

    Raises:
        ValueError: an unknown name (the known ones listed).
    """
    if name == "avg":
        return AvgPool()
    if name == "gem":
        return GeM()
    raise ValueError(f"unknown pooling {name!r}; expected one of {', '.join(POOLINGS)}")
