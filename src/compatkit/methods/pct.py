"""Positive-congruent training: focal distillation ``pct`` and OpenCompatible's ``pct_oc``.

``pct`` is the published form (Yan et al., CVPR 2021; fct-fastfill-peers.md §3.2): per-sample
weight ``α + β·focus_i`` on ``T²·KL(softmax(z_o/T) ‖ softmax(z_n/T))`` (or ``½·mean_k (z_n −
z_o)²``) between old and new classifier logits. ``pct_oc`` is OpenCompatible's ``fd`` (methods.md
§2.2): the *new* model's correctness and the L2 distance of the raw embeddings.

Class sets: logits are compared over the classes both classifiers know, old rows matched to new
rows by global class id, each softmax taken over that shared set (with identical class sets this
is the plain PCT loss). The old model is correct on a sample when its argmax over all its classes
is the sample's class, so it is never correct on a class it does not know. A split without
shared classes (open-class) has nothing to distil and raises.
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F
from pydantic import Field
from torch import Tensor, nn

from compatkit.errors import MethodNotApplicableError
from compatkit.methods.base import (
    LossOutput,
    Method,
    MethodBatch,
    MethodConfig,
    MethodContext,
    register_method,
)
from compatkit.methods.functional import (
    check_labels,
    check_pair,
    reduce_per_sample,
    require_same_embed_dim,
)

FocusType = Literal["old_correct", "neg_flip", "new_incorrect"]


def focus_mask(focus: str, *, old_correct: Tensor, new_correct: Tensor) -> Tensor:
    """Which samples get the extra weight β: ``old_correct``, ``neg_flip`` (old correct and new
    wrong) or ``new_incorrect``.

    Shapes: old_correct (B,) bool, new_correct (B,) bool -> (B,) bool.
    """
    if focus == "old_correct":
        return old_correct
    if focus == "neg_flip":
        return old_correct & ~new_correct
    if focus == "new_incorrect":
        return ~new_correct
    raise ValueError(f"focus must be 'old_correct', 'neg_flip' or 'new_incorrect', got {focus!r}")


def focal_weights(focus: Tensor, *, alpha: float = 1.0, beta: float = 5.0) -> Tensor:
    """Per-sample weights ``α + β·focus``. Shapes: focus (B,) bool -> (B,) float32."""
    if focus.ndim != 1 or focus.dtype != torch.bool:
        raise ValueError(f"focus must be a (B,) bool tensor, got {tuple(focus.shape)} "
                         f"{focus.dtype}")
    return alpha + beta * focus.float()


def logit_distillation(new_logits: Tensor, old_logits: Tensor, *, temperature: float = 100.0,
                       distance: str = "kl") -> Tensor:
    """Per-sample ``T²·KL(softmax(z_o/T) ‖ softmax(z_n/T))`` (``kl``) or ``½·mean_k (z_n − z_o)²``
    (``lm``), in float32; the old logits are constants.

    Shapes: new_logits (B, C), old_logits (B, C) -> (B,).
    """
    if new_logits.ndim != 2 or new_logits.shape != old_logits.shape:
        raise ValueError(f"new and old logits must be (B, C) of one shape, got "
                         f"{tuple(new_logits.shape)} and {tuple(old_logits.shape)}")
    new, old = new_logits.float(), old_logits.detach().float()
    if distance == "lm":
        return 0.5 * (new - old).pow(2).mean(dim=1)
    if distance != "kl":
        raise ValueError(f"distance must be 'kl' or 'lm', got {distance!r}")
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    log_p_new = F.log_softmax(new / temperature, dim=1)
    log_p_old = F.log_softmax(old / temperature, dim=1)
    kl = F.kl_div(log_p_new, log_p_old, reduction="none", log_target=True).sum(dim=1)
    return temperature**2 * kl


class FocalDistillationLoss(nn.Module):
    """PCT focal distillation: ``mean_i (α + β·focus_i)·D(z_n(x_i), z_o(x_i))``.

    Args:
        alpha: α, the weight of every sample. Default 1.
        beta: β, the extra weight of focused samples. Default 5.
        temperature: T of the ``kl`` distance. Default 100.
        distance: ``kl`` (FD-KL) or ``lm`` (FD-LM, logit matching). Default ``kl``.

    Shapes:
        new_logits: (B, C) with gradient.  old_logits: (B, C), constants.  focus: (B,) bool.

    Returns:
        Scalar, or (B,) weighted per-sample terms with ``reduction="none"``.
    """

    def __init__(self, *, alpha: float = 1.0, beta: float = 5.0, temperature: float = 100.0,
                 distance: Literal["kl", "lm"] = "kl") -> None:
        super().__init__()
        if alpha < 0 or beta < 0:
            raise ValueError(f"alpha and beta must be >= 0, got {alpha} and {beta}")
        if not temperature > 0:
            raise ValueError(f"temperature must be > 0, got {temperature}")
        if distance not in ("kl", "lm"):
            raise ValueError(f"distance must be 'kl' or 'lm', got {distance!r}")
        self.alpha, self.beta = float(alpha), float(beta)
        self.temperature = float(temperature)
        self.distance = distance

    def forward(self, new_logits: Tensor, old_logits: Tensor, focus: Tensor, *,
                reduction: str = "mean") -> Tensor:
        d = logit_distillation(new_logits, old_logits, temperature=self.temperature,
                               distance=self.distance)
        if focus.shape != d.shape:
            raise ValueError(f"focus must have shape {tuple(d.shape)}, got {tuple(focus.shape)}")
        return reduce_per_sample(focal_weights(focus, alpha=self.alpha, beta=self.beta) * d,
                                 reduction)


def focal_feature_l2(new: Tensor, old: Tensor, focus: Tensor, *, alpha: float = 1.0,
                     beta: float = 5.0, reduction: str = "mean") -> Tensor:
    """OpenCompatible's ``fd``: ``mean_i (α + β·focus_i)·mean_d (new_i − old_i)²`` on raw
    (un-normalised) embeddings; ``old`` is a constant.

    Shapes: new (B, D), old (B, D), focus (B,) bool -> scalar, or (B,) for ``reduction="none"``.
    """
    check_pair(new, old)
    if focus.shape != (new.shape[0],):
        raise ValueError(f"focus must have shape ({new.shape[0]},), got {tuple(focus.shape)}")
    d = (new.float() - old.detach().float()).pow(2).mean(dim=1)
    return reduce_per_sample(focal_weights(focus, alpha=alpha, beta=beta) * d, reduction)


def new_plain_logits(ctx: MethodContext, feature: Tensor) -> Tensor:
    """The new classifier's logits without margin (labels not passed), for correctness and KD."""
    classifier = ctx.model.classifier
    if classifier is None:
        raise ValueError("PCT needs the new model's classifier, but the model has none")
    return classifier(feature)


