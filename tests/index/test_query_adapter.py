"""Serving through a query adapter: a transformation new -> old maps new-model queries onto a
collection's old vectors, a hot-refresh upgrade moves items to new while both groups answer
one merged top-k, and a score calibration stored with the relation rescales the adapted group."""

from __future__ import annotations

import json
import re
import sqlite3
import warnings

import numpy as np
import pytest
import typer
from typer.testing import CliRunner

from compatkit.errors import CompatkitError
from compatkit.index import HashEmbedder, IndexStore, ItemInput, rollback, run_backfill
from compatkit.index.cli import index_app
from compatkit.index.db import DB_NAME, SCHEMA_VERSION
from compatkit.index.service import ServiceSettings, create_app
from compatkit.index.vectors import l2_normalize
from compatkit.score_calibration import ScoreCalibration, fit_score_calibration

with warnings.catch_warnings():
    warnings.simplefilter("ignore")  # starlette's note about httpx2
    from fastapi.testclient import TestClient

D_OLD, D_NEW = 8, 6
OLD = HashEmbedder("vA", D_OLD, seed=0)
NEW = HashEmbedder("vB", D_NEW, seed=1)
PAIRS = [f"pair{i}" for i in range(30)]


def open_store(path) -> IndexStore:
    st = IndexStore(path)
    st.register_version("vA", dim=D_OLD, embedder=OLD)
    st.register_version("vB", dim=D_NEW, embedder=NEW)
    return st


@pytest.fixture()
def adapter(make_transformation):
    """A new -> old transformation artifact (vB 6-d queries into vA's 8-d space)."""
    return make_transformation("adapter", "vB", "vA", d_old=D_NEW, d_new=D_OLD, seed=3)


@pytest.fixture()
def st(tmp_path):
    store = open_store(tmp_path / "store")
    yield store
    store.close()


def old_collection(store: IndexStore, n: int = 40):
    coll = store.create_collection("c", "vA")
    coll.add([ItemInput(f"i{i}", source=f"src{i}") for i in range(n)])
    return coll


def pair_vectors() -> dict[str, np.ndarray]:
    """The paired sample of the relation vB -> vA: vB vectors (from) and vA vectors (to)."""
    return {"from_vectors": NEW.embed_sources(PAIRS), "to_vectors": OLD.embed_sources(PAIRS)}


def brute_merge(store, coll, queries, k, calibration):
    """(ids, scores) per query: vB items scored directly, vA items through the adapter."""
    rel = next(r for r in store.relations() if r.kind == "transform")
    adapted = l2_normalize(store.transformer(rel).apply(queries))
    q = l2_normalize(queries)
    ids, rows = [], []
    for item_id in coll.list_ids(limit=10_000):
        cur = coll.get(item_id, with_vectors=True).current
        if cur.version == "vB":
            rows.append(q @ l2_normalize(cur.vector[None, :])[0])
        else:
            s = adapted @ l2_normalize(cur.vector[None, :])[0]
            rows.append(s if calibration is None else calibration.apply(s))
        ids.append(item_id)
    scores = np.stack(rows, axis=1)
    out = []
    for row in scores:
        top = sorted(range(len(ids)), key=lambda j: (-row[j], j))[:k]
        out.append(([ids[j] for j in top], row[top]))
    return out


