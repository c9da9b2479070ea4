import pytest
import torch

from compatkit.models.pooling import GeM, create_pooling


@pytest.mark.parametrize("c", [0.5, 2.0, 7.0])
def test_gem_constant_map_returns_the_constant(c):
    # reference/methods.md §7 case 34, first half
    x = torch.full((2, 3, 4, 5), c)
    torch.testing.assert_close(GeM()(x), torch.full((2, 3), c))


def test_gem_two_positions():
    # case 34: ((1 + 512) / 2)^(1/3) = 6.353735
    x = torch.tensor([1.0, 8.0]).view(1, 1, 1, 2)
    assert GeM()(x).item() == pytest.approx(6.353735, abs=1e-5)
    assert abs(((1 + 512) / 2) ** (1 / 3) - 6.353735) < 1e-6


def test_gem_with_p1_is_average_pooling():
    x = torch.rand(2, 3, 4, 4) + 0.1
    torch.testing.assert_close(GeM(p=1.0)(x), x.mean(dim=(-2, -1)))
    torch.testing.assert_close(create_pooling("avg")(x), x.mean(dim=(-2, -1)))


def test_gem_clamps_negative_activations_to_eps():
    x = torch.full((1, 1, 2, 2), -3.0)
    assert GeM(eps=1e-6)(x).item() == pytest.approx(1e-6, rel=1e-4)


def test_gem_fp16_does_not_overflow():
    # 100^3 = 1e6 overflows fp16 (max 65504); the power is taken in float32
    x = torch.full((1, 2, 3, 3), 100.0, dtype=torch.float16)
    out = GeM()(x)
    assert out.dtype == torch.float16
    torch.testing.assert_close(out.float(), torch.full((1, 2), 100.0))


def test_gem_learnable_p_is_a_parameter_fixed_p_is_not():
    fixed, learned = GeM(), GeM(learnable=True)
    assert list(fixed.parameters()) == []
    assert "p" in fixed.state_dict()
    (param,) = learned.parameters()
    learned(torch.rand(2, 3, 4, 4) + 0.1).sum().backward()
    assert param.grad is not None and torch.isfinite(param.grad).all()
    assert param.grad.abs().item() > 0


def test_pooling_errors():
    with pytest.raises(ValueError, match=r"\(B, C, H, W\).*\(2, 3\)"):
        GeM()(torch.rand(2, 3))
    with pytest.raises(ValueError, match="p must be > 0"):
        GeM(p=0)
    with pytest.raises(ValueError, match=r"'max'.*avg, gem"):
        create_pooling("max")
