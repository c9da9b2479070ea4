"""The embedding model (backbone + embedding head + optional classifier) and the frozen wrapper.

``create_model(**spec)`` rebuilds a model from the plain-dict ``spec`` it records, so the spec
can go into an artifact manifest. ``FrozenModel`` wraps the old model of a compatibility method:
eval mode for good, no gradients, detached outputs (reference/methods.md §1 "Old model handling").
"""

from __future__ import annotations

import copy
from typing import Any, NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from compatkit.models.backbones import create_backbone
from compatkit.models.heads import CLASSIFIERS, ClassifierHead, EmbeddingHead, create_classifier


class ModelOutput(NamedTuple):
    """What ``EmbeddingModel.forward`` returns; both fields are always present.

    embedding: (B, D), L2-normalised when the model normalises.
    feature: (B, D), the embedding before normalisation (what the classifier sees).
    logits: (B, C), or None when the model has no classifier.
    """

    embedding: Tensor
    feature: Tensor
    logits: Tensor | None


class EmbeddingModel(nn.Module):
    """Backbone → embedding head → (optional) classifier.

    The classifier receives the un-normalised embedding; cosine/margin heads normalise it
    themselves. Build it with ``create_model``, which also records ``spec``.

    Args:
        backbone: a module with ``num_features`` and ``forward_features(x) -> (B, num_features)``.
        head: the embedding head, ``(B, num_features) -> (B, D)``.
        classifier: a classifier head on the embedding, or None.
        normalize: L2-normalise the returned embedding. Default True.
        spec: the ``create_model`` keywords that rebuild this model, or None when built by hand.

    Shapes:
        x: (B, in_chans, H, W); labels: (B,) int or None.
        embed(x): (B, D); forward(x, labels): ModelOutput(embedding (B, D), feature (B, D),
            logits (B, C) | None).
    """

    def __init__(
        self,
        backbone: nn.Module,
        head: EmbeddingHead,
        classifier: ClassifierHead | None = None,
        *,
        normalize: bool = True,
        spec: dict[str, Any] | None = None,
    ) -> None:
        super().__init__()
        num_features = getattr(backbone, "num_features", None)
        if num_features != head.in_features:
            raise ValueError(
                f"backbone gives {num_features} features but the head expects {head.in_features}"
            )
        if classifier is not None and classifier.embed_dim != head.embed_dim:
            raise ValueError(
                f"classifier expects embed_dim {classifier.embed_dim}, head gives {head.embed_dim}"
            )
        self.backbone = backbone
        self.head = head
        self.classifier = classifier
        self.normalize = normalize
        self.embed_dim = head.embed_dim
        self.num_classes = None if classifier is None else classifier.num_classes
        self._spec = copy.deepcopy(spec)

    @property
    def spec(self) -> dict[str, Any] | None:
        """A copy of the ``create_model`` keywords (None when the model was built by hand)."""
        return copy.deepcopy(self._spec)

    def raw_embedding(self, x: Tensor) -> Tensor:
        """The embedding before L2 normalisation. Shapes: (B, in_chans, H, W) -> (B, D)."""
        return self.head(self.backbone.forward_features(x))

    def embed(self, x: Tensor) -> Tensor:
        """The retrieval embedding (L2-normalised when ``normalize``). Shapes: -> (B, D)."""
        return self._finish(self.raw_embedding(x))

    def forward(self, x: Tensor, labels: Tensor | None = None) -> ModelOutput:
        raw = self.raw_embedding(x)
        logits = None if self.classifier is None else self.classifier(raw, labels)
        return ModelOutput(embedding=self._finish(raw), feature=raw, logits=logits)

    def _finish(self, raw: Tensor) -> Tensor:
        return F.normalize(raw, dim=1) if self.normalize else raw


