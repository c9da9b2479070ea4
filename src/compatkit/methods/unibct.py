"""UniBCT: influence loss through structurally refined prototypes (reference methods.md §2.4).

Every class of the new training set gets a prototype built from the old model's features of its
images, so no old classifier is needed and every split scenario works, open-class included. The
plain prototype is the mean old feature (BCT's synthesised row, for every class). Refinement
denoises the old vertices V⁰ of a class with the *new* model's intra-class structure:
``A = row_softmax(⟨n_j, n_k⟩/τ)`` (diagonal excluded), ``V* = (1−λ)(I−λA)^{-1}V⁰``,
``p = mean_j V*[j] = Σ_k w_k V⁰[k]``. ``A`` must be row-stochastic: the column-softmax of the
third-party code makes ``w`` uniform, i.e. the refinement a no-op.

Old vertices are the old model's raw (un-normalised) embeddings, as in BCT's synthesis; the
cosine and ArcFace logit forms normalise the prototypes, the ``dot`` form (MixBCT) uses them raw.
"""

from __future__ import annotations

import itertools
import logging
import math
from collections.abc import Iterable
from typing import Literal, NamedTuple

import torch
import torch.nn.functional as F
from pydantic import Field
from torch import Tensor

from compatkit.methods.base import (
    LossOutput,
    Method,
    MethodBatch,
    MethodConfig,
    MethodContext,
    register_method,
)
from compatkit.methods.bct import class_mean_features
from compatkit.methods.functional import require_same_embed_dim
from compatkit.models.heads import create_classifier

logger = logging.getLogger(__name__)


class RefinedPrototype(NamedTuple):
    """A class prototype ``Σ_k vertex_weights[k]·old[k]``. Shapes: prototype (d,), weights (n,)."""

    prototype: Tensor
    vertex_weights: Tensor


def propagation_matrix(new_feats: Tensor, *, lam: float = 0.9, tau: float = 0.05,
                       normalize_new: bool = True) -> Tensor:
    """``M = (1−λ)(I−λA)^{-1}`` with ``A`` the row-softmax of new-space similarities / τ.

    The diagonal of the similarities is −∞ (no self-loops); a single vertex gives ``M = [[1]]``.
    Rows of M sum to 1. Computed in float64.

    Shapes: new_feats (n, d) -> (n, n) float64.
    """
    if new_feats.ndim != 2 or new_feats.shape[0] < 1:
        raise ValueError(f"new_feats must be (n, d) with n >= 1, got {tuple(new_feats.shape)}")
    if not 0.0 <= lam < 1.0:
        raise ValueError(f"lam must be in [0, 1), got {lam}")
    if not tau > 0:
        raise ValueError(f"tau must be > 0, got {tau}")
    n = new_feats.shape[0]
    eye = torch.eye(n, dtype=torch.float64, device=new_feats.device)
    if n == 1:
        return eye
    x = new_feats.detach().double()
    if normalize_new:
        x = F.normalize(x, dim=1)
    similarity = (x @ x.T / tau).masked_fill(eye.bool(), float("-inf"))
    affinity = torch.softmax(similarity, dim=1)
    return (1.0 - lam) * torch.linalg.solve(eye - lam * affinity, eye)


