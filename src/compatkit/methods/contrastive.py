"""New-to-old InfoNCE (``contra``) and RACT (``ract``), reference methods.md §2.2 and §2.3.

Both losses L2-normalise their inputs, take their negatives from ``keys`` (the local batch by
default, the global batch from ``gather_keys`` in distributed runs) and mask every key of the
anchor's class, the anchor itself included: the only positive is the same image's old feature.
This module also holds ``PointToPointMethod``, the step shared by the methods of such losses.
"""

from __future__ import annotations

from typing import ClassVar, Literal

import torch.nn.functional as F
from pydantic import Field
from torch import Tensor, nn

from compatkit.methods.base import (
    LossOutput,
    Method,
    MethodBatch,
    MethodConfig,
    MethodContext,
    register_method,
)
from compatkit.methods.distributed import CompatKeys, gather_keys, resolve_keys
from compatkit.methods.functional import (
    float32_region,
    info_nce_from_parts,
    masked_topk,
    reduce_per_sample,
    require_same_embed_dim,
    same_class_mask,
)


def _unit(x: Tensor) -> Tensor:
    return F.normalize(x.float(), dim=1)


class ContrastiveLoss(nn.Module):
    """New-to-old InfoNCE (OpenCompatible ``contra``): positive ⟨n_i, o_i⟩, negatives ⟨n_i, o_j⟩.

    Args:
        temperature: softmax temperature τ. Default 0.01.
        topk_neg: hardest old negatives kept per anchor; 0 or less keeps all. Default 10.

    Shapes:
        new: (B, D) new-model embeddings, with gradient.  old: (B, D) old-model embeddings of
        the same samples (detached here).  labels: (B,) int64.
        keys: optional CompatKeys over K rows (e.g. ``gather_keys``); default the local batch.

    Returns:
        Scalar mean over the B anchors, or the (B,) losses with ``reduction="none"``.
    """

    def __init__(self, *, temperature: float = 0.01, topk_neg: int = 10) -> None:
        super().__init__()
        if not temperature > 0:
            raise ValueError(f"temperature must be > 0, got {temperature}")
        self.temperature = float(temperature)
        self.topk_neg = int(topk_neg)

    def forward(self, new: Tensor, old: Tensor, labels: Tensor, *,
                keys: CompatKeys | None = None, reduction: str = "mean") -> Tensor:
        keys = resolve_keys(new, old, labels, keys, stopgrad_new=True)
        with float32_region(new):
            n = _unit(new)
            valid = ~same_class_mask(labels, keys.labels)
            n2o = masked_topk(n @ _unit(keys.old).T, valid, self.topk_neg)
            pos = (n * _unit(old.detach())).sum(1)
            return reduce_per_sample(info_nce_from_parts(pos, [n2o], self.temperature), reduction)


class RACTLoss(nn.Module):
    """Regression-alleviating compatible loss (RACT, reference methods.md §2.3).

    The only positive of each new feature is the old feature of the same sample. Negatives are
    the top-k old *and* the top-k new features of other classes, in one softmax, so a
    new-to-new negative cannot outrank the new-to-old positive unpunished.

    Args:
        temperature: softmax temperature τ. Default 0.01.
        topk_neg: hardest negatives kept per anchor and kind; 0 or less keeps all. Default 10.
        stopgrad_new_keys: no gradient through new features used as keys (as in the official
            multi-GPU runs). Default True.

    Shapes:
        new: (B, D) new-model embeddings, with gradient.  old: (B, D) old-model embeddings of
        the same samples (detached here).  labels: (B,) int64.
        keys: optional CompatKeys over K rows (e.g. ``gather_keys``); default the local batch.

    Returns:
        Scalar mean over the B anchors, or the (B,) losses with ``reduction="none"``.
    """

    def __init__(self, *, temperature: float = 0.01, topk_neg: int = 10,
                 stopgrad_new_keys: bool = True) -> None:
        super().__init__()
        if not temperature > 0:
            raise ValueError(f"temperature must be > 0, got {temperature}")
        self.temperature = float(temperature)
        self.topk_neg = int(topk_neg)
        self.stopgrad_new_keys = bool(stopgrad_new_keys)

    def forward(self, new: Tensor, old: Tensor, labels: Tensor, *,
                keys: CompatKeys | None = None, reduction: str = "mean") -> Tensor:
        keys = resolve_keys(new, old, labels, keys, stopgrad_new=self.stopgrad_new_keys)
        with float32_region(new):
            n = _unit(new)
            valid = ~same_class_mask(labels, keys.labels)
            n2o = masked_topk(n @ _unit(keys.old).T, valid, self.topk_neg)
            n2n = masked_topk(n @ _unit(keys.new).T, valid, self.topk_neg)
            pos = (n * _unit(old.detach())).sum(1)
            losses = info_nce_from_parts(pos, [n2o, n2n], self.temperature)
            return reduce_per_sample(losses, reduction)


class PointToPointMethod(Method):
    """Classification loss + weight · a loss of new vs old embeddings over gathered keys.

    Subclasses set ``config_cls`` and implement ``build_loss``; a config field
    ``stopgrad_new_keys`` (default True) decides whether the local new keys keep gradient.
    """

    needs_old_model: ClassVar[bool] = True
    backward_compatible: ClassVar[bool] = True

    def __init__(self, cfg: MethodConfig, ctx: MethodContext) -> None:
        super().__init__(cfg, ctx)
        self.loss = self.build_loss()

    def build_loss(self) -> nn.Module:
        raise NotImplementedError(f"{type(self).__name__} must implement build_loss()")

    def on_train_start(self) -> None:
        require_same_embed_dim(self.ctx.model.embed_dim, self.ctx.old_model.embed_dim,
                               self.cfg.name)

    def step(self, batch: MethodBatch) -> LossOutput:
        out = self.ctx.forward(batch.images, batch.labels)
        old = self.ctx.old_model.embed(batch.images)
        cls = self.classification_loss(out.logits, batch.labels)
        stopgrad = bool(getattr(self.cfg, "stopgrad_new_keys", True))
        keys = gather_keys(out.embedding, old, batch.labels, stopgrad_new=stopgrad)
        comp = self.loss(out.embedding, old, batch.labels, keys=keys)
        total = cls + self.cfg.weight * comp
        return LossOutput(total, {"cls": cls.item(), self.cfg.name: comp.item()})


class ContraConfig(MethodConfig):
    name: Literal["contra"] = "contra"
    weight: float = Field(1.0, ge=0.0)
    temperature: float = Field(0.01, gt=0.0)
    topk_neg: int = Field(10, ge=0)


@register_method("contra")
class Contra(PointToPointMethod):
    """Classification loss + weight · new-to-old InfoNCE over the global batch."""

    config_cls = ContraConfig

    def build_loss(self) -> nn.Module:
        return ContrastiveLoss(temperature=self.cfg.temperature, topk_neg=self.cfg.topk_neg)


class RACTConfig(MethodConfig):
    name: Literal["ract"] = "ract"
    weight: float = Field(1.0, ge=0.0)
    temperature: float = Field(0.01, gt=0.0)
    topk_neg: int = Field(10, ge=0)
    stopgrad_new_keys: bool = True


@register_method("ract")
class RACT(PointToPointMethod):
    """Classification loss + weight · RACTLoss(new, old) over the global batch."""

    config_cls = RACTConfig

    def build_loss(self) -> nn.Module:
        return RACTLoss(temperature=self.cfg.temperature, topk_neg=self.cfg.topk_neg,
                        stopgrad_new_keys=self.cfg.stopgrad_new_keys)