class PCTConfig(MethodConfig):
    name: Literal["pct"] = "pct"
    weight: float = Field(1.0, ge=0.0)
    alpha: float = Field(1.0, ge=0.0)
    beta: float = Field(5.0, ge=0.0)
    temperature: float = Field(100.0, gt=0.0)
    distance: Literal["kl", "lm"] = "kl"
    focus: FocusType = "old_correct"


@register_method("pct")
class PCT(Method):
    """Classification loss + weight · focal distillation from the old classifier's logits."""

    config_cls = PCTConfig
    needs_old_model = True

    def __init__(self, cfg: PCTConfig, ctx: MethodContext) -> None:
        super().__init__(cfg, ctx)
        self.loss = FocalDistillationLoss(alpha=cfg.alpha, beta=cfg.beta,
                                          temperature=cfg.temperature, distance=cfg.distance)
        self._ready = False

    def on_train_start(self) -> None:
        old_classifier = self.ctx.old_model.classifier
        if old_classifier is None:
            raise ValueError("PCT needs the old model's classifier; the old checkpoint has none")
        old_ids = [int(c) for c in self.ctx.old_manifest.class_ids]
        if old_classifier.weight.shape[0] != len(old_ids):
            raise ValueError(f"old classifier has {old_classifier.weight.shape[0]} rows but "
                             f"{len(old_ids)} class ids")
        old_row = {c: i for i, c in enumerate(old_ids)}
        shared = [(r, old_row[int(c)]) for r, c in enumerate(self.ctx.class_ids)
                  if int(c) in old_row]
        if not shared:
            raise MethodNotApplicableError(
                "PCT distils old-classifier logits over the classes both models know, and this "
                "split has none (open-class); use unibct or contra")
        device = self.ctx.device
        self.register_buffer("new_rows", torch.tensor([r for r, _ in shared], device=device),
                             persistent=False)
        self.register_buffer("old_rows", torch.tensor([o for _, o in shared], device=device),
                             persistent=False)
        self.register_buffer("old_global", torch.tensor(old_ids, device=device),
                             persistent=False)
        self.register_buffer("new_global", torch.tensor([int(c) for c in self.ctx.class_ids],
                                                        device=device), persistent=False)
        self._ready = True

    def step(self, batch: MethodBatch) -> LossOutput:
        if not self._ready:
            raise RuntimeError("PCT.on_train_start() must run before step()")
        check_labels(batch.labels, batch.images.shape[0])
        out = self.ctx.forward(batch.images, batch.labels)
        cls = self.classification_loss(out.logits, batch.labels)
        old_logits = self.ctx.old_model(batch.images).logits
        new_logits = new_plain_logits(self.ctx, out.feature)
        old_correct = self.old_global[old_logits.argmax(dim=1)] == self.new_global[batch.labels]
        new_correct = new_logits.argmax(dim=1) == batch.labels
        focus = focus_mask(self.cfg.focus, old_correct=old_correct, new_correct=new_correct)
        comp = self.loss(new_logits[:, self.new_rows], old_logits[:, self.old_rows], focus)
        total = cls + self.cfg.weight * comp
        return LossOutput(total, {"cls": cls.item(), "pct": comp.item()})


class PCTOCConfig(MethodConfig):
    name: Literal["pct_oc"] = "pct_oc"
    weight: float = Field(1.0, ge=0.0)
    alpha: float = Field(1.0, ge=0.0)
    beta: float = Field(5.0, ge=0.0)


@register_method("pct_oc")
class PCTOC(Method):
    """Classification loss + weight · OpenCompatible's ``fd``: (α + β·1[new correct]) · raw L2."""

    config_cls = PCTOCConfig
    needs_old_model = True
    backward_compatible = True  # L2 between new and old embeddings

    def on_train_start(self) -> None:
        require_same_embed_dim(self.ctx.model.embed_dim, self.ctx.old_model.embed_dim, "pct_oc")

    def step(self, batch: MethodBatch) -> LossOutput:
        out = self.ctx.forward(batch.images, batch.labels)
        cls = self.classification_loss(out.logits, batch.labels)
        old_feature = self.ctx.old_model(batch.images).feature
        new_correct = new_plain_logits(self.ctx, out.feature).argmax(dim=1) == batch.labels
        comp = focal_feature_l2(out.feature, old_feature, new_correct, alpha=self.cfg.alpha,
                                beta=self.cfg.beta)
        total = cls + self.cfg.weight * comp
        return LossOutput(total, {"cls": cls.item(), "pct_oc": comp.item()})
