"""Image-free upgrade of stored embeddings by learned transformations (FCT, FastFill, BiCT).

``upgrade_features`` chains v1 → v2 → v3 … over a features file, checking every hop (the
features' version must be the transformation's ``transforms_from``, dimensions must match) and
recording the chain in the output manifest's ``lineage``. ``sigma_scores`` gives FastFill's
backfill priority (fct-fastfill-peers.md §2.3): the most uncertain items first.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from compatkit.artifacts import FeatureSet, Manifest, load_module, read_manifest
from compatkit.errors import CompatkitError, IncompatibleSpacesError
from compatkit.version import code_version

log = logging.getLogger(__name__)


def _device_of(module: nn.Module) -> torch.device:
    param = next(module.parameters(), None)
    return param.device if param is not None else torch.device("cpu")


def _as_matrix(values: np.ndarray, what: str) -> np.ndarray:
    arr = np.asarray(values)
    if arr.ndim != 2:
        raise ValueError(f"{what} must be an (N, D) matrix, got shape {arr.shape}")
    if not np.all(np.isfinite(arr)):
        raise ValueError(f"{what} holds NaN or inf values")
    return arr.astype(np.float32, copy=False)


@torch.no_grad()
def _run(
    module: nn.Module, vectors: np.ndarray, side: np.ndarray | None, *, batch_size: int,
    field: str,
) -> np.ndarray:
    """Batched eval-mode forward of a transformation; returns one output field as float32."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    old = _as_matrix(vectors, "vectors")
    side_arr = None if side is None else _as_matrix(side, "side-information")
    if side_arr is not None and side_arr.shape[0] != old.shape[0]:
        raise ValueError(f"side-information has {side_arr.shape[0]} rows but the vectors have "
                         f"{old.shape[0]}")
    device = _device_of(module)
    was_training = module.training
    module.eval()
    out = []
    try:
        for start in range(0, old.shape[0], batch_size):
            x = torch.from_numpy(old[start:start + batch_size]).to(device)
            s = (None if side_arr is None
                 else torch.from_numpy(side_arr[start:start + batch_size]).to(device))
            value = getattr(module(x, s), field)
            out.append(value.float().cpu().numpy())
    finally:
        module.train(was_training)
    if not out:
        width = getattr(module, "d_out", 0) if field == "embedding" else module.sigma_dim
        return np.zeros((0, width), dtype=np.float32)
    return np.concatenate(out)


def apply_transformation(
    module: nn.Module, vectors: np.ndarray, side: np.ndarray | None = None, *,
    batch_size: int = 4096, normalize: bool = False,
) -> np.ndarray:
    """Map stored old vectors (and side-information) into the new space, in eval mode.

    Args:
        module: a ``Transformation`` (on any device; inputs follow it).
        vectors: (N, d_old) stored old embeddings.  side: (N, d_side) or None.
        batch_size: rows per forward pass.
        normalize: L2-normalise the outputs (when the target space is normalised).

    Returns:
        (N, d_new) float32.

    Raises:
        ValueError: wrong shapes, NaN/inf inputs or missing/unexpected side-information.
    """
    out = _run(module, vectors, side, batch_size=batch_size, field="embedding")
    if normalize and out.shape[0]:
        out = F.normalize(torch.from_numpy(out), dim=1).numpy()
    return out


def sigma_scores(
    transformation: nn.Module, old_feats: np.ndarray, side_feats: np.ndarray | None = None, *,
    batch_size: int = 4096,
) -> np.ndarray:
    """FastFill's predicted log-uncertainty s(x) per item (mean over σ outputs).

    Higher = more uncertain = backfill first (``compatkit.ordering``'s ``sigma`` policy).
    Shapes: old_feats (N, d_old), side_feats (N, d_side) | None -> (N,) float32.

    Raises:
        ValueError: the transformation has no σ head (not trained with FastFill), or bad inputs.
    """
    if getattr(transformation, "sigma_head", None) is None:
        raise ValueError("this transformation has no σ head: train it with method 'fastfill' "
                         "(sigma_dim >= 1) to get backfill uncertainties")
    s = _run(transformation, old_feats, side_feats, batch_size=batch_size, field="log_sigma")
    return s.mean(axis=1).astype(np.float32)


