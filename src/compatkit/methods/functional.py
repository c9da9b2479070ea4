"""Shared pieces of the compatibility losses: input checks, class masks, masked top-k, InfoNCE.

Masked entries are filled with ``torch.finfo(dtype).min`` rather than OpenCompatible's ``-1e9``
(which overflows to ``-inf`` in fp16); ``info_nce_from_parts`` works in float32 and clamps, so a
masked entry contributes exactly 0 to the softmax and never produces inf or NaN.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor


def check_pair(new: Tensor, old: Tensor, labels: Tensor | None = None) -> None:
    """Raise unless ``new`` and ``old`` are (B, D) with one shape and ``labels`` is (B,) integer.

    Raises:
        ValueError: wrong rank, different batch sizes or embedding dimensions (e.g. d_new != d_old
            without a projection), or labels of another length.
        TypeError: floating-point or boolean labels.
    """
    if new.ndim != 2 or old.ndim != 2:
        raise ValueError(f"new and old must be (B, D) matrices, got shapes {tuple(new.shape)} "
                         f"and {tuple(old.shape)}")
    if new.shape[1] != old.shape[1]:
        raise ValueError(f"new and old embeddings must have one dimension, got d_new = "
                         f"{new.shape[1]} and d_old = {old.shape[1]} (configure a projection)")
    if new.shape[0] != old.shape[0]:
        raise ValueError(f"new and old must hold the same samples, got batch sizes "
                         f"{new.shape[0]} and {old.shape[0]}")
    if labels is not None:
        check_labels(labels, new.shape[0])


def check_labels(labels: Tensor, batch_size: int) -> None:
    """Raise unless ``labels`` is an integer tensor of shape (batch_size,)."""
    if labels.shape != (batch_size,):
        raise ValueError(f"labels must have shape ({batch_size},), got {tuple(labels.shape)}")
    if labels.dtype.is_floating_point or labels.dtype == torch.bool:
        raise TypeError(f"labels must be an integer tensor, got dtype {labels.dtype}")


def same_class_mask(labels_a: Tensor, labels_b: Tensor) -> Tensor:
    """True where ``labels_a[i] == labels_b[j]``.

    Shapes: labels_a (B,), labels_b (K,) -> (B, K) bool.
    """
    if labels_a.ndim != 1 or labels_b.ndim != 1:
        raise ValueError(f"labels must be 1-D, got shapes {tuple(labels_a.shape)} and "
                         f"{tuple(labels_b.shape)}")
    return labels_a.unsqueeze(1) == labels_b.unsqueeze(0)


def masked_topk(scores: Tensor, valid_mask: Tensor, k: int) -> Tensor:
    """The ``k`` largest valid scores of each row; ``k <= 0`` keeps every column.

    Invalid entries (and the padding of rows with fewer than ``k`` valid entries) hold
    ``torch.finfo(scores.dtype).min``: they contribute 0 to a softmax and lose every top-k.

    Shapes: scores (B, K) float, valid_mask (B, K) bool -> (B, min(k, K)), or (B, K) if k <= 0.
    """
    if scores.ndim != 2 or valid_mask.shape != scores.shape:
        raise ValueError(f"scores must be (B, K) and valid_mask the same shape, got "
                         f"{tuple(scores.shape)} and {tuple(valid_mask.shape)}")
    if valid_mask.dtype != torch.bool:
        raise TypeError(f"valid_mask must be a bool tensor, got dtype {valid_mask.dtype}")
    masked = scores.masked_fill(~valid_mask, torch.finfo(scores.dtype).min)
    if k <= 0 or k >= scores.shape[1]:
        return masked
    return masked.topk(k, dim=1).values


def info_nce_from_parts(pos: Tensor, neg_blocks: Sequence[Tensor], temperature: float) -> Tensor:
    """Per-sample ``-log(e^{p/τ} / (e^{p/τ} + Σ_blocks Σ_j e^{s_j/τ}))``: one joint softmax.

    Computed in float32 whatever the input dtype. Masked entries from ``masked_topk`` add 0.

    Shapes: pos (B,), each negative block (B, K_b) -> (B,) float32.
    """
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    if pos.ndim != 1:
        raise ValueError(f"pos must be (B,), got shape {tuple(pos.shape)}")
    for block in neg_blocks:
        if block.ndim != 2 or block.shape[0] != pos.shape[0]:
            raise ValueError(f"negative blocks must be ({pos.shape[0]}, K), got "
                             f"{tuple(block.shape)}")
    parts = [pos.float().unsqueeze(1), *(block.float() for block in neg_blocks)]
    logits = (torch.cat(parts, dim=1) / temperature).clamp_min(torch.finfo(torch.float32).min)
    return torch.logsumexp(logits, dim=1) - logits[:, 0]


def reduce_per_sample(losses: Tensor, reduction: str) -> Tensor:
    """``"mean"`` over the batch (a scalar) or ``"none"`` (the (B,) per-sample losses)."""
    if reduction == "mean":
        return losses.mean()
    if reduction == "none":
        return losses
    raise ValueError(f"reduction must be 'mean' or 'none', got {reduction!r}")


def float32_region(like: Tensor) -> torch.autocast:
    """A context with autocast off on ``like``'s device, so similarities stay in float32 (with
    τ = 0.01 an fp16 cosine error of 1e-3 would move a logit by 0.1)."""
    return torch.autocast(device_type=like.device.type, enabled=False)


def require_same_embed_dim(new_dim: int, old_dim: int, method: str) -> None:
    """Raise a clear error when a method compares new and old embeddings of different sizes."""
    if int(new_dim) != int(old_dim):
        raise ValueError(f"{method} compares new and old embeddings directly and needs equal "
                         f"dimensions: new {new_dim}, old {old_dim}")
