"""One suite, every search backend: FAISS in-process and Qdrant (qdrant-client local mode).

Group level: exact search equals brute force, removals and replacements, padding, errors.
Collection level: searches, deletes, a hot-refresh upgrade, a rollback and a version registered
after the search cache was built give the same hits on every backend.
"""

from __future__ import annotations

import numpy as np
import pytest

from compatkit.index import BackendOptions, HashEmbedder, IndexStore, ItemInput, run_backfill
from compatkit.index.backends import check_options, open_backend
from compatkit.index.qdrant_backend import QdrantBackend, close_clients, safe_name
from compatkit.index.upgrade import rollback

from .conftest import DIM, brute_top_k, hash_versions, mean_recall, unit_vectors

#: Qdrant runs in qdrant-client's local mode in memory; a local-mode folder (one SQLite commit
#: per point, slow) is covered by ``test_qdrant_payloads_alias_and_restart``.
ENGINES = ["faiss", "qdrant"]


def _options(engine: str, tmp_path, **kw) -> BackendOptions:
    if engine == "faiss":
        return BackendOptions(**kw)
    return BackendOptions(engine="qdrant", location=":memory:", **kw)


@pytest.fixture(autouse=True)
def _release_qdrant():
    yield
    close_clients()


@pytest.fixture(params=ENGINES)
def engine(request) -> str:
    return request.param


@pytest.fixture()
def backend(engine, tmp_path):
    b = open_backend(None, "suite", _options(engine, tmp_path))
    b.reset({})
    yield b
    b.close()


# ------------------------------------------------------------------ group level


