"""Triplet compatibility losses ``triplet`` and ``triplet_ract`` (reference methods.md §2.2).

Euclidean distances on L2-normalised features. The k nearest negatives (smallest distance) of
other classes are taken from ``keys``; a row with fewer than k valid negatives averages over the
ones it has (OpenCompatible averaged the masked padding in as zeros), and a row without any
contributes 0. ``topk_neg`` must be positive: OpenCompatible crashes with k <= 0 (§6.3 item 7).
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F
from pydantic import Field
from torch import Tensor, nn

from compatkit.methods.base import MethodConfig, register_method
from compatkit.methods.contrastive import PointToPointMethod
from compatkit.methods.distributed import CompatKeys, resolve_keys
from compatkit.methods.functional import (
    float32_region,
    masked_topk,
    reduce_per_sample,
    same_class_mask,
)


def _unit(x: Tensor) -> Tensor:
    return F.normalize(x.float(), dim=1)


def nearest_negative_hinge(d_pos: Tensor, dist: Tensor, valid: Tensor, *, k: int,
                           margin: float) -> Tensor:
    """Mean of ``max(0, d_pos_i − d_ij + margin)`` over the k nearest valid j of each row i.

    Shapes: d_pos (B,), dist (B, K), valid (B, K) bool -> (B,); rows without valid j give 0.
    """
    minus_dist = masked_topk(-dist, valid, k)  # masked entries hold finfo.min: hinge 0
    hinge = F.relu(d_pos.unsqueeze(1) + minus_dist + margin)
    count = valid.sum(dim=1).clamp(max=k)
    return hinge.sum(dim=1) / count.clamp_min(1).to(hinge.dtype)


class TripletLoss(nn.Module):
    """Triplet loss against old features: positive o_i, the k nearest old negatives o_j.

    With ``new_negatives`` (``triplet_ract``) the mean hinge over the k nearest *new* negatives
    n_j of other classes is added, the RACT idea applied to the triplet loss.

    Args:
        margin: m. Default 0.8.
        topk_neg: k nearest negatives per anchor and kind, > 0. Default 10.
        new_negatives: add the new-to-new term. Default False.
        stopgrad_new_keys: no gradient through new features used as keys. Default True.

    Shapes:
        new: (B, D) new-model embeddings, with gradient.  old: (B, D) old-model embeddings of
        the same samples (detached here).  labels: (B,) int64.
        keys: optional CompatKeys over K rows (e.g. ``gather_keys``); default the local batch.

    Returns:
        Scalar mean over the B anchors, or the (B,) losses with ``reduction="none"``.

    Raises:
        ValueError: ``topk_neg <= 0`` or a negative margin.
    """

    def __init__(self, *, margin: float = 0.8, topk_neg: int = 10, new_negatives: bool = False,
                 stopgrad_new_keys: bool = True) -> None:
        super().__init__()
        if topk_neg <= 0:
            raise ValueError(f"triplet losses need topk_neg > 0 nearest negatives, got {topk_neg}")
        if margin < 0:
            raise ValueError(f"margin must be >= 0, got {margin}")
        self.margin = float(margin)
        self.topk_neg = int(topk_neg)
        self.new_negatives = bool(new_negatives)
        self.stopgrad_new_keys = bool(stopgrad_new_keys)

    def forward(self, new: Tensor, old: Tensor, labels: Tensor, *,
                keys: CompatKeys | None = None, reduction: str = "mean") -> Tensor:
        keys = resolve_keys(new, old, labels, keys, stopgrad_new=self.stopgrad_new_keys)
        with float32_region(new):
            n = _unit(new)
            d_pos = (n - _unit(old.detach())).norm(dim=1)
            valid = ~same_class_mask(labels, keys.labels)
            losses = nearest_negative_hinge(d_pos, _euclidean(n, _unit(keys.old)), valid,
                                            k=self.topk_neg, margin=self.margin)
            if self.new_negatives:
                losses = losses + nearest_negative_hinge(
                    d_pos, _euclidean(n, _unit(keys.new)), valid, k=self.topk_neg,
                    margin=self.margin)
            return reduce_per_sample(losses, reduction)


def _euclidean(a: Tensor, b: Tensor) -> Tensor:
    """Exact pairwise distances (no ‖a‖²+‖b‖²−2ab cancellation); zero distance, zero gradient."""
    return torch.cdist(a, b, compute_mode="donot_use_mm_for_euclid_dist")


class TripletConfig(MethodConfig):
    name: Literal["triplet"] = "triplet"
    weight: float = Field(1.0, ge=0.0)
    margin: float = Field(0.8, ge=0.0)
    topk_neg: int = Field(10, gt=0)


@register_method("triplet")
class Triplet(PointToPointMethod):
    """Classification loss + weight · triplet loss against the k nearest old negatives."""

    config_cls = TripletConfig

    def build_loss(self) -> nn.Module:
        return TripletLoss(margin=self.cfg.margin, topk_neg=self.cfg.topk_neg)


class TripletRACTConfig(MethodConfig):
    name: Literal["triplet_ract"] = "triplet_ract"
    weight: float = Field(1.0, ge=0.0)
    margin: float = Field(0.8, ge=0.0)
    topk_neg: int = Field(10, gt=0)
    stopgrad_new_keys: bool = True


@register_method("triplet_ract")
class TripletRACT(PointToPointMethod):
    """Classification loss + weight · triplet loss against old and new nearest negatives."""

    config_cls = TripletRACTConfig

    def build_loss(self) -> nn.Module:
        return TripletLoss(margin=self.cfg.margin, topk_neg=self.cfg.topk_neg,
                           new_negatives=True, stopgrad_new_keys=self.cfg.stopgrad_new_keys)
