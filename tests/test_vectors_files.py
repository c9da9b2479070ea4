"""Numpy in and out: ``.npy``/``.npz`` vectors for ``compatkit index add --features`` and
``compatkit embed --out``, plus ``compatkit export`` and ``compatkit index version --onnx``
from the command line."""

from __future__ import annotations

import json

import numpy as np
import pytest
from typer.testing import CliRunner

from compatkit.artifacts import (
    FeatureSet,
    InputSpec,
    Manifest,
    load_vectors_file,
    save_features,
    save_module,
    save_vectors_file,
)
from compatkit.cli import app
from compatkit.errors import CompatkitError
from compatkit.index import IndexStore

runner = CliRunner()


def run(*args: str) -> str:
    result = runner.invoke(app, list(args), catch_exceptions=False)
    assert result.exit_code == 0, result.output
    return result.output


def _unit(n: int, d: int, seed: int = 0) -> np.ndarray:
    v = np.random.default_rng(seed).standard_normal((n, d)).astype(np.float32)
    return v / np.linalg.norm(v, axis=1, keepdims=True)


def test_vectors_files_round_trip(tmp_path):
    v = _unit(3, 4)
    save_vectors_file(tmp_path / "a.npz", v, ids=["x", "y", "z"],
                      metadata=[{"n": 1}, {}, {"tag": "t"}], version="v1")
    got = load_vectors_file(tmp_path / "a.npz")
    np.testing.assert_array_equal(got.vectors, v)
    assert (got.ids, got.metadata, got.version) == (["x", "y", "z"], [{"n": 1}, {}, {"tag": "t"}],
                                                    "v1")
    save_vectors_file(tmp_path / "a.npy", v)
    (tmp_path / "ids.txt").write_text("p\nq\nr\n")
    got = load_vectors_file(tmp_path / "a.npy", ids=tmp_path / "ids.txt")
    assert (got.ids, got.metadata, got.version) == (["p", "q", "r"], None, None)
    np.testing.assert_array_equal(got.vectors, v)


def test_vectors_files_refuse_clearly(tmp_path):
    (tmp_path / "a.csv").write_text("1,2\n")
    with pytest.raises(CompatkitError, match=r"cannot read vectors from .*a\.csv: unknown suffix "
                                             r"'\.csv' \(formats read: \.safetensors, \.npy, "
                                             r"\.npz"):
        load_vectors_file(tmp_path / "a.csv")
    (tmp_path / "bad.npy").write_bytes(b"not numpy at all")
    with pytest.raises(CompatkitError, match=r"cannot read vectors from .*bad\.npy: .*formats "
                                             r"read"):
        load_vectors_file(tmp_path / "bad.npy")
    np.save(tmp_path / "flat.npy", np.zeros(4, dtype=np.float32))
    with pytest.raises(CompatkitError, match=r"expected an \(N, D\) array of numbers, got "
                                             r"float32 of shape \(4,\)"):
        load_vectors_file(tmp_path / "flat.npy")
    np.savez(tmp_path / "noids.npz", vectors=np.zeros((2, 3), dtype=np.float32))
    assert load_vectors_file(tmp_path / "noids.npz").ids is None
    np.savez(tmp_path / "novectors.npz", ids=np.asarray(["a"]))
    with pytest.raises(CompatkitError, match=r"the \.npz has no vectors entry"):
        load_vectors_file(tmp_path / "novectors.npz")
    save_vectors_file(tmp_path / "two.npy", np.zeros((2, 3)))
    (tmp_path / "ids.txt").write_text("a\n")
    with pytest.raises(CompatkitError, match="holds 2 vectors but 1 ids"):
        load_vectors_file(tmp_path / "two.npy", ids=tmp_path / "ids.txt")
    with pytest.raises(CompatkitError, match=r"suffix must be \.npy or \.npz"):
        save_vectors_file(tmp_path / "x.txt", np.zeros((1, 2)))


