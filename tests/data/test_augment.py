"""Batched crop/flip/normalise on uint8 tensors: shapes, determinism, hand-checked results."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from compatkit.data.augment import Augmenter, normalize, random_crop, random_flip


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
