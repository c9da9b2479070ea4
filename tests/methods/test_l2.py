"""L2 compatibility loss: reference methods.md §7 case 20."""

from __future__ import annotations

import pytest
import torch

from compatkit.methods.l2 import l2_compat_loss


def test_l2_is_zero_iff_features_equal_after_normalisation():
    x = torch.randn(5, 4)
    assert l2_compat_loss(x, x).item() == 0.0
    assert l2_compat_loss(3.0 * x, x).item() == pytest.approx(0.0, abs=1e-12)
    assert l2_compat_loss(x, torch.randn(5, 4)).item() > 0.0


def test_l2_value_by_hand():
    new = torch.tensor([[1.0, 0.0]])
    old = torch.tensor([[0.0, 2.0]])
    # normalised difference (1, -1): mean of squares = 1
    assert l2_compat_loss(new, old).item() == pytest.approx(1.0)


def test_l2_gives_no_gradient_to_old_and_checks_shapes():
    new = torch.randn(3, 4, requires_grad=True)
    old = torch.randn(3, 4, requires_grad=True)
    l2_compat_loss(new, old).backward()
    assert old.grad is None and new.grad is not None
    with pytest.raises(ValueError, match="one shape"):
        l2_compat_loss(torch.randn(3, 4), torch.randn(3, 5))
