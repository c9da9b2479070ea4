"""End-to-end runs of the one training loop on tiny synthetic data (CPU)."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from compatkit.artifacts import load_module, read_manifest
from compatkit.errors import CompatkitError
from compatkit.train.config import load_config
from compatkit.train.loop import train, train_or_reuse

TINY = [
    "data.options={num_classes: 200, images_per_class: 5}",
    "data.image_size=16",
    "data.test_class_ratio=0.2",
    "data.crop_padding=1",
    "model.backbone=resnet10_cifar",
    "model.width=0.125",
    "model.embed_dim=16",
    "train.batch_size=64",
    "train.progress=false",
    "train.embed_batch_size=256",
    "eval.metrics=[map, cmc@1]",
]


def _cfg(*extra: str):
    return load_config(None, [*TINY, *extra])


@pytest.fixture(scope="module")
def old_run(tmp_path_factory):
    torch.set_num_threads(1)
    out = tmp_path_factory.mktemp("old")
    return train(_cfg("name=old", "data.side=old", "train.epochs=2"), out)


def _weights(run_dir):
    return load_file(str(run_dir / "model" / "model.safetensors"))


def test_old_run_writes_a_complete_run_folder(old_run):
    run = old_run.run_dir
    for name in ("config.yaml", "run.json", "data.json", "metrics.json"):
        assert (run / name).is_file(), name
    meta = json.loads((run / "run.json").read_text())
    assert meta["seed"] == 0 and meta["code_version"]
    manifest = read_manifest(old_run.artifact_dir)
    data = json.loads((run / "data.json").read_text())
    assert data["side"] == "old" and data["split"]["scenario"] == "extended_class"
    # extended-class, ratio 0.3 of the 160 training classes
    assert manifest.class_ids and len(manifest.class_ids) == int(0.3 * 160)
    assert manifest.embed_dim == 16 and manifest.input.image_size == 16
    assert 0.0 <= old_run.metrics["self"]["map"] <= 1.0
    model, _ = load_module(old_run.artifact_dir)
    assert model.classifier.weight.shape == (48, 16)


def test_bct_run_evaluates_cross_test_and_declares_compatibility(old_run, tmp_path):
    result = train(_cfg("name=bct", "method={name: bct}", "train.epochs=1",
                        f"old_model={old_run.artifact_dir}"), tmp_path)
    assert set(result.metrics) == {"self", "cross", "old_old"}
    assert result.metrics["old_old"] == pytest.approx(old_run.metrics["self"])
    old_version = read_manifest(old_run.artifact_dir).model_version
    assert result.manifest.compatible_with == (old_version,)
    assert result.manifest.method == "bct"
    assert len(result.manifest.class_ids) == 160


def test_independent_declares_no_compatibility(old_run, tmp_path):
    result = train(_cfg("name=ind", "train.epochs=1", f"old_model={old_run.artifact_dir}"),
                   tmp_path)
    assert result.manifest.compatible_with == ()


def test_compat_weight_zero_reproduces_independent_exactly(old_run, tmp_path):
    """methods.md §7 case 24: same seed, weight 0 → identical weights to independent."""
    common = ("train.epochs=1", f"old_model={old_run.artifact_dir}")
    a = train(_cfg("name=a", *common), tmp_path / "a")
    b = train(_cfg("name=b", "method={name: bct, weight: 0.0}", *common), tmp_path / "b")
    wa, wb = _weights(a.run_dir), _weights(b.run_dir)
    assert wa.keys() == wb.keys()
    assert all(torch.equal(wa[k], wb[k]) for k in wa)


def test_resume_continues_to_the_same_weights(tmp_path, monkeypatch):
    cfg = _cfg("name=r", "data.side=old", "train.epochs=2")
    full = train(cfg, tmp_path / "full")

    from compatkit.methods.independent import Independent

    class Crash(Exception):
        pass

    def crash_at_second_epoch(self, epoch):
        if epoch == 1:
            raise Crash

    interrupted = tmp_path / "interrupted"
    with monkeypatch.context() as m:
        m.setattr(Independent, "on_epoch_start", crash_at_second_epoch)
        with pytest.raises(Crash):
            train(cfg, interrupted)
    assert json.loads((interrupted / "checkpoints" / "last" / "state.json").read_text())[
        "epoch"] == 1
    assert not (interrupted / "model").exists()
    resumed = train_or_reuse(cfg, interrupted)  # same config: resumes at epoch 1
    wf, wr = _weights(full.run_dir), _weights(resumed.run_dir)
    assert all(torch.equal(wf[k], wr[k]) for k in wf)
    assert [h["epoch"] for h in json.loads((interrupted / "history.json").read_text())] == [0, 1]
    mtime = (interrupted / "model" / "model.safetensors").stat().st_mtime_ns
    train_or_reuse(cfg, interrupted)  # finished with the same config: reused, not retrained
    assert (interrupted / "model" / "model.safetensors").stat().st_mtime_ns == mtime


def test_resume_from_corrupt_state_is_a_clear_error(tmp_path):
    cfg = _cfg("name=c", "data.side=old", "train.epochs=1")
    train(cfg, tmp_path)
    (tmp_path / "checkpoints" / "last" / "state.safetensors").write_bytes(b"garbage")
    with pytest.raises(CompatkitError, match="corrupt training state"):
        train(cfg, tmp_path, resume=True)


def test_corrupt_model_artifact_is_a_clear_error(old_run, tmp_path):
    import shutil

    bad = tmp_path / "model"
    shutil.copytree(old_run.artifact_dir, bad)
    (bad / "model.safetensors").write_bytes(b"\x00" * 10)
    with pytest.raises(CompatkitError, match="corrupt checkpoint"):
        load_module(bad)


def test_unknown_method_and_missing_old_model(tmp_path):
    with pytest.raises(CompatkitError, match="unknown method"):
        _cfg("method={name: nope}")
    with pytest.raises(ValueError, match="needs an old model"):
        train(_cfg("method={name: l2}", "train.epochs=1"), tmp_path)