def test_exact_group_equals_brute_force_with_item_keys(backend):
    x, q = unit_vectors(300, 16), unit_vectors(5, 16, seed=1)
    keys = np.arange(1000, 1300, dtype=np.int64)
    g = backend.group(("vA", None), 16)
    g.add(keys, x)
    assert len(g) == 300
    hits = g.search(q, 7)
    ref_s, ref_k = brute_top_k(x, keys, q, 7)
    np.testing.assert_allclose(hits.scores, ref_s, rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(hits.keys, ref_k)
    np.testing.assert_allclose(g.vectors_of(keys[[5, 2]]), x[[5, 2]], rtol=1e-6, atol=1e-7)


def test_hand_computed_scores_and_padding(backend):
    g = backend.group(("vA", None), 2)
    g.add(np.array([7, 9]), np.array([[1.0, 0.0], [0.6, 0.8]], dtype=np.float32))
    hits = g.search(np.array([[0.8, 0.6]], dtype=np.float32), 3)
    np.testing.assert_allclose(hits.scores[0, :2], [0.96, 0.8], rtol=1e-6)
    assert hits.keys.tolist() == [[9, 7, -1]]
    assert hits.scores[0, 2] == -np.inf
    empty = backend.group(("vB", None), 2).search(np.ones((2, 2), dtype=np.float32), 2)
    assert empty.keys.tolist() == [[-1, -1], [-1, -1]]


def test_removed_and_replaced_keys(backend):
    g = backend.group(("vA", None), 2)
    g.add(np.array([1, 2, 3]), np.array([[1, 0], [0, 1], [0.6, 0.8]], dtype=np.float32))
    g.remove(np.array([1, 42]))  # unknown keys are ignored
    assert len(g) == 2
    q = np.array([[1.0, 0.0]], dtype=np.float32)
    assert g.search(q, 3).keys.tolist() == [[3, 2, -1]]
    g.add(np.array([2]), np.array([[1.0, 0.0]], dtype=np.float32))  # key 2 is replaced
    assert len(g) == 2
    assert g.search(q, 3).keys.tolist() == [[2, 3, -1]]
    np.testing.assert_allclose(g.vectors_of(np.array([2])), [[1.0, 0.0]])
    with pytest.raises(KeyError):
        g.vectors_of(np.array([1]))


def test_groups_of_one_space_stay_apart(backend):
    """vB native and vB transformed from vA share a space but are separate groups."""
    native = backend.group(("vB", None), 2)
    transformed = backend.group(("vB", "vA"), 2)
    native.add(np.array([1]), np.array([[1.0, 0.0]], dtype=np.float32))
    transformed.add(np.array([2]), np.array([[0.0, 1.0]], dtype=np.float32))
    transformed.remove(np.array([1]))  # key 1 is native: untouched
    q = np.array([[0.6, 0.8]], dtype=np.float32)
    assert native.search(q, 2).keys.tolist() == [[1, -1]]
    assert transformed.search(q, 2).keys.tolist() == [[2, -1]]


def test_mass_removal_keeps_results(backend):
    x = unit_vectors(3000, 8)
    keys = np.arange(3000, dtype=np.int64)
    g = backend.group(("vA", None), 8)
    g.add(keys, x)
    g.remove(keys[:2500])  # FAISS compacts here
    q = unit_vectors(3, 8, seed=2)
    ref_s, ref_k = brute_top_k(x[2500:], keys[2500:], q, 5)
    hits = g.search(q, 5)
    np.testing.assert_array_equal(hits.keys, ref_k)
    np.testing.assert_allclose(hits.scores, ref_s, rtol=1e-5, atol=1e-6)


def test_hnsw_kind_recall(engine, tmp_path):
    b = open_backend(None, "suite", _options(engine, tmp_path, kind="hnsw"))
    b.reset({"vA": 16})  # the version declared up front
    x, q = unit_vectors(2000, 16), unit_vectors(30, 16, seed=3)
    keys = np.arange(2000, dtype=np.int64)
    g = b.group(("vA", None), 16)
    g.add(keys, x)
    g.remove(keys[:10])
    _, ref_k = brute_top_k(x[10:], keys[10:], q, 10)
    hits = g.search(q, 10)
    assert not np.isin(hits.keys, keys[:10]).any()
    assert mean_recall(hits.keys, ref_k) >= 0.9
    b.close()


def test_bad_shapes(backend):
    g = backend.group(("vA", None), 4)
    with pytest.raises(ValueError, match=r"vectors must be \(2, 4\), got \(2, 3\)"):
        g.add(np.array([1, 2]), np.zeros((2, 3), dtype=np.float32))
    with pytest.raises(ValueError, match="keys added in one call must be unique"):
        g.add(np.array([1, 1]), np.ones((2, 4), dtype=np.float32))
    with pytest.raises(ValueError, match="keys must be non-negative, got -3"):
        g.add(np.array([1, -3]), np.ones((2, 4), dtype=np.float32))
    assert len(g) == 0


# ------------------------------------------------------------------ options


def test_options_are_checked():
    with pytest.raises(ValueError, match="unknown search engine 'qdrnt'; did you mean qdrant"):
        check_options(BackendOptions(engine="qdrnt"))  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="the qdrant engine needs a location"):
        check_options(BackendOptions(engine="qdrant"))
    with pytest.raises(ValueError, match="qdrant engine has no IVF index"):
        check_options(BackendOptions(engine="qdrant", kind="ivf", location=":memory:"))
    with pytest.raises(ValueError, match="location applies to the qdrant engine, not 'faiss'"):
        check_options(BackendOptions(location="/tmp/q"))
    with pytest.raises(ValueError, match="nprobe must be a positive integer, got 0"):
        check_options(BackendOptions(nprobe=0))
    with pytest.raises(ValueError, match="nlist must be a positive integer or None, got 0"):
        check_options(BackendOptions(nlist=0))


def test_store_refuses_bad_engine_options(tmp_path):
    st = IndexStore(tmp_path / "s")
    hash_versions(st)
    with pytest.raises(ValueError, match="the qdrant engine needs a location"):
        st.create_collection("c", "vA", index=BackendOptions(engine="qdrant"))
    assert st.collection_names() == []
    st.close()


def test_safe_names():
    assert safe_name("vB-1.2@x+y") == "vB-1.2@x+y"
    name = safe_name("bct:1234")
    assert name.startswith("bct_1234-") and len(name) == len("bct_1234-") + 8
    assert safe_name("bct:1234") != safe_name("bct_1234")


# ------------------------------------------------------------------ collection level


