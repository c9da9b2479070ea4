"""Synthetic glyphs: a deterministic many-class image set that needs no files.

Each class is a random glyph of 2–4 cubic Bézier strokes (some joined end to start), with its
own stroke widths. Each image redraws the glyph with jittered control points (an elastic
change of shape), a random affine pose (rotation, anisotropic scale, shear, translation), a
random stroke width, contrast, background level and additive Gaussian noise.

Rendering is vectorised: every stroke is sampled densely and each sample splats a Gaussian
weighted by its arc length, so the sum approximates a uniform line integral along the curve.
A Gaussian is separable, so a whole batch is one batched matrix product
``(B, H, K) @ (B, K, W)`` over the K samples.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import torch

from compatkit.data.base import DATASETS, DatasetSource, DatasetSplits, ImageDataset

NATIVE_SIZE = 32
MAX_STROKES = 4
MIN_STROKES = 2
SAMPLES_PER_STROKE = 48
RENDER_CHUNK = 1024

# Class-level glyph shape (coordinates in [-1, 1], the image spans the square).
ENDPOINT_RANGE = 0.7
CONTROL_SPREAD = 0.3
CONTROL_LIMIT = 0.85
CONNECT_PROB = 0.5
WIDTH_RANGE = (0.04, 0.065)  # Gaussian sigma of a stroke, in normalised units

# Per-image variation.
JITTER_STD = 0.07
ROTATION_DEG = 25.0
SCALE_RANGE = (0.75, 1.1)
ASPECT_STD = 0.1
SHEAR_RANGE = 0.25
SHIFT_RANGE = 0.18
WIDTH_FACTOR = (0.75, 1.3)
CONTRAST_RANGE = (0.7, 1.0)
BACKGROUND_RANGE = (0.0, 0.12)
NOISE_RANGE = (0.03, 0.12)
INK_GAIN = 1.5


def _uniform(gen: torch.Generator, shape: tuple[int, ...], low: float, high: float) -> torch.Tensor:
    return low + (high - low) * torch.rand(shape, generator=gen)


def _class_glyphs(num_classes: int, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor,
                                                                      torch.Tensor]:
    """Control points (C, S, 4, 2), active-stroke mask (C, S) and stroke sigma (C, S)."""
    c, s = num_classes, MAX_STROKES
    n_strokes = torch.randint(MIN_STROKES, MAX_STROKES + 1, (c,), generator=gen)
    start = _uniform(gen, (c, s, 2), -ENDPOINT_RANGE, ENDPOINT_RANGE)
    end = _uniform(gen, (c, s, 2), -ENDPOINT_RANGE, ENDPOINT_RANGE)
    connect = torch.rand((c, s), generator=gen) < CONNECT_PROB
    for k in range(1, s):
        start[:, k] = torch.where(connect[:, k, None], end[:, k - 1], start[:, k])
    chord = end - start
    bend = CONTROL_SPREAD * torch.randn((c, s, 2, 2), generator=gen)
    ctrl = torch.stack(
        [start, start + chord / 3 + bend[:, :, 0], start + 2 * chord / 3 + bend[:, :, 1], end],
        dim=2,
    ).clamp(-CONTROL_LIMIT, CONTROL_LIMIT)
    active = torch.arange(s)[None, :] < n_strokes[:, None]
    width = _uniform(gen, (c, s), *WIDTH_RANGE)
    return ctrl, active, width


def _poses(n: int, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Random affine maps: matrices (n, 2, 2) and translations (n, 2)."""
    theta = _uniform(gen, (n,), -ROTATION_DEG, ROTATION_DEG) * (math.pi / 180.0)
    scale = _uniform(gen, (n,), *SCALE_RANGE)
    aspect = torch.exp(ASPECT_STD * torch.randn((n,), generator=gen))
    shear = _uniform(gen, (n,), -SHEAR_RANGE, SHEAR_RANGE)
    cos, sin = torch.cos(theta), torch.sin(theta)
    rot = torch.stack([torch.stack([cos, -sin], -1), torch.stack([sin, cos], -1)], -2)
    shear_m = torch.zeros((n, 2, 2))
    shear_m[:, 0, 0] = 1.0
    shear_m[:, 1, 1] = 1.0
    shear_m[:, 0, 1] = shear
    diag = torch.zeros((n, 2, 2))
    diag[:, 0, 0] = scale * aspect
    diag[:, 1, 1] = scale / aspect
    shift = _uniform(gen, (n, 2), -SHIFT_RANGE, SHIFT_RANGE)
    return rot @ shear_m @ diag, shift


def _bernstein(t: torch.Tensor) -> torch.Tensor:
    """Cubic Bernstein basis (T, 4) at parameters ``t`` (T,)."""
    u = 1.0 - t
    return torch.stack([u**3, 3 * u**2 * t, 3 * u * t**2, t**3], dim=-1)


def _gaussian(q: torch.Tensor) -> torch.Tensor:
    """exp(-q), exactly 0 where it would be negligible: denormal floats make CPU math crawl."""
    return torch.where(q < 30.0, torch.exp(-q.clamp(max=30.0)), torch.zeros(()))


