"""Fit an adapter between two embedding models from paired vectors and save it as a
transformation artifact (``compatkit.artifacts``).

Directions: ``old-to-new`` maps stored old vectors into the new space (rewrite the gallery,
like FCT: ``compatkit upgrade-embeddings`` and the index's ``transform`` upgrade apply it);
``new-to-old`` maps new-model queries into the old space (a query adapter: the stored old
vectors are searched as they are).
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
from torch import nn

from compatkit.adapters.io import Vectors, check_pairs
from compatkit.adapters.kinds import FitOptions, fit_kind, get_kind
from compatkit.artifacts import Manifest, save_module, weights_digest
from compatkit.errors import CompatkitError
from compatkit.version import code_version

Direction = Literal["old-to-new", "new-to-old"]
DIRECTIONS: tuple[str, ...] = ("old-to-new", "new-to-old")


def check_direction(direction: str) -> str:
    """``direction`` itself when it is one of ``DIRECTIONS``; anything else raises clearly."""
    if direction not in DIRECTIONS:
        raise CompatkitError(f"unknown direction {direction!r}; expected one of "
                             f"{', '.join(DIRECTIONS)}")
    return direction


def source_and_target(old: Vectors, new: Vectors, direction: str) -> tuple[Vectors, Vectors]:
    """(the vectors the adapter reads, the vectors it must reproduce) for ``direction``."""
    return (old, new) if check_direction(direction) == "old-to-new" else (new, old)


@dataclass(frozen=True)
class FittedAdapter:
    """A fitted map with what is needed to save and judge it.

    module: the transformation (eval mode, CPU).  versions: the source and target model
    versions of the map.  normalized: whether the target vectors are L2-normalised (the map's
    outputs are then normalised when applied).  stats: fit statistics of the kind.
    """

    module: nn.Module
    kind: str
    direction: str
    n_pairs: int
    source_version: str
    target_version: str
    normalized: bool
    seconds: float
    options: FitOptions
    stats: dict[str, Any] = field(default_factory=dict)

    def summary(self) -> dict[str, Any]:
        """JSON-ready description (no weights)."""
        return {"kind": self.kind, "direction": self.direction, "pairs": self.n_pairs,
                "from": self.source_version, "to": self.target_version,
                "d_in": int(self.module.d_in), "d_out": int(self.module.d_out),
                "normalized": self.normalized, "fit_seconds": round(self.seconds, 4),
                **self.stats}


def _is_unit_norm(v: Vectors) -> bool:
    if v.normalized is not None:
        return v.normalized
    norms = np.linalg.norm(v.features, axis=1)
    return bool(norms.size and np.allclose(norms, 1.0, atol=1e-3))


def as_vectors(values: Vectors | np.ndarray, default_version: str) -> Vectors:
    """``values`` as ``Vectors`` (an array gets ``default_version`` as its version)."""
    if isinstance(values, Vectors):
        return values if values.version else Vectors(values.features, values.labels,
                                                      values.ids, default_version,
                                                      values.normalized)
    arr = np.asarray(values)
    if arr.ndim != 2:
        raise CompatkitError(f"vectors must be an (N, d) matrix, got shape {arr.shape}")
    return Vectors(arr.astype(np.float32, copy=False), version=default_version)


def fit_adapter(
    old: Vectors | np.ndarray, new: Vectors | np.ndarray, kind: str, direction: str, *,
    side: Vectors | np.ndarray | None = None, options: FitOptions | None = None,
) -> FittedAdapter:
    """Fit an adapter of ``kind`` from row-aligned old and new vectors of the same items.

    Args:
        old: (N, d_old) vectors of the old model.  new: (N, d_new) of the new model.
        kind: ``procrustes``, ``linear``, ``lowrank``, ``mlp`` or ``fct``.
        direction: ``old-to-new`` (gallery rewrite) or ``new-to-old`` (query adapter).
        side: (N, d_side) side-information of the items, for ``fct`` (old-to-new only).
        options: the kinds' settings (``FitOptions``).

    Raises:
        CompatkitError: different row counts, NaN/inf rows, disagreeing ids or labels, an
            unknown kind or direction, too few pairs (``NotEnoughPairsError``), or
            side-information that the kind cannot use.
    """
    options = options or FitOptions()
    old_v, new_v = as_vectors(old, "old"), as_vectors(new, "new")
    side_v = None if side is None else as_vectors(side, "side")
    get_kind(kind)
    check_pairs(old_v, new_v, side_v)
    source, target = source_and_target(old_v, new_v, direction)
    if side_v is not None and direction == "new-to-old":
        raise CompatkitError("side-information belongs to stored items: kind 'fct' maps the "
                             "gallery (direction old-to-new); a query adapter (new-to-old) "
                             "takes only the query vector")
    started = time.perf_counter()
    module, stats = fit_kind(kind, source.features, target.features,
                             None if side_v is None else side_v.features, options)
    seconds = time.perf_counter() - started
    return FittedAdapter(module, kind, direction, len(source), str(source.version),
                         str(target.version), _is_unit_norm(target), seconds, options, stats)


def save_adapter(fitted: FittedAdapter, directory: str | Path, *,
                 data: dict[str, Any] | None = None) -> Path:
    """Write ``fitted`` as a transformation artifact folder (``compatkit.artifacts``).

    The manifest's ``transforms_from``/``transforms_to`` are the source and target versions,
    ``method`` is ``adapter-<kind>`` and ``config`` records the kind, direction and options;
    ``data`` (e.g. the pair files) is stored as given.
    """
    state = fitted.module.state_dict()
    manifest = Manifest(
        kind="transformation",
        model_version=f"adapter-{fitted.kind}-{weights_digest(state)}",
        spec=dict(fitted.module.spec),
        embed_dim=int(fitted.module.d_out),
        normalized=fitted.normalized,
        method=f"adapter-{fitted.kind}",
        transforms_from=fitted.source_version,
        transforms_to=fitted.target_version,
        data={"pairs": fitted.n_pairs, **(data or {})},
        metrics={"fit_seconds": fitted.seconds, **fitted.stats},
        seed=fitted.options.seed,
        code_version=code_version(),
        config={"kind": fitted.kind, "direction": fitted.direction,
                "options": asdict(fitted.options)},
    )
    return save_module(directory, fitted.module, manifest)
