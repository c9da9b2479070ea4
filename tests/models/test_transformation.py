import pytest
import torch
from torch import nn

from compatkit.models import Transformation, TransformOutput, create_transformation

SMALL = {"d_old": 6, "d_new": 5, "inner": 16}


def _mlp_params(d_old, d_new, d_side, inner):
    """Hand count of FCT's side-info MLP (fct-fastfill-peers.md §1.4): Linear(no bias)+BN blocks."""
    block = lambda i, o: i * o + 2 * o  # noqa: E731
    total = block(d_old, 2 * d_old) + block(2 * d_old, 2 * d_new)
    branches = 1
    if d_side is not None:
        total += block(d_side, 2 * d_side) + block(2 * d_side, 2 * d_new)
        branches = 2
    total += block(branches * 2 * d_new, inner) + block(inner, inner)
    return total + inner * d_new + d_new


def test_parameter_count_matches_the_reference():
    count = lambda m: sum(p.numel() for p in m.parameters())  # noqa: E731
    with_side = Transformation(128, 128, d_side=128)
    assert count(with_side) == _mlp_params(128, 128, 128, 2048) == 5_712_000  # ≈ 5.71 M
    assert count(Transformation(128, 128)) == _mlp_params(128, 128, None, 2048) == 5_088_384


def test_layer_layout():
    t = Transformation(4, 3, d_side=2, inner=8)
    linears = [m for m in t.mixer if isinstance(m, nn.Linear)]
    assert [(m.in_features, m.out_features) for m in linears] == [(12, 8), (8, 8), (8, 3)]
    assert [m.bias is not None for m in linears] == [False, False, True]
    assert isinstance(t.mixer[-1], nn.Linear)  # no BN/ReLU after the last layer
    old_lin = [(m.in_features, m.out_features) for m in t.old_branch if isinstance(m, nn.Linear)]
    side_lin = [(m.in_features, m.out_features) for m in t.side_branch if isinstance(m, nn.Linear)]
    assert old_lin == [(4, 8), (8, 6)] and side_lin == [(2, 4), (4, 6)]
    narrow = Transformation(4, 3, inner=8, old_hidden=5, branch_dim=7)
    assert narrow.old_branch[0].out_features == 5 and narrow.mixer[0].in_features == 7


def test_shapes_without_and_with_side_information():
    out = Transformation(**SMALL)(torch.randn(4, 6))
    assert isinstance(out, TransformOutput)
    assert out.embedding.shape == (4, 5) and out.log_sigma is None
    t = Transformation(**SMALL, d_side=3).eval()
    old, side = torch.randn(4, 6), torch.randn(4, 3)
    assert t(old, side).embedding.shape == (4, 5)
    assert not torch.allclose(t(old, side).embedding, t(old, side + 1).embedding)


@pytest.mark.parametrize("sigma_dim", [0, 1, 5])
def test_sigma_head_only_when_requested(sigma_dim):
    t = Transformation(**SMALL, sigma_dim=sigma_dim)
    out = t(torch.randn(4, 6))
    if sigma_dim == 0:
        assert t.sigma_head is None and out.log_sigma is None
        assert not any("sigma" in k for k in t.state_dict())
    else:
        assert out.log_sigma.shape == (4, sigma_dim)
        (out.embedding.square().mean() + out.log_sigma.mean()).backward()
        assert all(p.grad is not None for p in t.parameters())


def test_input_errors():
    no_side, with_side = Transformation(**SMALL), Transformation(**SMALL, d_side=3)
    with pytest.raises(ValueError, match="no side branch"):
        no_side(torch.randn(4, 6), torch.randn(4, 3))
    with pytest.raises(ValueError, match=r"side-information of shape \(N, 3\); got side=None"):
        with_side(torch.randn(4, 6))
    with pytest.raises(ValueError, match=r"\(N, d_old=6\), got \(4, 7\)"):
        no_side(torch.randn(4, 7))
    with pytest.raises(ValueError, match=r"\(4, d_side=3\).*got \(4, 2\)"):
        with_side(torch.randn(4, 6), torch.randn(4, 2))
    with pytest.raises(ValueError, match=r"\(4, d_side=3\).*got \(5, 3\)"):
        with_side(torch.randn(4, 6), torch.randn(5, 3))


def test_constructor_errors():
    with pytest.raises(ValueError, match="sigma_dim must be 0, 1 or d_new=5, got 2"):
        Transformation(**SMALL, sigma_dim=2)
    with pytest.raises(ValueError, match="inner must be >= 1, got 0"):
        Transformation(6, 5, inner=0)
    with pytest.raises(ValueError, match="side_hidden=4 given but d_side is None"):
        Transformation(**SMALL, side_hidden=4)


def test_spec_round_trip_and_dims():
    torch.manual_seed(0)
    t = Transformation(**SMALL, d_side=3, sigma_dim=1)
    t(torch.randn(8, 6), torch.randn(8, 3))  # update BN statistics
    t.eval()
    spec = t.spec
    assert spec == {"d_old": 6, "d_new": 5, "inner": 16, "old_hidden": 12, "branch_dim": 10,
                    "d_side": 3, "side_hidden": 6, "sigma_dim": 1}
    rebuilt = create_transformation(**spec)
    rebuilt.load_state_dict(t.state_dict())
    rebuilt.eval()
    old, side = torch.randn(4, 6), torch.randn(4, 3)
    a, b = t(old, side), rebuilt(old, side)
    assert torch.equal(a.embedding, b.embedding) and torch.equal(a.log_sigma, b.log_sigma)
    assert (t.d_in, t.d_out) == (6, 5)
