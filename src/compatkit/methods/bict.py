"""BiCT stage two: the forward transformation ψ from old embeddings to a backward-compatible
new model's space (reference methods.md §2.5).

Stage one is ``bct`` with ``weight = λ_b``; stage two (this method) trains ψ: R^{d_o} → R^{d_n}
on the training images so that ψ(φ_o(x)) ≈ φ_n(x), then stored gallery embeddings are upgraded
without images (``compatkit.feature_upgrade``) and sequential upgrades chain ψ's. The paper's
exact loss is [to verify against the paper]; per the reference this is a regression term (MSE,
optionally cosine) plus an optional classification term through the frozen new classifier
(weight 0 by default). ψ is FCT's MLP without side-information, trained with FCT's BN switch.
"""

from __future__ import annotations

from typing import ClassVar, Literal

import torch.nn.functional as F
from pydantic import Field

from compatkit.methods.base import LossOutput, MethodBatch, register_method
from compatkit.methods.fastfill import alignment_loss
from compatkit.methods.fct import TransformationConfig, TransformationMethod


class BiCTConfig(TransformationConfig):
    name: Literal["bict"] = "bict"
    regression: Literal["mse", "cosine", "mse+cosine"] = "mse"
    cls_weight: float = Field(0.0, ge=0.0, description="weight of CE(W_n ψ(φ_o(x)), y)")


@register_method("bict")
class BiCT(TransformationMethod):
    """Regression of ψ(φ_o(x)) onto φ_n(x) (+ cls_weight · CE through the frozen W_n)."""

    config_cls = BiCTConfig
    uses_side_info: ClassVar[bool] = False

    def on_train_start(self) -> None:
        super().on_train_start()
        if self.cfg.cls_weight > 0:
            classifier = getattr(self.new_model, "classifier", None)
            if classifier is None or classifier.weight.shape[0] != self.ctx.num_classes:
                found = None if classifier is None else classifier.weight.shape[0]
                raise ValueError(f"bict's classification term needs the new model's classifier "
                                 f"over this run's {self.ctx.num_classes} classes, found {found}")

    def step(self, batch: MethodBatch) -> LossOutput:
        pred, _, target = self.prediction(batch)
        parts: dict[str, float] = {}
        total = pred.new_zeros((), dtype=pred.float().dtype)
        for kind in self.cfg.regression.split("+"):
            term = alignment_loss(pred, target, kind).mean()  # type: ignore[arg-type]
            parts[kind] = term.item()
            total = total + term
        if self.cfg.cls_weight > 0:
            ce = F.cross_entropy(self.new_model.classifier(pred).float(), batch.labels,
                                 label_smoothing=self.cfg.label_smoothing)
            parts["cls"] = ce.item()
            total = total + self.cfg.cls_weight * ce
        return LossOutput(total, parts)
