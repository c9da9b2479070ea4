"""``compatkit adapt fit / eval / pairs`` end to end on tiny arrays, and one-line user errors."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

SRC = Path(__file__).resolve().parents[2] / "src"


def run_cli(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": f"{SRC}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    return subprocess.run([sys.executable, "-m", "compatkit", "adapt", *args],
                          capture_output=True, text=True, env=env, timeout=120)


@pytest.fixture()
def pair_files(tmp_path):
    """Training pairs (.npy) and held-out items (.npz with labels in metadata); new = old·Q."""
    from compatkit.artifacts import save_vectors_file

    rng = np.random.default_rng(0)
    labels = np.repeat(np.arange(10), 6)
    old = rng.normal(size=(10, 6))[labels] + 0.5 * rng.normal(size=(60, 6))
    q = np.linalg.qr(rng.normal(size=(6, 6)))[0]
    new = old @ q
    paths = {"old": tmp_path / "old.npy", "new": tmp_path / "new.npy",
             "test_old": tmp_path / "test_old.npz", "test_new": tmp_path / "test_new.npz"}
    np.save(paths["old"], old[:40].astype(np.float32))
    np.save(paths["new"], new[:40].astype(np.float32))
    meta = [{"label": int(lab)} for lab in labels[40:]]
    save_vectors_file(paths["test_old"], old[40:].astype(np.float32), metadata=meta)
    save_vectors_file(paths["test_new"], new[40:].astype(np.float32), metadata=meta)
    return paths


def test_fit_then_eval(pair_files, tmp_path):
    p = pair_files
    res = run_cli("fit", "--old", str(p["old"]), "--new", str(p["new"]), "--kind", "procrustes",
                  "--direction", "new-to-old", "--out", str(tmp_path / "adapter"),
                  "--old-version", "v1", "--new-version", "v2", "--json")
    assert res.returncode == 0, res.stderr
    fit = json.loads(res.stdout)
    assert (fit["from"], fit["to"], fit["pairs"], fit["d_in"]) == ("v2", "v1", 40, 6)
    manifest = json.loads((tmp_path / "adapter" / "manifest.json").read_text())
    assert manifest["kind"] == "transformation" and manifest["transforms_to"] == "v1"

    res = run_cli("eval", "--adapter", str(tmp_path / "adapter"), "--old", str(p["test_old"]),
                  "--new", str(p["test_new"]), "--json")
    assert res.returncode == 0, res.stderr
    out = json.loads(res.stdout)
    # new = old·Q is an isometry: every search is the same, the adapter changes nothing
    assert out["direction"] == "new-to-old" and out["items"] == 20
    assert out["adapted"]["map"] == pytest.approx(out["old_old"]["map"], abs=1e-5)
    assert out["retained"]["map"] is None  # new/new == old/old: nothing to retain
    assert out["nfr"] == 0 and out["overlap@10"] == pytest.approx(1.0)

    res = run_cli("eval", "--adapter", str(tmp_path / "adapter"), "--old", str(p["test_old"]),
                  "--new", str(p["test_new"]))
    assert res.returncode == 0, res.stderr
    assert res.stdout.splitlines()[1].split("\t") == ["metric", "adapted", "old/old", "new/new",
                                                      "retained"]


def test_pairs_budget(pair_files):
    p = pair_files
    res = run_cli("pairs", "--old", str(p["old"]), "--new", str(p["new"]), "--direction",
                  "old-to-new", "--test-old", str(p["test_old"]), "--test-new",
                  str(p["test_new"]), "--kinds", "procrustes,linear", "--budgets", "3,10,1000",
                  "--ridge", "0", "--json")
    assert res.returncode == 0, res.stderr
    rows = json.loads(res.stdout)["rows"]
    assert [(r["kind"], r["pairs"]) for r in rows] == [
        ("procrustes", 3), ("procrustes", 10), ("procrustes", 40),
        ("linear", 3), ("linear", 10), ("linear", 40)]
    assert "needs at least 6 pairs, got 3" in rows[0]["error"]
    assert "needs at least 7 pairs, got 3" in rows[3]["error"]
    assert rows[2]["error"] is None and rows[2]["adapted"]["map"] > 0


@pytest.mark.parametrize(("args", "message"), [
    (["--kind", "lineal"], "error: unknown adapter kind 'lineal'; did you mean linear?"),
    (["--kind", "linear", "--direction", "sideways"], "error: unknown direction 'sideways'"),
])
def test_fit_user_errors_are_one_line(pair_files, tmp_path, args, message):
    p = pair_files
    base = ["fit", "--old", str(p["old"]), "--new", str(p["new"]), "--out", str(tmp_path / "a")]
    if "--direction" not in args:
        args = [*args, "--direction", "old-to-new"]
    res = run_cli(*base, *args)
    assert res.returncode == 2
    assert res.stderr.strip().splitlines()[-1].startswith(message)
    assert not (tmp_path / "a").exists()


def test_fit_rejects_mismatched_files(pair_files, tmp_path):
    np.save(tmp_path / "short.npy", np.ones((39, 6), dtype=np.float32))
    res = run_cli("fit", "--old", str(pair_files["old"]), "--new", str(tmp_path / "short.npy"),
                  "--kind", "linear", "--direction", "old-to-new", "--out", str(tmp_path / "a"))
    assert res.returncode == 2
    assert "old 40 rows, new 39 rows" in res.stderr


def test_fit_rejects_an_unknown_file_type(pair_files, tmp_path):
    (tmp_path / "v.csv").write_text("1,2\n")
    res = run_cli("fit", "--old", str(tmp_path / "v.csv"), "--new", str(pair_files["new"]),
                  "--kind", "linear", "--direction", "old-to-new", "--out", str(tmp_path / "a"))
    assert res.returncode == 2
    assert "unknown suffix '.csv'" in res.stderr
