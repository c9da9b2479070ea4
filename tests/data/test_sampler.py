"""EpochSampler sharding and per-epoch shuffles; sequential embedding batches."""

from __future__ import annotations

import numpy as np
import pytest

from compatkit.data.sampler import EpochSampler, sequential_batches


def _rank_indices(n: int, world: int, epoch: int, **kw) -> list[np.ndarray]:
    return [np.concatenate(list(EpochSampler(n, 2, rank=r, world_size=world, **kw)
                                .batches(epoch))) for r in range(world)]


def test_shards_are_disjoint_and_cover_when_divisible() -> None:
    shards = _rank_indices(24, 3, epoch=0, drop_last=True, seed=4)
    assert all(s.size == 8 for s in shards)
    joined = np.concatenate(shards)
    assert np.array_equal(np.sort(joined), np.arange(24))


def test_wraparound_padding_gives_equal_counts() -> None:
    samplers = [EpochSampler(10, 3, rank=r, world_size=4, drop_last=False, seed=1)
                for r in range(4)]
    assert {s.num_batches for s in samplers} == {1}  # ceil(10 / 4) = 3 per rank
    shards = [np.concatenate(list(s.batches(0))) for s in samplers]
    assert all(s.size == 3 for s in shards)
    joined = np.concatenate(shards)
    assert np.array_equal(np.unique(joined), np.arange(10))  # every item, 2 repeated
    perm = np.random.default_rng([1, 0]).permutation(10)
    assert sorted(joined.tolist()) == sorted(perm.tolist() + perm[:2].tolist())


def test_same_permutation_on_every_rank_and_new_one_per_epoch() -> None:
    epoch0 = _rank_indices(40, 2, epoch=0)
    assert np.array_equal(epoch0[0], _rank_indices(40, 2, epoch=0)[0])
    epoch1 = _rank_indices(40, 2, epoch=1)
    assert not np.array_equal(epoch0[0], epoch1[0])
    other_seed = _rank_indices(40, 2, epoch=0, seed=9)
    assert not np.array_equal(epoch0[0], other_seed[0])


def test_batches_and_drop_last() -> None:
    s = EpochSampler(11, 4, shuffle=False)
    assert s.num_batches == len(s) == 2
    assert [b.tolist() for b in s.batches(0)] == [[0, 1, 2, 3], [4, 5, 6, 7]]
    keep = EpochSampler(11, 4, shuffle=False, drop_last=False)
    assert [b.tolist() for b in keep.batches(3)][-1] == [8, 9, 10]
    assert all(b.dtype == np.int64 for b in keep.batches(0))
    assert EpochSampler(3, 4).num_batches == 0  # too few items for one full batch


def test_bad_arguments() -> None:
    with pytest.raises(ValueError, match="rank"):
        EpochSampler(10, 2, rank=2, world_size=2)
    with pytest.raises(ValueError, match="batch_size"):
        EpochSampler(10, 0)
    with pytest.raises(ValueError, match="num_items"):
        EpochSampler(0, 2)
    with pytest.raises(ValueError, match="epoch"):
        next(EpochSampler(10, 2).batches(-1))


def test_sequential_batches() -> None:
    assert [b.tolist() for b in sequential_batches(5, 2)] == [[0, 1], [2, 3], [4]]
    assert list(sequential_batches(0, 3)) == []
    with pytest.raises(ValueError, match="batch_size"):
        list(sequential_batches(5, 0))
