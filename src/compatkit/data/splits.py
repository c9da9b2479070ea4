"""Old/new training-set scenarios (reference/methods.md §4.3) and class hold-out splits.

By class (``extended_class``, ``open_class``): the class ids present are shuffled with
``np.random.RandomState(seed)`` and the first ``int(old_ratio · C)`` are old.
By data (``extended_data``, ``open_data``), per class with n images in index order: n = 1 →
the image is in both sets; n = 2, 3 → the first image is old; n ≥ 4 → ``int(old_ratio · n)``
images drawn with ``RandomState(seed + class_id)`` are old.
The new set is everything in the extended scenarios and the complement in the open ones
(singletons stay in both). Labels are never re-indexed: indices point into the original data.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, NamedTuple

import numpy as np

SCENARIOS = ("extended_data", "extended_class", "open_data", "open_class")
Scenario = Literal["extended_data", "extended_class", "open_data", "open_class"]
DEFAULT_SEED = 666


@dataclass(frozen=True, eq=False)
class Split:
    """Indices of the old and new training sets for one scenario.

    Shapes:
        old_indices, new_indices: sorted int64 indices into the labels given to ``make_split``.
        old_classes, new_classes: sorted int64 class ids present on each side.
    """

    old_indices: np.ndarray
    new_indices: np.ndarray
    scenario: str
    old_ratio: float
    seed: int
    old_classes: np.ndarray
    new_classes: np.ndarray
    num_images: int
    num_classes: int

    def indices(self, side: Literal["old", "new"]) -> np.ndarray:
        """The indices of one side, ``"old"`` or ``"new"``."""
        if side == "old":
            return self.old_indices
        if side == "new":
            return self.new_indices
        raise ValueError(f"split side must be 'old' or 'new', got {side!r}")

    def checksum(self) -> str:
        """sha256 (hex) of both index arrays as little-endian int64, with their lengths."""
        h = hashlib.sha256()
        for arr in (self.old_indices, self.new_indices):
            h.update(np.int64(arr.size).astype("<i8").tobytes())
            h.update(np.ascontiguousarray(arr, dtype="<i8").tobytes())
        return h.hexdigest()

    def manifest(self) -> dict[str, Any]:
        """Counts of images and classes per side, the rule's parameters and the checksum."""
        return {
            "scenario": self.scenario,
            "old_ratio": self.old_ratio,
            "seed": self.seed,
            "num_images": self.num_images,
            "num_classes": self.num_classes,
            "old": {"images": int(self.old_indices.size), "classes": int(self.old_classes.size)},
            "new": {"images": int(self.new_indices.size), "classes": int(self.new_classes.size)},
            "sha256": self.checksum(),
        }


class Holdout(NamedTuple):
    """Indices of training and held-out test images; their classes are disjoint."""

    train_indices: np.ndarray
    test_indices: np.ndarray


def _check_labels(labels: Any) -> np.ndarray:
    arr = np.asarray(labels)
    if arr.ndim != 1 or arr.size == 0:
        raise ValueError(f"labels must be a non-empty 1-D array, got shape {arr.shape}")
    if not np.issubdtype(arr.dtype, np.integer):
        raise ValueError(f"labels must be integer class ids, got dtype {arr.dtype}")
    if arr.min() < 0:
        raise ValueError(f"labels must be non-negative class ids, got minimum {arr.min()}")
    return arr.astype(np.int64, copy=False)


def _check_seed(seed: Any) -> int:
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
        raise ValueError(f"seed must be a non-negative int, got {seed!r}")
    return int(seed)


def _check_ratio(name: str, ratio: Any, *, allow_zero: bool = False) -> float:
    low_ok = ratio >= 0.0 if allow_zero else ratio > 0.0
    if isinstance(ratio, bool) or not isinstance(ratio, (int, float)) or not (low_ok
                                                                              and ratio < 1.0):
        interval = "[0, 1)" if allow_zero else "(0, 1)"
        raise ValueError(f"{name} must be a number in {interval}, got {ratio!r}")
    return float(ratio)