def _store(tmp_path, sub: str) -> IndexStore:
    st = IndexStore(tmp_path / sub)
    hash_versions(st)
    st.declare_compatible("vB", "vA")
    return st


def _hits(coll, queries, version="vB", k=60):
    """Per query: {id: (score, version, transformed_from, label)} of the top-k hits."""
    return [{h.id: (h.score, h.version, h.transformed_from, h.metadata.get("label"))
             for h in r.hits} for r in coll.search_batch(queries, version=version, k=k)]


def _assert_same(got, want):
    """Same hits with the same origin and metadata, scores equal to float32 precision."""
    assert len(got) == len(want)
    for g, w in zip(got, want, strict=True):
        assert sorted(g) == sorted(w)
        for item_id, (score, *rest) in g.items():
            assert rest == list(w[item_id][1:])
            assert score == pytest.approx(w[item_id][0], abs=1e-5)


def test_collection_searches_equal_faiss_through_an_upgrade(engine, tmp_path):
    """Search, delete, a hot-refresh upgrade half-way and complete, and a rollback."""
    ref = _store(tmp_path, "ref")
    st = _store(tmp_path, "st")
    colls = [s.create_collection("c", "vA", index=o) for s, o in
             ((ref, BackendOptions()), (st, _options(engine, tmp_path)))]
    items = [ItemInput(f"i{i}", source=f"src{i}", metadata={"label": i % 3}) for i in range(60)]
    queries = unit_vectors(4, DIM, seed=7)
    for c in colls:
        c.add(items)
        c.delete(["i3", "i4"])
    _assert_same(_hits(colls[1], queries), _hits(colls[0], queries))

    jobs = [c.start_upgrade("vB", batch_size=10, seed=1).job for c in colls]
    for s, job in zip((ref, st), jobs, strict=True):
        run_backfill(s, job, max_batches=3)
    mid = _hits(colls[1], queries)
    assert {h[1] for row in mid for h in row.values()} == {"vA", "vB"}  # both versions answer
    _assert_same(mid, _hits(colls[0], queries))
    top = [[h.id for h in r.hits] for r in colls[1].search_batch(queries, version="vB",
                                                                           k=5)]
    assert top == [[h.id for h in r.hits] for r in colls[0].search_batch(queries, version="vB",
                                                                        k=5)]

    for s, job in zip((ref, st), jobs, strict=True):
        assert run_backfill(s, job).state == "completed"
    _assert_same(_hits(colls[1], queries), _hits(colls[0], queries))
    assert colls[1].stats().current == {"vB": 58}

    for s, job in zip((ref, st), jobs, strict=True):
        rollback(s, job)  # a whole-collection rewrite: the cache rebuilds
    back = _hits(colls[1], queries, version="vA")
    assert {h[1] for row in back for h in row.values()} == {"vA"}
    _assert_same(back, _hits(colls[0], queries, version="vA"))
    ref.close()
    st.close()


def test_version_registered_after_the_cache_was_built(engine, tmp_path):
    st = _store(tmp_path, "st")
    coll = st.create_collection("c", "vA", index=_options(engine, tmp_path))
    coll.add([ItemInput(f"i{i}", source=f"src{i}") for i in range(20)])
    q = unit_vectors(1, DIM, seed=3)
    before = coll.search(q[0], version="vA", k=20).hits
    st.register_version("vC", dim=DIM, embedder=HashEmbedder("vC", DIM, seed=2))
    st.declare_compatible("vC", "vA")
    job = coll.start_upgrade("vC", batch_size=5).job
    run_backfill(st, job, max_batches=2)
    hits = coll.search(q[0], version="vC", k=20).hits
    assert len(hits) == 20 and {h.version for h in hits} == {"vA", "vC"}
    assert {h.id for h in hits if h.version == "vA"} <= {h.id for h in before}
    st.close()