def refine_prototypes(old_feats: Tensor, new_feats: Tensor, *, lam: float = 0.9, tau: float = 0.05,
                      normalize_new: bool = True,
                      max_class_size: int | None = None) -> RefinedPrototype:
    """The refined prototype of one class and the weight of each old vertex in it.

    A class larger than ``max_class_size`` is split into near-equal contiguous chunks refined
    separately (each O(n³)); their prototypes are averaged weighted by chunk size.

    Shapes: old_feats (n, d), new_feats (n, d_new) -> RefinedPrototype((d,), (n,)).
    """
    if old_feats.ndim != 2 or new_feats.ndim != 2 or old_feats.shape[0] != new_feats.shape[0]:
        raise ValueError(f"old_feats and new_feats must be (n, d) with the same n, got "
                         f"{tuple(old_feats.shape)} and {tuple(new_feats.shape)}")
    if max_class_size is not None and max_class_size < 1:
        raise ValueError(f"max_class_size must be >= 1 or None, got {max_class_size}")
    n = old_feats.shape[0]
    chunks = 1 if max_class_size is None else math.ceil(n / max_class_size)
    weights = []
    for part in torch.arange(n, device=new_feats.device).tensor_split(chunks):
        m = propagation_matrix(new_feats[part], lam=lam, tau=tau, normalize_new=normalize_new)
        weights.append(m.mean(dim=0) * (len(part) / n))
    vertex_weights = torch.cat(weights).to(old_feats.device)
    prototype = vertex_weights @ old_feats.detach().double()
    return RefinedPrototype(prototype.to(old_feats.dtype), vertex_weights)


def build_prototypes(batches: Iterable[tuple[Tensor, Tensor | None, Tensor]], num_classes: int,
                     *, refine: bool, lam: float = 0.9, tau: float = 0.05,
                     normalize_new: bool = True, max_class_size: int | None = 1024) -> Tensor:
    """One prototype per class from streamed (old_feats (B, d), new_feats (B, d_new), labels (B,)).

    Without ``refine`` the prototypes are class means (``new_feats`` may be None) and nothing is
    stored; with it every feature is kept on the CPU (N·(d + d_new) floats) and each class is
    refined on its own. Classes without samples get a zero row (logged).

    Returns: (num_classes, d) float32 on the device of the features.
    """
    if not refine:
        stream = iter((old, labels) for old, _, labels in batches)
        first = next(stream, None)
        if first is None:
            raise ValueError("no batches to build prototypes from: the training set is empty")
        means, counts = class_mean_features(itertools.chain([first], stream), num_classes,
                                            first[0].shape[1])
        _warn_empty(counts)
        return means
    olds, news, labels_all = [], [], []
    device = None
    for old, new, labels in batches:
        if new is None:
            raise ValueError("refined prototypes need the new model's features, got None")
        device = old.device
        olds.append(old.detach().float().cpu())
        news.append(new.detach().float().cpu())
        labels_all.append(labels.detach().cpu())
    if not olds:
        raise ValueError("no batches to build prototypes from: the training set is empty")
    old_all, new_all, labels_cat = torch.cat(olds), torch.cat(news), torch.cat(labels_all)
    order = torch.argsort(labels_cat, stable=True)
    counts = torch.bincount(labels_cat, minlength=num_classes)
    if counts.numel() > num_classes:
        raise ValueError(f"labels reach {counts.numel() - 1} but num_classes is {num_classes}")
    prototypes = torch.zeros(num_classes, old_all.shape[1])
    start = 0
    for c, count in enumerate(counts.tolist()):
        if count:
            rows = order[start:start + count]
            prototypes[c] = refine_prototypes(
                old_all[rows], new_all[rows], lam=lam, tau=tau, normalize_new=normalize_new,
                max_class_size=max_class_size).prototype
            start += count
    _warn_empty(counts)
    return prototypes.to(device)


def _warn_empty(counts: Tensor) -> None:
    empty = int((counts == 0).sum())
    if empty:
        logger.warning("%d classes have no training samples; their prototypes are zero", empty)


class UniBCTConfig(MethodConfig):
    name: Literal["unibct"] = "unibct"
    weight: float = Field(1.0, ge=0.0)
    logits: Literal["dot", "cosine", "arcface"] = "cosine"
    scale: float = Field(30.0, gt=0.0)
    margin: float = Field(0.3, ge=0.0)
    refine_lambda: float = Field(0.9, ge=0.0, lt=1.0)
    refine_tau: float = Field(0.05, gt=0.0)
    normalize_new: bool = True
    max_class_size: int = Field(1024, ge=1)
    refine_epochs: tuple[int, ...] = ()
    warmup_compat_epochs: int = Field(0, ge=0)


