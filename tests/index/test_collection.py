"""Items and search: hand-computed scores, merged versions, the version-mixing guard."""

from __future__ import annotations

import numpy as np
import pytest

from compatkit.errors import IncompatibleSpacesError, UnknownNameError
from compatkit.index import IndexStore, ItemInput
from compatkit.index.vectors import l2_normalize

from .conftest import DIM, fill


@pytest.fixture()
def plane(tmp_path):
    """2-D versions p1 (old) and p2 (compatible with p1), and q2 with no relation."""
    st = IndexStore(tmp_path / "plane")
    for name in ("p1", "p2", "q2"):
        st.register_version(name, dim=2)
    st.declare_compatible("p2", "p1")
    yield st
    st.close()


def test_scores_are_cosines_and_hits_name_their_version(plane):
    coll = plane.create_collection("c", "p2")
    coll.add([ItemInput("a", vector=[1.0, 0.0], version="p1", metadata={"n": 1}),
              ItemInput("b", vector=[0.0, 3.0], version="p1"),  # stored unnormalised
              ItemInput("c", vector=[0.6, 0.8])])               # the serving version p2
    res = coll.search([0.8, 0.6], version="p2", k=3)
    assert [(h.id, h.version) for h in res.hits] == [("c", "p2"), ("a", "p1"), ("b", "p1")]
    np.testing.assert_allclose([h.score for h in res.hits], [0.96, 0.8, 0.6], rtol=1e-6)
    assert res.hits[1].metadata == {"n": 1}
    assert res.query_version == "p2"


def test_serving_version_cannot_read_unrelated_vectors(plane):
    coll = plane.create_collection("c", "p1")
    with pytest.raises(IncompatibleSpacesError) as err:
        coll.add([ItemInput("x", vector=[1.0, 0.0], version="q2")])
    assert str(err.value) == (
        "item 'x': the serving version 'p1' cannot search a vector of version 'q2' (no "
        "declared relation), and the item has no source that 'p1' can embed")
    assert coll.count() == 0


def test_version_mixing_guard_on_search(plane):
    coll = plane.create_collection("c", "p1")
    coll.add([ItemInput("a", vector=[1.0, 0.0])])
    with pytest.raises(IncompatibleSpacesError) as err:
        coll.search([1.0, 0.0], version="q2")
    assert str(err.value) == (
        "a query of version 'q2' cannot search vectors of version 'p1': no declared relation "
        "connects them (declare 'q2' compatible with 'p1', or register a transformation "
        "'q2' -> 'p1')")
    plane.declare_compatible("q2", "p1")  # declaring the relation lifts the guard
    assert coll.search([1.0, 0.0], version="q2").hits[0].id == "a"


def test_query_side_transformation(tmp_path, make_transformation):
    st = IndexStore(tmp_path / "t")
    st.register_version("vA", dim=DIM)
    st.register_version("vC", dim=DIM)
    st.register_artifact(make_transformation("t", "vA", "vC"))
    coll = st.create_collection("c", "vC")
    rng = np.random.default_rng(0)
    g = rng.standard_normal((20, DIM)).astype(np.float32)
    coll.add([ItemInput(f"g{i}", vector=v) for i, v in enumerate(g)])
    q = rng.standard_normal(DIM).astype(np.float32)
    # vA's model L2-normalises, so its query is a unit vector before the transformation
    mapped = st.transformer(st.relations()[0]).apply(l2_normalize(q[None, :]))
    res = coll.search(q, version="vA", k=3)
    direct = coll.search(mapped[0], version="vC", k=3)
    assert [h.id for h in res.hits] == [h.id for h in direct.hits]
    np.testing.assert_allclose([h.score for h in res.hits], [h.score for h in direct.hits],
                               rtol=1e-5)
    huge = coll.search(q * np.float32(1e37), version="vA", k=3)  # no overflow on the way
    assert [h.id for h in huge.hits] == [h.id for h in res.hits]
    np.testing.assert_allclose([h.score for h in huge.hits], [h.score for h in res.hits],
                               rtol=1e-5)


def test_search_equals_brute_force_over_the_union(store):
    coll = fill(store, 60)
    coll.add([ItemInput(f"n{i}", source=f"new{i}", vector=None) for i in range(5)])
    rng = np.random.default_rng(1)
    q = rng.standard_normal((4, DIM)).astype(np.float32)
    ids = [f"i{i}" for i in range(60)] + [f"n{i}" for i in range(5)]
    g = np.stack([coll.get(i, with_vectors=True).current.vector for i in ids])
    ref = l2_normalize(q) @ l2_normalize(g).T
    for row, res in zip(ref, coll.search_batch(q, version="vA", k=5), strict=True):
        order = np.argsort(-row, kind="stable")[:5]
        assert [h.id for h in res.hits] == [ids[j] for j in order]
        np.testing.assert_allclose([h.score for h in res.hits], row[order], rtol=1e-5)


