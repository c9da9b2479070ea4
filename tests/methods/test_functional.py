"""Shared loss helpers: class masks, masked top-k (case 16's padding) and the joint InfoNCE."""

from __future__ import annotations

import math

import pytest
import torch

from compatkit.methods.functional import (
    check_pair,
    info_nce_from_parts,
    masked_topk,
    reduce_per_sample,
    same_class_mask,
)


def test_same_class_mask():
    mask = same_class_mask(torch.tensor([0, 1]), torch.tensor([1, 0, 0]))
    assert mask.tolist() == [[False, True, True], [True, False, False]]
    with pytest.raises(ValueError, match="1-D"):
        same_class_mask(torch.zeros(2, 1), torch.zeros(2))


def test_masked_topk_selects_largest_valid_and_pads_with_finfo_min():
    scores = torch.tensor([[0.9, 0.1, 0.5, 0.7], [0.2, 0.8, 0.3, 0.1]])
    valid = torch.tensor([[False, True, True, True], [True, False, False, False]])
    top = masked_topk(scores, valid, 2)
    lowest = torch.finfo(torch.float32).min
    assert top.tolist() == [[pytest.approx(0.7), pytest.approx(0.5)],
                            [pytest.approx(0.2), lowest]]


def test_masked_topk_k_nonpositive_or_large_keeps_all_columns():
    scores, valid = torch.rand(3, 4), torch.rand(3, 4) > 0.5
    for k in (0, -1, 4, 9):
        out = masked_topk(scores, valid, k)
        assert out.shape == (3, 4)
        assert torch.equal(out[valid], scores[valid])
        assert (out[~valid] == torch.finfo(torch.float32).min).all()


def test_masked_topk_fp16_uses_the_dtype_minimum():
    out = masked_topk(torch.tensor([[0.5, 0.25]], dtype=torch.float16),
                      torch.tensor([[True, False]]), 0)
    assert out.dtype == torch.float16
    assert out[0, 1].item() == torch.finfo(torch.float16).min
    assert torch.isfinite(out).all()


def test_masked_topk_shape_errors():
    with pytest.raises(ValueError, match="valid_mask the same shape"):
        masked_topk(torch.zeros(2, 3), torch.zeros(2, 2, dtype=torch.bool), 1)
    with pytest.raises(TypeError, match="bool"):
        masked_topk(torch.zeros(2, 3), torch.zeros(2, 3), 1)


def test_info_nce_hand_value_and_joint_softmax():
    pos = torch.tensor([1.0, 0.0])
    block_a = torch.tensor([[0.0], [1.0]])
    block_b = torch.tensor([[1.0], [1.0]])
    losses = info_nce_from_parts(pos, [block_a, block_b], temperature=1.0)
    e = math.e
    assert losses.tolist() == pytest.approx([math.log((2 * e + 1) / e), math.log(1 + 2 * e)],
                                            abs=1e-6)
    # one joint softmax, not the sum of two separate InfoNCE terms
    separate = info_nce_from_parts(pos, [block_a], 1.0) + info_nce_from_parts(pos, [block_b], 1.0)
    assert not torch.allclose(losses, separate)


def test_info_nce_masked_entries_add_nothing_in_fp16_and_fp32():
    pos = torch.tensor([0.3, -0.2])
    neg = torch.tensor([[0.1, 0.2], [0.4, -0.5]])
    for dtype in (torch.float16, torch.float32):
        unpadded = info_nce_from_parts(pos.to(dtype), [neg.to(dtype)], temperature=0.01)
        pad = torch.full((2, 3), torch.finfo(dtype).min, dtype=dtype)
        padded = info_nce_from_parts(pos.to(dtype), [torch.cat([neg.to(dtype), pad], 1)], 0.01)
        assert padded.dtype == torch.float32
        assert torch.isfinite(padded).all()
        assert torch.allclose(padded, unpadded, atol=1e-6, rtol=0)


def test_info_nce_gradient_is_finite_with_masked_entries():
    pos = torch.tensor([0.5], requires_grad=True)
    scores = torch.tensor([[0.2, 0.9]], requires_grad=True)
    neg = masked_topk(scores, torch.tensor([[True, False]]), 0)
    info_nce_from_parts(pos, [neg], 0.01).sum().backward()
    assert torch.isfinite(pos.grad).all() and torch.isfinite(scores.grad).all()
    assert scores.grad[0, 1] == 0


def test_info_nce_rejects_bad_input():
    with pytest.raises(ValueError, match="temperature must be > 0"):
        info_nce_from_parts(torch.zeros(2), [], 0.0)
    with pytest.raises(ValueError, match=r"negative blocks must be \(2, K\)"):
        info_nce_from_parts(torch.zeros(2), [torch.zeros(3, 1)], 1.0)


def test_reduce_and_check_pair_errors():
    assert reduce_per_sample(torch.tensor([1.0, 3.0]), "mean").item() == 2.0
    with pytest.raises(ValueError, match="reduction"):
        reduce_per_sample(torch.zeros(2), "sum")
    with pytest.raises(ValueError, match="d_new = 4 and d_old = 3"):
        check_pair(torch.zeros(2, 4), torch.zeros(2, 3))
    with pytest.raises(TypeError, match="integer"):
        check_pair(torch.zeros(2, 3), torch.zeros(2, 3), torch.zeros(2))
