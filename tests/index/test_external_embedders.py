"""Embedders from outside compatkit: exported ONNX / TorchScript files and python factories.

Round trips (export, then embed through the index: the artifact's own vectors), the checksum
guard, and the clear errors of a missing file, a wrong input spec, another output dimension
and an import path that does not resolve.
"""

from __future__ import annotations

import json
import textwrap
from pathlib import Path

import numpy as np
import pytest
from fastapi.testclient import TestClient
from PIL import Image

from compatkit.errors import CompatkitError
from compatkit.export import export_model
from compatkit.index import IndexStore, ItemInput
from compatkit.index.embedders import ArtifactEmbedder
from compatkit.index.errors import StateConflictError
from compatkit.index.external_embedders import (
    EmbedderChangedError,
    OnnxEmbedder,
    TorchScriptEmbedder,
    onnx_providers,
    spec_from_options,
)
from compatkit.index.service import ServiceSettings, create_app

FACTORY = textwrap.dedent('''
    import numpy as np


    class Lengths:
        """Embeds a text source by its length and its number of vowels."""

        def __init__(self, dim, scale=1.0):
            self.dim, self.scale = dim, scale

        def embed_sources(self, sources):
            out = np.zeros((len(sources), self.dim), dtype=np.float32)
            for i, s in enumerate(sources):
                s = s.decode() if isinstance(s, bytes) else s
                out[i, 0] = self.scale * len(s)
                out[i, 1] = sum(ch in "aeiou" for ch in s) + 1
            return out


    def lengths(dim=4, scale=1.0):
        return Lengths(dim, scale)


    NOT_CALLABLE = 3
''')


@pytest.fixture()
def images(tmp_path) -> list[str]:
    """Six small RGB PNG files (decoded to grey and resized by the input spec)."""
    rng = np.random.default_rng(0)
    folder = tmp_path / "images"
    folder.mkdir()
    paths = []
    for i in range(6):
        path = folder / f"img{i}.png"
        Image.fromarray(rng.integers(0, 256, (20, 24, 3), dtype=np.uint8)).save(path)
        paths.append(str(path))
    return paths


@pytest.fixture()
def exported(tmp_path, make_model):
    """A tiny 1-channel 16px model artifact and its ONNX and TorchScript exports."""
    artifact = make_model("m1", embed_dim=8)
    onnx = export_model(artifact, tmp_path / "m1.onnx", format="onnx")
    ts = export_model(artifact, tmp_path / "m1.pt", format="torchscript")
    return artifact, onnx, ts


@pytest.fixture()
def factory_module(tmp_path, monkeypatch):
    """``byom_factory.py`` importable here (and by workers given its folder on PYTHONPATH)."""
    import sys

    (tmp_path / "byom_factory.py").write_text(FACTORY)
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.delitem(sys.modules, "byom_factory", raising=False)  # another test's copy
    return tmp_path


def test_exported_models_embed_like_the_artifact_through_the_index(tmp_path, exported,
                                                                   images):
    artifact, onnx, ts = exported
    native = ArtifactEmbedder(artifact).embed_sources(images)
    store = IndexStore(tmp_path / "store")
    for name, spec in (("onnx-v", {"kind": "onnx", "path": str(onnx)}),
                       ("ts-v", {"kind": "torchscript", "path": str(ts)})):
        info = store.register_version(name, dim=8, embedder=spec)
        assert info.embedder["input"] == {"kind": "image", "image_size": 16, "in_chans": 1,
                                          "mean": [0.5], "std": [0.25]}  # read from the file
        coll = store.create_collection(f"c-{name}", name)
        coll.add([ItemInput(f"i{i}", source=s) for i, s in enumerate(images)])
        stored = np.stack([coll.get(f"i{i}", with_vectors=True).current.vector
                           for i in range(len(images))])
        np.testing.assert_allclose(stored, native, atol=1e-5)
        hit = coll.search(source=images[3], k=1).hits[0]
        assert (hit.id, hit.version) == ("i3", name)
        assert hit.score == pytest.approx(1.0, abs=1e-5)
    store.close()