@register_method("unibct")
class UniBCT(Method):
    """Classification loss + weight · CE of the new feature through a fixed prototype classifier.

    Prototypes are built at the first epoch where the loss is active (``warmup_compat_epochs``,
    weight 0 before): refined with the current new model if a refine epoch is due by then, else
    plain class means (so epoch 0 uses plain means unless 0 is in ``refine_epochs``). They are
    rebuilt, refined, at every later epoch of ``refine_epochs``. MixBCT's recipe over 35 epochs:
    ``warmup_compat_epochs=10, refine_epochs=(10, 20)``. Logit forms: ``dot`` ⟨φ_n, P_c⟩ (MixBCT),
    ``cosine`` s·cos, ``arcface`` s·cos(θ_y + m) (AdvBCT); the prototypes get no gradient.
    """

    config_cls = UniBCTConfig
    needs_old_model = True
    backward_compatible = True

    def __init__(self, cfg: UniBCTConfig, ctx: MethodContext) -> None:
        super().__init__(cfg, ctx)
        head = {"dot": ("linear", {}), "cosine": ("cosine", {"scale": cfg.scale}),
                "arcface": ("arcface", {"scale": cfg.scale, "margin": cfg.margin})}[cfg.logits]
        self.prototype_head = create_classifier(head[0], ctx.old_model.embed_dim,
                                                ctx.num_classes, **head[1]).to(ctx.device)
        self.prototype_head.requires_grad_(False)
        self.register_buffer("built_epoch", torch.tensor(-1, device=ctx.device))
        self._ready = False

    @property
    def prototypes(self) -> Tensor:
        """The (C, d) prototype classifier (a constant)."""
        return self.prototype_head.weight

    def on_train_start(self) -> None:
        require_same_embed_dim(self.ctx.model.embed_dim, self.ctx.old_model.embed_dim, "unibct")

    def on_epoch_start(self, epoch: int) -> None:
        if epoch < self.cfg.warmup_compat_epochs:
            return
        built = int(self.built_epoch)
        if built < 0:
            self.rebuild_prototypes(epoch, refine=any(e <= epoch for e in self.cfg.refine_epochs))
        elif epoch in self.cfg.refine_epochs and built < epoch:
            self.rebuild_prototypes(epoch, refine=True)
        self._ready = True

    @torch.no_grad()
    def rebuild_prototypes(self, epoch: int, *, refine: bool) -> None:
        """Recompute the prototypes over the training set (refined with the current new model)."""
        model, was_training = self.ctx.model, self.ctx.model.training
        model.eval()
        try:
            batches = (
                (self.ctx.old_model(images).feature,
                 model(images).feature if refine else None, labels)
                for images, labels in self.ctx.train_batches()
            )
            prototypes = build_prototypes(
                batches, self.ctx.num_classes, refine=refine, lam=self.cfg.refine_lambda,
                tau=self.cfg.refine_tau, normalize_new=self.cfg.normalize_new,
                max_class_size=self.cfg.max_class_size)
        finally:
            model.train(was_training)
        self.prototype_head.weight.copy_(prototypes.to(self.prototype_head.weight))
        self.built_epoch.fill_(epoch)
        logger.info("unibct: %s prototypes built at epoch %d",
                    "refined" if refine else "plain", epoch)

    def step(self, batch: MethodBatch) -> LossOutput:
        out = self.ctx.forward(batch.images, batch.labels)
        cls = self.classification_loss(out.logits, batch.labels)
        if batch.epoch < self.cfg.warmup_compat_epochs:
            return LossOutput(cls, {"cls": cls.item(), "unibct": 0.0})
        if not self._ready:
            raise RuntimeError("unibct: prototypes not built; on_epoch_start() must run first")
        logits = self.prototype_head(out.feature, batch.labels)
        comp = F.cross_entropy(logits.float(), batch.labels)
        total = cls + self.cfg.weight * comp
        return LossOutput(total, {"cls": cls.item(), "unibct": comp.item()})