def render_strokes(ctrl: torch.Tensor, sigma: torch.Tensor, size: int) -> torch.Tensor:
    """Render cubic Bézier strokes as ink in [0, 1] on a ``size × size`` grid over [-1, 1]².

    Shapes:
        ctrl: (B, S, 4, 2) control points as (x, y); sigma: (B, S) stroke Gaussian sigma,
            0 for a stroke that is absent. Returns (B, size, size) float32.
    """
    b = ctrl.shape[0]
    t = torch.linspace(0.0, 1.0, SAMPLES_PER_STROKE)
    pts = torch.einsum("tk,bskd->bstd", _bernstein(t), ctrl)  # (B, S, T, 2)
    seg = (pts[:, :, 1:] - pts[:, :, :-1]).norm(dim=-1)  # (B, S, T-1)
    weight = torch.zeros(pts.shape[:3])
    weight[:, :, :-1] += seg / 2
    weight[:, :, 1:] += seg / 2
    pixel = 2.0 / size
    sig = torch.sqrt(sigma**2 + pixel**2 / 12.0)[:, :, None].expand_as(weight)  # box-filter AA
    weight = weight * (sigma > 0)[:, :, None] / (sig * math.sqrt(2 * math.pi))
    px, py = pts[..., 0].reshape(b, -1), pts[..., 1].reshape(b, -1)  # (B, K)
    sig, weight = sig.reshape(b, -1), weight.reshape(b, -1)
    grid = (torch.arange(size, dtype=torch.float32) + 0.5) * pixel - 1.0
    inv = 1.0 / (2 * sig[..., None] ** 2)
    gx = _gaussian((grid - px[..., None]).square_() * inv)  # (B, K, W)
    gy = _gaussian((grid - py[..., None]).square_() * inv) * weight[..., None]  # (B, K, H)
    line = torch.bmm(gy.transpose(1, 2).contiguous(), gx)  # (B, H, W)
    return (INK_GAIN * line).clamp_(0.0, 1.0)


def _check_int(label: str, value: object, low: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise ValueError(f"synthetic {label} must be an int >= {low}, got {value!r}")


def _check_options(num_classes: object, images_per_class: object, seed: object) -> None:
    _check_int("num_classes", num_classes, 2)
    _check_int("images_per_class", images_per_class, 1)
    _check_int("seed", seed, 0)


def make_synthetic(
    num_classes: int = 300,
    images_per_class: int = 40,
    *,
    seed: int = 0,
    image_size: int = NATIVE_SIZE,
) -> ImageDataset:
    """Render ``num_classes × images_per_class`` glyph images, ordered by class.

    Returns:
        ImageDataset "synthetic": images (N, 1, S, S) uint8, labels (N,) = class of each image.
    """
    _check_options(num_classes, images_per_class, seed)
    _check_int("image_size", image_size, 4)
    class_seed, image_seed = (int(x) for x in np.random.SeedSequence(seed).generate_state(2))
    class_gen = torch.Generator().manual_seed(class_seed)
    image_gen = torch.Generator().manual_seed(image_seed)

    ctrl, active, width = _class_glyphs(num_classes, class_gen)
    n = num_classes * images_per_class
    labels = torch.arange(num_classes).repeat_interleave(images_per_class)
    jitter = JITTER_STD * torch.randn((n, MAX_STROKES, 4, 2), generator=image_gen)
    matrix, shift = _poses(n, image_gen)
    width_factor = _uniform(image_gen, (n, 1), *WIDTH_FACTOR)
    contrast = _uniform(image_gen, (n, 1, 1), *CONTRAST_RANGE)
    background = _uniform(image_gen, (n, 1, 1), *BACKGROUND_RANGE)
    noise_std = _uniform(image_gen, (n, 1, 1), *NOISE_RANGE)

    images = np.empty((n, 1, image_size, image_size), dtype=np.uint8)
    for lo in range(0, n, RENDER_CHUNK):
        hi = min(lo + RENDER_CHUNK, n)
        cls = labels[lo:hi]
        pts = ctrl[cls] + jitter[lo:hi]
        pts = torch.einsum("bij,bskj->bski", matrix[lo:hi], pts) + shift[lo:hi, None, None, :]
        sigma = width[cls] * width_factor[lo:hi] * active[cls]
        ink = render_strokes(pts, sigma, image_size)
        noise = torch.randn((hi - lo, image_size, image_size), generator=image_gen)
        pixel = background[lo:hi] + contrast[lo:hi] * ink + noise_std[lo:hi] * noise
        images[lo:hi, 0] = (pixel.clamp(0.0, 1.0) * 255.0).round().to(torch.uint8).numpy()
    names = tuple(f"glyph{i:0{len(str(num_classes - 1))}d}" for i in range(num_classes))
    return ImageDataset("synthetic", images, labels.numpy(), names)


@DATASETS.register("synthetic")
def synthetic(
    root: Path | None,
    *,
    num_classes: int = 300,
    images_per_class: int = 40,
    seed: int = 0,
) -> DatasetSource:
    """Synthetic random glyphs (default 300 classes × 40, 32 px gray), no files needed."""
    if root is not None:
        raise ValueError(f"dataset 'synthetic' is generated and takes no root, got {root}")
    _check_options(num_classes, images_per_class, seed)

    def build(image_size: int | None) -> DatasetSplits:
        size = NATIVE_SIZE if image_size is None else image_size
        return DatasetSplits(
            train=make_synthetic(num_classes, images_per_class, seed=seed, image_size=size),
            test=None,
        )

    return DatasetSource(build=build, cacheable=False)
