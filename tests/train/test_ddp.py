"""Two processes (torchrun, gloo) train exactly like one process with the same global batch.

The test backbone has no BatchNorm (per-process batch statistics differ from the global
batch's on CPU, where SyncBatchNorm is unavailable) and augmentation is off, so both runs see
the same images; DDP averages gradients and RACT gathers its negatives across processes.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

SRC = Path(__file__).resolve().parents[2] / "src"
SCRIPT = '''
import json, sys
import torch
from torch import nn
from compatkit.models import register_backbone


class Flat(nn.Module):
    def __init__(self, in_chans: int) -> None:
        super().__init__()
        self.num_features = 32
        self.fc = nn.Linear(in_chans * 8 * 8, 32)

    def forward_features(self, x):
        return torch.relu(self.fc(x.flatten(1)))


@register_backbone("flat_test")
def flat_test(*, width=1.0, in_chans=3, pooling="avg"):
    return Flat(in_chans)


from compatkit.train.config import load_config
from compatkit.train.loop import train

torch.set_num_threads(1)
train(load_config(None, json.loads(sys.argv[2])), sys.argv[1])
'''

COMMON = ["data.options={num_classes: 200, images_per_class: 5}", "data.image_size=8",
          "data.test_class_ratio=0.2", "data.crop_padding=0", "data.flip=false",
          "model.backbone=flat_test", "model.embed_dim=16", "train.epochs=1",
          "train.progress=false", "eval.enabled=false", "optim.warmup_epochs=0"]


def _run(tmp: Path, out: str, overrides: list[str], nproc: int) -> Path:
    script = tmp / "train_flat.py"
    script.write_text(SCRIPT)
    launcher = ([sys.executable, str(script)] if nproc == 1 else
                [sys.executable, "-m", "torch.distributed.run", "--standalone",
                 f"--nproc_per_node={nproc}", str(script)])
    env = {**os.environ, "PYTHONPATH": str(SRC), "OMP_NUM_THREADS": "1"}
    res = subprocess.run([*launcher, str(tmp / out), json.dumps(overrides)], env=env,
                         capture_output=True, text=True, timeout=240)
    assert res.returncode == 0, res.stderr[-3000:]
    return tmp / out


@pytest.mark.ddp
@pytest.mark.parametrize("method", ["independent", "ract"])
def test_two_processes_equal_one_process_with_the_same_global_batch(tmp_path, method):
    overrides = [*COMMON, f"method={{name: {method}}}", "name=ddp"]
    if method != "independent":
        old = _run(tmp_path, "old", [*COMMON, "data.side=old", "train.batch_size=64"], 1)
        overrides.append(f"old_model={old / 'model'}")
    one = _run(tmp_path, "one", [*overrides, "train.batch_size=200"], 1)
    two = _run(tmp_path, "two", [*overrides, "train.batch_size=100"], 2)
    h1 = json.loads((one / "history.json").read_text())
    h2 = json.loads((two / "history.json").read_text())
    assert h1[0]["loss"] == pytest.approx(h2[0]["loss"], rel=1e-5)
    w1 = load_file(str(one / "model" / "model.safetensors"))
    w2 = load_file(str(two / "model" / "model.safetensors"))
    assert w1.keys() == w2.keys()
    # equal up to float summation order (RACT's τ = 0.01 scales similarities by 100)
    for key in w1:
        torch.testing.assert_close(w1[key], w2[key], rtol=1e-3, atol=1e-4)
    # and a different global batch does change the result
    other = _run(tmp_path, "other", [*overrides, "train.batch_size=100"], 1)
    w3 = load_file(str(other / "model" / "model.safetensors"))
    assert max((w1[k] - w3[k]).abs().max().item() for k in w1) > 1e-3
