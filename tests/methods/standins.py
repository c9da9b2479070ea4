"""Tiny stand-ins for the model API the methods use (no dependency on ``compatkit.models``).

A "backbone" is one Linear layer on flattened images; the old model is wrapped so that it has
no gradient and returns detached outputs, like ``compatkit.models.FrozenModel``.
"""

from __future__ import annotations

from types import SimpleNamespace
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from compatkit.methods.base import MethodContext

IMAGE_SHAPE = (1, 3, 3)


class Output(NamedTuple):
    embedding: Tensor
    feature: Tensor
    logits: Tensor | None


class StandinClassifier(nn.Module):
    """Bias-free linear logits, or scaled cosine logits when ``normalized``."""

    def __init__(self, dim: int, num_classes: int, *, normalized: bool = False,
                 scale: float = 10.0) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.randn(num_classes, dim))
        self.normalized = normalized
        self.scale = scale

    def forward(self, embedding: Tensor, labels: Tensor | None = None) -> Tensor:
        if self.normalized:
            return self.scale * F.normalize(embedding, dim=1) @ F.normalize(self.weight, dim=1).T
        return embedding @ self.weight.T


class StandinModel(nn.Module):
    def __init__(self, dim: int, num_classes: int | None, *, normalized: bool = False) -> None:
        super().__init__()
        self.backbone = nn.Linear(int(torch.tensor(IMAGE_SHAPE).prod()), dim)
        self.classifier = (None if num_classes is None
                           else StandinClassifier(dim, num_classes, normalized=normalized))
        self.embed_dim = dim

    def forward(self, images: Tensor, labels: Tensor | None = None) -> Output:
        feature = self.backbone(images.flatten(1))
        logits = None if self.classifier is None else self.classifier(feature, labels)
        return Output(F.normalize(feature, dim=1), feature, logits)

    def embed(self, images: Tensor) -> Tensor:
        return self.forward(images).embedding


class StandinFrozen(nn.Module):
    def __init__(self, model: StandinModel) -> None:
        super().__init__()
        self.module = model.requires_grad_(False).eval()

    @property
    def classifier(self) -> nn.Module | None:
        return self.module.classifier

    @property
    def embed_dim(self) -> int:
        return self.module.embed_dim

    def forward(self, images: Tensor) -> Output:
        with torch.no_grad():
            out = self.module(images)
        return Output(*(None if t is None else t.detach() for t in out))

    def embed(self, images: Tensor) -> Tensor:
        return self.forward(images).embedding


def make_context(*, new_ids=(0, 1, 2, 3), old_ids=(0, 1, 2), dim: int = 6,
                 old_dim: int | None = None, n: int = 16, seed: int = 0,
                 normalized: bool = False, old_classifier: bool = True):
    """A MethodContext with stand-in models plus the (images, labels) of its training set."""
    torch.manual_seed(seed)
    old = StandinModel(old_dim or dim, len(old_ids) if old_classifier else None,
                       normalized=normalized)
    new = StandinModel(dim, len(new_ids), normalized=normalized)
    images = torch.randn(n, *IMAGE_SHAPE)
    labels = torch.arange(n) % len(new_ids)

    def train_batches():
        for start in range(0, n, 8):
            yield images[start:start + 8], labels[start:start + 8]

    ctx = MethodContext(model=new, forward=new, old_model=StandinFrozen(old),
                        old_manifest=SimpleNamespace(class_ids=tuple(old_ids)),
                        class_ids=tuple(new_ids), device=torch.device("cpu"), epochs=2,
                        train_batches=train_batches)
    return ctx, images, labels
