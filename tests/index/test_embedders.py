"""Embedders: the deterministic hash embedder, decoding sources, model artifacts."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from compatkit.artifacts import InputSpec
from compatkit.errors import CompatkitError
from compatkit.index import ArtifactEmbedder, Embedder, HashEmbedder, load_source_image


def test_hash_embedder_is_deterministic_and_anchored():
    a = HashEmbedder("a", 16, seed=0)
    b = HashEmbedder("b", 16, seed=1, anchor_seed=0, anchor_weight=0.9)
    c = HashEmbedder("c", 16, seed=1)
    x = a.embed_sources(["s1", "s2"])
    assert isinstance(a, Embedder)
    np.testing.assert_array_equal(x, a.embed_sources(["s1", "s2"]))
    np.testing.assert_allclose(np.linalg.norm(x, axis=1), 1.0, rtol=1e-6)
    np.testing.assert_array_equal(a.embed_sources([b"s1"]), x[:1])  # bytes = their utf-8
    anchored = float(x[0] @ b.embed_sources(["s1"])[0])
    unrelated = float(x[0] @ c.embed_sources(["s1"])[0])
    assert anchored > 0.9 > abs(unrelated)


def test_load_source_image_gray_rgb_resize_and_bytes(tmp_path):
    gray = np.arange(64, dtype=np.uint8).reshape(8, 8)
    Image.fromarray(gray).save(tmp_path / "g.png")
    spec = InputSpec(image_size=8, in_chans=1, mean=(0.5,), std=(0.5,))
    out = load_source_image(str(tmp_path / "g.png"), spec)
    assert out.shape == (1, 8, 8) and out.dtype == np.uint8
    np.testing.assert_array_equal(out[0], gray)
    np.testing.assert_array_equal(load_source_image(f"file://{tmp_path}/g.png", spec), out)
    np.testing.assert_array_equal(load_source_image((tmp_path / "g.png").read_bytes(), spec), out)
    rgb = load_source_image(str(tmp_path / "g.png"),
                            InputSpec(image_size=4, in_chans=3, mean=(0,) * 3, std=(1,) * 3))
    assert rgb.shape == (3, 4, 4)
    assert (rgb[0] == rgb[1]).all()  # a gray image converted to RGB


@pytest.mark.parametrize(("source", "message"), [
    ("s3://bucket/x.png", "source 's3://bucket/x.png': only local paths and file:// URIs can be "
                          "read"),
    ("/does/not/exist.png", "source '/does/not/exist.png' cannot be read: No such file or "
                            "directory"),
    (b"not an image", "image bytes: not a readable image"),
])
def test_unreadable_sources(source, message):
    spec = InputSpec(image_size=8, in_chans=1, mean=(0.5,), std=(0.5,))
    with pytest.raises(CompatkitError) as err:
        load_source_image(source, spec)
    assert str(err.value).startswith(message)


def test_artifact_embedder_matches_embed_images(tmp_path, make_model):
    from compatkit.artifacts import load_module
    from compatkit.inference import embed_images

    path = make_model("m", embed_dim=8)
    emb = ArtifactEmbedder(path)
    imgs = np.random.default_rng(0).integers(0, 256, (3, 1, 16, 16), dtype=np.uint8)
    for i, img in enumerate(imgs):
        Image.fromarray(img[0]).save(tmp_path / f"{i}.png")
    out = emb.embed_sources([str(tmp_path / f"{i}.png") for i in range(3)])
    model, manifest = load_module(path)
    np.testing.assert_allclose(out, embed_images(model, imgs, manifest.input), rtol=1e-5,
                               atol=1e-6)
    assert (emb.version, emb.dim, emb.classifier_weights().shape) == ("m", 8, (4, 8))
