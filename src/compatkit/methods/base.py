"""The method interface: loss terms plus the state they need, selected by name from a registry.

The training loop only calls ``on_train_start``, ``on_epoch_start`` and ``step``; it never
branches on a method's name. Adding a method is one file plus one import in ``__init__``.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any, ClassVar, NamedTuple

import torch
from pydantic import Field
from torch import Tensor, nn

from compatkit.config_base import StrictModel
from compatkit.registry import Registry


class MethodConfig(StrictModel):
    """Fields every method has: its registry name and the base classification loss."""

    name: str
    label_smoothing: float = Field(0.0, ge=0.0, lt=1.0)


class LossOutput(NamedTuple):
    """The scalar to backpropagate and its named parts (detached floats, for logging)."""

    total: Tensor
    parts: dict[str, float]


class MethodBatch(NamedTuple):
    """One training batch, already augmented and on the training device.

    Shapes: images (B, C, H, W) float32; labels (B,) int64 classifier rows of the new model;
    raw (B, C, H, W) uint8, the same images before augmentation (for methods that need more
    views, through ``MethodContext.augment``).
    """

    images: Tensor
    labels: Tensor
    epoch: int
    step: int
    raw: Tensor | None = None


@dataclass
class MethodContext:
    """What a method may use: the models, the training set and the distributed runtime.

    ``forward`` calls the trained module through its (possibly DDP-wrapped) handle, so
    gradients are synchronised; ``model`` is the bare module for attribute access.
    ``train_batches`` iterates the training set without augmentation, in a fixed order,
    yielding (images float (B, C, H, W) on the device, labels (B,) classifier rows).
    ``gather`` concatenates a tensor across processes (identity in one process).
    ``frozen`` holds further frozen models by role (e.g. ``"new"``, ``"side"`` for FCT).
    ``augment`` applies the run's training augmentation to a uint8 batch (seeded generator).
    """

    model: nn.Module
    forward: Callable[..., Any]
    old_model: nn.Module | None
    old_manifest: Any
    class_ids: tuple[int, ...]
    device: torch.device
    epochs: int
    train_batches: Callable[[], Iterator[tuple[Tensor, Tensor]]]
    gather: Callable[[Tensor], Tensor] = field(default=lambda t: t)
    frozen: dict[str, nn.Module] = field(default_factory=dict)
    augment: Callable[[Tensor], Tensor] | None = None
    rank: int = 0
    world_size: int = 1

    @property
    def num_classes(self) -> int:
        return len(self.class_ids)


class EvalEmbedders(NamedTuple):
    """How a trained method is evaluated: one query embedder against named gallery embedders.

    Each embedder maps normalised image batches (B, C, H, W) to embeddings (B, D). Gallery
    names become the metric keys (``self``, ``cross``, ``transformed``, ...); ``old`` is the
    reference φ_o, also evaluated against itself as ``old_old``.
    """

    query: Callable[[Tensor], Tensor]
    galleries: dict[str, Callable[[Tensor], Tensor]]
    old: Callable[[Tensor], Tensor] | None = None


class Method(nn.Module):
    """Base class: holds the config and context; subclasses implement ``step``."""

    config_cls: ClassVar[type[MethodConfig]] = MethodConfig
    needs_old_model: ClassVar[bool] = False
    backward_compatible: ClassVar[bool] = False
    artifact_kind: ClassVar[str] = "model"

    def __init__(self, cfg: MethodConfig, ctx: MethodContext) -> None:
        super().__init__()
        self.cfg = cfg
        self.ctx = ctx

    @classmethod
    def build_trained_module(
        cls, model_cfg: Any, method_cfg: MethodConfig, *, num_classes: int, in_chans: int,
        frozen: dict[str, nn.Module],
    ) -> nn.Module:
        """The module this method trains, built before the method (the loop moves and wraps it).

        The default is a new embedding model with a classifier over the training classes.
        """
        from compatkit.models import create_model

        return create_model(
            backbone=model_cfg.backbone, embed_dim=model_cfg.embed_dim, num_classes=num_classes,
            classifier=model_cfg.classifier, in_chans=in_chans, width=model_cfg.width,
            pooling=model_cfg.pooling, bn_neck=model_cfg.bn_neck, normalize=model_cfg.normalize,
            classifier_kwargs=dict(model_cfg.classifier_kwargs),
        )

    @classmethod
    def relations(cls, old_manifest: Any, frozen_manifests: dict[str, Any]) -> dict[str, Any]:
        """Relations the artifact declares (manifest fields): by default, a backward-compatible
        method's model may query the old model's gallery."""
        if cls.backward_compatible and old_manifest is not None:
            return {"compatible_with": (old_manifest.model_version,)}
        return {}

    def trained_module(self) -> nn.Module:
        """The module whose weights are optimised and checkpointed (the new model by default)."""
        return self.ctx.model

    def extra_parameters(self) -> list[nn.Parameter]:
        """Parameters the method owns beyond the trained module (e.g. a σ head)."""
        return []

    def evaluation_embedders(self) -> EvalEmbedders:
        """Default: the trained model queries its own gallery (self) and the old one (cross)."""
        model = self.trained_module()
        galleries: dict[str, Callable[[Tensor], Tensor]] = {"self": model.embed}
        old = self.ctx.old_model
        if old is not None and old.embed_dim == model.embed_dim:
            galleries["cross"] = old.embed
        return EvalEmbedders(model.embed, galleries, old.embed if old is not None else None)

    def on_train_start(self) -> None:
        """Called once before the first step (after a resume too)."""

    def on_epoch_start(self, epoch: int) -> None:
        """Called at the start of every epoch."""

    def classification_loss(self, logits: Tensor, labels: Tensor) -> Tensor:
        """Cross-entropy of the new model's own classifier (with its label smoothing)."""
        return nn.functional.cross_entropy(
            logits.float(), labels, label_smoothing=self.cfg.label_smoothing
        )

    def step(self, batch: MethodBatch) -> LossOutput:
        raise NotImplementedError(f"{type(self).__name__} must implement step()")


METHODS: Registry[type[Method]] = Registry("method")


def register_method(name: str) -> Callable[[type[Method]], type[Method]]:
    """Class decorator: register a ``Method`` subclass; its config's ``name`` must match."""

    def decorator(cls: type[Method]) -> type[Method]:
        declared = cls.config_cls.model_fields["name"].default
        if declared != name:
            raise ValueError(
                f"method {cls.__name__} registers as {name!r} but its config names {declared!r}"
            )
        METHODS.add(name, cls)
        return cls

    return decorator


def method_config_from_dict(data: dict[str, Any] | MethodConfig) -> MethodConfig:
    """Validate a method config, choosing the config class by its ``name`` field."""
    if isinstance(data, MethodConfig):
        return data
    if not isinstance(data, dict) or "name" not in data:
        raise ValueError(f"method config must be a mapping with a 'name' key, got {data!r}")
    return METHODS.get(str(data["name"])).config_cls.model_validate(data)


def create_method(cfg: MethodConfig, ctx: MethodContext) -> Method:
    """Instantiate the registered method for ``cfg``, checking that it has what it needs."""
    cls = METHODS.get(cfg.name)
    if cls.needs_old_model and ctx.old_model is None:
        raise ValueError(f"method {cfg.name!r} needs an old model (set old_model in the config)")
    return cls(cfg, ctx)
