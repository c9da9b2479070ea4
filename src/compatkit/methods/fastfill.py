"""FastFill: FCT plus a learned per-sample uncertainty σ that orders partial backfilling.

fct-fastfill-peers.md §2.2. The transformation gets a head ``s(x) = log σ(x)`` on ĥ; with
ℓ(x) = μ_sim·ℓ_sim(ĥ, φ_new(x)) + μ_disc·LS-CE_ε(W_new ĥ, y) the loss is Kendall–Gal's

    L = mean_x [ ½·exp(−s(x))·ℓ(x) + μ_unc·s(x) ],

whose optimum s* = log(ℓ/(2μ_unc)) makes s a monotone predictor of the alignment loss, computable
from stored old features (and side-information) alone: backfill the largest s first
(``compatkit.feature_upgrade.sigma_scores``). With ``sigma_dim = d_new`` the scalar ℓ(x) is
broadcast over the σ outputs and the mean runs over samples and outputs (the reference's
μ_unc·mean(s)).
"""

from __future__ import annotations

from typing import Literal

import torch.nn.functional as F
from pydantic import Field
from torch import Tensor

from compatkit.methods.base import LossOutput, MethodBatch, register_method
from compatkit.methods.fct import TransformationConfig, TransformationMethod, per_sample_mse

Similarity = Literal["mse", "l1", "cosine"]


def alignment_loss(pred: Tensor, target: Tensor, kind: Similarity = "mse") -> Tensor:
    """Per-sample point-to-point alignment ℓ_sim: mean_d squared ("mse") or absolute ("l1")
    error, or 1 − cos ("cosine"). Shapes: (B, D), (B, D) -> (B,)."""
    if kind == "mse":
        return per_sample_mse(pred, target)
    if pred.shape != target.shape or pred.ndim != 2:
        raise ValueError(f"pred and target must be (B, D) of one shape, got {tuple(pred.shape)} "
                         f"and {tuple(target.shape)}")
    if kind == "l1":
        return (pred.float() - target.float()).abs().mean(dim=1)
    if kind == "cosine":
        return 1.0 - F.cosine_similarity(pred.float(), target.float(), dim=1)
    raise ValueError(f"similarity must be 'mse', 'l1' or 'cosine', got {kind!r}")


def uncertainty_weighted_loss(per_sample: Tensor, log_sigma: Tensor, *,
                              mu_unc: float = 0.5) -> Tensor:
    """mean_{x,k} [ ½·exp(−s_{x,k})·ℓ(x) + μ_unc·s_{x,k} ].

    Shapes: per_sample (B,), log_sigma (B, S) with S ≥ 1 -> scalar.
    """
    if per_sample.ndim != 1 or log_sigma.ndim != 2 or log_sigma.shape[0] != per_sample.shape[0]:
        raise ValueError(f"per_sample must be (B,) and log_sigma (B, S), got "
                         f"{tuple(per_sample.shape)} and {tuple(log_sigma.shape)}")
    s = log_sigma.float()
    return (0.5 * (-s).exp() * per_sample.float().unsqueeze(1) + mu_unc * s).mean()


def fastfill_loss(
    pred: Tensor, target: Tensor, log_sigma: Tensor, logits: Tensor | None = None,
    labels: Tensor | None = None, *, mu_sim: float = 1.0, mu_disc: float = 1.0,
    mu_unc: float = 0.5, label_smoothing: float = 0.1, similarity: Similarity = "mse",
) -> Tensor:
    """FastFill's objective (fct-fastfill-peers.md §2.2) on one batch.

    Args:
        pred: ĥ, the transformed old features (B, d_new).  target: φ_new(x) (B, d_new).
        log_sigma: s(x) (B, S).  logits: W_new ĥ (B, C) from the frozen new classifier, or None
            to drop the discriminative term.  labels: (B,) new-classifier rows.
        mu_sim, mu_disc, mu_unc: term weights. Defaults 1, 1, 0.5.
        label_smoothing: ε of the discriminative cross-entropy. Default 0.1.

    Returns:
        Scalar ``mean[½·exp(−s)·(μ_sim·ℓ_sim + μ_disc·LS-CE_ε(logits, y)) + μ_unc·s]``.
    """
    per_sample = mu_sim * alignment_loss(pred, target, similarity)
    if logits is not None and mu_disc != 0.0:
        if labels is None:
            raise ValueError("the discriminative term needs labels")
        per_sample = per_sample + mu_disc * F.cross_entropy(
            logits.float(), labels, label_smoothing=label_smoothing, reduction="none")
    return uncertainty_weighted_loss(per_sample, log_sigma, mu_unc=mu_unc)


class FastFillConfig(TransformationConfig):
    name: Literal["fastfill"] = "fastfill"
    label_smoothing: float = Field(0.1, ge=0.0, lt=1.0)
    sigma_dim: int = Field(1, ge=1, description="σ head outputs: 1 or d_new")
    mu_sim: float = Field(1.0, ge=0.0)
    mu_disc: float = Field(1.0, ge=0.0)
    mu_unc: float = Field(0.5, gt=0.0)
    similarity: Similarity = "mse"


@register_method("fastfill")
class FastFill(TransformationMethod):
    """FCT transformation with a σ head, trained with FastFill's uncertainty-weighted loss.

    The discriminative term feeds ĥ to the frozen new classifier without labels, i.e. plain
    logits W_new ĥ (a margin head's margin is not applied).
    """

    config_cls = FastFillConfig

    def on_train_start(self) -> None:
        super().on_train_start()
        if self.ctx.model.sigma_head is None:
            raise ValueError("fastfill's transformation has no σ head (sigma_dim must be >= 1)")
        if self.cfg.mu_disc > 0:
            classifier = getattr(self.new_model, "classifier", None)
            if classifier is None:
                raise ValueError("fastfill's discriminative term needs the new model's "
                                 "classifier; the new checkpoint has none (or set mu_disc: 0)")
            if classifier.weight.shape[0] != self.ctx.num_classes:
                raise ValueError(f"the new classifier has {classifier.weight.shape[0]} classes but "
                                 f"this run trains on {self.ctx.num_classes}: train the "
                                 "transformation on the new model's training data")

    def step(self, batch: MethodBatch) -> LossOutput:
        pred, log_sigma, target = self.prediction(batch)
        logits = self.new_model.classifier(pred) if self.cfg.mu_disc > 0 else None
        cfg = self.cfg
        loss = fastfill_loss(pred, target, log_sigma, logits, batch.labels, mu_sim=cfg.mu_sim,
                             mu_disc=cfg.mu_disc, mu_unc=cfg.mu_unc,
                             label_smoothing=cfg.label_smoothing, similarity=cfg.similarity)
        parts = {"fastfill": loss.item(),
                 "sim": alignment_loss(pred, target, cfg.similarity).mean().item(),
                 "log_sigma": log_sigma.float().mean().item()}
        return LossOutput(loss, parts)
