"""BCT: influence loss through the frozen old classifier (reference methods.md §2.1).

Rows for classes the old model never saw are synthesised as the mean old feature of that
class over the new training set (normalised when the old classifier is normalised) and
concatenated to the old rows. The old rows and the synthesised rows receive no gradient.
"""

from __future__ import annotations

import copy
from collections.abc import Iterable, Sequence
from typing import Literal

import torch
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


def class_mean_features(
    batches: Iterable[tuple[Tensor, Tensor]], num_classes: int, dim: int
) -> tuple[Tensor, Tensor]:
    """Per-class sum-then-mean of features streamed as (features (B, D), labels (B,)) batches.

    Returns (means (num_classes, D), counts (num_classes,)); classes without samples get 0 rows.
    """
    sums: Tensor | None = None
    counts: Tensor | None = None
    for feats, labels in batches:
        if feats.shape[1] != dim:
            raise ValueError(f"expected features of dimension {dim}, got {tuple(feats.shape)}")
        if sums is None:
            sums = torch.zeros(num_classes, dim, dtype=torch.float64, device=feats.device)
            counts = torch.zeros(num_classes, dtype=torch.float64, device=feats.device)
        sums.index_add_(0, labels, feats.double())
        counts.index_add_(0, labels, torch.ones_like(labels, dtype=torch.float64))
    if sums is None or counts is None:
        raise ValueError("no batches to average: the training set is empty")
    means = sums / counts.clamp(min=1).unsqueeze(1)
    return means.float(), counts


def influence_weight(
    old_weight: Tensor,
    old_class_ids: Sequence[int],
    new_class_ids: Sequence[int],
    synthesized: dict[int, Tensor],
) -> Tensor:
    """The (C_new, D) classifier of the influence loss, one row per new-model class.

    Row c is the old classifier's row of global class ``new_class_ids[c]`` if the old model
    has it, else ``synthesized[class]``. A class found in neither raises ``ValueError``.
    """
    if old_weight.shape[0] != len(old_class_ids):
        raise ValueError(f"old classifier has {old_weight.shape[0]} rows but "
                         f"{len(old_class_ids)} class ids")
    old_row = {int(c): i for i, c in enumerate(old_class_ids)}
    rows = []
    for c in new_class_ids:
        c = int(c)
        if c in old_row:
            rows.append(old_weight[old_row[c]])
        elif c in synthesized:
            rows.append(synthesized[c].to(old_weight))
        else:
            raise ValueError(f"class {c} has neither an old classifier row nor a synthesised "
                             f"row (old classes: {len(old_row)}, synthesised: {len(synthesized)})")
    return torch.stack(rows).detach()


def synthesize_new_class_rows(
    class_means: Tensor, class_ids: Sequence[int], old_class_ids: Sequence[int], *, normalize: bool
) -> dict[int, Tensor]:
    """Synthesised rows for the classes of ``class_ids`` absent from the old classifier.

    ``class_means[c]`` is the mean old feature of class ``class_ids[c]`` on the new training set.
    """
    old = {int(c) for c in old_class_ids}
    rows = {}
    for i, c in enumerate(class_ids):
        if int(c) not in old:
            row = class_means[i]
            rows[int(c)] = F.normalize(row, dim=0) if normalize else row
    return rows


class BCTConfig(MethodConfig):
    name: Literal["bct"] = "bct"
    weight: float = Field(1.0, ge=0.0)
    synthesize_new_classes: bool = True


@register_method("bct")
class BCT(Method):
    """Classification loss + weight · CE of the new feature through the frozen old classifier."""

    config_cls = BCTConfig
    needs_old_model = True
    backward_compatible = True

    def __init__(self, cfg: BCTConfig, ctx: MethodContext) -> None:
        super().__init__(cfg, ctx)
        self.influence_head: nn.Module | None = None

    def on_train_start(self) -> None:
        old = self.ctx.old_model
        old_classifier = old.classifier
        if old_classifier is None:
            raise ValueError("BCT needs the old model's classifier; the old checkpoint has none")
        new_dim = self.ctx.model.embed_dim
        if old.embed_dim != new_dim:
            raise ValueError(f"BCT needs equal embedding dimensions: new {new_dim}, "
                             f"old {old.embed_dim}")
        old_ids = list(self.ctx.old_manifest.class_ids)
        missing = [c for c in self.ctx.class_ids if c not in set(old_ids)]
        synthesized: dict[int, Tensor] = {}
        if missing:
            if not self.cfg.synthesize_new_classes:
                raise ValueError(f"{len(missing)} new classes are unknown to the old classifier "
                                 "and synthesize_new_classes is false")
            means, _ = class_mean_features(
                ((old(images).feature, labels) for images, labels in self.ctx.train_batches()),
                self.ctx.num_classes, old.embed_dim,
            )
            synthesized = synthesize_new_class_rows(
                means, self.ctx.class_ids, old_ids, normalize=old_classifier.normalized
            )
        weight = influence_weight(old_classifier.weight, old_ids, self.ctx.class_ids, synthesized)
        head = copy.deepcopy(old_classifier)
        head.weight = nn.Parameter(weight, requires_grad=False)
        self.influence_head = head.requires_grad_(False)

    def step(self, batch: MethodBatch) -> LossOutput:
        if self.influence_head is None:
            raise RuntimeError("BCT.on_train_start() must run before step()")
        out = self.ctx.forward(batch.images, batch.labels)
        cls = self.classification_loss(out.logits, batch.labels)
        inf = F.cross_entropy(self.influence_head(out.feature, batch.labels).float(), batch.labels)
        return LossOutput(cls + self.cfg.weight * inf, {"cls": cls.item(), "bct": inf.item()})