def test_a_changed_file_is_refused_under_its_version(tmp_path, exported, make_model, images):
    _, onnx, _ = exported
    store = IndexStore(tmp_path / "store")
    recorded = store.register_version("v1", dim=8, embedder={"kind": "onnx",
                                                             "path": str(onnx)})
    recorded_sha = recorded.embedder["files"][str(onnx)]
    store.close()
    export_model(make_model("m2", seed=5, embed_dim=8), onnx, format="onnx")  # overwritten
    reopened = IndexStore(tmp_path / "store")
    with pytest.raises(EmbedderChangedError) as err:
        reopened.embedder("v1")
    from compatkit.artifacts import file_sha256

    actual = file_sha256(onnx)
    assert str(err.value).startswith(f"{onnx} changed since version 'v1' was registered: "
                                     f"recorded sha256 {recorded_sha}, actual {actual}")
    with pytest.raises(StateConflictError, match="already registered with another embedder"):
        reopened.register_version("v1", dim=8, embedder={"kind": "onnx", "path": str(onnx)})
    onnx.unlink()
    with pytest.raises(EmbedderChangedError, match=f"{onnx}, registered with version 'v1' "
                                                   f"\\(sha256 {recorded_sha}\\), is missing"):
        reopened.embedder("v1")
    reopened.close()


def test_clear_errors_at_registration(tmp_path, exported):
    _, onnx, ts = exported
    store = IndexStore(tmp_path / "store")
    missing = tmp_path / "nope.onnx"
    with pytest.raises(CompatkitError, match=f"onnx model file {missing} does not exist"):
        store.register_version("a", dim=8, embedder={"kind": "onnx", "path": str(missing)})
    with pytest.raises(CompatkitError, match=r"outputs 8-dimensional embeddings, but version "
                                             r"'b' is registered with dim 16"):
        store.register_version("b", dim=16, embedder={"kind": "onnx", "path": str(onnx)})
    with pytest.raises(CompatkitError, match=r"gives \(8,\)-shaped embeddings, but version 'b' "
                                             r"is registered with dim 16"):
        store.register_version("b", dim=16, embedder={"kind": "torchscript", "path": str(ts)})
    rgb = {"kind": "image", "in_chans": 3, "image_size": 16}
    with pytest.raises(CompatkitError, match="takes 1-channel images, the input spec says 3"):
        store.register_version("c", dim=8, embedder={"kind": "onnx", "path": str(onnx),
                                                     "input": rgb})
    with pytest.raises(CompatkitError, match=r"takes 16×16px images, the input spec says "
                                             r"32×32px \(image size\)"):
        store.register_version("c", dim=8, embedder={"kind": "onnx", "path": str(onnx), "input": {
            "kind": "image", "in_chans": 1, "image_size": 32}})
    with pytest.raises(CompatkitError, match=r"torchscript model .* cannot embed 3-channel "
                                             r"16×16px images .* check the input spec"):
        store.register_version("c", dim=8, embedder={"kind": "torchscript", "path": str(ts),
                                                     "input": rgb})
    with pytest.raises(ValueError, match="channels must be 1 \\(grey\\) or 3 \\(RGB\\), got 2"):
        store.register_version("c", dim=8, embedder={"kind": "onnx", "path": str(onnx), "input": {
            "kind": "image", "in_chans": 2}})
    bare = tmp_path / "bare.pt"
    import torch

    torch.jit.save(torch.jit.script(torch.nn.Flatten()), str(bare))
    with pytest.raises(CompatkitError, match="carries no compatkit input spec"):
        store.register_version("d", dim=8, embedder={"kind": "torchscript", "path": str(bare)})
    with pytest.raises(CompatkitError, match="is not an ONNX model onnxruntime can load"):
        store.register_version("d", dim=8, embedder={"kind": "onnx", "path": str(bare)})
    with pytest.raises(ValueError, match="embedder kind must be one of none, hash, artifact, "
                                         "onnx, torchscript, python, got 'tflite'"):
        store.register_version("d", dim=8, embedder={"kind": "tflite"})
    assert [v.name for v in store.versions()] == []  # nothing half-registered
    store.close()