def test_source_query_uses_the_serving_embedder(store):
    coll = fill(store, 10)
    res = coll.search(source="src4", k=1)
    assert (res.hits[0].id, res.query_version) == ("i4", "vA")
    assert res.hits[0].score == pytest.approx(1.0, abs=1e-6)


@pytest.mark.parametrize(("kwargs", "message"), [
    ({"vector": [1.0] * 3}, "query vectors of version 'vA' have dimension 3, expected 8"),
    ({"vector": [np.nan] * DIM}, "query vectors of version 'vA' row 0 holds NaN or infinite "
                                 "values (float32 holds at most ±3.4e38)"),
    ({"vector": [1.0] * DIM, "k": 0}, "k must be an integer in [1, 10000], got 0"),
    ({}, "give exactly one of vector or source"),
    ({"vector": [1.0] * DIM, "source": "x"}, "give exactly one of vector or source"),
])
def test_bad_queries(store, kwargs, message):
    coll = fill(store, 3)
    vector = kwargs.pop("vector", None)
    with pytest.raises(ValueError) as err:
        coll.search(vector, **kwargs)
    assert str(err.value) == message


def test_add_replace_get_delete(store):
    coll = fill(store, 3)
    res = coll.add([ItemInput("i1", source="other", metadata={"v": 2}),
                    ItemInput("z", vector=np.ones(DIM))])
    assert (res.added, res.replaced) == (1, 1)
    item = coll.get("i1", with_vectors=True)
    assert (item.source, item.metadata, item.revision) == ("other", {"v": 2}, 2)
    np.testing.assert_allclose(item.current.vector,
                               store.embedder("vA").embed_sources(["other"])[0])
    assert coll.list_ids() == ["i0", "i1", "i2", "z"]
    assert coll.delete(["i0", "nope"]) == 1
    with pytest.raises(UnknownNameError, match="collection 'c' has no item 'i0'"):
        coll.get("i0")
    assert [h.id for h in coll.search(source="src0", k=10).hits].count("i0") == 0


@pytest.mark.parametrize(("item", "message"), [
    (ItemInput(""), "item id must be a non-empty string of at most 512 characters, got ''"),
    (ItemInput("a"), "item 'a' needs a vector or a source"),
    (ItemInput("a", source="s", metadata={"x": {1, 2}}),
     "item 'a': metadata is not JSON-serialisable (Object of type set is not JSON "
     "serializable)"),
    (ItemInput("a", vector=[1.0] * 2), "item 'a' vector have dimension 2, expected 8"),
    (ItemInput("a", version="vA", source="s"), "item 'a': version given without a vector"),
])
def test_bad_items_change_nothing(store, item, message):
    coll = fill(store, 2)
    with pytest.raises(ValueError) as err:
        coll.add([ItemInput("ok", source="fine"), item])
    assert str(err.value) == message
    assert coll.count() == 2


def test_duplicate_ids_in_one_request(store):
    coll = fill(store, 0)
    with pytest.raises(ValueError, match="item id 'a' appears twice in one request"):
        coll.add([ItemInput("a", source="s"), ItemInput("a", source="t")])


def test_another_process_writes_are_seen(store):
    coll = fill(store, 5)
    assert coll.search(source="late", k=1).hits[0].id != "late"
    other = IndexStore(store.root, embedders={})  # a second handle, as another process has
    other.collection("c").add([ItemInput("late", source="late")])
    other.collection("c").delete(["i0"])
    hits = coll.search(source="late", k=10).hits
    assert hits[0].id == "late" and "i0" not in [h.id for h in hits]


def test_a_recreated_collection_is_not_served_from_a_stale_cache(store):
    coll = fill(store, 3)
    assert len(coll.search(source="src0", k=10).hits) == 3  # the cache is built
    other = IndexStore(store.root)
    other.drop_collection("c")
    other.create_collection("c", "vA").add([ItemInput("only", source="x")])
    assert [h.id for h in coll.search(source="src0", k=10).hits] == ["only"]


def test_an_add_with_one_bad_item_anywhere_stores_nothing(store):
    coll = fill(store, 3)
    deep: dict = {}
    for _ in range(5000):  # deeper than json.dumps can go
        deep = {"a": deep}
    good = [ItemInput(f"n{i}", source=f"new{i}") for i in range(600)]  # past 2 embed chunks
    with pytest.raises(ValueError, match="item 'deep': metadata is not JSON-serialisable"):
        coll.add([*good, ItemInput("deep", source="s", metadata=deep)])
    with pytest.raises(ValueError, match="item 'bad' vector row 0 holds NaN"):
        coll.add([*good, ItemInput("bad", vector=[np.inf] * DIM)], embed_chunk=7)
    assert coll.count() == 3
    assert coll.add(good, embed_chunk=7).added == 600
    np.testing.assert_array_equal(coll.get("n599", with_vectors=True).current.vector,
                                  store.embedder("vA").embed_sources(["new599"])[0])
