"""Forward transformations between embedding spaces (FCT, FastFill, BiCT).

``Transformation`` is FCT's side-information MLP (fct-fastfill-peers.md §1.4) on (N, d) tensors:

- old branch: d_old → old_hidden → branch_dim (two Linear-without-bias → BN → ReLU blocks);
- optional side branch: d_side → side_hidden → branch_dim (same blocks);
- mixer on the concatenation: (2 or 1)·branch_dim → inner → inner (blocks) → d_new (Linear with
  bias, no BN, no ReLU; the output is unbounded).

Defaults: old_hidden = 2·d_old, side_hidden = 2·d_side, branch_dim = 2·d_new, inner = 2048;
128/128/128 with side-info has 5,712,000 parameters. Without side-info there is no side branch
(ml-fct instead feeds the old feature twice). FastFill adds ``Linear(d_new → sigma_dim)`` on the
transformed feature, predicting the per-sample log-uncertainty ``s(x)`` (§2.2). BiCT uses the
same module without side-info (methods.md §2.5).

``TRANSFORMATIONS`` maps an architecture name to its class so that ``create_transformation``
rebuilds any transformation artifact from its manifest's spec: a spec without an
``architecture`` key is this FCT MLP (``"fct_mlp"``); other modules (the adapters of
``compatkit.models.adapter_maps``) register themselves and put their name in their spec.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from typing import Any, NamedTuple

import torch
from torch import Tensor, nn

from compatkit.registry import Registry

TRANSFORMATIONS: Registry[Callable[..., nn.Module]] = Registry("transformation architecture")
DEFAULT_ARCHITECTURE = "fct_mlp"


class TransformOutput(NamedTuple):
    """What ``Transformation.forward`` returns; both fields are always present.

    embedding: (N, d_new), the transformed feature (not normalised).
    log_sigma: (N, sigma_dim), FastFill's predicted log-uncertainty s(x), or None without σ head.
    """

    embedding: Tensor
    log_sigma: Tensor | None


def _block(in_dim: int, out_dim: int) -> list[nn.Module]:
    return [nn.Linear(in_dim, out_dim, bias=False), nn.BatchNorm1d(out_dim), nn.ReLU(inplace=True)]


class EmbeddingMap(nn.Module):
    """What every transformation between embedding spaces exposes: its dimensions and the
    spec it is rebuilt from (``create_transformation(**spec)``). Subclasses set ``d_old``,
    ``d_new`` and ``_spec``."""

    d_old: int
    d_new: int
    _spec: dict[str, Any]

    @property
    def d_in(self) -> int:
        """The input (old) embedding dimension."""
        return self.d_old

    @property
    def d_out(self) -> int:
        """The output (new) embedding dimension."""
        return self.d_new

    @property
    def spec(self) -> dict[str, Any]:
        """Constructor keywords (defaults resolved); ``create_transformation(**spec)``."""
        return copy.deepcopy(self._spec)


class Transformation(EmbeddingMap):
    """FCT's MLP from old embeddings (plus optional side-information) to the new space.

    Args:
        d_old: old embedding dimension.
        d_new: new embedding dimension.
        d_side: side-information dimension, or None for no side branch. Default None.
        inner: mixer hidden width. Default 2048.
        old_hidden: old branch hidden width. Default 2·d_old.
        side_hidden: side branch hidden width. Default 2·d_side.
        branch_dim: output width of each branch. Default 2·d_new.
        sigma_dim: FastFill σ head outputs: 0 (no head), 1 or d_new. Default 0.

    Shapes:
        old: (N, d_old); side: (N, d_side) or None ->
        TransformOutput(embedding (N, d_new), log_sigma (N, sigma_dim) | None).

    Raises:
        ValueError: non-positive sizes or sigma_dim not in {0, 1, d_new}.
    """

    def __init__(
        self,
        d_old: int,
        d_new: int,
        *,
        d_side: int | None = None,
        inner: int = 2048,
        old_hidden: int | None = None,
        side_hidden: int | None = None,
        branch_dim: int | None = None,
        sigma_dim: int = 0,
    ) -> None:
        super().__init__()
        old_hidden = 2 * d_old if old_hidden is None else old_hidden
        branch_dim = 2 * d_new if branch_dim is None else branch_dim
        if d_side is not None:
            side_hidden = 2 * d_side if side_hidden is None else side_hidden
        elif side_hidden is not None:
            raise ValueError(f"side_hidden={side_hidden} given but d_side is None (no side branch)")
        sizes = {"d_old": d_old, "d_new": d_new, "inner": inner, "old_hidden": old_hidden,
                 "branch_dim": branch_dim, "d_side": d_side, "side_hidden": side_hidden}
        for key, value in sizes.items():
            if value is not None and value < 1:
                raise ValueError(f"{key} must be >= 1, got {value}")
        if sigma_dim not in (0, 1, d_new):
            raise ValueError(f"sigma_dim must be 0, 1 or d_new={d_new}, got {sigma_dim}")

        self.d_old, self.d_new, self.d_side = d_old, d_new, d_side
        self.sigma_dim = sigma_dim
        self._spec: dict[str, Any] = {**sizes, "sigma_dim": sigma_dim}

        self.old_branch = nn.Sequential(*_block(d_old, old_hidden), *_block(old_hidden, branch_dim))
        self.side_branch: nn.Sequential | None = None
        if d_side is not None and side_hidden is not None:
            self.side_branch = nn.Sequential(
                *_block(d_side, side_hidden), *_block(side_hidden, branch_dim)
            )
        n_branches = 1 if self.side_branch is None else 2
        self.mixer = nn.Sequential(
            *_block(n_branches * branch_dim, inner),
            *_block(inner, inner),
            nn.Linear(inner, d_new, bias=True),
        )
        self.sigma_head = nn.Linear(d_new, sigma_dim) if sigma_dim > 0 else None

    def forward(self, old: Tensor, side: Tensor | None = None) -> TransformOutput:
        self._check(old, side)
        features = self.old_branch(old)
        if self.side_branch is not None and side is not None:
            features = torch.cat([features, self.side_branch(side)], dim=1)
        embedding = self.mixer(features)
        log_sigma = None if self.sigma_head is None else self.sigma_head(embedding)
        return TransformOutput(embedding=embedding, log_sigma=log_sigma)

    def _check(self, old: Tensor, side: Tensor | None) -> None:
        if old.ndim != 2 or old.shape[1] != self.d_old:
            raise ValueError(
                f"old features must have shape (N, d_old={self.d_old}), got {tuple(old.shape)}"
            )
        if self.side_branch is None:
            if side is not None:
                raise ValueError(
                    "side-information given but this transformation has no side branch "
                    "(built with d_side=None)"
                )
            return
        if side is None:
            raise ValueError(
                f"this transformation needs side-information of shape (N, {self.d_side}); "
                "got side=None"
            )
        if side.ndim != 2 or side.shape != (old.shape[0], self.d_side):
            raise ValueError(
                f"side-information must have shape ({old.shape[0]}, d_side={self.d_side}) "
                f"to match old features {tuple(old.shape)}, got {tuple(side.shape)}"
            )


TRANSFORMATIONS.add(DEFAULT_ARCHITECTURE, Transformation)


def create_transformation(**spec: Any) -> nn.Module:
    """Build a transformation from its ``spec``: the constructor keywords, plus the registered
    ``architecture`` name for modules other than FCT's MLP (unknown names raise with the list)."""
    architecture = spec.pop("architecture", DEFAULT_ARCHITECTURE)
    return TRANSFORMATIONS.get(architecture)(**spec)