def test_python_factory_embeds_and_bad_import_paths_are_clear(tmp_path, factory_module):
    store = IndexStore(tmp_path / "store")
    spec = spec_from_options(python="byom_factory:lengths", kwargs='{"dim": 4, "scale": 2}')
    info = store.register_version("txt", dim=4, normalized=False, embedder=spec)
    assert info.embedder["files"] == {
        str((factory_module / "byom_factory.py").resolve()): info.embedder["files"][
            str((factory_module / "byom_factory.py").resolve())]}
    coll = store.create_collection("docs", "txt")
    coll.add([ItemInput("a", source="banana"), ItemInput("b", source="kiwi")])
    np.testing.assert_array_equal(coll.get("a", with_vectors=True).current.vector,
                                  [12.0, 4.0, 0.0, 0.0])
    for factory, message in (
            ("no_such_module_xyz:make", "module 'no_such_module_xyz' cannot be imported"),
            ("byom_factory:missing", "module 'byom_factory' has no attribute 'missing'"),
            ("byom_factory:NOT_CALLABLE", "names a int, not a callable factory")):
        with pytest.raises(CompatkitError, match=message):
            store.register_version("bad", dim=4, embedder={"kind": "python",
                                                           "factory": factory})
    with pytest.raises(ValueError, match=r"a python embedder is 'package\.module:factory', got "
                                         r"'byom_factory'"):
        store.register_version("bad", dim=4, embedder={"kind": "python",
                                                       "factory": "byom_factory"})
    with pytest.raises(CompatkitError, match="embeds in dim 4, but version 'bad' is registered "
                                             "with dim 5"):
        store.register_version("bad", dim=5, embedder={"kind": "python",
                                                       "factory": "byom_factory:lengths"})
    with pytest.raises(CompatkitError, match=r"cannot be called with kwargs \{'colour': 1\}"):
        store.register_version("bad", dim=4, embedder={"kind": "python", "kwargs": {"colour": 1},
                                                       "factory": "byom_factory:lengths"})
    (factory_module / "byom_factory.py").write_text(FACTORY + "\n# edited\n")
    with pytest.raises(EmbedderChangedError, match=r"byom_factory\.py changed since version 'txt'"):
        IndexStore(tmp_path / "store").embedder("txt")
    store.close()


def test_raw_array_inputs(tmp_path):
    """An ONNX model of (N, 4) vectors, fed from .npy sources; the spec says raw arrays."""
    import torch

    torch.manual_seed(0)
    linear = torch.nn.Linear(4, 3).eval()
    path = tmp_path / "linear.onnx"
    torch.onnx.export(linear, (torch.zeros(2, 4),), str(path), dynamo=False,
                      input_names=["x"], dynamic_axes={"x": {0: "batch"}})
    sources = []
    rng = np.random.default_rng(1)
    rows = rng.standard_normal((5, 4)).astype(np.float32)
    for i, row in enumerate(rows):
        np.save(tmp_path / f"row{i}.npy", row)
        sources.append(str(tmp_path / f"row{i}.npy"))
    store = IndexStore(tmp_path / "store")
    spec = spec_from_options(onnx=path, raw_arrays=True)
    store.register_version("lin", dim=3, normalized=False, embedder=spec)
    out = store.embedder("lin").embed_sources(sources)
    with torch.no_grad():
        expected = linear(torch.from_numpy(rows)).numpy()
    np.testing.assert_allclose(out, expected, atol=1e-6)
    with pytest.raises(CompatkitError, match=r"source '.*img\.txt' is not a \.npy array"):
        (tmp_path / "img.txt").write_text("hello")
        store.embedder("lin").embed_sources([str(tmp_path / "img.txt")])
    store.close()