def _load_transformation(path: str | Path, device: str | torch.device) -> tuple[nn.Module,
                                                                                 Manifest]:
    manifest = read_manifest(path)
    if manifest.kind != "transformation":
        raise CompatkitError(f"{path} holds a {manifest.kind} artifact, not a transformation")
    if manifest.transforms_from is None or manifest.transforms_to is None:
        raise CompatkitError(f"transformation {path} does not declare transforms_from/"
                             "transforms_to in its manifest")
    module, manifest = load_module(path, device=device)
    return module, manifest


def _check_side(side: FeatureSet | None, features: FeatureSet, module: nn.Module,
                hop: str) -> np.ndarray | None:
    """The side-information matrix a hop needs (None when its transformation has no side branch)."""
    d_side = getattr(module, "d_side", None)
    if d_side is None:
        return None
    if side is None:
        raise CompatkitError(f"{hop} needs side-information of dimension {d_side}; "
                             "pass the stored side-information features")
    if side.manifest.kind != "side_info":
        raise CompatkitError(f"side-information features come from a {side.manifest.kind} "
                             f"({side.manifest.model_version}), not a side-info model")
    if side.features.shape != (features.features.shape[0], d_side):
        raise CompatkitError(f"{hop} needs side-information of shape "
                             f"({features.features.shape[0]}, {d_side}), got "
                             f"{side.features.shape}")
    if side.ids is not None and features.ids is not None and not np.array_equal(side.ids,
                                                                                 features.ids):
        raise CompatkitError("side-information rows do not match the features' item ids")
    return side.features


def upgrade_features(
    features: FeatureSet, transformations: Sequence[str | Path], *,
    side: FeatureSet | None = None, batch_size: int = 4096, device: str | torch.device = "cpu",
) -> FeatureSet:
    """Upgrade stored embeddings through a chain of transformations, oldest first.

    Every hop must start where the previous one ended: the features' ``model_version`` must be
    the transformation's ``transforms_from`` and their dimension its input dimension. ``side``
    is used by every hop whose transformation has a side branch. The output carries the target
    model's identity (``model_version`` = the last ``transforms_to``, ``embed_dim`` = its d_new)
    and ``lineage`` = every version and transformation passed, oldest first.

    Raises:
        IncompatibleSpacesError: a hop whose ``transforms_from`` is not the current version, or
            whose input dimension differs from the features'.
        CompatkitError: no transformations, a non-transformation artifact, or missing,
            mismatched or unused side-information.
    """
    if not transformations:
        raise CompatkitError("upgrade needs at least one transformation")
    current = features.features
    version = features.manifest.model_version
    lineage = list(features.manifest.lineage or (version,))
    used_side = False
    for path in transformations:
        module, manifest = _load_transformation(path, device)
        hop = f"transformation {manifest.model_version} ({path})"
        if manifest.transforms_from != version:
            raise IncompatibleSpacesError(
                f"{hop} maps {manifest.transforms_from} → {manifest.transforms_to}, but the "
                f"features are of version {version}")
        if current.shape[1] != module.d_in:
            raise IncompatibleSpacesError(
                f"{hop} takes {module.d_in}-d vectors of {manifest.transforms_from}, but the "
                f"features of {version} are {current.shape[1]}-d")
        side_arr = _check_side(side, features, module, hop)
        used_side = used_side or side_arr is not None
        current = apply_transformation(module, current, side_arr, batch_size=batch_size,
                                       normalize=manifest.normalized)
        version = manifest.transforms_to
        lineage += [manifest.model_version, version]
        log.info("upgraded %d vectors %s → %s", current.shape[0], lineage[-3], version)
    if side is not None and not used_side:
        raise CompatkitError("side-information was given but no transformation of the chain "
                             "has a side branch")
    out_manifest = Manifest(
        kind="model", model_version=version, spec={}, embed_dim=int(current.shape[1]),
        normalized=manifest.normalized, method=manifest.method, lineage=tuple(lineage),
        code_version=code_version(),
    )
    return FeatureSet(current, features.labels, out_manifest, features.ids)
