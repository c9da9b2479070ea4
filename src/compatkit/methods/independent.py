"""Independent training: the new model's own classification loss, no compatibility term."""

from __future__ import annotations

from typing import Literal

from compatkit.methods.base import LossOutput, Method, MethodBatch, MethodConfig, register_method


class IndependentConfig(MethodConfig):
    name: Literal["independent"] = "independent"


@register_method("independent")
class Independent(Method):
    """Classification loss only; the paragon φ_n* and the old model are trained this way."""

    config_cls = IndependentConfig

    def step(self, batch: MethodBatch) -> LossOutput:
        out = self.ctx.forward(batch.images, batch.labels)
        loss = self.classification_loss(out.logits, batch.labels)
        return LossOutput(loss, {"cls": loss.item()})
