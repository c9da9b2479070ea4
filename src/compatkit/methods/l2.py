"""L2 feature regression to the old embedding (reference methods.md §2.2, ``l2``)."""

from __future__ import annotations

from typing import Literal

import torch.nn.functional as F
from pydantic import Field
from torch import Tensor

from compatkit.methods.base import LossOutput, Method, MethodBatch, MethodConfig, register_method


def l2_compat_loss(new: Tensor, old: Tensor) -> Tensor:
    """Mean squared difference of the L2-normalised features (scale invariant, 0 iff equal).

    Shapes: new (B, D), old (B, D) → scalar.
    """
    if new.shape != old.shape:
        raise ValueError(f"new and old features must have one shape, got {tuple(new.shape)} "
                         f"and {tuple(old.shape)}")
    diff = F.normalize(new.float(), dim=1) - F.normalize(old.float().detach(), dim=1)
    return diff.pow(2).mean()


class L2Config(MethodConfig):
    name: Literal["l2"] = "l2"
    weight: float = Field(1.0, ge=0.0)


@register_method("l2")
class L2(Method):
    """Classification loss + weight · MSE between normalised new and old features."""

    config_cls = L2Config
    needs_old_model = True
    backward_compatible = True

    def step(self, batch: MethodBatch) -> LossOutput:
        out = self.ctx.forward(batch.images, batch.labels)
        old = self.ctx.old_model.embed(batch.images)
        cls = self.classification_loss(out.logits, batch.labels)
        comp = l2_compat_loss(out.embedding, old)
        return LossOutput(cls + self.cfg.weight * comp, {"cls": cls.item(), "l2": comp.item()})