def test_spec_from_options_refuses_mixed_options():
    with pytest.raises(ValueError, match="give one of --onnx, --torchscript, --python, got "
                                         "--onnx, --python"):
        spec_from_options(onnx="a.onnx", python="m:f")
    with pytest.raises(ValueError, match="--kwargs goes with --python"):
        spec_from_options(onnx="a.onnx", kwargs="{}")
    with pytest.raises(ValueError, match="--kwargs is not JSON"):
        spec_from_options(python="m:f", kwargs="{dim: 4}")
    with pytest.raises(ValueError, match="needs --channels"):
        spec_from_options(torchscript="a.pt", image_size=32)
    with pytest.raises(ValueError, match="decodes its own sources"):
        spec_from_options(python="m:f", channels=3)
    assert spec_from_options() is None
    assert spec_from_options(onnx="a.onnx", channels=3, image_size=32, mean=[0.5] * 3) == {
        "kind": "onnx", "path": "a.onnx", "input": {
            "kind": "image", "image_size": 32, "in_chans": 3, "mean": [0.5] * 3,
            "std": [1.0] * 3}}


def test_onnx_providers_follow_the_device():
    assert onnx_providers("cpu", ["CUDAExecutionProvider", "CPUExecutionProvider"]) == [
        "CPUExecutionProvider"]
    assert onnx_providers("cuda:1", ["CUDAExecutionProvider", "CPUExecutionProvider"]) == [
        ("CUDAExecutionProvider", {"device_id": 1}), "CPUExecutionProvider"]
    assert onnx_providers("cuda", ["CPUExecutionProvider"]) == ["CPUExecutionProvider"]


def test_http_admin_registers_external_embedders(tmp_path, exported, factory_module):
    _, onnx, _ = exported
    store = IndexStore(tmp_path / "store")
    token = "t" * 32
    app = create_app(store, ServiceSettings(admin_token=token, run_worker=False))
    auth = {"Authorization": f"Bearer {token}"}
    with TestClient(app) as client:
        r = client.post("/versions", headers=auth, json={
            "name": "v1", "dim": 8, "embedder": {"kind": "onnx", "path": str(onnx)}})
        assert r.status_code == 201, r.text
        assert r.json()["embedder"] == "onnx"
        r = client.post("/versions", headers=auth, json={
            "name": "v2", "dim": 16, "embedder": {"kind": "onnx", "path": str(onnx)}})
        assert r.status_code == 422
        assert "registered with dim 16" in r.text
        r = client.post("/versions", headers=auth, json={
            "name": "v3", "dim": 4, "normalized": False,
            "embedder": {"kind": "python", "factory": "byom_factory:lengths",
                         "kwargs": {"dim": 4}}})
        assert r.status_code == 201, r.text
        r = client.post("/versions", headers=auth, json={
            "name": "v4", "dim": 8, "embedder": {"kind": "torchscript", "path": str(onnx),
                                                 "input": {"kind": "image", "in_chans": 2}}})
        assert r.status_code == 422
    assert store.version("v1").embedder["files"] == {str(onnx): json.loads(
        json.dumps(store.version("v1").embedder["files"]))[str(onnx)]}
    store.close()


def test_model_file_embedders_check_their_outputs(exported):
    _, onnx, ts = exported
    assert OnnxEmbedder(onnx, version="v", dim=8).embed_sources([]).shape == (0, 8)
    with pytest.raises(CompatkitError, match="outputs 8-dimensional embeddings, but version 'v' "
                                             "is registered with dim 9"):
        OnnxEmbedder(onnx, version="v", dim=9)  # the declared output shape
    unchecked = TorchScriptEmbedder(ts, version="v", dim=9)  # no declared shapes: per batch
    with pytest.raises(CompatkitError, match=r"gives outputs of shape \(2, 8\) for 2 inputs; "
                                             r"version 'v' expects \(2, 9\)"):
        unchecked.embed_inputs(np.zeros((2, 1, 16, 16), np.float32))


def test_exports_carry_the_manifest_and_refuse_non_models(tmp_path, exported,
                                                          make_transformation):
    import onnx as onnx_lib
    import torch

    artifact, onnx, ts = exported
    props = {p.key: p.value for p in onnx_lib.load(str(onnx)).metadata_props}
    assert json.loads(props["compatkit.manifest"])["model_version"] == "m1"
    extra = {"compatkit_manifest.json": ""}
    torch.jit.load(str(ts), _extra_files=extra)
    assert json.loads(extra["compatkit_manifest.json"])["embed_dim"] == 8
    with pytest.raises(CompatkitError, match="format must be one of onnx, torchscript"):
        export_model(artifact, tmp_path / "x.tfl", format="tflite")  # type: ignore[arg-type]
    transform = make_transformation("t", "vA", "vB")
    with pytest.raises(CompatkitError, match="not an image model"):
        export_model(Path(transform), tmp_path / "t.onnx")


