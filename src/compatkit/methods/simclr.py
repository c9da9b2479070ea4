"""SimCLR training of FCT's side-information model ψ (fct-fastfill-peers.md §1.2).

NT-Xent over two augmented views of each image: for the 2N normalised projections z, the only
positive of z_i is the other view of the same image and every other view in the (global) batch
is a negative. Labels are not used. The stored side-information is ``SideInfoModel.features``;
the projection head only serves the loss.
"""

from __future__ import annotations

from typing import Any, Literal, NamedTuple

import torch
import torch.nn.functional as F
from pydantic import Field
from torch import Tensor, nn

from compatkit.methods.base import (
    EvalEmbedders,
    LossOutput,
    Method,
    MethodBatch,
    MethodConfig,
    MethodContext,
    register_method,
)
from compatkit.methods.distributed import gather_keys


class ViewKeys(NamedTuple):
    """Keys of NT-Xent, usually the global batch: both views of every image.

    Shapes: view1 (K, D), view2 (K, D); row ``offset + i`` holds the local image i.
    """

    view1: Tensor
    view2: Tensor
    offset: int


def nt_xent_loss(
    view1: Tensor, view2: Tensor, *, temperature: float = 0.1, keys: ViewKeys | None = None,
) -> Tensor:
    """NT-Xent (SimCLR): mean over the 2B local anchors of −log softmax of the positive.

    ``ℓ(i) = −log( exp(cos(z_i, z_i⁺)/τ) / Σ_{k≠i} exp(cos(z_i, z_k)/τ) )``, the sum running
    over both views of every key image except the anchor itself.

    Args:
        view1, view2: the two views' projections of the same B images (normalised here).
        temperature: τ > 0. Default 0.1.
        keys: both views of the K ≥ B key images (e.g. gathered across processes), with the
            local images at rows ``offset .. offset + B − 1``; default the local batch.

    Shapes: view1, view2 (B, D) -> scalar.

    Raises:
        ValueError: mismatched shapes, B < 1, a non-positive temperature or keys that do not
            hold the local batch.
    """
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    if view1.ndim != 2 or view1.shape != view2.shape or view1.shape[0] < 1:
        raise ValueError(f"the two views must be non-empty (B, D) matrices of one shape, got "
                         f"{tuple(view1.shape)} and {tuple(view2.shape)}")
    if keys is None:
        keys = ViewKeys(view1, view2, 0)
    b, k = view1.shape[0], keys.view1.shape[0]
    if keys.view1.shape != keys.view2.shape or keys.view1.shape[1] != view1.shape[1]:
        raise ValueError(f"keys must be two (K, {view1.shape[1]}) matrices, got "
                         f"{tuple(keys.view1.shape)} and {tuple(keys.view2.shape)}")
    if not 0 <= keys.offset <= k - b:
        raise ValueError(f"keys offset {keys.offset} does not fit a local batch of {b} rows in "
                         f"{k} keys")
    anchors = F.normalize(torch.cat([view1, view2]).float(), dim=1)
    all_keys = F.normalize(torch.cat([keys.view1, keys.view2]).float(), dim=1)
    logits = anchors @ all_keys.T / temperature  # (2B, 2K)
    local = torch.arange(b, device=view1.device) + keys.offset
    self_col = torch.cat([local, local + k])
    pos_col = torch.cat([local + k, local])
    rows = torch.arange(2 * b, device=view1.device)
    logits[rows, self_col] = float("-inf")
    return (torch.logsumexp(logits, dim=1) - logits[rows, pos_col]).mean()


class SimCLRConfig(MethodConfig):
    name: Literal["simclr"] = "simclr"
    temperature: float = Field(0.1, gt=0.0)
    proj_dim: int = Field(128, gt=0)
    proj_hidden: int = Field(512, gt=0)


@register_method("simclr")
class SimCLR(Method):
    """Self-supervised NT-Xent training of a ``SideInfoModel`` (side_dim = model.embed_dim).

    View 1 is the loop's augmented batch, view 2 a second draw of the run's augmentation on
    the same raw images. τ defaults to 0.1 (SimCLR's ImageNet setting; ml-fct does not ship
    its ψ training code, so the side-information recipe's τ is unknown).
    """

    config_cls = SimCLRConfig
    artifact_kind = "side_info"

    def __init__(self, cfg: SimCLRConfig, ctx: MethodContext) -> None:
        super().__init__(cfg, ctx)
        if ctx.augment is None:
            raise ValueError("simclr needs the run's augmentation (MethodContext.augment) to "
                             "draw a second view")

    @classmethod
    def build_trained_module(
        cls, model_cfg: Any, method_cfg: MethodConfig, *, num_classes: int, in_chans: int,
        frozen: dict[str, nn.Module],
    ) -> nn.Module:
        """A ``SideInfoModel`` on the configured backbone whose stored feature is embed_dim wide."""
        from compatkit.models import SideInfoModel

        cfg = method_cfg if isinstance(method_cfg, SimCLRConfig) else SimCLRConfig()
        return SideInfoModel(
            model_cfg.backbone, side_dim=model_cfg.embed_dim, proj_dim=cfg.proj_dim,
            proj_hidden=cfg.proj_hidden, in_chans=in_chans, width=model_cfg.width,
            pooling=model_cfg.pooling,
        )

    def step(self, batch: MethodBatch) -> LossOutput:
        if batch.raw is None:
            raise ValueError("simclr needs the raw uint8 batch (MethodBatch.raw) for view 2")
        second = self.ctx.augment(batch.raw)
        z1 = self.ctx.forward(batch.images)
        z2 = self.ctx.forward(second)
        ids = torch.arange(z1.shape[0], device=z1.device)
        gathered = gather_keys(z1, z2, ids, stopgrad_new=False)
        b, off = z1.shape[0], gathered.offset
        view2 = torch.cat([gathered.old[:off], z2, gathered.old[off + b:]])  # local rows keep grad
        loss = nt_xent_loss(z1, z2, temperature=self.cfg.temperature,
                            keys=ViewKeys(gathered.new, view2, off))
        return LossOutput(loss, {"nt_xent": loss.item()})

    def evaluation_embedders(self) -> EvalEmbedders:
        """The side features' own leave-one-out retrieval (``self``)."""
        embed = self.ctx.model.features
        old = self.ctx.old_model
        return EvalEmbedders(embed, {"self": embed}, old.embed if old is not None else None)
