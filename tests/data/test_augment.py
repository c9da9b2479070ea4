"""Batched crop/flip/normalise on uint8 tensors: shapes, determinism, hand-checked results."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from compatkit.data.augment import (
    Augmenter,
    affine_params,
    apply_affine,
    normalize,
    random_affine,
    random_crop,
    random_flip,
)


def _batch(b: int = 6, c: int = 3, h: int = 5, w: int = 7) -> torch.Tensor:
    return torch.randint(1, 256, (b, c, h, w), generator=torch.Generator().manual_seed(0),
                         dtype=torch.uint8)


def _gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def test_crop_with_zero_padding_is_identity() -> None:
    x = _batch()
    assert torch.equal(random_crop(x, 0, _gen()), x)


@pytest.mark.parametrize("mode", ["zeros", "reflect"])
def test_crop_is_a_window_of_the_padded_image(mode: str) -> None:
    x, p = _batch(), 2
    out = random_crop(x, p, _gen(1), padding_mode=mode)
    assert out.shape == x.shape and out.dtype == torch.uint8
    np_mode = "constant" if mode == "zeros" else "reflect"
    padded = np.pad(x.numpy(), ((0, 0), (0, 0), (p, p), (p, p)), mode=np_mode)
    offsets = set()
    for i in range(x.shape[0]):
        hits = [(dy, dx) for dy in range(2 * p + 1) for dx in range(2 * p + 1)
                if np.array_equal(out[i].numpy(), padded[i, :, dy:dy + 5, dx:dx + 7])]
        assert hits, f"sample {i} is no window of its padded image"
        offsets.add(hits[0])
    assert len(offsets) > 1  # offsets are drawn per sample


def test_crop_and_flip_are_deterministic_per_generator() -> None:
    x = _batch(b=32)
    assert torch.equal(random_crop(x, 3, _gen(5)), random_crop(x, 3, _gen(5)))
    assert not torch.equal(random_crop(x, 3, _gen(5)), random_crop(x, 3, _gen(6)))
    assert torch.equal(random_flip(x, _gen(5)), random_flip(x, _gen(5)))


def test_flip_per_sample_and_twice_is_identity() -> None:
    x = _batch(b=32)
    once = random_flip(x, _gen(2))
    flipped = [torch.equal(once[i], x[i].flip(-1)) for i in range(32)]
    kept = [torch.equal(once[i], x[i]) for i in range(32)]
    assert all(f or k for f, k in zip(flipped, kept, strict=True))
    assert 0 < sum(flipped) < 32
    assert torch.equal(random_flip(once, _gen(2)), x)  # same draws flip the same samples back
    assert torch.equal(random_flip(x, _gen(2), p=1.0), x.flip(-1))
    assert torch.equal(random_flip(x, _gen(2), p=0.0), x)


def test_normalize_by_hand() -> None:
    x = torch.tensor([[[[0, 255]], [[51, 102]]]], dtype=torch.uint8)  # (1, 2, 1, 2)
    out = normalize(x, (0.5, 0.2), (0.5, 0.1))
    assert out.dtype == torch.float32
    expected = torch.tensor([[[[-1.0, 1.0]], [[0.0, 2.0]]]])
    assert torch.allclose(out, expected, atol=1e-6)


def test_augmenter_pipeline() -> None:
    x = _batch(b=8, c=1, h=6, w=6)
    aug = Augmenter((0.5,), (0.25,), crop_padding=2, flip=True)
    out = aug(x, _gen(3))
    assert out.shape == (8, 1, 6, 6) and out.dtype == torch.float32
    assert torch.equal(out, aug(x, _gen(3)))
    assert torch.equal(aug.eval_transform(x), normalize(x, (0.5,), (0.25,)))
    plain = Augmenter((0.5,), (0.25,), crop_padding=0, flip=False)
    assert torch.equal(plain(x, _gen(3)), plain.eval_transform(x))


def test_bad_input_is_named() -> None:
    x = _batch()
    with pytest.raises(TypeError, match="uint8"):
        random_crop(x.float(), 2, _gen())
    with pytest.raises(ValueError, match="padding"):
        random_crop(x, -1, _gen())
    with pytest.raises(ValueError, match="smaller than the image"):
        random_crop(x, 5, _gen(), padding_mode="reflect")
    with pytest.raises(ValueError, match="3 values"):
        normalize(x, (0.5,), (0.5,))
    with pytest.raises(ValueError, match="positive"):
        normalize(x, (0.5,) * 3, (0.5, 0.0, 0.5))
    with pytest.raises(ValueError, match="same"):
        Augmenter((0.5, 0.5), (0.5,))


def test_affine_at_zero_strength_is_identity() -> None:
    x = _batch(b=4, c=2, h=6, w=9)
    out = random_affine(x, _gen(), rotation=0.0, scale=0.0, shift=0.0)
    assert out.dtype == torch.uint8 and torch.equal(out, x)


def test_affine_by_hand() -> None:
    x = _batch(b=3, c=2, h=5, w=5)
    one = torch.tensor([[0.0, 1.0, 0.0, 0.0]]).repeat(3, 1)
    right = apply_affine(x, one + torch.tensor([0.0, 0.0, 1.0, 0.0]))  # 1 px to the right
    assert torch.equal(right[..., 1:], x[..., :-1]) and not right[..., 0].any()
    down = apply_affine(x, one + torch.tensor([0.0, 0.0, 0.0, 2.0]))  # 2 px down
    assert torch.equal(down[..., 2:, :], x[..., :-2, :]) and not down[..., :2, :].any()
    turned = apply_affine(x, one + torch.tensor([90.0, 0.0, 0.0, 0.0]))  # clockwise
    assert torch.equal(turned, torch.rot90(x, -1, (2, 3)))
    wide = _batch(b=2, c=1, h=4, w=6)  # the aspect ratio is handled: 180° of a 4x6 image
    half = apply_affine(wide, torch.tensor([[180.0, 1.0, 0.0, 0.0]] * 2))
    assert torch.equal(half, wide.flip(-1).flip(-2))
    # scaling by 2 about the centre: the 2x2 centre block of a 4x4 image fills it
    block = torch.zeros(1, 1, 4, 4, dtype=torch.uint8)
    block[..., 1:3, 1:3] = 200
    grown = apply_affine(block, torch.tensor([[0.0, 2.0, 0.0, 0.0]]))
    assert (grown[..., 1:3, 1:3] == 200).all() and grown.float().mean() > block.float().mean()


def test_affine_shapes_and_determinism_under_a_seed() -> None:
    x = _batch(b=16, c=1, h=12, w=12)
    kw = {"rotation": 10.0, "scale": 0.1, "shift": 3.0}
    out = random_affine(x, _gen(7), **kw)
    assert out.shape == x.shape and out.dtype == torch.uint8
    assert torch.equal(out, random_affine(x, _gen(7), **kw))
    assert not torch.equal(out, random_affine(x, _gen(8), **kw))
    params = affine_params(1000, _gen(7), **kw)
    assert params.shape == (1000, 4)
    assert params[:, 0].abs().max() <= 10.0 and (params[:, 1] - 1).abs().max() <= 0.1
    assert params[:, 2:].abs().max() <= 3.0 and params[:, 2:].abs().max() > 2.5


def test_affine_batched_equals_per_sample() -> None:
    x = _batch(b=8, c=3, h=10, w=10)
    params = affine_params(8, _gen(3), rotation=15.0, scale=0.2, shift=2.0)
    batched = apply_affine(x, params)
    single = torch.cat([apply_affine(x[i:i + 1], params[i:i + 1]) for i in range(8)])
    assert torch.equal(batched, single)
    assert torch.equal(random_affine(x, _gen(3), rotation=15.0, scale=0.2, shift=2.0), batched)


def test_augmenter_with_affine() -> None:
    x = _batch(b=8, c=1, h=8, w=8)
    aug = Augmenter((0.5,), (0.25,), crop_padding=0, flip=False, affine_rotation=10.0,
                    affine_scale=0.1, affine_shift=2.0)
    expected = normalize(random_affine(x, _gen(4), rotation=10.0, scale=0.1, shift=2.0),
                         (0.5,), (0.25,))
    assert torch.equal(aug(x, _gen(4)), expected)
    with pytest.raises(ValueError, match="rotation"):
        Augmenter((0.5,), (0.25,), affine_rotation=-1.0)
    with pytest.raises(ValueError, match="scale"):
        random_affine(x, _gen(), scale=1.0)
    with pytest.raises(ValueError, match="shape"):
        apply_affine(x, torch.zeros(3, 4))
