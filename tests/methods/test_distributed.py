"""gather_keys: local keys, gradient of the local slice, and 1 process == 2 processes (case 17)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from compatkit.methods.contrastive import ContrastiveLoss, RACTLoss
from compatkit.methods.distributed import CompatKeys, gather_keys, local_keys
from compatkit.methods.triplet import TripletLoss

SPLITS = (0, 5, 12)  # two ranks with uneven batches of 5 and 7


def _losses() -> dict[str, torch.nn.Module]:
    return {
        "contra": ContrastiveLoss(temperature=0.05, topk_neg=3),
        "ract": RACTLoss(temperature=0.05, topk_neg=3),
        "ract_all": RACTLoss(temperature=0.1, topk_neg=0),
        "triplet_ract": TripletLoss(topk_neg=2, new_negatives=True),
    }


def _batch():
    g = torch.Generator().manual_seed(11)
    new, old = torch.randn(12, 6, generator=g), torch.randn(12, 6, generator=g)
    labels = torch.tensor([0, 1, 2, 3, 0, 1, 2, 3, 4, 4, 5, 0])
    return new, old, labels


def _worker(rank: int, world: int, init_file: str, out_dir: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank,
                            world_size=world)
    try:
        new, old, labels = _batch()
        lo, hi = SPLITS[rank], SPLITS[rank + 1]
        results: dict[str, object] = {}
        for name, loss in _losses().items():
            anchors = new[lo:hi].clone().requires_grad_(True)
            keys = gather_keys(anchors, old[lo:hi], labels[lo:hi], stopgrad_new=True)
            value = loss(anchors, old[lo:hi], labels[lo:hi], keys=keys)
            value.backward()
            results[name] = (value.detach(), anchors.grad)
        anchors = new[lo:hi].clone().requires_grad_(True)
        keys = gather_keys(anchors, old[lo:hi], labels[lo:hi], stopgrad_new=False)
        (keys.new * torch.arange(12.0).unsqueeze(1)).sum().backward()
        results["keys"] = CompatKeys(keys.new.detach(), keys.old, keys.labels, keys.offset)
        results["local_grad"] = anchors.grad
        torch.save(results, Path(out_dir) / f"rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def test_local_keys_without_process_group():
    new, old, labels = _batch()
    new.requires_grad_(True)
    keys = gather_keys(new, old, labels)
    assert keys.offset == 0 and torch.equal(keys.labels, labels)
    assert not keys.new.requires_grad and torch.equal(keys.new, new)
    kept = gather_keys(new, old, labels, stopgrad_new=False)
    assert kept.new is new
    assert not local_keys(new, old.requires_grad_(True), labels).old.requires_grad


def test_local_keys_check_shapes():
    with pytest.raises(ValueError, match="batch sizes 3 and 2"):
        gather_keys(torch.zeros(3, 2), torch.zeros(2, 2), torch.zeros(3, dtype=torch.int64))


@pytest.mark.ddp
def test_one_process_equals_two_processes(tmp_path):
    os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
    mp.spawn(_worker, args=(2, str(tmp_path / "store"), str(tmp_path)), nprocs=2, join=True)
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=False) for r in range(2)]
    new, old, labels = _batch()
    total = SPLITS[-1]
    for name, loss in _losses().items():
        anchors = new.clone().requires_grad_(True)
        full = loss(anchors, old, labels)
        full.backward()
        sizes = [SPLITS[r + 1] - SPLITS[r] for r in range(2)]
        # the global mean is the size-weighted mean of the per-rank means ...
        combined = sum(ranks[r][name][0] * sizes[r] / total for r in range(2))
        assert combined.item() == pytest.approx(full.item(), rel=1e-6, abs=1e-6), name
        # ... and with stop-gradient keys each anchor's gradient is its rank's, rescaled
        grads = torch.cat([ranks[r][name][1] * sizes[r] / total for r in range(2)])
        assert torch.allclose(grads, anchors.grad, rtol=1e-5, atol=1e-6), name
    for r in range(2):
        keys = ranks[r]["keys"]
        assert keys.offset == SPLITS[r]
        assert torch.equal(keys.new, new) and torch.equal(keys.old, old)
        assert torch.equal(keys.labels, labels)
        # stopgrad_new=False: the local slice kept its graph (gradient = its row weights)
        expected = torch.arange(SPLITS[r], SPLITS[r + 1], dtype=torch.float32)
        assert torch.equal(ranks[r]["local_grad"], expected.unsqueeze(1).expand(-1, 6))