def _text_upgrade(tmp_path: Path) -> tuple[IndexStore, object, int, list[str]]:
    """vA and vB python embedders (scale 1 and 2), a collection of texts on vA, and a
    hot-refresh job to vB that nothing has run yet."""
    store = IndexStore(tmp_path / "store")
    for name, scale in (("vA", 1.0), ("vB", 2.0)):
        store.register_version(name, dim=4, normalized=False, embedder=spec_from_options(
            python="byom_factory:lengths", kwargs=json.dumps({"dim": 4, "scale": scale})))
    store.declare_compatible("vB", "vA")
    texts = ["apple", "fig", "banana", "kiwi", "mango", "pear", "plum"]
    coll = store.create_collection("fruit", "vA")
    coll.add([ItemInput(t, source=t) for t in texts])
    job = coll.start_upgrade("vB", strategy="hot-refresh", batch_size=3).job
    return store, coll, job, texts


def _check_vb(coll, texts: list[str]) -> None:
    for t in texts:
        got = coll.get(t, with_vectors=True).current
        assert got.version == "vB"
        np.testing.assert_array_equal(got.vector, [2.0 * len(t),
                                                   sum(ch in "aeiou" for ch in t) + 1, 0, 0])


def _worker_env(factory_dir: Path) -> dict[str, str]:
    import os

    src = str(Path(__file__).resolve().parents[2] / "src")
    paths = [str(factory_dir), src, os.environ.get("PYTHONPATH", "")]
    return {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in paths if p),
            "OMP_NUM_THREADS": "1"}


@pytest.mark.slow
def test_python_factory_embedder_in_a_backfill_worker_process(tmp_path, factory_module):
    import subprocess
    import sys

    store, coll, _, texts = _text_upgrade(tmp_path)
    proc = subprocess.run([sys.executable, "-m", "compatkit", "index", "work", "fruit",
                           "--store", str(store.root), "--json"],
                          env=_worker_env(factory_module), capture_output=True, text=True,
                          timeout=240, check=False)
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout)["state"] == "completed"
    _check_vb(coll, texts)
    store.close()


@pytest.mark.slow
@pytest.mark.ddp
def test_python_factory_embedder_in_a_torchrun_rank(tmp_path, factory_module):
    from compatkit.index.distributed import launch_torchrun

    store, coll, job, texts = _text_upgrade(tmp_path)
    status = launch_torchrun(store.root, job, workers=1, device="cpu", max_restarts=0,
                             env={"PYTHONPATH": str(factory_module)}, timeout_s=240)
    assert (status.state, status.done) == ("completed", len(texts))
    _check_vb(coll, texts)
    store.close()


def test_index_version_accepts_a_python_factory_from_the_command_line(tmp_path, factory_module):
    from typer.testing import CliRunner

    from compatkit.cli import app

    store = ["--store", str(tmp_path / "st")]
    result = CliRunner().invoke(app, ["index", "version", "txt", "--python",
                                      "byom_factory:lengths", "--kwargs", '{"dim": 4}',
                                      "--dim", "4", "--no-normalized", *store, "--json"],
                                catch_exceptions=False)
    assert result.exit_code == 0, result.output
    embedder = json.loads(result.output)["embedder"]
    assert (embedder["kind"], embedder["factory"], embedder["kwargs"]) == (
        "python", "byom_factory:lengths", {"dim": 4})
    with pytest.raises(ValueError, match="--kwargs goes with --python"):
        CliRunner().invoke(app, ["index", "version", "x", "--onnx", "m.onnx", "--kwargs", "{}",
                                 "--dim", "4", *store], catch_exceptions=False)
