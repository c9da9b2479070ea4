"""Transformations fitted from paired vectors (``compatkit.adapters``): affine and residual maps.

- ``AffineMap``: y = x·W + b, with W full (d_in × d_out) or of rank r (W = U·V, U: d_in × r,
  V: r × d_out). Orthogonal Procrustes, ridge least squares and low-rank affine fits all land
  in it; the fit writes the weights, the module only applies them.
- ``ResidualTransformation``: an ``AffineMap`` skip plus FCT's MLP (``Transformation``, with
  optional side-information) whose last layer starts at zero, so training starts from the
  affine fit and learns the non-linear remainder.

Both register in ``TRANSFORMATIONS`` under their ``ARCHITECTURE`` name, which their ``spec``
carries, so ``compatkit.artifacts.load_module`` rebuilds them like any transformation.
Their outputs are ``TransformOutput`` without a σ head.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from compatkit.models.transformation import (
    TRANSFORMATIONS,
    EmbeddingMap,
    Transformation,
    TransformOutput,
)


def _check_input(x: Tensor, d_in: int, side: Tensor | None, d_side: int | None) -> None:
    if x.ndim != 2 or x.shape[1] != d_in:
        raise ValueError(f"input vectors must have shape (N, {d_in}), got {tuple(x.shape)}")
    if d_side is None and side is not None:
        raise ValueError("side-information given but this map takes none (d_side=None)")


class AffineMap(EmbeddingMap):
    """y = x·W + b between two embedding spaces, W of full rank or factored at rank ``rank``.

    Args:
        d_old: input dimension.  d_new: output dimension.
        rank: None for a full W, else 1 <= rank <= min(d_old, d_new).

    Shapes:
        old: (N, d_old) -> TransformOutput(embedding (N, d_new), log_sigma None).
    """

    ARCHITECTURE = "affine"

    def __init__(self, d_old: int, d_new: int, *, rank: int | None = None) -> None:
        super().__init__()
        for key, value in (("d_old", d_old), ("d_new", d_new)):
            if value < 1:
                raise ValueError(f"{key} must be >= 1, got {value}")
        if rank is not None and not 1 <= rank <= min(d_old, d_new):
            raise ValueError(f"rank must be in [1, min(d_old, d_new) = {min(d_old, d_new)}], "
                             f"got {rank}")
        self.d_old, self.d_new, self.rank = d_old, d_new, rank
        self._spec = {"architecture": self.ARCHITECTURE, "d_old": d_old, "d_new": d_new,
                      "rank": rank}
        self.d_side: int | None = None
        self.sigma_dim = 0
        self.sigma_head: nn.Module | None = None
        if rank is None:
            self.weight = nn.Parameter(torch.zeros(d_old, d_new))
        else:
            self.down = nn.Parameter(torch.zeros(d_old, rank))
            self.up = nn.Parameter(torch.zeros(rank, d_new))
        self.bias = nn.Parameter(torch.zeros(d_new))

    def matrix(self) -> Tensor:
        """W as one (d_old, d_new) matrix (the product U·V for a low-rank map)."""
        return self.weight if self.rank is None else self.down @ self.up

    @torch.no_grad()
    def set_weights(self, weight: Tensor, bias: Tensor) -> None:
        """Write a fitted W (d_old, d_new) and b (d_new,); a low-rank map takes W as U·V factors
        via its rank-r truncated SVD, exact when rank(W) <= r."""
        if weight.shape != (self.d_old, self.d_new) or bias.shape != (self.d_new,):
            raise ValueError(f"expected W {(self.d_old, self.d_new)} and b ({self.d_new},), got "
                             f"{tuple(weight.shape)} and {tuple(bias.shape)}")
        if self.rank is None:
            self.weight.copy_(weight)
        else:
            u, s, vh = torch.linalg.svd(weight.double(), full_matrices=False)
            root = s[: self.rank].sqrt()
            self.down.copy_((u[:, : self.rank] * root).to(self.down.dtype))
            self.up.copy_((root[:, None] * vh[: self.rank]).to(self.up.dtype))
        self.bias.copy_(bias)

    def forward(self, old: Tensor, side: Tensor | None = None) -> TransformOutput:
        _check_input(old, self.d_old, side, None)
        if self.rank is None:
            out = old @ self.weight + self.bias
        else:
            out = (old @ self.down) @ self.up + self.bias
        return TransformOutput(embedding=out, log_sigma=None)


class ResidualTransformation(EmbeddingMap):
    """An affine skip plus FCT's MLP: h(x, s) = x·W + b + MLP(x, s).

    The MLP is ``Transformation(d_old, d_new, d_side=d_side, inner=inner)``; its last linear
    layer is zero at construction, so an untrained module equals its skip.

    Shapes:
        old: (N, d_old); side: (N, d_side) or None -> TransformOutput(embedding (N, d_new), None).
    """

    ARCHITECTURE = "residual_mlp"

    def __init__(self, d_old: int, d_new: int, *, d_side: int | None = None,
                 inner: int = 512) -> None:
        super().__init__()
        self.skip = AffineMap(d_old, d_new)
        self.mlp = Transformation(d_old, d_new, d_side=d_side, inner=inner)
        last = self.mlp.mixer[-1]
        with torch.no_grad():
            last.weight.zero_()
            last.bias.zero_()
        self.d_old, self.d_new, self.d_side = d_old, d_new, d_side
        self.sigma_dim = 0
        self.sigma_head: nn.Module | None = None
        self._spec = {"architecture": self.ARCHITECTURE, "d_old": d_old, "d_new": d_new,
                      "d_side": d_side, "inner": inner}

    def forward(self, old: Tensor, side: Tensor | None = None) -> TransformOutput:
        _check_input(old, self.d_old, side, self.d_side)
        out = self.skip(old).embedding + self.mlp(old, side).embedding
        return TransformOutput(embedding=out, log_sigma=None)


TRANSFORMATIONS.add(AffineMap.ARCHITECTURE, AffineMap)
TRANSFORMATIONS.add(ResidualTransformation.ARCHITECTURE, ResidualTransformation)