def _class_groups(labels: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Sorted class ids, and per class its image indices (ascending) as order/starts."""
    order = np.argsort(labels, kind="stable")
    classes, starts = np.unique(labels[order], return_index=True)
    return classes, order, np.append(starts, labels.size)


def _old_by_class(labels: np.ndarray, ratio: float, seed: int) -> np.ndarray:
    classes = np.unique(labels)
    shuffled = np.random.RandomState(seed).permutation(classes)
    old = np.sort(shuffled[: int(ratio * classes.size)])
    return np.flatnonzero(np.isin(labels, old))


def _by_data(labels: np.ndarray, ratio: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Old image indices and singleton indices (which also stay in the new set)."""
    classes, order, bounds = _class_groups(labels)
    old_parts: list[np.ndarray] = []
    singles: list[np.ndarray] = []
    for k, cls in enumerate(classes):
        members = order[bounds[k]:bounds[k + 1]]  # ascending: argsort is stable
        n = members.size
        if n == 1:
            singles.append(members)
            old_parts.append(members)
        elif n <= 3:
            old_parts.append(members[:1])
        else:
            draw = np.random.RandomState(seed + int(cls)).choice(n, int(ratio * n), replace=False)
            old_parts.append(members[draw])
    old = np.sort(np.concatenate(old_parts)).astype(np.int64)
    single = np.sort(np.concatenate(singles)).astype(np.int64) if singles else np.zeros(0, np.int64)
    return old, single


def make_split(
    labels: Any,
    scenario: Scenario,
    *,
    old_ratio: float = 0.3,
    seed: int = DEFAULT_SEED,
) -> Split:
    """Split images into the old and new training sets of ``scenario`` (module docstring).

    Shapes:
        labels: (N,) non-negative integer class ids of the whole training set.

    Raises:
        ValueError: unknown scenario (the four listed), ratio outside (0, 1), bad labels or seed.
    """
    if scenario not in SCENARIOS:
        raise ValueError(f"unknown split scenario {scenario!r}; expected one of "
                         f"{', '.join(SCENARIOS)}")
    y = _check_labels(labels)
    ratio = _check_ratio("old_ratio", old_ratio)
    seed = _check_seed(seed)
    everything = np.arange(y.size, dtype=np.int64)
    if scenario.endswith("_class"):
        old = _old_by_class(y, ratio, seed)
        new = everything if scenario == "extended_class" else np.setdiff1d(everything, old)
    else:
        old, singles = _by_data(y, ratio, seed)
        if scenario == "extended_data":
            new = everything
        else:
            new = np.union1d(np.setdiff1d(everything, old), singles)
    old, new = old.astype(np.int64), new.astype(np.int64)
    return Split(
        old_indices=old,
        new_indices=new,
        scenario=scenario,
        old_ratio=ratio,
        seed=seed,
        old_classes=np.unique(y[old]),
        new_classes=np.unique(y[new]),
        num_images=int(y.size),
        num_classes=int(np.unique(y).size),
    )


def class_holdout_split(labels: Any, *, test_ratio: float, seed: int = DEFAULT_SEED) -> Holdout:
    """Hold out ``int(test_ratio · C)`` whole classes (shuffled with ``RandomState(seed)``).

    The open-set retrieval protocol of datasets with no official test split (Omniglot,
    synthetic): train on some classes, retrieve among the disjoint rest.

    Raises:
        ValueError: a ratio outside [0, 1), or one that leaves no test or no training class.
    """
    y = _check_labels(labels)
    ratio = _check_ratio("test_ratio", test_ratio, allow_zero=True)
    seed = _check_seed(seed)
    classes = np.unique(y)
    n_test = int(ratio * classes.size)
    if ratio > 0 and n_test == 0:
        raise ValueError(f"test_ratio {ratio} of {classes.size} classes holds out no class; "
                         "raise the ratio or use 0 for no hold-out")
    if n_test >= classes.size:
        raise ValueError(f"test_ratio {ratio} of {classes.size} classes leaves no training class")
    test_classes = np.random.RandomState(seed).permutation(classes)[:n_test]
    is_test = np.isin(y, test_classes)
    return Holdout(np.flatnonzero(~is_test).astype(np.int64),
                   np.flatnonzero(is_test).astype(np.int64))


def write_manifest(path: str | Path, manifest: dict[str, Any]) -> Path:
    """Write ``manifest`` as indented, key-sorted JSON, atomically; returns the path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=path.name, suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w") as fh:
            json.dump(manifest, fh, indent=2, sort_keys=True)
            fh.write("\n")
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    return path
