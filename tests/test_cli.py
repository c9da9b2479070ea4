"""The command line: eval and curve on features made elsewhere, listings, one-line user errors."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

SRC = Path(__file__).resolve().parents[1] / "src"


def run_cli(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": f"{SRC}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    return subprocess.run([sys.executable, "-m", "compatkit", *args], capture_output=True,
                          text=True, env=env, timeout=120)


@pytest.fixture()
def feature_files(tmp_path):
    # 2-D features at known angles: queries q0, q1; gallery g0..g3
    q = np.array([[1.0, 0.0], [0.0, 1.0]], dtype=np.float32)
    ql = np.array([0, 1])
    g = np.array([[0.9, 0.1], [0.1, 0.9], [0.8, 0.6], [-1.0, 0.0]], dtype=np.float32)
    gl = np.array([1, 1, 0, 0])
    paths = {}
    for name, arr in {"q": q, "ql": ql, "g": g, "gl": gl}.items():
        paths[name] = tmp_path / f"{name}.npy"
        np.save(paths[name], arr)
    return paths


def test_eval_json_on_npy_features(feature_files):
    p = feature_files
    res = run_cli("eval", "--query-features", str(p["q"]), "--query-labels", str(p["ql"]),
                  "--gallery-features", str(p["g"]), "--gallery-labels", str(p["gl"]),
                  "--metrics", "map,cmc@1,cmc@5", "--json")
    assert res.returncode == 0, res.stderr
    out = json.loads(res.stdout)
    assert list(out) == ["map", "cmc@1", "cmc@5"]
    # q0=(1,0) ranks g0 (0.99 cos, label 1 ✗), g2 (0.8, ✓), g1 (✗), g3 (✓) → AP = (1/2 + 2/4)/2
    # q1=(0,1) ranks g1 (✓), g2 (0.6), g0 (✓ at 3) , g3 → AP = (1 + 2/3)/2
    assert out["map"] == pytest.approx(((0.5 + 0.5) / 2 + (1 + 2 / 3) / 2) / 2, abs=1e-6)
    assert out["cmc@1"] == pytest.approx(0.5)
    assert out["cmc@5"] == pytest.approx(1.0)


def test_eval_exclude_self_requires_the_same_items(feature_files):
    p = feature_files
    res = run_cli("eval", "--query-features", str(p["q"]), "--query-labels", str(p["ql"]),
                  "--gallery-features", str(p["g"]), "--gallery-labels", str(p["gl"]),
                  "--exclude-self", "--json")
    assert res.returncode == 2
    assert res.stdout == ""
    assert res.stderr.startswith("error:") and len(res.stderr.strip().splitlines()) == 1


def test_eval_user_errors_are_one_line(feature_files, tmp_path):
    p = feature_files
    bad = tmp_path / "nan.npy"
    np.save(bad, np.array([[np.nan, 0.0], [0.0, 1.0]], dtype=np.float32))
    cases = [
        (["--query-features", str(bad), "--query-labels", str(p["ql"])], "NaN"),
        (["--query-features", str(tmp_path / "missing.npy"), "--query-labels", str(p["ql"])],
         "does not exist"),
        (["--query-features", str(p["q"]), "--query-labels", str(p["gl"])], "label"),
    ]
    for query_args, needle in cases:
        res = run_cli("eval", *query_args, "--gallery-features", str(p["g"]),
                      "--gallery-labels", str(p["gl"]), "--json")
        assert res.returncode == 2, res
        assert needle.lower() in res.stderr.lower(), res.stderr
        assert "Traceback" not in res.stderr


def test_curve_ends_at_the_old_and_new_galleries_and_backfill_is_its_deprecated_name(
        feature_files, tmp_path):
    p = feature_files
    new = tmp_path / "new.npy"  # each item on its class's axis: every query ranks perfectly
    np.save(new, np.array([[0.0, 1.0], [0.0, 1.0], [1.0, 0.0], [1.0, 0.0]], dtype=np.float32))
    args = ["--query-features", str(p["q"]), "--query-labels", str(p["ql"]),
            "--old-gallery-features", str(p["g"]), "--new-gallery-features", str(new),
            "--gallery-labels", str(p["gl"]), "--steps", "2", "--json"]
    res = run_cli("curve", *args)
    assert res.returncode == 0, res.stderr
    out = json.loads(res.stdout)
    assert out["fractions"] == [0.0, 1.0]
    # fraction 0 is `eval` on the old gallery (see test_eval_json_on_npy_features)
    assert out["map"] == pytest.approx([((0.5 + 0.5) / 2 + (1 + 2 / 3) / 2) / 2, 1.0], abs=1e-6)
    assert out["cmc@1"] == pytest.approx([0.5, 1.0])
    old_name = run_cli("backfill", *args)
    assert old_name.returncode == 0, old_name.stderr
    assert old_name.stdout == res.stdout
    assert "`compatkit backfill` is deprecated; use `compatkit curve`" in old_name.stderr
    assert "deprecated" not in res.stderr


def test_listings_name_first():
    methods = run_cli("methods")
    assert methods.returncode == 0
    names = [line.split("\t")[0] for line in methods.stdout.splitlines()]
    assert {"independent", "l2", "bct"} <= set(names)
    datasets = run_cli("datasets")
    names = [line.split("\t")[0] for line in datasets.stdout.splitlines()]
    assert {"synthetic", "omniglot", "cifar10", "cifar100", "mnist", "fashion_mnist",
            "imagefolder"} <= set(names)


def test_unknown_dataset_is_a_user_error(tmp_path):
    res = run_cli("train", "--set", "data.name=nope", "--out", str(tmp_path))
    assert res.returncode == 2
    assert "unknown dataset 'nope'" in res.stderr


def _main(monkeypatch, capsys, *args: str) -> tuple[int, str, str]:
    """Run the console entry point in this process: (exit status, stdout, stderr)."""
    from compatkit.cli import main

    monkeypatch.setattr(sys, "argv", ["compatkit", *args])
    with pytest.raises(SystemExit) as exc:
        main()
    out = capsys.readouterr()
    return exc.value.code, out.out, out.err


@pytest.mark.parametrize(("args", "message"), [
    (["index", "search", "c", "-k", "abc"], "error: Invalid value for '-k'"),
    (["index", "nosuchcmd"], "error: No such command 'nosuchcmd'"),
    (["index", "search"], "error: Missing argument 'name'"),
    (["index", "search", "c", "--bogus"], "error: No such option: --bogus"),
    (["nosuchverb"], "error: No such command 'nosuchverb'"),
])
def test_usage_errors_are_one_line_and_exit_2(monkeypatch, capsys, args, message):
    code, out, err = _main(monkeypatch, capsys, *args)
    assert code == 2
    assert out == ""
    assert err.startswith(message), err
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err
    assert "--help" in err  # where to look next


@pytest.mark.parametrize("args", [[], ["index"], ["--help"]])
def test_bare_command_prints_help_and_succeeds(monkeypatch, capsys, args):
    code, out, err = _main(monkeypatch, capsys, *args)
    assert code == 0
    assert "Usage:" in out and "Traceback" not in out + err


def test_eval_on_a_text_file_named_npy_says_it_is_not_numpy(monkeypatch, capsys, tmp_path):
    fake = tmp_path / "q.npy"
    fake.write_text("0.1 0.2\n0.3 0.4\n")
    code, _, err = _main(monkeypatch, capsys, "eval", "--query-features", str(fake),
                         "--query-labels", str(fake), "--gallery-features", str(fake),
                         "--gallery-labels", str(fake))
    assert code == 2
    assert err.strip() == (f"error: query features file {fake} is not a numpy file (.npy written "
                           "by numpy.save); for a features file use .safetensors")
