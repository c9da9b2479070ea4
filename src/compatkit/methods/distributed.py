"""The one place that gathers contrastive keys across processes (reference methods.md §2.2).

Losses never call ``torch.distributed``: they take ``keys=`` (default: the local batch), and
methods pass ``gather_keys(...)``, which returns the global batch when a process group with more
than one process is initialised. One process and N processes then give the same loss for the
same global batch.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.distributed as dist
from torch import Tensor

from compatkit.methods.functional import check_pair


class CompatKeys(NamedTuple):
    """Keys a loss compares its anchors with, usually the global batch.

    Shapes: new (K, D), old (K, D), labels (K,). ``offset`` is the row of the local batch's first
    sample, so rows ``offset .. offset + B - 1`` are the anchors themselves.
    """

    new: Tensor
    old: Tensor
    labels: Tensor
    offset: int


def local_keys(
    new: Tensor, old: Tensor, labels: Tensor, *, stopgrad_new: bool = True
) -> CompatKeys:
    """The local batch as keys (``old`` detached; ``new`` too when ``stopgrad_new``)."""
    check_pair(new, old, labels)
    return CompatKeys(new.detach() if stopgrad_new else new, old.detach(), labels, 0)


def gather_keys(
    new: Tensor, old: Tensor, labels: Tensor, *, stopgrad_new: bool = True
) -> CompatKeys:
    """All-gather ``new``, ``old`` and ``labels`` across processes, in rank order.

    Without an initialised process group of world size > 1 this is ``local_keys``. Ranks may hold
    batches of different sizes. Gathered rows of other ranks are constants; with
    ``stopgrad_new=False`` the local slice of ``new`` keeps its autograd graph.

    Shapes: new (B, D), old (B, D), labels (B,) -> CompatKeys over the K = Σ_ranks B rows.
    """
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return local_keys(new, old, labels, stopgrad_new=stopgrad_new)
    check_pair(new, old, labels)
    rank, world = dist.get_rank(), dist.get_world_size()
    size = torch.tensor([new.shape[0]], dtype=torch.int64, device=new.device)
    sizes_t = [torch.zeros_like(size) for _ in range(world)]
    dist.all_gather(sizes_t, size)
    sizes = [int(s.item()) for s in sizes_t]
    offset = sum(sizes[:rank])
    gathered_new = _gather_rows(new.detach(), sizes)
    if not stopgrad_new:
        gathered_new[rank] = new
    return CompatKeys(
        new=torch.cat(gathered_new),
        old=torch.cat(_gather_rows(old.detach(), sizes)),
        labels=torch.cat(_gather_rows(labels, sizes)),
        offset=offset,
    )


def _gather_rows(tensor: Tensor, sizes: list[int]) -> list[Tensor]:
    """All-gather a (B, ...) tensor whose B differs per rank: pad to the largest, then trim."""
    longest = max(sizes)
    padded = tensor.new_zeros((longest, *tensor.shape[1:]))
    padded[: tensor.shape[0]] = tensor
    parts = [torch.empty_like(padded) for _ in sizes]
    dist.all_gather(parts, padded.contiguous())
    return [part[:n] for part, n in zip(parts, sizes, strict=True)]


def resolve_keys(
    new: Tensor, old: Tensor, labels: Tensor, keys: CompatKeys | None, *, stopgrad_new: bool
) -> CompatKeys:
    """``keys`` checked against the local batch (the local batch when None), ``new`` detached
    when ``stopgrad_new`` and ``old`` always detached.

    Raises:
        ValueError: keys whose dimension differs from the anchors', whose fields disagree in
            length, or whose ``offset`` does not leave room for the local batch.
    """
    if keys is None:
        return local_keys(new, old, labels, stopgrad_new=stopgrad_new)
    check_pair(new, old, labels)
    check_pair(keys.new, keys.old, keys.labels)
    if keys.new.shape[1] != new.shape[1]:
        raise ValueError(f"keys have dimension {keys.new.shape[1]}, anchors {new.shape[1]}")
    if not 0 <= keys.offset <= keys.new.shape[0] - new.shape[0]:
        raise ValueError(f"keys offset {keys.offset} does not fit a local batch of "
                         f"{new.shape[0]} rows in {keys.new.shape[0]} keys")
    key_new = keys.new.detach() if stopgrad_new else keys.new
    return CompatKeys(key_new, keys.old.detach(), keys.labels, keys.offset)
