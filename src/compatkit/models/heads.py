"""Embedding head and classifier heads (plain linear, cosine, ArcFace, CosFace).

Classifier heads share one interface: ``.weight`` of shape (C, D), a class attribute
``normalized`` (True when logits come from normalised weights and features, which BCT uses to
decide whether synthesised old-classifier rows are normalised), and
``forward(embedding, labels=None) -> logits (B, C)``. Margin heads apply their margin only when
``labels`` are given (training); without labels they return the plain scaled cosine.
Defaults ``s = 30``, ``m = 0.3`` follow reference/methods.md §1.
"""

from __future__ import annotations

import abc
import math
from collections.abc import Callable
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from compatkit.registry import Registry

CLASSIFIERS: Registry[type[ClassifierHead]] = Registry("classifier")


def register_classifier(name: str) -> Callable[[type[ClassifierHead]], type[ClassifierHead]]:
    """Decorator: register a classifier head class under ``name``."""
    return CLASSIFIERS.register(name)


class EmbeddingHead(nn.Module):
    """Linear projection from backbone features to the embedding, with an optional BN neck.

    With ``bn_neck`` the linear layer has no bias (the BatchNorm1d that follows has one).

    Shapes:
        x: (B, in_features) -> (B, embed_dim).
    """

    def __init__(self, in_features: int, embed_dim: int, *, bn_neck: bool = False) -> None:
        super().__init__()
        if in_features < 1 or embed_dim < 1:
            raise ValueError(
                f"in_features and embed_dim must be >= 1, got {in_features} and {embed_dim}"
            )
        self.fc = nn.Linear(in_features, embed_dim, bias=not bn_neck)
        self.bn: nn.Module = nn.BatchNorm1d(embed_dim) if bn_neck else nn.Identity()
        self.in_features = in_features
        self.embed_dim = embed_dim

    def forward(self, x: Tensor) -> Tensor:
        return self.bn(self.fc(x))


class ClassifierHead(nn.Module, abc.ABC):
    """Base class: a (C, D) weight matrix without bias and ``forward(embedding, labels)``.

    Args:
        embed_dim: D, the embedding dimension.
        num_classes: C, the number of classes.
    """

    normalized: ClassVar[bool] = False

    def __init__(self, embed_dim: int, num_classes: int) -> None:
        super().__init__()
        if embed_dim < 1 or num_classes < 1:
            raise ValueError(
                f"embed_dim and num_classes must be >= 1, got {embed_dim} and {num_classes}"
            )
        self.embed_dim = embed_dim
        self.num_classes = num_classes
        self.weight = nn.Parameter(torch.empty(num_classes, embed_dim))
        nn.init.kaiming_uniform_(self.weight, a=math.sqrt(5))  # nn.Linear's default

    @abc.abstractmethod
    def forward(self, embedding: Tensor, labels: Tensor | None = None) -> Tensor:
        """Logits of ``embedding`` (B, D) -> (B, C); margin heads use ``labels`` (B,) if given."""

    def _check(self, embedding: Tensor, labels: Tensor | None) -> None:
        if embedding.ndim != 2 or embedding.shape[1] != self.embed_dim:
            raise ValueError(
                f"{type(self).__name__} expects embeddings of shape (B, {self.embed_dim}), "
                f"got {tuple(embedding.shape)}"
            )
        if labels is not None:
            if labels.shape != (embedding.shape[0],):
                raise ValueError(
                    f"labels must have shape ({embedding.shape[0]},), got {tuple(labels.shape)}"
                )
            if labels.dtype.is_floating_point or labels.dtype == torch.bool:
                raise TypeError(f"labels must be an integer tensor, got dtype {labels.dtype}")

    def _cosine(self, embedding: Tensor) -> Tensor:
        """cos(embedding_i, weight_c) in float32, autocast off. Shapes: (B, D) -> (B, C)."""
        with torch.autocast(device_type=embedding.device.type, enabled=False):
            features = F.normalize(embedding.float(), dim=1)
            return F.linear(features, F.normalize(self.weight.float(), dim=1))

    def extra_repr(self) -> str:
        return f"embed_dim={self.embed_dim}, num_classes={self.num_classes}"


@register_classifier("linear")
class LinearClassifier(ClassifierHead):
    """Raw logits ``W·e`` of a bias-free linear layer; ``labels`` are ignored.

    Shapes:
        embedding: (B, D) -> logits (B, C).
    """

    normalized: ClassVar[bool] = False

    def forward(self, embedding: Tensor, labels: Tensor | None = None) -> Tensor:
        self._check(embedding, labels)
        return F.linear(embedding, self.weight)


