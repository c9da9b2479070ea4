"""``compatkit index ...`` commands, run through typer's test runner."""

from __future__ import annotations

import datetime
import json
import time

import numpy as np
import pytest
import typer
from typer.testing import CliRunner

from compatkit.errors import CompatkitError, UnknownNameError
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


def _fails(*args: str) -> Exception:
    """The exception an ``index`` command raises (the console entry point prints it)."""
    result = runner.invoke(app, ["index", *args])
    assert result.exit_code != 0 and result.exception is not None, result.output
    return result.exception


def test_a_failed_jsonl_add_stores_nothing(tmp_path):
    store = _hash_collection(tmp_path)  # 9 items i0..i8
    lines = [json.dumps({"id": f"g{i}", "vector": [1.0, float(i), 0.0, 0.0]}) for i in range(300)]
    lines.insert(290, json.dumps({"id": "bad", "vector": [1.0, "x", 0.0, 0.0]}))
    lines.append(json.dumps({"id": "i0", "vector": [0.0, 0.0, 0.0, 1.0]}))  # a replacement
    items = tmp_path / "many.jsonl"
    items.write_text("\n".join(lines))
    before = run("search", "c", "--vector", "[0, 0, 0, 1]", "-k", "9", *store, "--json")
    err = _fails("add", "c", "--jsonl", str(items), *store)
    assert isinstance(err, CompatkitError)
    assert str(err) == "item 'bad' vector must be numbers, got list; nothing was added"
    assert json.loads(run("status", "c", *store, "--json"))["collection"]["items"] == 9
    assert run("search", "c", "--vector", "[0, 0, 0, 1]", "-k", "9", *store, "--json") == before
    lines[290] = json.dumps({"id": "bad", "vector": [1.0, 2.0, 0.0, 0.0]})
    items.write_text("\n".join(lines))
    out = json.loads(run("add", "c", "--jsonl", str(items), *store, "--json"))
    assert (out["added"], out["replaced"], out["items"]) == (301, 1, 310)


def test_a_failed_image_add_stores_nothing(tmp_path, make_model):
    from PIL import Image

    folder = tmp_path / "images"
    rng = np.random.default_rng(0)
    for i in range(300):  # a bad image past the first embedding chunk (256)
        sub = folder / ("a" if i < 150 else "b")
        sub.mkdir(parents=True, exist_ok=True)
        Image.fromarray(rng.integers(0, 255, (16, 16), dtype=np.uint8)).save(sub / f"{i}.png")
    (folder / "b" / "zz.png").write_text("not an image")
    store = ["--store", str(tmp_path / "st")]
    run("create", "c", "--artifact", make_model("m1"), *store)
    err = _fails("add", "c", "--images", str(folder), *store)
    assert isinstance(err, CompatkitError)
    assert "zz.png" in str(err) and str(err).endswith("; nothing was added")
    assert json.loads(run("status", "c", *store, "--json"))["collection"]["items"] == 0
    (folder / "b" / "zz.png").unlink()
    assert json.loads(run("add", "c", "--images", str(folder), *store, "--json"))["items"] == 300


def test_jsonl_directory_status_times_and_unknown_job(tmp_path):
    store = _hash_collection(tmp_path)
    err = _fails("add", "c", "--jsonl", str(tmp_path), *store)
    assert str(err) == f"--jsonl {tmp_path} is a directory; expected a JSON-lines file"
    err = _fails("status", "c", "--job", "999", *store)
    assert isinstance(err, UnknownNameError) and str(err) == "unknown upgrade job 999"
    assert "upgrade" not in run("status", "c", *store)  # never upgraded: no job, no error
    run("upgrade", "c", "--to", "vB", "--strategy", "cold", *store)
    text = dict(line.split("\t", 1) for line in run("status", "c", *store).splitlines())
    for key in ("upgrade.created", "upgrade.updated", "upgrade.finished"):
        stamp = datetime.datetime.fromisoformat(text[key])
        assert stamp.tzinfo is not None
        assert abs(stamp.timestamp() - time.time()) < 600
    as_json = json.loads(run("status", "c", *store, "--json"))["upgrade"]
    assert isinstance(as_json["created"], float)  # machines get epoch seconds


def test_serve_never_echoes_a_rejected_token(tmp_path):
    token = "short-Secret"
    result = runner.invoke(app, ["serve", "--store", str(tmp_path), "--token", token])
    assert isinstance(result.exception, CompatkitError)
    assert token not in str(result.exception) and token not in result.output
    assert "at least 16 characters" in str(result.exception)


def test_version_takes_the_hash_anchor_options_of_the_http_api(tmp_path):
    from compatkit.index import IndexStore

    store = ["--store", str(tmp_path / "st")]
    run("version", "vA", "--dim", "8", "--hash-seed", "0", *store)
    run("version", "vB", "--dim", "8", "--hash-seed", "1", "--anchor-seed", "0",
        "--anchor-weight", "0.7", *store)
    st = IndexStore(tmp_path / "st")
    want = HashEmbedder("vB", 8, seed=1, anchor_seed=0, anchor_weight=0.7)
    np.testing.assert_array_equal(st.embedder("vB").embed_sources(["s1", "s2"]),
                                  want.embed_sources(["s1", "s2"]))
    st.close()
    err = _fails("version", "vC", "--dim", "8", "--anchor-seed", "0", *store)
    assert str(err) == "--anchor-seed and --anchor-weight need --hash-seed"