def test_new_queries_search_the_old_collection_through_the_adapter(st, adapter):
    coll = old_collection(st)
    st.declare_transform("vB", "vA", adapter)
    queries = NEW.embed_sources([f"q{i}" for i in range(5)])
    expected = brute_merge(st, coll, queries, 7, None)
    for res, (ids, scores) in zip(coll.search_batch(queries, version="vB", k=7), expected,
                                  strict=True):
        assert [h.id for h in res.hits] == ids
        assert {h.version for h in res.hits} == {"vA"}
        np.testing.assert_allclose([h.score for h in res.hits], scores, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("calibrate", [False, True])
def test_mixed_search_during_a_hot_refresh_equals_a_brute_force_merge(st, adapter, calibrate):
    coll = old_collection(st)
    rel = st.declare_transform("vB", "vA", adapter, calibrate=calibrate or None,
                               **(pair_vectors() if calibrate else {}))
    assert (rel.calibration is not None) == calibrate
    status = coll.start_upgrade("vB", strategy="hot-refresh", batch_size=8, seed=1)
    assert coll.serving_version == "vB"
    run_backfill(st, status.job, max_batches=2)
    assert coll.stats().current == {"vA": 24, "vB": 16}
    queries = NEW.embed_sources([f"q{i}" for i in range(6)])
    expected = brute_merge(st, coll, queries, 12, rel.calibration)
    results = coll.search_batch(queries, version="vB", k=12)
    versions = set()
    for res, (ids, scores) in zip(results, expected, strict=True):
        assert [h.id for h in res.hits] == ids
        np.testing.assert_allclose([h.score for h in res.hits], scores, rtol=1e-5, atol=1e-6)
        versions |= {h.version for h in res.hits}
    assert versions == {"vA", "vB"}  # both groups answer
    if calibrate:  # the calibration changes the merge, so the test above can tell them apart
        plain = brute_merge(st, coll, queries, 12, None)
        assert [ids for ids, _ in plain] != [ids for ids, _ in expected]


def test_the_upgrade_completes_and_rolls_back_through_the_adapter(st, adapter):
    coll = old_collection(st, 10)
    st.declare_transform("vB", "vA", adapter)
    job = coll.start_upgrade("vB", batch_size=4).job
    assert run_backfill(st, job).state == "completed"
    assert coll.stats().current == {"vB": 10}
    hit = coll.search(NEW.embed_sources(["src3"])[0], version="vB", k=1).hits[0]
    assert (hit.id, hit.version, hit.score) == ("i3", "vB", pytest.approx(1.0, abs=1e-6))
    rollback(st, job)
    assert coll.stats().current == {"vA": 10}
    assert coll.search(NEW.embed_sources(["q"])[0], version="vB", k=3).hits[0].version == "vA"


def test_the_calibration_round_trips_through_the_store(tmp_path, adapter):
    st = open_store(tmp_path / "s")
    pairs = pair_vectors()
    rel = st.declare_transform("vB", "vA", adapter, calibrate=True, **pairs)
    mapped = st.transformer(rel).apply(pairs["from_vectors"])
    expected = fit_score_calibration(mapped, pairs["to_vectors"], pairs["from_vectors"])
    assert rel.calibration == expected
    assert rel.calibration.pairs == len(PAIRS)
    assert rel.describe() == "transformation vB -> vA, scores calibrated"
    assert st.declare_transform("vB", "vA", adapter).calibration == expected  # kept
    st.close()
    again = IndexStore(tmp_path / "s")
    assert [r.calibration for r in again.relations()] == [expected]
    assert again.declare_transform("vB", "vA", adapter, calibrate=False).calibration is None
    assert again.relations()[0].calibration is None
    again.close()


def test_register_artifact_calibrates_a_transformation(st, adapter, make_model):
    rel = st.register_artifact(adapter, calibrate=True, **pair_vectors())
    assert (rel.old, rel.new, rel.calibration is not None) == ("vB", "vA", True)
    model = make_model("m1")
    with pytest.raises(CompatkitError, match="holds a model: score calibration applies to a "
                                             "transformation"):
        st.register_artifact(model, calibrate=True, **pair_vectors())
    assert "m1" not in [v.name for v in st.versions()]


@pytest.mark.parametrize(("kwargs", "message"), [
    ({"calibrate": True}, "calibrating transformation vB -> vA needs a paired sample: "
                          "from_vectors ('vB' vectors) and to_vectors ('vA' vectors of the "
                          "same items)"),
    ({"calibrate": True, "from_vectors": np.ones((5, D_NEW)), "to_vectors": np.ones((4, D_OLD))},
     "from_vectors has 5 rows but to_vectors 4; row i of each is the same item"),
    ({"calibrate": True, "from_vectors": np.ones((5, D_OLD)), "to_vectors": np.ones((5, D_OLD))},
     "from_vectors must be (n, 6) 'vB' vectors, got shape (5, 8)"),
    ({"calibrate": True, "from_vectors": np.full((5, D_NEW), np.nan),
      "to_vectors": np.ones((5, D_OLD))}, "from_vectors row 0 holds NaN or infinite values"),
    ({"calibrate": True, "from_vectors": np.ones((2, D_NEW)), "to_vectors": np.ones((2, D_OLD))},
     "a score calibration needs at least 3 paired items, got 2"),
    ({"from_vectors": np.ones((5, D_NEW)), "to_vectors": np.ones((5, D_OLD))},
     "from_vectors and to_vectors are the paired sample of calibrate=True"),
])
def test_bad_calibration_requests_declare_nothing(st, adapter, kwargs, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        st.declare_transform("vB", "vA", adapter, **kwargs)
    assert st.relations() == []


def test_a_transformation_with_side_information_takes_no_calibration(st, make_transformation):
    st.register_version("side", dim=4, kind="side_info")
    art = make_transformation("t", "vB", "vA", d_old=D_NEW, d_new=D_OLD, d_side=4)
    with pytest.raises(CompatkitError, match="needs side-information, so it cannot map queries"):
        st.declare_transform("vB", "vA", art, side_version="side", calibrate=True,
                             **pair_vectors())
    assert st.relations() == []


def _downgrade_to_schema_1(path) -> None:
    """Rewrite a store folder's database as schema version 1 wrote it (no calibration)."""
    con = sqlite3.connect(path / DB_NAME)
    con.execute("ALTER TABLE relations DROP COLUMN calibration")
    con.execute("UPDATE meta SET value='1' WHERE key='schema_version'")
    con.commit()
    con.close()


def test_a_schema_1_store_is_migrated(tmp_path, adapter):
    st = open_store(tmp_path / "s")
    st.declare_transform("vB", "vA", adapter)
    st.register_version("vA2", dim=D_OLD)
    st.declare_compatible("vA2", "vA")
    old_collection(st, 5)
    st.close()
    _downgrade_to_schema_1(tmp_path / "s")
    con = sqlite3.connect(tmp_path / "s" / DB_NAME)
    assert "calibration" not in [r[1] for r in con.execute("PRAGMA table_info(relations)")]
    con.close()
    again = IndexStore(tmp_path / "s")
    with again.read() as con:
        assert con.execute("SELECT value FROM meta WHERE key='schema_version'").fetchone()[0] \
            == SCHEMA_VERSION == "2"
    assert [(r.kind, r.old, r.new, r.calibration) for r in again.relations()] == [
        ("compatible", "vA", "vA2", None), ("transform", "vB", "vA", None)]
    assert again.collection("c").count() == 5
    rel = again.declare_transform("vB", "vA", adapter, calibrate=True, **pair_vectors())
    assert again.relations()[1] == rel and rel.calibration is not None
    again.close()


def test_a_newer_schema_is_refused(tmp_path):
    IndexStore(tmp_path / "s").close()
    con = sqlite3.connect(tmp_path / "s" / DB_NAME)
    con.execute("UPDATE meta SET value='99' WHERE key='schema_version'")
    con.commit()
    con.close()
    with pytest.raises(CompatkitError, match="has schema version 99, this code reads 2"):
        IndexStore(tmp_path / "s")


def test_cli_declares_a_calibrated_adapter_and_starts_the_upgrade(tmp_path, adapter):
    app = typer.Typer()
    app.add_typer(index_app, name="index")
    runner = CliRunner()

    def run(*args: str) -> str:
        result = runner.invoke(app, ["index", *args, "--store", str(tmp_path / "st")],
                               catch_exceptions=False)
        assert result.exit_code == 0, result.output
        return result.output

    st = open_store(tmp_path / "st")
    old_collection(st, 12)
    st.close()
    pairs = pair_vectors()
    np.save(tmp_path / "from.npy", pairs["from_vectors"])
    np.savez(tmp_path / "to.npz", vectors=pairs["to_vectors"])
    rel = json.loads(run("register", adapter, "--calibrate", "--from-vectors",
                         str(tmp_path / "from.npy"), "--to-vectors", str(tmp_path / "to.npz"),
                         "--json"))
    assert set(rel["calibration"]) == {"scale", "shift", "pairs"}
    assert rel["calibration"]["pairs"] == len(PAIRS)
    status = json.loads(run("upgrade", "c", "--to", "vB", "--no-run", "--json"))
    assert (status["state"], status["total"]) == ("running", 12)
    out = json.loads(run("search", "c", "--vector", json.dumps([1.0] * D_NEW), "--version", "vB",
                         "-k", "3", "--json"))
    assert [h["version"] for h in out["hits"]] == ["vA"] * 3
    rel = json.loads(run("relate", "transform", "vB", "vA", "--artifact", adapter,
                         "--no-calibrate", "--json"))
    assert rel["calibration"] is None
    result = runner.invoke(app, ["index", "relate", "compatible", "vA", "vB", "--calibrate",
                                 "--store", str(tmp_path / "st")])
    assert result.exit_code != 0
    assert "apply to a transform relation" in str(result.exception)


def test_http_declares_a_calibrated_adapter_and_starts_the_upgrade(st, adapter, tmp_path):
    token = "t0ken-for-tests-0123456789"
    auth = {"Authorization": f"Bearer {token}"}
    old_collection(st, 12)
    pairs = pair_vectors()
    np.save(tmp_path / "from.npy", pairs["from_vectors"])
    np.save(tmp_path / "to.npy", pairs["to_vectors"])
    app = create_app(st, ServiceSettings(admin_token=token, run_worker=False))
    with TestClient(app) as client:
        body = {"kind": "transform", "old": "vB", "new": "vA", "artifact": adapter,
                "calibrate": True, "from_vectors": str(tmp_path / "from.npy"),
                "to_vectors": str(tmp_path / "to.npy")}
        assert client.post("/relations", json=body).status_code == 401
        r = client.post("/relations", headers=auth, json={**body, "to_vectors": "nope.npy"})
        assert (r.status_code, r.json()) == (422, {"detail": "vectors file nope.npy does not "
                                                             "exist"})
        r = client.post("/relations", headers=auth, json=body)
        assert r.status_code == 201, r.json()
        cal = st.relations()[0].calibration
        assert r.json()["calibration"] == cal.to_json()
        assert r.json()["description"] == "transformation vB -> vA, scores calibrated"
        r = client.post("/collections/c/upgrades", headers=auth,
                        json={"version": "vB", "batch_size": 4})
        assert (r.status_code, r.json()["phases"]) == (201, ["refresh(live, random)"])
        run_backfill(st, r.json()["job"], max_batches=1)
        query = NEW.embed_sources(["src0"])[0]
        r = client.post("/collections/c/search", json={"vector": query.tolist(), "k": 12})
        hits = r.json()["hits"]
        assert {h["version"] for h in hits} == {"vA", "vB"}
        expected = brute_merge(st, st.collection("c"), query[None, :], 12, cal)[0]
        assert [h["id"] for h in hits] == expected[0]
        r = client.post("/relations", headers=auth, json={
            "kind": "compatible", "old": "vA", "new": "vB", "calibrate": True})
        assert r.status_code == 422
        assert "a compatible relation takes no calibration" in r.json()["detail"]


def test_score_calibration_rejects_bad_values():
    with pytest.raises(ValueError, match="calibration scale must be a finite number > 0"):
        ScoreCalibration(0.0, 0.0, 3)
    with pytest.raises(ValueError, match="a score calibration is"):
        ScoreCalibration.from_json({"scale": 1.0})


def test_pair_files_read_through_load_vectors_file(tmp_path):
    from compatkit.artifacts import FeatureSet, Manifest, load_vectors_file, save_features

    x = np.arange(12, dtype=np.float64).reshape(4, 3)
    np.save(tmp_path / "a.npy", x)
    np.savez(tmp_path / "v.npz", vectors=x)
    manifest = Manifest(model_version="m", spec={}, embed_dim=3, normalized=True)
    save_features(tmp_path / "f.safetensors", FeatureSet(x.astype(np.float32), np.arange(4),
                                                         manifest))
    for name in ("a.npy", "v.npz", "f.safetensors"):
        got = load_vectors_file(tmp_path / name).vectors
        assert got.dtype == np.float32
        np.testing.assert_array_equal(got, x)
    np.savez(tmp_path / "other.npz", a=x)
    np.save(tmp_path / "flat.npy", np.ones(3))
    (tmp_path / "v.txt").write_text("1 2 3")
    for name, message in [
        ("other.npz", r"the .npz has no vectors entry \(entries: a\)"),
        ("flat.npy", r"expected an \(N, D\) array of numbers, got float64 of shape \(3,\)"),
        ("v.txt", r"unknown suffix '.txt'"),
        ("missing.npy", "does not exist"),
    ]:
        with pytest.raises(CompatkitError, match=message):
            load_vectors_file(tmp_path / name)
