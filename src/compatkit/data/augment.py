"""Batched training augmentations on uint8 image tensors, on whatever device they live on.

Random numbers come from the ``torch.Generator`` passed in (drawn on the generator's device and
moved to the images), so results depend only on the generator state, never on the device.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor

PaddingMode = Literal["zeros", "reflect"]


def _check_batch(x: Tensor, name: str = "x") -> None:
    if not isinstance(x, Tensor) or x.ndim != 4:
        raise ValueError(f"{name} must be a (B, C, H, W) tensor, got "
                         f"{tuple(x.shape) if isinstance(x, Tensor) else type(x).__name__}")
    if x.dtype != torch.uint8:
        raise TypeError(f"{name} must be uint8 images, got {x.dtype}")


def random_crop(
    x: Tensor,
    padding: int,
    generator: torch.Generator | None = None,
    *,
    padding_mode: PaddingMode = "zeros",
) -> Tensor:
    """Pad each side by ``padding`` and crop back to (H, W) at a random offset per sample.

    Shapes:
        x: (B, C, H, W) uint8 → (B, C, H, W) uint8. ``padding = 0`` returns the images unchanged.

    Raises:
        ValueError: negative padding, an unknown mode, or reflect padding of ``>= H`` or ``W``.
    """
    _check_batch(x)
    if isinstance(padding, bool) or not isinstance(padding, int) or padding < 0:
        raise ValueError(f"padding must be a non-negative int, got {padding!r}")
    if padding_mode not in ("zeros", "reflect"):
        raise ValueError(f"padding_mode must be 'zeros' or 'reflect', got {padding_mode!r}")
    b, _, h, w = x.shape
    if padding_mode == "reflect" and padding >= min(h, w):
        raise ValueError(f"reflect padding {padding} must be smaller than the image size {h}x{w}")
    gen_device = generator.device if generator is not None else torch.device("cpu")
    offsets = torch.randint(0, 2 * padding + 1, (2, b), generator=generator, device=gen_device)
    offsets = offsets.to(x.device)
    rows = offsets[0, :, None] + torch.arange(h, device=x.device) - padding  # (B, H) source rows
    cols = offsets[1, :, None] + torch.arange(w, device=x.device) - padding  # (B, W)
    if padding_mode == "reflect":
        rows = torch.where(rows < 0, -rows, torch.where(rows >= h, 2 * (h - 1) - rows, rows))
        cols = torch.where(cols < 0, -cols, torch.where(cols >= w, 2 * (w - 1) - cols, cols))
        inside = None
    else:
        inside = ((rows >= 0) & (rows < h))[:, :, None] & ((cols >= 0) & (cols < w))[:, None, :]
        rows, cols = rows.clamp(0, h - 1), cols.clamp(0, w - 1)
    batch = torch.arange(b, device=x.device)[:, None, None, None]
    channel = torch.arange(x.shape[1], device=x.device)[None, :, None, None]
    out = x[batch, channel, rows[:, None, :, None], cols[:, None, None, :]]
    if inside is not None:
        out = out * inside[:, None].to(out.dtype)
    return out


def affine_params(
    batch: int,
    generator: torch.Generator | None = None,
    *,
    rotation: float = 0.0,
    scale: float = 0.0,
    shift: float = 0.0,
) -> Tensor:
    """Per-sample affine parameters drawn uniformly: angle in ``[-rotation, rotation]`` degrees,
    scale factor in ``[1 - scale, 1 + scale]``, shifts in ``[-shift, shift]`` pixels.

    Shapes:
        → (batch, 4) float32 on the generator's device: (degrees, factor, shift x, shift y).

    Raises:
        ValueError: a negative strength, rotation above 180 degrees or scale of 1 or more.
    """
    _check_strengths(rotation, scale, shift)
    gen_device = generator.device if generator is not None else torch.device("cpu")
    u = torch.rand(batch, 4, generator=generator, device=gen_device) * 2.0 - 1.0
    strength = torch.tensor([rotation, scale, shift, shift], device=gen_device)
    params = u * strength
    params[:, 1] += 1.0
    return params


def apply_affine(x: Tensor, params: Tensor) -> Tensor:
    """Rotate, scale and shift each image about its centre by its row of ``params`` (see
    ``affine_params``): bilinear, zero fill, rounded back to uint8.

    Shapes:
        x: (B, C, H, W) uint8, params: (B, 4) → (B, C, H, W) uint8.
    """
    _check_batch(x)
    b, _, h, w = x.shape
    if params.shape != (b, 4):
        raise ValueError(f"params must have shape ({b}, 4), got {tuple(params.shape)}")
    params = params.to(x.device, torch.float32)
    angle = params[:, 0] * (math.pi / 180.0)
    factor = params[:, 1]
    cos, sin = torch.cos(angle) / factor, torch.sin(angle) / factor
    # affine_grid maps output to input coordinates in [-1, 1] units (2 px / W, 2 px / H), so
    # theta holds the inverse map p = R(-angle) (p' - shift) / factor; positive angles turn
    # the image clockwise as displayed (y points down).
    tx, ty = params[:, 2], params[:, 3]
    theta = torch.stack([
        torch.stack([cos, sin * h / w, -2.0 / w * (cos * tx + sin * ty)], dim=1),
        torch.stack([-sin * w / h, cos, 2.0 / h * (sin * tx - cos * ty)], dim=1),
    ], dim=1)
    grid = F.affine_grid(theta, [b, x.shape[1], h, w], align_corners=False)
    out = F.grid_sample(x.to(torch.float32), grid, mode="bilinear", padding_mode="zeros",
                        align_corners=False)
    return out.round_().clamp_(0, 255).to(torch.uint8)


def random_affine(
    x: Tensor,
    generator: torch.Generator | None = None,
    *,
    rotation: float = 0.0,
    scale: float = 0.0,
    shift: float = 0.0,
) -> Tensor:
    """Random rotation (± degrees), scale (± fraction) and shift (± pixels) per sample, batched
    on the images' device; no reflection, so characters keep their handedness.

    Shapes:
        x: (B, C, H, W) uint8 → (B, C, H, W) uint8. Zero strengths return the images unchanged.
    """
    _check_batch(x)
    params = affine_params(x.shape[0], generator, rotation=rotation, scale=scale, shift=shift)
    return apply_affine(x, params)


def _check_strengths(rotation: float, scale: float, shift: float) -> None:
    if not 0.0 <= rotation <= 180.0:
        raise ValueError(f"affine rotation must lie in [0, 180] degrees, got {rotation!r}")
    if not 0.0 <= scale < 1.0:
        raise ValueError(f"affine scale must lie in [0, 1), got {scale!r}")
    if not shift >= 0.0:
        raise ValueError(f"affine shift must be non-negative pixels, got {shift!r}")


def random_flip(x: Tensor, generator: torch.Generator | None = None, *, p: float = 0.5) -> Tensor:
    """Mirror each image left-right with probability ``p``, independently per sample.

    Shapes:
        x: (B, C, H, W) → (B, C, H, W), same dtype.
    """
    if not isinstance(x, Tensor) or x.ndim != 4:
        raise ValueError("x must be a (B, C, H, W) tensor")
    if not 0.0 <= p <= 1.0:
        raise ValueError(f"flip probability p must lie in [0, 1], got {p!r}")
    gen_device = generator.device if generator is not None else torch.device("cpu")
    flip = torch.rand(x.shape[0], generator=generator, device=gen_device).to(x.device) < p
    return torch.where(flip[:, None, None, None], x.flip(-1), x)


def normalize(x: Tensor, mean: Sequence[float], std: Sequence[float]) -> Tensor:
    """uint8 images to float32 ``(x / 255 − mean) / std``, per channel.

    Shapes:
        x: (B, C, H, W) uint8 → (B, C, H, W) float32; mean, std: C values in [0, 1] units.

    Raises:
        ValueError: mean/std lengths that differ from C, or a non-positive std.
    """
    _check_batch(x)
    c = x.shape[1]
    if len(mean) != c or len(std) != c:
        raise ValueError(f"mean and std need {c} values for {c}-channel images, got "
                         f"{len(mean)} and {len(std)}")
    if min(std) <= 0:
        raise ValueError(f"std values must be positive, got {tuple(std)}")
    m = torch.tensor(mean, dtype=torch.float32, device=x.device).view(1, c, 1, 1)
    s = torch.tensor(std, dtype=torch.float32, device=x.device).view(1, c, 1, 1)
    return (x.to(torch.float32) / 255.0 - m) / s


class Augmenter:
    """Training transform: random affine → random crop (padding) → random flip → normalise.

    Args:
        mean, std: per-channel statistics in [0, 1] units, e.g. from ``dataset_mean_std``.
        crop_padding: pixels of padding for the random crop; 0 disables it. Default 4.
        flip: random horizontal flips. Default True.
        padding_mode: "zeros" or "reflect". Default "zeros".
        affine_rotation, affine_scale, affine_shift: strengths of ``random_affine`` (degrees,
            fraction, pixels); all 0 (the default) disables it.
    """

    def __init__(
        self,
        mean: Sequence[float],
        std: Sequence[float],
        *,
        crop_padding: int = 4,
        flip: bool = True,
        padding_mode: PaddingMode = "zeros",
        affine_rotation: float = 0.0,
        affine_scale: float = 0.0,
        affine_shift: float = 0.0,
    ) -> None:
        if len(mean) != len(std) or not mean:
            raise ValueError(f"mean and std must have the same, non-zero length, got "
                             f"{len(mean)} and {len(std)}")
        if isinstance(crop_padding, bool) or not isinstance(crop_padding, int) or crop_padding < 0:
            raise ValueError(f"crop_padding must be a non-negative int, got {crop_padding!r}")
        self.mean = tuple(float(m) for m in mean)
        self.std = tuple(float(s) for s in std)
        self.crop_padding = crop_padding
        self.flip = flip
        self.padding_mode = padding_mode
        _check_strengths(affine_rotation, affine_scale, affine_shift)
        self.affine = {"rotation": float(affine_rotation), "scale": float(affine_scale),
                       "shift": float(affine_shift)}

    def __call__(self, x: Tensor, generator: torch.Generator | None = None) -> Tensor:
        """Augmented float32 batch (B, C, H, W) from uint8 images, deterministic per generator."""
        if any(self.affine.values()):
            x = random_affine(x, generator, **self.affine)
        if self.crop_padding:
            x = random_crop(x, self.crop_padding, generator, padding_mode=self.padding_mode)
        if self.flip:
            x = random_flip(x, generator)
        return normalize(x, self.mean, self.std)

    def eval_transform(self, x: Tensor) -> Tensor:
        """Evaluation transform: normalisation only (float32 (B, C, H, W))."""
        return normalize(x, self.mean, self.std)

    def __repr__(self) -> str:
        return (f"Augmenter(mean={self.mean}, std={self.std}, crop_padding={self.crop_padding}, "
                f"flip={self.flip}, padding_mode={self.padding_mode!r}, affine={self.affine})")
