"""``compatkit index ...`` commands, run through typer's test runner."""

from __future__ import annotations

import json

import pytest
import typer
from typer.testing import CliRunner

from compatkit.errors import CompatkitError
from compatkit.index import HashEmbedder
from compatkit.index.cli import index_app, serve

app = typer.Typer()
app.add_typer(index_app, name="index")
app.command("serve")(serve)
runner = CliRunner()


def run(*args: str) -> str:
    result = runner.invoke(app, ["index", *args], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    return result.output


def test_create_add_search_upgrade_status_rollback(tmp_path):
    store = ["--store", str(tmp_path / "st")]
    run("version", "vA", "--dim", "4", "--hash-seed", "0", *store)
    run("version", "vB", "--dim", "4", "--hash-seed", "1", *store)
    run("relate", "compatible", "vA", "vB", *store)
    created = json.loads(run("create", "c", "--version", "vA", *store, "--json"))
    assert (created["serving_version"], created["items"]) == ("vA", 0)
    items = tmp_path / "items.jsonl"
    items.write_text("\n".join(json.dumps({"id": f"i{i}", "source": f"s{i}",
                                           "metadata": {"n": i}}) for i in range(7))
                     + '\n{"id": "v", "vector": [0, 0, 1, 0]}\n')
    assert json.loads(run("add", "c", "--jsonl", str(items), *store, "--json"))["items"] == 8
    out = json.loads(run("search", "c", "--vector", "[0, 0, 2, 0]", "-k", "1", *store, "--json"))
    assert out["hits"][0]["id"] == "v"
    assert out["hits"][0]["score"] == pytest.approx(1.0)
    status = json.loads(run("upgrade", "c", "--to", "vB", "--batch-size", "3", *store, "--json"))
    assert (status["state"], status["done"], status["skipped"]) == ("completed", 7, 1)
    probe = HashEmbedder("vB", 4, seed=1).embed_sources(["s3"])[0].tolist()
    text = run("search", "c", "--vector", json.dumps(probe), "--version", "vB", "-k", "2",
               *store)
    assert text.splitlines()[0].split("\t")[:2] == ["1", "i3"]
    st = json.loads(run("status", "c", *store, "--json"))
    assert st["collection"]["current"] == {"vA": 1, "vB": 7}
    assert json.loads(run("rollback", "c", *store, "--json"))["state"] == "rolled_back"
    assert "collection\tc" in run("list", *store)


def test_upgrade_without_run_then_work(tmp_path):
    store = ["--store", str(tmp_path / "st")]
    run("version", "vA", "--dim", "4", "--hash-seed", "0", *store)
    run("version", "vB", "--dim", "4", "--hash-seed", "1", *store)
    run("create", "c", "--version", "vA", *store)
    items = tmp_path / "items.jsonl"
    items.write_text("\n".join(json.dumps({"id": f"i{i}", "source": f"s{i}"}) for i in range(5)))
    run("add", "c", "--jsonl", str(items), *store)
    started = json.loads(run("upgrade", "c", "--to", "vB", "--strategy", "cold", "--no-run",
                             *store, "--json"))
    assert (started["state"], started["done"]) == ("running", 0)
    assert json.loads(run("work", "c", *store, "--json"))["state"] == "completed"
    assert json.loads(run("finalize", "c", *store, "--json"))["state"] == "finalized"


def test_user_errors_raise_compatkit_errors(tmp_path):
    with pytest.raises(CompatkitError, match="holds no index store"):
        runner.invoke(app, ["index", "status", "c", "--store", str(tmp_path / "none")],
                      catch_exceptions=False)
    run("version", "vA", "--dim", "4", "--store", str(tmp_path / "st"))
    with pytest.raises(CompatkitError, match="give exactly one of --images, --features, --jsonl"):
        runner.invoke(app, ["index", "add", "c", "--store", str(tmp_path / "st")],
                      catch_exceptions=False)


def test_serve_refuses_a_weak_token(tmp_path):
    with pytest.raises(CompatkitError, match="admin_token must be at least 16 characters"):
        runner.invoke(app, ["serve", "--store", str(tmp_path), "--token", "short"],
                      catch_exceptions=False)
