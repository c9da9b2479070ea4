"""``lwf``: learning without forgetting through the frozen old classifier (methods.md §2.2).

``L_lwf = −(1/B) Σ_i Σ_c softmax(W_o φ_o(x_i)/T_d)_c · log softmax(W_o φ_n(x_i)/T)_c``: the old
classifier's posterior on the old feature is the soft target for the old classifier applied to
the new feature. Softmax over the class dimension (OpenCompatible omits ``dim``, §6.3 item 6).
OpenCompatible uses T_d = T = 0.01, which makes both posteriors nearly one-hot (a hard-label CE
on the old model's prediction); compatkit defaults to the usual distillation T_d = T = 2.
"""

from __future__ import annotations

import copy
from typing import Literal

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
from compatkit.methods.functional import reduce_per_sample, require_same_embed_dim


class LwFLoss(nn.Module):
    """Soft cross-entropy from ``softmax(old_logits/T_d)`` to ``log_softmax(new_logits/T)``.

    Args:
        temperature: T on the logits of the new feature. Default 2 (OpenCompatible: 0.01).
        distillation_temperature: T_d on the old feature's logits. Default 2 (OC: 0.01).

    Shapes:
        new_logits: (B, C) old classifier on new features, with gradient.
        old_logits: (B, C) old classifier on old features, constants.

    Returns:
        Scalar mean over the batch, or (B,) with ``reduction="none"``.
    """

    def __init__(self, *, temperature: float = 2.0, distillation_temperature: float = 2.0) -> None:
        super().__init__()
        if not temperature > 0 or not distillation_temperature > 0:
            raise ValueError(f"temperatures must be > 0, got temperature={temperature}, "
                             f"distillation_temperature={distillation_temperature}")
        self.temperature = float(temperature)
        self.distillation_temperature = float(distillation_temperature)

    def forward(self, new_logits: Tensor, old_logits: Tensor, *, reduction: str = "mean") -> Tensor:
        if new_logits.ndim != 2 or new_logits.shape != old_logits.shape:
            raise ValueError(f"new and old logits must be (B, C) of one shape, got "
                             f"{tuple(new_logits.shape)} and {tuple(old_logits.shape)}")
        target = F.softmax(old_logits.detach().float() / self.distillation_temperature, dim=1)
        log_p = F.log_softmax(new_logits.float() / self.temperature, dim=1)
        return reduce_per_sample(-(target * log_p).sum(dim=1), reduction)


class LwFConfig(MethodConfig):
    name: Literal["lwf"] = "lwf"
    weight: float = Field(1.0, ge=0.0)
    temperature: float = Field(2.0, gt=0.0)
    distillation_temperature: float = Field(2.0, gt=0.0)


@register_method("lwf")
class LwF(Method):
    """Classification loss + weight · KD from the old classifier's posterior on old features."""

    config_cls = LwFConfig
    needs_old_model = True

    def __init__(self, cfg: LwFConfig, ctx: MethodContext) -> None:
        super().__init__(cfg, ctx)
        self.loss = LwFLoss(temperature=cfg.temperature,
                            distillation_temperature=cfg.distillation_temperature)
        self.old_head: nn.Module | None = None

    def on_train_start(self) -> None:
        old = self.ctx.old_model
        if old.classifier is None:
            raise ValueError("lwf needs the old model's classifier; the old checkpoint has none")
        require_same_embed_dim(self.ctx.model.embed_dim, old.embed_dim, "lwf")
        self.old_head = copy.deepcopy(old.classifier).requires_grad_(False)

    def step(self, batch: MethodBatch) -> LossOutput:
        if self.old_head is None:
            raise RuntimeError("LwF.on_train_start() must run before step()")
        out = self.ctx.forward(batch.images, batch.labels)
        cls = self.classification_loss(out.logits, batch.labels)
        old_logits = self.ctx.old_model(batch.images).logits
        comp = self.loss(self.old_head(out.feature), old_logits)
        total = cls + self.cfg.weight * comp
        return LossOutput(total, {"cls": cls.item(), "lwf": comp.item()})
