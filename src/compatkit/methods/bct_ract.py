"""``bct_ract``: the RACT idea at prototype level (reference methods.md §2.2).

The influence logits through the frozen old classifier (BCT's rows, synthesised ones included)
are concatenated with the new classifier's logits, whose true-class entry is masked:
``z = [W_bct·φ_n ; W_n·φ_n − masked(y)] ∈ R^{2C}`` with the target in the first block. The
positive is the old prototype of the true class; the negatives are the other old prototypes
and the new prototypes of every other class. The two blocks keep their heads' own scales.
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F
from pydantic import Field
from torch import Tensor

from compatkit.methods.base import LossOutput, MethodBatch, MethodConfig, register_method
from compatkit.methods.bct import BCT
from compatkit.methods.functional import check_labels, reduce_per_sample


def bct_ract_logits(influence_logits: Tensor, new_logits: Tensor, labels: Tensor) -> Tensor:
    """``[influence_logits ; new_logits with the true class masked]`` in float32.

    Shapes: influence_logits (B, C), new_logits (B, C), labels (B,) -> (B, 2C).
    """
    if influence_logits.ndim != 2 or influence_logits.shape != new_logits.shape:
        raise ValueError(f"influence and new logits must be (B, C) of one shape, got "
                         f"{tuple(influence_logits.shape)} and {tuple(new_logits.shape)}")
    check_labels(labels, influence_logits.shape[0])
    true_class = F.one_hot(labels.long(), new_logits.shape[1]).bool()
    masked_new = new_logits.float().masked_fill(true_class, torch.finfo(torch.float32).min)
    return torch.cat([influence_logits.float(), masked_new], dim=1)


def bct_ract_loss(influence_logits: Tensor, new_logits: Tensor, labels: Tensor, *,
                  reduction: str = "mean") -> Tensor:
    """Cross-entropy of ``bct_ract_logits`` with the target in the first (old-prototype) block.

    Never below the plain BCT loss ``CE(influence_logits, labels)``: it only adds terms to the
    softmax denominator.

    Shapes: influence_logits (B, C), new_logits (B, C), labels (B,) -> scalar, or (B,) for
    ``reduction="none"``.
    """
    logits = bct_ract_logits(influence_logits, new_logits, labels)
    return reduce_per_sample(F.cross_entropy(logits, labels.long(), reduction="none"), reduction)


class BCTRACTConfig(MethodConfig):
    name: Literal["bct_ract"] = "bct_ract"
    weight: float = Field(1.0, ge=0.0)
    synthesize_new_classes: bool = True


@register_method("bct_ract")
class BCTRACT(BCT):
    """Classification loss + weight · CE over old prototypes and other classes' new prototypes.

    The influence classifier is BCT's (same old rows, same synthesised rows for new classes).
    """

    config_cls = BCTRACTConfig

    def step(self, batch: MethodBatch) -> LossOutput:
        if self.influence_head is None:
            raise RuntimeError("bct_ract: on_train_start() must run before step()")
        out = self.ctx.forward(batch.images, batch.labels)
        cls = self.classification_loss(out.logits, batch.labels)
        influence = self.influence_head(out.feature, batch.labels)
        comp = bct_ract_loss(influence, out.logits, batch.labels)
        total = cls + self.cfg.weight * comp
        return LossOutput(total, {"cls": cls.item(), "bct_ract": comp.item()})
