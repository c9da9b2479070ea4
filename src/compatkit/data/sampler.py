"""Index batches for in-memory datasets: seeded per-epoch shuffles, sharded across ranks.

Every rank draws the same permutation for an epoch (seeded by ``(seed, epoch)``), pads it by
wrap-around to a multiple of the world size (as ``DistributedSampler`` does) and takes every
``world_size``-th index from ``rank`` on, so all ranks get the same number of batches.
"""

from __future__ import annotations

import math
from collections.abc import Iterator

import numpy as np


def _check_int(name: str, value: object, low: int) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < low:
        raise ValueError(f"{name} must be an int >= {low}, got {value!r}")
    return int(value)


class EpochSampler:
    """Per-epoch batches of item indices for one rank.

    Args:
        num_items: items in the dataset.
        batch_size: items per batch on this rank.
        shuffle: shuffle each epoch (else keep index order). Default True.
        drop_last: drop a final batch smaller than ``batch_size``. Default True.
        seed: base seed; epoch ``e`` uses the permutation seeded by ``(seed, e)``.
        rank, world_size: this process's shard out of ``world_size``.

    ``num_batches`` is 0 when ``drop_last`` is set and a rank holds fewer items than one batch;
    callers decide whether that is an error.

    Raises:
        ValueError: non-positive sizes, a negative seed, or ``rank`` outside ``[0, world_size)``.
    """

    def __init__(
        self,
        num_items: int,
        batch_size: int,
        *,
        shuffle: bool = True,
        drop_last: bool = True,
        seed: int = 0,
        rank: int = 0,
        world_size: int = 1,
    ) -> None:
        self.num_items = _check_int("num_items", num_items, 1)
        self.batch_size = _check_int("batch_size", batch_size, 1)
        self.seed = _check_int("seed", seed, 0)
        self.world_size = _check_int("world_size", world_size, 1)
        self.rank = _check_int("rank", rank, 0)
        if self.rank >= self.world_size:
            raise ValueError(f"rank must lie in [0, {self.world_size}), got {rank}")
        self.shuffle = shuffle
        self.drop_last = drop_last
        self.per_rank = math.ceil(self.num_items / self.world_size)

    @property
    def num_batches(self) -> int:
        """Batches per epoch on each rank (the same on every rank)."""
        if self.drop_last:
            return self.per_rank // self.batch_size
        return math.ceil(self.per_rank / self.batch_size)

    def __len__(self) -> int:
        return self.num_batches

    def epoch_indices(self, epoch: int) -> np.ndarray:
        """This rank's (per_rank,) int64 indices for ``epoch``, before batching."""
        epoch = _check_int("epoch", epoch, 0)
        if self.shuffle:
            order = np.random.default_rng([self.seed, epoch]).permutation(self.num_items)
        else:
            order = np.arange(self.num_items)
        total = self.per_rank * self.world_size
        if total > self.num_items:  # wrap around so every rank gets per_rank items
            order = np.resize(order, total)
        return order[self.rank:total:self.world_size].astype(np.int64)

    def batches(self, epoch: int) -> Iterator[np.ndarray]:
        """Yield this rank's batches of int64 indices for ``epoch``."""
        indices = self.epoch_indices(epoch)
        for k in range(self.num_batches):
            yield indices[k * self.batch_size:(k + 1) * self.batch_size]


def sequential_batches(num_items: int, batch_size: int) -> Iterator[np.ndarray]:
    """Consecutive int64 index batches covering ``range(num_items)`` once, the last possibly
    short (for embedding passes)."""
    n = _check_int("num_items", num_items, 0)
    size = _check_int("batch_size", batch_size, 1)
    for start in range(0, n, size):
        yield np.arange(start, min(start + size, n), dtype=np.int64)
