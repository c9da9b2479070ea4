"""The SQLite store: versions, relations, artifacts, collections, persistence."""

from __future__ import annotations

import sqlite3

import numpy as np
import pytest

from compatkit.errors import CompatkitError, UnknownNameError
from compatkit.index import IndexStore, ItemInput, StateConflictError
from compatkit.index.versions import Relation

from .conftest import DIM, fill, hash_versions


def test_register_version_is_idempotent_and_refuses_changes(store):
    assert store.register_version("vA", dim=DIM, embedder=store.version("vA").embedder) == \
        store.version("vA")
    with pytest.raises(StateConflictError) as err:
        store.register_version("vA", dim=4)
    assert str(err.value) == ("version 'vA' is already registered with other fields "
                              "(dim 8, normalized True, kind model)")


def test_unknown_version_suggests_close_names(store):
    with pytest.raises(UnknownNameError) as err:
        store.version("vb")
    assert str(err.value) == "unknown version 'vb'; did you mean vB, vA?"


def test_declare_compatible_checks(store):
    store.register_version("wide", dim=DIM + 1)
    with pytest.raises(ValueError) as err:
        store.declare_compatible("wide", "vA")
    assert str(err.value) == ("'wide' (dim 9) cannot be compatible with 'vA' (dim 8): the "
                              "dimensions differ")
    with pytest.raises(ValueError, match="always compatible with itself"):
        store.declare_compatible("vA", "vA")
    with pytest.raises(UnknownNameError):
        store.declare_compatible("vZ", "vA")
    assert store.relations() == [Relation("compatible", "vA", "vB", origin="user")]


def test_model_artifact_registers_its_version_and_relations(tmp_path, make_model):
    st = IndexStore(tmp_path / "s")
    old = make_model("old-1")
    new = make_model("new-1", seed=1, compatible_with=("old-1",))
    info = st.register_artifact(old)
    assert (info.name, info.dim, info.kind, info.embedder["kind"]) == ("old-1", 8, "model",
                                                                       "artifact")
    st.register_artifact(new)
    assert st.route("new-1", "old-1").via == "compatible"
    assert [r.origin for r in st.relations()] == ["manifest"]
    # the embedder is rebuilt from the artifact
    assert st.embedder("new-1").version == "new-1"


def test_transformation_artifact_registers_a_relation(tmp_path, make_transformation):
    st = IndexStore(tmp_path / "s")
    hash_versions(st)
    st.register_version("vC", dim=6)
    rel = st.register_artifact(make_transformation("t1", "vA", "vB"))
    assert (rel.kind, rel.old, rel.new, rel.origin) == ("transform", "vA", "vB", "manifest")
    bad = make_transformation("t2", "vA", "vC")  # declares 8 -> 8 but vC has 6 dims
    with pytest.raises(CompatkitError, match=r"maps 8 -> 8 dims, but 'vA' has 8 and 'vC' has 6"):
        st.register_artifact(bad)


def test_collections_create_list_drop(store):
    store.create_collection("a", "vA")
    with pytest.raises(StateConflictError, match="collection 'a' already exists"):
        store.create_collection("a", "vA")
    with pytest.raises(ValueError, match="index must be one of flat, ivf, hnsw"):
        store.create_collection("b", "vA", index="annoy")
    assert store.collection_names() == ["a"]
    store.drop_collection("a")
    with pytest.raises(UnknownNameError, match="unknown collection 'a'"):
        store.collection("a")


def test_reopened_store_holds_everything(store):
    coll = fill(store, 5)
    coll.add([ItemInput("raw", vector=np.arange(1, DIM + 1), metadata={"x": [1, 2]})])
    again = IndexStore(store.root)
    c2 = again.collection("c")
    assert c2.count() == 6
    item = c2.get("raw", with_vectors=True)
    assert item.metadata == {"x": [1, 2]}
    np.testing.assert_array_equal(item.current.vector, np.arange(1, DIM + 1, dtype=np.float32))
    assert again.route("vB", "vA").via == "compatible"


def test_schema_forbids_two_current_vectors_and_orphans(store):
    fill(store, 1)
    con = sqlite3.connect(store.path)
    con.execute("PRAGMA foreign_keys=ON")
    key = con.execute("SELECT key FROM items").fetchone()[0]
    with pytest.raises(sqlite3.IntegrityError):
        con.execute("INSERT INTO vectors VALUES (?, 'current', 'vA', NULL, x'00')", (key,))
    with pytest.raises(sqlite3.IntegrityError):
        con.execute("INSERT INTO vectors VALUES (999, 'current', 'vA', NULL, x'00')")
    con.close()