def test_index_add_reads_npy_npz_and_features_files(tmp_path):
    store = ["--store", str(tmp_path / "st")]
    run("index", "version", "v1", "--dim", "4", *store)
    run("index", "create", "c", "--version", "v1", *store)
    v = _unit(5, 4)
    save_vectors_file(tmp_path / "a.npy", v[:2])
    (tmp_path / "ids.txt").write_text("a0\na1\n")
    out = json.loads(run("index", "add", "c", "--features", str(tmp_path / "a.npy"), "--ids",
                         str(tmp_path / "ids.txt"), *store, "--json"))
    assert (out["added"], out["items"]) == (2, 2)
    save_vectors_file(tmp_path / "b.npz", v[2:], ids=["b0", "b1", "b2"],
                      metadata=[{"k": 0}, {"k": 1}, {"k": 2}], version="v1")
    run("index", "add", "c", "--features", str(tmp_path / "b.npz"), *store)
    manifest = Manifest(model_version="v1", spec={}, embed_dim=4, normalized=True)
    save_features(tmp_path / "f.safetensors", FeatureSet(v[:1] * 1, np.array([7]), manifest,
                                                         np.array([42])))
    run("index", "add", "c", "--features", str(tmp_path / "f.safetensors"), *store)
    st = IndexStore(tmp_path / "st")
    coll = st.collection("c")
    assert sorted(coll.list_ids()) == ["42", "a0", "a1", "b0", "b1", "b2"]
    np.testing.assert_allclose(coll.get("b1", with_vectors=True).current.vector, v[3],
                               atol=1e-6)
    assert coll.get("b2").metadata == {"k": 2}
    assert coll.get("42").metadata == {"label": 7}
    st.close()
    with pytest.raises(CompatkitError, match="holds vectors only: give --ids FILE"):
        runner.invoke(app, ["index", "add", "c", "--features", str(tmp_path / "a.npy"), *store],
                      catch_exceptions=False)
    (tmp_path / "x.json").write_text("[]")
    with pytest.raises(CompatkitError, match=r"unknown suffix '\.json' \(formats read"):
        runner.invoke(app, ["index", "add", "c", "--features", str(tmp_path / "x.json"),
                            *store], catch_exceptions=False)


def test_embed_writes_npz_and_npy_by_suffix(tmp_path, make_artifact):
    artifact = make_artifact()
    out = json.loads(run("embed", "--model", str(artifact), "--out", str(tmp_path / "e.npz")))
    got = load_vectors_file(tmp_path / "e.npz")
    assert got.vectors.shape == (out["count"], 8) and got.version == "m1"
    assert got.ids == [str(i) for i in range(out["count"])]
    assert all(set(m) == {"label"} for m in got.metadata)
    run("embed", "--model", str(artifact), "--out", str(tmp_path / "e.npy"))
    np.testing.assert_array_equal(np.load(tmp_path / "e.npy"), got.vectors)
    with pytest.raises(CompatkitError,
                       match=r"the suffix must be one of \.safetensors, \.npy, \.npz"):
        runner.invoke(app, ["embed", "--model", str(artifact), "--out",
                            str(tmp_path / "e.csv")], catch_exceptions=False)


def test_export_then_index_version_from_the_command_line(tmp_path, make_artifact):
    artifact = make_artifact()
    out = json.loads(run("export", str(artifact), "--format", "torchscript", "--out",
                         str(tmp_path / "m.pt")))
    assert (out["model_version"], out["dim"], out["format"]) == ("m1", 8, "torchscript")
    store = ["--store", str(tmp_path / "st")]
    info = json.loads(run("index", "version", "m1", "--torchscript", str(tmp_path / "m.pt"),
                          "--dim", "8", *store, "--json"))
    assert info["embedder"]["files"] == {str(tmp_path / "m.pt"): out["sha256"]}
    info = json.loads(run("index", "version", "m1-grey", "--torchscript", str(tmp_path / "m.pt"),
                          "--dim", "8", "--channels", "1", "--image-size", "24", "--mean", "0.5",
                          "--std", "0.25", *store, "--json"))
    assert info["embedder"]["input"]["image_size"] == 24
    with pytest.raises(CompatkitError, match="--format must be one of onnx, torchscript"):
        runner.invoke(app, ["export", str(artifact), "--format", "tflite", "--out",
                            str(tmp_path / "m.tfl")], catch_exceptions=False)
    with pytest.raises(CompatkitError, match="--mean must be comma-separated numbers"):
        runner.invoke(app, ["index", "version", "x", "--torchscript", str(tmp_path / "m.pt"),
                            "--dim", "8", "--channels", "1", "--mean", "half", *store],
                      catch_exceptions=False)


@pytest.fixture()
def make_artifact(tmp_path):
    """A function saving a tiny 1-channel 16px model whose data config is a small synthetic
    set (so ``compatkit embed`` can rebuild its test images)."""
    import torch

    from compatkit.models import create_model

    def make():
        torch.manual_seed(0)
        torch.set_num_threads(1)
        model = create_model(backbone="resnet10_cifar", width=0.125, embed_dim=8,
                             num_classes=None, in_chans=1).eval()
        data = {"name": "synthetic", "image_size": 16,
                "options": {"num_classes": 10, "images_per_class": 3}}
        manifest = Manifest(model_version="m1", spec=model.spec, embed_dim=8, normalized=True,
                            input=InputSpec(image_size=16, in_chans=1, mean=(0.5,),
                                            std=(0.25,)),
                            config={"data": data})
        return save_module(tmp_path / "m1", model, manifest)

    return make
