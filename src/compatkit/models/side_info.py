"""The side-information model of FCT (fct-fastfill-peers.md §1.2), trained with SimCLR.

``features(x)`` is the stored side-information vector ψ(x) (un-normalised, ``side_dim`` wide);
``forward(x)`` adds SimCLR's projection MLP and returns the L2-normalised projection z used by
the NT-Xent loss. The projection head is discarded after training.
"""

from __future__ import annotations

import copy
from typing import Any

import torch.nn.functional as F
from torch import Tensor, nn

from compatkit.models.backbones import create_backbone
from compatkit.models.heads import EmbeddingHead


class SideInfoModel(nn.Module):
    """Backbone → side-information feature (B, side_dim) → projection MLP → normalised z.

    Args:
        backbone: a registered backbone name.
        side_dim: width of the stored side-information feature (a Linear on the pooled
            backbone feature), or None to store the backbone feature itself. Default 128.
        proj_dim: projection output width. Default 128.
        proj_hidden: projection hidden width. Default 512.
        in_chans, width, pooling: passed to the backbone.

    Shapes:
        x: (B, in_chans, H, W) -> features: (B, side_dim); forward: (B, proj_dim), unit norm.
    """

    def __init__(
        self,
        backbone: str,
        *,
        side_dim: int | None = 128,
        proj_dim: int = 128,
        proj_hidden: int = 512,
        in_chans: int = 3,
        width: float = 1.0,
        pooling: str = "avg",
    ) -> None:
        super().__init__()
        if proj_dim < 1 or proj_hidden < 1:
            raise ValueError(
                f"proj_dim and proj_hidden must be >= 1, got {proj_dim}, {proj_hidden}"
            )
        self._spec: dict[str, Any] = {
            "backbone": backbone, "side_dim": side_dim, "proj_dim": proj_dim,
            "proj_hidden": proj_hidden, "in_chans": in_chans, "width": width, "pooling": pooling,
        }
        self.backbone = create_backbone(backbone, width=width, in_chans=in_chans, pooling=pooling)
        num_features: int = self.backbone.num_features
        self.head: nn.Module = (
            nn.Identity() if side_dim is None else EmbeddingHead(num_features, side_dim)
        )
        self.side_dim = num_features if side_dim is None else side_dim
        self.proj_dim = proj_dim
        self.projection = nn.Sequential(
            nn.Linear(self.side_dim, proj_hidden, bias=False),
            nn.BatchNorm1d(proj_hidden),
            nn.ReLU(inplace=True),
            nn.Linear(proj_hidden, proj_dim),
        )

    @property
    def spec(self) -> dict[str, Any]:
        """A copy of the constructor keywords; ``create_side_info_model(**spec)`` rebuilds it."""
        return copy.deepcopy(self._spec)

    @property
    def embed_dim(self) -> int:
        """Width of the stored vector (``side_dim``), for code that embeds with any model."""
        return self.side_dim

    def features(self, x: Tensor) -> Tensor:
        """The side-information vector ψ(x) to store. Shapes: -> (B, side_dim)."""
        return self.head(self.backbone.forward_features(x))

    def embed(self, x: Tensor) -> Tensor:
        """Same as ``features``, so generic embedding code can store side-information."""
        return self.features(x)

    def forward(self, x: Tensor) -> Tensor:
        """The L2-normalised SimCLR projection z. Shapes: -> (B, proj_dim)."""
        return F.normalize(self.projection(self.features(x)), dim=1)


def create_side_info_model(**spec: Any) -> SideInfoModel:
    """Build a ``SideInfoModel`` from its ``spec`` (the constructor keywords)."""
    return SideInfoModel(**spec)