@pytest.mark.parametrize("create_vector_name", [True, False])
def test_qdrant_new_named_vector_keeps_points(create_vector_name):
    b = open_backend(None, "c", BackendOptions(engine="qdrant", location=":memory:"))
    assert isinstance(b, QdrantBackend)
    b.reset({"vA": 2})
    ga = b.group(("vA", None), 2)
    ga.add(np.array([1, 2]), np.array([[1, 0], [0, 1]], dtype=np.float32))
    b.use_create_vector_name = create_vector_name
    gb = b.group(("vB", None), 2)  # a new named vector on a collection with points
    gb.add(np.array([3]), np.array([[0.6, 0.8]], dtype=np.float32))
    q = np.array([[1.0, 0.0]], dtype=np.float32)
    assert ga.search(q, 3).keys.tolist() == [[1, 2, -1]]
    assert gb.search(q, 3).keys.tolist() == [[3, -1, -1]]
    physical = [c.name for c in b.client.get_collections().collections]
    assert len(physical) == 1 and physical[0].startswith("compatkit-c-")
    assert set(b.client.get_collection("compatkit-c").config.params.vectors) == {"vA", "vB"}
    b.close()


def test_qdrant_payloads_alias_and_restart(tmp_path):
    """Payload holds the item's id and metadata; a new process (new client) rebuilds into a
    fresh physical collection behind the same alias and drops the old one."""
    location = str(tmp_path / "qdrant")
    st = _store(tmp_path, "st")
    coll = st.create_collection("photos", "vA", index=BackendOptions(
        engine="qdrant", location=location, namespace="prod"))
    coll.add([ItemInput(f"i{i}", source=f"src{i}", metadata={"label": i}) for i in range(5)])
    hits = coll.search(unit_vectors(1, DIM)[0], version="vA", k=5).hits
    assert sorted(h.id for h in hits) == [f"i{i}" for i in range(5)]
    client = st.search_cache("photos")._backend.client  # the shared local-mode client
    points, _ = client.scroll("prod-photos", limit=10, with_payload=True)
    payloads = sorted((p.payload["item"], p.payload["metadata"]["label"], p.payload["version"],
                       p.payload["origin"]) for p in points)
    assert payloads == [(f"i{i}", i, "vA", "") for i in range(5)]
    first = [c.name for c in client.get_collections().collections]
    st.close()
    close_clients()  # as if the process ended

    st2 = IndexStore(tmp_path / "st")
    again = st2.collection("photos").search(unit_vectors(1, DIM)[0], version="vA", k=5).hits
    assert again == hits
    client2 = st2.search_cache("photos")._backend.client
    second = [c.name for c in client2.get_collections().collections]
    assert len(first) == len(second) == 1 and first != second
    assert client2.count("prod-photos").count == 5
    st2.close()


def test_qdrant_drop_deletes_the_alias_and_its_collections():
    b = open_backend(None, "c", BackendOptions(engine="qdrant", location=":memory:"))
    other = QdrantBackend(b.client, "compatkit-c2", b.options, lock=b._lock)
    for backend in (b, other):
        backend.reset({"vA": 2})
        backend.group(("vA", None), 2).add(np.array([1]), np.ones((1, 2), dtype=np.float32))
    b.drop()
    assert [a.alias_name for a in b.client.get_aliases().aliases] == ["compatkit-c2"]
    assert [c.name for c in b.client.get_collections().collections] == [other._physical]
    b.close()



def test_huge_and_tiny_vectors_score_by_direction(engine, tmp_path):
    st = IndexStore(tmp_path / "st")
    st.register_version("v", dim=4)
    coll = st.create_collection("c", "v", index=_options(engine, tmp_path))
    coll.add([ItemInput("huge", vector=[3e38, 3e38, 0.0, 0.0]),
              ItemInput("tiny", vector=[0.0, 0.0, 1e-30, 1e-30]),
              ItemInput("other", vector=[1.0, -1.0, 0.0, 0.0])])
    hits = coll.search([1e20, 1e20, 0.0, 0.0], k=3).hits
    assert [h.id for h in hits][:1] == ["huge"]
    assert [h.score for h in hits] == pytest.approx([1.0, 0.0, 0.0], abs=1e-5)
    tiny = coll.search([0.0, 0.0, 3e38, 3e38], k=1).hits[0]
    assert (tiny.id, tiny.score) == ("tiny", pytest.approx(1.0, abs=1e-5))
    st.close()