def create_model(
    *,
    backbone: str,
    embed_dim: int = 128,
    num_classes: int | None = None,
    classifier: str = "linear",
    in_chans: int = 3,
    width: float = 1.0,
    pooling: str = "avg",
    bn_neck: bool = False,
    normalize: bool = True,
    classifier_kwargs: dict[str, Any] | None = None,
) -> EmbeddingModel:
    """Build an ``EmbeddingModel``; ``create_model(**model.spec)`` rebuilds the same architecture.

    Args:
        backbone: a registered backbone name (``compatkit.models.list_backbones()``).
        embed_dim: D. Default 128.
        num_classes: C, or None for no classifier.
        classifier: classifier head name ("linear", "cosine", "arcface", "cosface").
        in_chans, width, pooling: passed to the backbone.
        bn_neck: BatchNorm1d after the embedding projection.
        normalize: L2-normalise the embedding returned by ``embed`` and ``forward``.
        classifier_kwargs: extra head keywords, e.g. ``{"scale": 30.0, "margin": 0.3}``.

    Raises:
        UnknownNameError: unknown backbone or classifier name (close names listed).
        ValueError: non-positive sizes, or classifier_kwargs without num_classes.
    """
    if embed_dim < 1:
        raise ValueError(f"embed_dim must be >= 1, got {embed_dim}")
    if num_classes is not None and num_classes < 1:
        raise ValueError(f"num_classes must be >= 1 or None, got {num_classes}")
    if num_classes is None and classifier_kwargs:
        raise ValueError(
            f"classifier_kwargs {classifier_kwargs!r} given but num_classes is None (no classifier)"
        )
    CLASSIFIERS.get(classifier)  # fail on an unknown head name even without num_classes
    spec: dict[str, Any] = {
        "backbone": backbone,
        "embed_dim": embed_dim,
        "num_classes": num_classes,
        "classifier": classifier,
        "in_chans": in_chans,
        "width": width,
        "pooling": pooling,
        "bn_neck": bn_neck,
        "normalize": normalize,
        "classifier_kwargs": dict(classifier_kwargs or {}),
    }
    trunk = create_backbone(backbone, width=width, in_chans=in_chans, pooling=pooling)
    head = EmbeddingHead(trunk.num_features, embed_dim, bn_neck=bn_neck)
    clf = None
    if num_classes is not None:
        clf = create_classifier(classifier, embed_dim, num_classes, **(classifier_kwargs or {}))
    return EmbeddingModel(trunk, head, clf, normalize=normalize, spec=spec)


class FrozenModel(nn.Module):
    """A module frozen for use as the old model: eval mode for good, no grad, detached outputs.

    ``train(True)`` leaves it (and everything inside) in eval mode, so BatchNorm statistics never
    change; attributes not found on the wrapper (``classifier``, ``embed_dim``, ``spec``, …) are
    read from the wrapped module. Load weights before wrapping: the state dict gains ``module.``.

    Shapes:
        as the wrapped module's ``forward`` and ``embed``.
    """

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        if isinstance(model, FrozenModel):
            model = model.module
        self.module = model
        self.module.requires_grad_(False)
        self.train(False)

    def train(self, mode: bool = True) -> FrozenModel:
        """Keep eval mode whatever ``mode`` is (a parent's ``.train()`` cannot unfreeze BN)."""
        self.training = False
        self.module.train(False)
        return self

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        with torch.no_grad():
            return _detach(self.module(*args, **kwargs))

    def embed(self, x: Tensor) -> Tensor:
        """The wrapped model's ``embed(x)`` without gradient. Shapes: -> (B, D)."""
        embed = getattr(self.module, "embed", None)
        if embed is None:
            raise AttributeError(f"{type(self.module).__name__} has no embed() method")
        with torch.no_grad():
            return _detach(embed(x))

    def __getattr__(self, name: str) -> Any:
        try:
            return super().__getattr__(name)
        except AttributeError:
            module = super().__getattr__("module")
            return getattr(module, name)


def _detach(value: Any) -> Any:
    if isinstance(value, Tensor):
        return value.detach()
    if isinstance(value, tuple) and hasattr(value, "_fields"):
        return type(value)(*(_detach(v) for v in value))
    if isinstance(value, tuple | list):
        return type(value)(_detach(v) for v in value)
    if isinstance(value, dict):
        return {k: _detach(v) for k, v in value.items()}
    return value
