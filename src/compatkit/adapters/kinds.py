"""The adapter kinds: maps from source vectors X (N, d_in) to target vectors Y (N, d_out).

Closed forms (float64, no randomness):

- ``procrustes``: W = U·Vᵀ from the thin SVD X ᵀY = U·S·Vᵀ, no bias. With d_in = d_out W is the
  orthogonal map minimising ‖XW − Y‖. With different dimensions W is the semi-orthogonal
  d_in × d_out matrix of the same formula, which is also what zero-padding the smaller space to
  max(d_in, d_out), solving the square problem and keeping the d_in × d_out block gives: for
  d_in < d_out an isometry into the larger space; for d_in > d_out a projection onto d_out
  orthonormal directions (exact when the source vectors carry nothing outside them). Needs
  min(d_in, d_out) pairs.
- ``linear``: ridge least squares with a free bias, W = (XcᵀXc + λI)⁻¹XcᵀYc on centred vectors,
  λ = ridge · trace(XcᵀXc) / d_in. With ridge 0 it needs d_in + 1 pairs.
- ``lowrank``: reduced-rank ridge regression: the linear W projected onto the top ``rank``
  right singular vectors of the fitted Xc·W (rank default: half the smaller dimension).

Trained (FCT's recipe, fct-fastfill-peers.md §1.5: MSE, Adam lr 5e-4 with weight decay 2⁻¹⁵,
batch up to 1024 but at least 16 steps per epoch, cosine schedule with 5 warm-up epochs,
BatchNorm frozen from half the epochs), on nine tenths of the pairs with early stopping on the
held-out tenth:

- ``mlp``: ``ResidualTransformation``: the ``linear`` fit as a skip plus FCT's MLP, which starts
  at zero and so can only improve the held-out error of the affine map it starts from.
- ``fct``: the same with a side-information vector per item as an extra input (FCT).
"""

from __future__ import annotations

import copy
import logging
import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from compatkit.errors import CompatkitError
from compatkit.models.adapter_maps import AffineMap, ResidualTransformation
from compatkit.registry import Registry

log = logging.getLogger(__name__)

MIN_TRAINED_PAIRS = 20
MIN_STEPS_PER_EPOCH = 16


class NotEnoughPairsError(CompatkitError):
    """Fewer pairs than the kind needs to determine its map."""