@register_classifier("cosine")
class CosineClassifier(ClassifierHead):
    """Scaled cosine logits ``s·cos(e, W_c)`` with normalised features and weights.

    Args:
        scale: s. Default 30.

    Shapes:
        embedding: (B, D) -> logits (B, C), float32.
    """

    normalized: ClassVar[bool] = True

    def __init__(self, embed_dim: int, num_classes: int, *, scale: float = 30.0) -> None:
        super().__init__(embed_dim, num_classes)
        if not scale > 0:
            raise ValueError(f"scale must be > 0, got {scale}")
        self.scale = float(scale)

    def forward(self, embedding: Tensor, labels: Tensor | None = None) -> Tensor:
        self._check(embedding, labels)
        return self.scale * self._cosine(embedding)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, scale={self.scale}"


class _MarginClassifier(ClassifierHead, abc.ABC):
    """Shared constructor and forward of the additive-margin heads."""

    normalized: ClassVar[bool] = True

    def __init__(
        self, embed_dim: int, num_classes: int, *, scale: float = 30.0, margin: float = 0.3
    ) -> None:
        super().__init__(embed_dim, num_classes)
        if not scale > 0:
            raise ValueError(f"scale must be > 0, got {scale}")
        if margin < 0:
            raise ValueError(f"margin must be >= 0, got {margin}")
        self.scale = float(scale)
        self.margin = float(margin)

    @abc.abstractmethod
    def _target_cosine(self, cos_target: Tensor) -> Tensor:
        """The target class's cosine with the margin applied. Shapes: (B, 1) -> (B, 1)."""

    def forward(self, embedding: Tensor, labels: Tensor | None = None) -> Tensor:
        self._check(embedding, labels)
        cos = self._cosine(embedding)
        if labels is None:
            return self.scale * cos
        with torch.autocast(device_type=cos.device.type, enabled=False):
            index = labels.long().unsqueeze(1)
            target = self._target_cosine(cos.gather(1, index))
            return self.scale * cos.scatter(1, index, target)  # out-of-place scatter

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, scale={self.scale}, margin={self.margin}"


@register_classifier("arcface")
class ArcFaceClassifier(_MarginClassifier):
    """ArcFace: target logit ``s·cos(θ_y + m)``, other logits ``s·cos θ_c``.

    The cosine is computed in float32 (autocast off) and clamped to [−1+eps, 1−eps] before
    ``acos``, so loss and gradient stay finite at cos = ±1 (OpenCompatible pitfall §6.3.13).
    For θ_y > π − m the margin logit is no longer monotone in θ_y, as in the plain formula.

    Args:
        scale: s. Default 30.
        margin: m, the additive angular margin in radians. Default 0.3.
        eps: clamp distance from ±1. Default 1e-6.

    Shapes:
        embedding: (B, D); labels: (B,) int or None -> logits (B, C), float32.
    """

    def __init__(
        self,
        embed_dim: int,
        num_classes: int,
        *,
        scale: float = 30.0,
        margin: float = 0.3,
        eps: float = 1e-6,
    ) -> None:
        super().__init__(embed_dim, num_classes, scale=scale, margin=margin)
        if not 0 < eps < 1:
            raise ValueError(f"eps must be in (0, 1), got {eps}")
        self.eps = float(eps)

    def _target_cosine(self, cos_target: Tensor) -> Tensor:
        theta = torch.acos(cos_target.clamp(-1.0 + self.eps, 1.0 - self.eps))
        return torch.cos(theta + self.margin)


@register_classifier("cosface")
class CosFaceClassifier(_MarginClassifier):
    """CosFace: target logit ``s·(cos θ_y − m)``, other logits ``s·cos θ_c``.

    Args:
        scale: s. Default 30.
        margin: m, the additive cosine margin. Default 0.3.

    Shapes:
        embedding: (B, D); labels: (B,) int or None -> logits (B, C), float32.
    """

    def _target_cosine(self, cos_target: Tensor) -> Tensor:
        return cos_target - self.margin


def create_classifier(
    name: str, embed_dim: int, num_classes: int, **kwargs: Any
) -> ClassifierHead:
    """Build the classifier head registered as ``name`` ("linear", "cosine", "arcface", "cosface").

    Raises:
        UnknownNameError: an unknown name (the closest registered names listed).
        TypeError: a keyword the head does not take.
    """
    return CLASSIFIERS.get(name)(embed_dim, num_classes, **kwargs)
