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


def _hash_collection(tmp_path, *create_args: str) -> list[str]:
    store = ["--store", str(tmp_path / "st")]
    run("version", "vA", "--dim", "4", "--hash-seed", "0", *store)
    run("version", "vB", "--dim", "4", "--hash-seed", "1", *store)
    run("create", "c", "--version", "vA", *create_args, *store)
    items = tmp_path / "items.jsonl"
    items.write_text("\n".join(json.dumps({"id": f"i{i}", "source": f"s{i}"}) for i in range(9)))
    run("add", "c", "--jsonl", str(items), *store)
    return store


def test_create_on_qdrant_local_mode_then_drop_removes_its_collections(tmp_path):
    from qdrant_client import QdrantClient

    from compatkit.index import IndexStore
    from compatkit.index.qdrant_backend import close_clients

    store = _hash_collection(tmp_path, "--engine", "qdrant", "--qdrant-location", "qd",
                             "--index", "hnsw", "--hnsw-m", "8", "--namespace", "t")
    probe = HashEmbedder("vA", 4, seed=0).embed_sources(["s4"])[0].tolist()
    out = json.loads(run("search", "c", "--vector", json.dumps(probe), "-k", "1", *store,
                         "--json"))
    assert out["hits"][0]["id"] == "i4"
    st = IndexStore(tmp_path / "st")
    assert st.collection("c").stats().items == 9
    st.drop_collection("c")
    st.close()
    close_clients()
    client = QdrantClient(path=str(tmp_path / "st" / "qd"))
    assert client.get_collections().collections == []
    assert client.get_aliases().aliases == []
    client.close()


def test_create_rejects_bad_engine_options(tmp_path):
    run("version", "vA", "--dim", "4", "--store", str(tmp_path / "st"))
    with pytest.raises(ValueError, match="qdrant engine needs a location"):
        runner.invoke(app, ["index", "create", "c", "--version", "vA", "--engine", "qdrant",
                            "--store", str(tmp_path / "st")], catch_exceptions=False)
    with pytest.raises(ValueError, match="nprobe must be a positive integer"):
        runner.invoke(app, ["index", "create", "c", "--version", "vA", "--nprobe", "0",
                            "--store", str(tmp_path / "st")], catch_exceptions=False)


def test_work_on_two_torchrun_workers(tmp_path):
    store = _hash_collection(tmp_path)
    run("upgrade", "c", "--to", "vB", "--strategy", "cold", "--batch-size", "2", "--no-run",
        *store)
    with pytest.raises(ValueError, match="local engine runs 1 worker"):
        runner.invoke(app, ["index", "work", "c", "--workers", "2", *store],
                      catch_exceptions=False)
    done = json.loads(run("work", "c", "--engine", "torchrun", "--workers", "2", "--device",
                          "cpu", *store, "--json"))
    assert (done["state"], done["done"], done["total"]) == ("completed", 9, 9)
    assert json.loads(run("status", "c", *store, "--json"))["collection"]["current"] == {"vB": 9}


def test_create_defaults_are_the_backend_defaults():
    import inspect

    from compatkit.index.backends import BackendOptions
    from compatkit.index.cli import create

    params = inspect.signature(create).parameters
    shared = {"engine", "namespace", "nlist", "nprobe", "hnsw_m", "ef_search", "ef_construction"}
    assert {k: params[k].default for k in shared} == {
        k: BackendOptions._field_defaults[k] for k in shared}