@dataclass(frozen=True)
class FitOptions:
    """Settings of every kind (each kind reads the ones it uses).

    ridge: linear/lowrank/mlp skip regulariser, relative to the mean variance per dimension.
    rank: lowrank's rank, None = half the smaller dimension.
    inner, epochs, patience, batch_size, lr, weight_decay: the trained kinds' MLP and recipe.
    holdout: fraction of the pairs kept for early stopping.  seed: split and initialisation.
    """

    ridge: float = 1e-3
    rank: int | None = None
    inner: int = 512
    epochs: int = 80
    patience: int = 10
    batch_size: int = 1024
    lr: float = 5e-4
    weight_decay: float = 2.0 ** -15
    holdout: float = 0.1
    seed: int = 0
    device: str = "cpu"

    def __post_init__(self) -> None:
        if self.ridge < 0:
            raise ValueError(f"ridge must be >= 0, got {self.ridge}")
        if self.rank is not None and self.rank < 1:
            raise ValueError(f"rank must be >= 1, got {self.rank}")
        for name in ("inner", "epochs", "patience", "batch_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.lr <= 0 or self.weight_decay < 0:
            raise ValueError(f"lr must be > 0 and weight_decay >= 0, got {self.lr}, "
                             f"{self.weight_decay}")
        if not 0 < self.holdout < 1:
            raise ValueError(f"holdout must be in (0, 1), got {self.holdout}")


@dataclass(frozen=True)
class AdapterKind:
    """One kind: its fit function, whether it takes side-information, and its pair minimum."""

    name: str
    fit: Callable[[Tensor, Tensor, Tensor | None, FitOptions], tuple[nn.Module, dict[str, Any]]]
    uses_side: bool
    min_pairs: Callable[[int, int, FitOptions], int]
    summary: str


KINDS: Registry[AdapterKind] = Registry("adapter kind")


def get_kind(name: str) -> AdapterKind:
    """The kind registered as ``name``; an unknown name raises with the known ones."""
    return KINDS.get(name)


def kind_summaries() -> list[tuple[str, str]]:
    """(name, one-line summary) of every kind, sorted by name."""
    return [(name, KINDS.get(name).summary) for name in KINDS.names()]


def resolve_rank(options: FitOptions, d_in: int, d_out: int) -> int:
    """lowrank's rank: the option, or half the smaller dimension (at least 1)."""
    rank = max(1, min(d_in, d_out) // 2) if options.rank is None else options.rank
    if rank > min(d_in, d_out):
        raise ValueError(f"rank {rank} exceeds min(d_in, d_out) = {min(d_in, d_out)}")
    return rank


def _ridge_solution(x: Tensor, y: Tensor, ridge: float) -> tuple[Tensor, Tensor, Tensor]:
    """(W, mean of x, mean of y) of ridge least squares on centred float64 vectors."""
    mx, my = x.mean(0), y.mean(0)
    xc, yc = x - mx, y - my
    if ridge == 0:
        w = torch.linalg.lstsq(xc, yc, driver="gelsd").solution
    else:
        gram = xc.T @ xc
        lam = ridge * float(torch.trace(gram)) / x.shape[1]
        eye = torch.eye(x.shape[1], dtype=x.dtype, device=x.device)
        w = torch.linalg.solve(gram + max(lam, 1e-12) * eye, xc.T @ yc)
    return w, mx, my


def _affine(w: Tensor, b: Tensor, rank: int | None) -> AffineMap:
    module = AffineMap(w.shape[0], w.shape[1], rank=rank)
    module.set_weights(w.float(), b.float())
    return module


def _fit_procrustes(x: Tensor, y: Tensor, side: Tensor | None,
                    options: FitOptions) -> tuple[nn.Module, dict[str, Any]]:
    u, _, vh = torch.linalg.svd(x.T @ y, full_matrices=False)
    return _affine(u @ vh, torch.zeros(y.shape[1], dtype=y.dtype), None), {}


def _fit_linear(x: Tensor, y: Tensor, side: Tensor | None,
                options: FitOptions) -> tuple[nn.Module, dict[str, Any]]:
    w, mx, my = _ridge_solution(x, y, options.ridge)
    return _affine(w, my - mx @ w, None), {}


def _fit_lowrank(x: Tensor, y: Tensor, side: Tensor | None,
                 options: FitOptions) -> tuple[nn.Module, dict[str, Any]]:
    rank = resolve_rank(options, x.shape[1], y.shape[1])
    w, mx, my = _ridge_solution(x, y, options.ridge)
    _, _, vh = torch.linalg.svd((x - mx) @ w, full_matrices=False)
    v = vh[:rank].T
    w_r = w @ v @ v.T
    return _affine(w_r, my - mx @ w_r, rank), {"rank": rank}


def _split(n: int, options: FitOptions) -> tuple[np.ndarray, np.ndarray]:
    """(train rows, held-out rows): a seeded ``holdout`` fraction, at least one row."""
    perm = np.random.default_rng(options.seed).permutation(n)
    n_val = max(1, round(n * options.holdout))
    return np.sort(perm[n_val:]), np.sort(perm[:n_val])


@torch.no_grad()
def _mse(module: nn.Module, x: Tensor, y: Tensor, side: Tensor | None) -> float:
    module.eval()
    return float(F.mse_loss(module(x, side).embedding, y))


def _fit_residual(x: Tensor, y: Tensor, side: Tensor | None,
                  options: FitOptions) -> tuple[nn.Module, dict[str, Any]]:
    """Train ``ResidualTransformation`` from the linear fit with FCT's recipe; early stopping
    keeps the weights of the epoch with the lowest held-out MSE (epoch 0 = the linear start)."""
    from compatkit.methods.fct import default_freeze_bn_epoch
    from compatkit.train.schedule import cosine_with_warmup

    tr, va = _split(x.shape[0], options)
    device = torch.device(options.device)
    w, mx, my = _ridge_solution(x[tr], y[tr], options.ridge)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(options.seed)
        module = ResidualTransformation(x.shape[1], y.shape[1],
                                        d_side=None if side is None else side.shape[1],
                                        inner=options.inner)
    module.skip.set_weights(w.float(), (my - mx @ w).float())
    module.to(device)
    xs, ys = x.float().to(device), y.float().to(device)
    ss = None if side is None else side.float().to(device)

    def rows(t: Tensor | None, idx: np.ndarray) -> Tensor | None:
        return None if t is None else t[torch.from_numpy(idx).to(device)]

    x_va, y_va, s_va = rows(xs, va), rows(ys, va), rows(ss, va)
    n_batches = math.ceil(len(tr) / effective_batch_size(len(tr), options.batch_size))
    total = options.epochs * n_batches
    warmup = min(5, options.epochs) * n_batches
    freeze_bn = default_freeze_bn_epoch(options.epochs)
    optimizer = torch.optim.Adam(module.parameters(), lr=options.lr,
                                 weight_decay=options.weight_decay)
    best = _mse(module, x_va, y_va, s_va)
    start_mse, best_state = best, copy.deepcopy(module.state_dict())
    best_epoch = stale = step = 0
    rng = np.random.default_rng(options.seed + 1)
    epoch = 0
    for epoch in range(1, options.epochs + 1):
        module.train(epoch - 1 < freeze_bn)
        for batch in np.array_split(rng.permutation(tr), n_batches):
            for group in optimizer.param_groups:
                group["lr"] = cosine_with_warmup(step, total_steps=total, warmup_steps=warmup,
                                                 base_lr=options.lr)
            loss = F.mse_loss(module(rows(xs, batch), rows(ss, batch)).embedding,
                              rows(ys, batch))
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            step += 1
        val = _mse(module, x_va, y_va, s_va)
        if val < best:
            best, best_state, best_epoch, stale = val, copy.deepcopy(module.state_dict()), epoch, 0
        else:
            stale += 1
            if stale >= options.patience:
                break
    module.load_state_dict(best_state)
    module.eval().cpu()
    log.info("residual MLP: held-out MSE %.6g (linear start %.6g), best epoch %d of %d",
             best, start_mse, best_epoch, epoch)
    return module, {"heldout_mse": best, "heldout_mse_linear": start_mse,
                    "best_epoch": best_epoch, "epochs_run": epoch, "heldout_pairs": len(va)}


def effective_batch_size(n_train: int, batch_size: int) -> int:
    """FCT's batch (``batch_size``, 1024) shrunk so that an epoch takes at least
    ``MIN_STEPS_PER_EPOCH`` steps, but never below 32 pairs: few pairs still get enough updates."""
    return max(1, min(batch_size, max(32, n_train // MIN_STEPS_PER_EPOCH)))


def _closed_min(d_in: int, d_out: int, options: FitOptions) -> int:
    return d_in + 1 if options.ridge == 0 else 2


for _kind in (
    AdapterKind("procrustes", _fit_procrustes, False, lambda di, do, o: min(di, do),
                "orthogonal (semi-orthogonal when dimensions differ) map, closed form"),
    AdapterKind("linear", _fit_linear, False, _closed_min,
                "affine map by ridge least squares, closed form"),
    AdapterKind("lowrank", _fit_lowrank, False, _closed_min,
                "affine map of rank r (reduced-rank ridge regression), closed form"),
    AdapterKind("mlp", _fit_residual, False, lambda di, do, o: MIN_TRAINED_PAIRS,
                "linear skip + FCT's MLP, trained with early stopping on a held-out tenth"),
    AdapterKind("fct", _fit_residual, True, lambda di, do, o: MIN_TRAINED_PAIRS,
                "mlp with a side-information vector per item as an extra input (FCT)"),
):
    KINDS.add(_kind.name, _kind)


def fit_kind(name: str, x: np.ndarray, y: np.ndarray, side: np.ndarray | None,
             options: FitOptions) -> tuple[nn.Module, dict[str, Any]]:
    """Fit kind ``name`` mapping rows of ``x`` (N, d_in) to rows of ``y`` (N, d_out).

    Returns (the module in eval mode on the CPU, fit statistics).

    Raises:
        UnknownNameError: an unknown kind.  NotEnoughPairsError: fewer pairs than it needs.
        CompatkitError: side-information given to a kind without it, or missing for ``fct``.
    """
    kind = get_kind(name)
    n, d_in, d_out = x.shape[0], x.shape[1], y.shape[1]
    if kind.uses_side and side is None:
        raise CompatkitError(f"kind {name!r} needs side-information: pass --side (N, d_side) "
                             "vectors of the same items")
    if not kind.uses_side and side is not None:
        raise CompatkitError(f"kind {name!r} takes no side-information; use kind 'fct' to give "
                             "the map a side-information input")
    need = kind.min_pairs(d_in, d_out, options)
    if n < need:
        hint = " (or a ridge > 0)" if name in ("linear", "lowrank") and options.ridge == 0 else ""
        raise NotEnoughPairsError(f"kind {name!r} mapping {d_in}-d to {d_out}-d vectors needs at "
                                  f"least {need} pairs, got {n}: add pairs{hint}")
    module, stats = kind.fit(_float64(x), _float64(y),
                             None if side is None else _float64(side), options)
    return module.eval(), stats


def _float64(a: np.ndarray) -> Tensor:
    return torch.from_numpy(np.ascontiguousarray(a, dtype=np.float64))
