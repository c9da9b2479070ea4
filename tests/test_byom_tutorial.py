"""``docs/bring-your-own-model.md`` runs as written: every command of its ``bash`` blocks, in
order, in a fresh folder (tiny models, 80 images), then the upgraded collection is checked."""

from __future__ import annotations

import os
import shlex
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from compatkit.cli import app

ROOT = Path(__file__).resolve().parents[1]
DOC = ROOT / "docs" / "bring-your-own-model.md"


def tutorial_commands(text: str) -> list[tuple[str, list[str] | str]]:
    """The commands of the page's ``bash`` blocks: ("compatkit", argv) or ("python", script)
    for a ``python - <<'EOF'`` here-document."""
    commands: list[tuple[str, list[str] | str]] = []
    in_block, heredoc = False, None
    for line in text.splitlines():
        if not in_block:
            in_block = line.strip() == "```bash"
            continue
        if heredoc is not None:
            if line.strip() == "EOF":
                commands.append(("python", "\n".join(heredoc)))
                heredoc = None
            else:
                heredoc.append(line)
        elif line.strip() == "```":
            in_block = False
        elif line.strip() == "python - <<'EOF'":
            heredoc = []
        elif line.strip() and not line.startswith("#"):
            argv = shlex.split(line)
            assert argv[0] == "compatkit", f"the tutorial runs only compatkit commands: {line}"
            commands.append(("compatkit", argv[1:]))
    return commands


@pytest.mark.slow
def test_the_tutorial_runs_as_written(tmp_path, monkeypatch):
    import torch

    from compatkit.index import IndexStore
    from compatkit.index.embedders import ArtifactEmbedder

    torch.set_num_threads(1)
    monkeypatch.chdir(tmp_path)
    (tmp_path / "configs").symlink_to(ROOT / "configs")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT / "src"),
                                                        os.environ.get("PYTHONPATH", "")])}
    commands = tutorial_commands(DOC.read_text())
    assert [c[1][:2] for c in commands if c[0] == "compatkit"][:4] == [
        ["train", "configs/synthetic/old.yaml"], ["train", "configs/synthetic/bct.yaml"],
        ["export", "runs/v1"], ["export", "runs/v2"]]
    searches = []
    runner = CliRunner()
    for kind, command in commands:
        if kind == "python":
            proc = subprocess.run([sys.executable, "-"], input=command, text=True, env=env,
                                  capture_output=True, timeout=120, check=False)
            assert proc.returncode == 0, proc.stderr
            continue
        result = runner.invoke(app, command, catch_exceptions=False)
        assert result.exit_code == 0, f"{command}: {result.output}"
        if command[:2] == ["index", "search"]:
            searches.append(result.output.splitlines())

    # each search finds the query photo itself first, answered by v1 then by v2
    assert [s[0].split("\t")[1::2] for s in searches] == [["000.png", "v1"], ["000.png", "v2"]]
    store = IndexStore(tmp_path / "store")
    coll = store.collection("photos")
    assert coll.serving_version == "v2" and coll.stats().current == {"v2": 80}
    native = ArtifactEmbedder(tmp_path / "runs" / "v2" / "model").embed_sources(
        [str(tmp_path / "photos" / f"{i:03d}.png") for i in (0, 41, 79)])
    stored = np.stack([coll.get(f"{i:03d}.png", with_vectors=True).current.vector
                       for i in (0, 41, 79)])
    np.testing.assert_allclose(stored, native, atol=1e-5)  # TorchScript v2 == compatkit v2
    assert store.collection("test-set").count() > 0
    store.close()
