"""benchmarks/gpu_check.sh: its CPU dry run end to end, and a clear refusal without CUDA."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "gpu_check.sh"


def _run(*args: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHON": sys.executable, "OMP_NUM_THREADS": "1"}
    return subprocess.run(["bash", str(SCRIPT), *args], capture_output=True, text=True,
                          env=env, timeout=600, check=False)


def test_dry_run_trains_evaluates_and_times(tmp_path: Path) -> None:
    done = _run("--dry-run", str(tmp_path))
    assert done.returncode == 0, done.stderr[-2000:]
    assert "gpu_check: done" in done.stdout
    bct = json.loads((tmp_path / "bct" / "metrics.json").read_text())
    assert {"self", "cross", "old_old"} <= bct.keys()
    assert "bct: self map" in done.stdout and "old: self map" in done.stdout
    assert "| mAP + CMC@1,5" in (tmp_path / "eval_engine.md").read_text()
    assert "21-point curve" in (tmp_path / "backfill_curve.md").read_text()


@pytest.mark.skipif(torch.cuda.is_available(), reason="a CUDA machine runs the real check")
def test_without_cuda_it_refuses_clearly(tmp_path: Path) -> None:
    done = _run(str(tmp_path))
    assert done.returncode == 2 and "no CUDA device" in done.stderr
    assert not any(tmp_path.iterdir())
