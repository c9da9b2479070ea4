"""Batched search: concurrent searches (different collections, versions and k) run as batches
and answer exactly as one-by-one searches; the batch path of a flat group with dead slots
equals brute force; a write committed by another process is seen by the next search."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import numpy as np
import pytest

from compatkit.errors import IncompatibleSpacesError
from compatkit.index import IndexStore, ItemInput
from compatkit.index.backends import VectorGroup
from compatkit.index.batching import SearchBatcher
from compatkit.index.search import SearchCache
from compatkit.index.vectors import l2_normalize

from .conftest import DIM

SRC = Path(__file__).resolve().parents[2] / "src"


def _answer(result) -> tuple:
    return result.query_version, [(h.id, h.score, h.version, h.transformed_from)
                                  for h in result.hits]


@pytest.fixture()
def two_collections(store):
    """c1 (vA, 300 items, 100 then deleted: dead slots in its cache) and c2 (vB, with vA and
    vB vectors: two groups)."""
    rng = np.random.default_rng(0)
    c1 = store.create_collection("c1", "vA")
    c1.add([ItemInput(f"a{i}", vector=rng.standard_normal(DIM)) for i in range(300)])
    c1.search(rng.standard_normal(DIM), k=1)  # build the cache, so deletions leave dead slots
    c1.delete([f"a{i}" for i in range(0, 300, 3)])
    c2 = store.create_collection("c2", "vB")
    c2.add([ItemInput(f"b{i}", vector=rng.standard_normal(DIM), version="vA" if i % 2 else "vB")
            for i in range(200)])
    return c1, c2


def test_concurrent_batched_searches_equal_one_by_one(store, two_collections, monkeypatch):
    c1, c2 = two_collections
    rng = np.random.default_rng(1)
    requests = [(c1, "vA", 5), (c1, "vB", 10), (c2, "vB", 3), (c2, "vB", 7), (c1, "vA", 12)]
    requests = [(coll, version, k, rng.standard_normal(DIM))
                for _ in range(10) for coll, version, k in requests]
    requests.append((c2, "vA", 4, rng.standard_normal(DIM)))  # vA cannot search vB vectors
    alone = [_answer(coll.search(q, version=v, k=k)) for coll, v, k, q in requests[:-1]]
    assert all(len(a[1]) == k for a, (_, _, k, _) in zip(alone, requests, strict=False))

    # hold the first batch until every other request waits: they must go as one batch
    gatherer = store.search_batcher().gatherer
    entered, release = threading.Event(), threading.Event()
    real_search = SearchCache.search

    def held(self, queries, version, k):
        if not entered.is_set():
            entered.set()
            release.wait(30)
        return real_search(self, queries, version, k)

    monkeypatch.setattr(SearchCache, "search", held)
    answers: list = [None] * len(requests)

    def run(i: int) -> None:
        coll, v, k, q = requests[i]
        try:
            answers[i] = _answer(coll.search(q, version=v, k=k))
        except IncompatibleSpacesError as err:
            answers[i] = err

    before = gatherer.batches
    threads = [threading.Thread(target=run, args=(i,)) for i in range(len(requests))]
    threads[0].start()
    assert entered.wait(30)
    for t in threads[1:]:
        t.start()
    deadline = time.monotonic() + 30
    while gatherer.waiting < len(requests) - 1 and time.monotonic() < deadline:
        time.sleep(0.01)
    assert gatherer.waiting == len(requests) - 1
    release.set()
    for t in threads:
        t.join(30)
    assert gatherer.batches == before + 2  # the held one, then all the others together
    assert answers[:-1] == alone  # ids, scores, order, versions: exactly
    assert isinstance(answers[-1], IncompatibleSpacesError)  # only that request failed


def test_a_batch_of_queries_equals_each_query_alone(store, two_collections):
    c1, c2 = two_collections
    queries = np.random.default_rng(2).standard_normal((64, DIM)).astype(np.float32)
    for coll in (c1, c2):
        cache = store.search_cache(coll.name)
        together = cache.search(queries, "vB", 10)  # 64 rows: one matrix product; alone: a scan
        assert together == [cache.search(queries[i:i + 1], "vB", 10)[0] for i in range(64)]
        batch = coll.search_batch(queries, version="vB", k=10)
        assert [_answer(r) for r in batch] == [_answer(coll.search(q, version="vB", k=10))
                                               for q in queries]


def test_scores_are_exact_cosines_ordered_by_key_on_ties(store):
    coll = store.create_collection("t", "vA")
    e = np.eye(DIM)
    coll.add([ItemInput("x", vector=e[0]), ItemInput("y", vector=e[0] + e[1]),
              ItemInput("z", vector=e[0])])
    hits = coll.search(e[0], k=3).hits
    assert [h.id for h in hits] == ["x", "z", "y"]  # x and z tie at 1.0: smaller key first
    assert [h.score for h in hits[:2]] == [1.0, 1.0]
    assert hits[2].score == pytest.approx(2 ** -0.5, abs=1e-7)


def test_flat_group_with_dead_slots_batched_equals_brute_force():
    rng = np.random.default_rng(3)
    x = l2_normalize(rng.standard_normal((500, DIM)).astype(np.float32))
    g = VectorGroup(DIM)
    g.add(np.arange(500), x)
    dead = np.arange(0, 500, 2)
    g.remove(dead)  # half the slots dead, no rebuild (below 1024 dead)
    assert g.structure == "flat" and len(g) == 250
    q = l2_normalize(rng.standard_normal((40, DIM)).astype(np.float32))
    hits = g.search(q, 7)
    live = np.setdiff1d(np.arange(500), dead)
    expected = live[np.argsort(-(q @ x[live].T), axis=1, kind="stable")[:, :7]]
    np.testing.assert_array_equal(hits.keys, expected)
    # a dead vector close to every query: the wide search comes back short, the rest is exact
    g.add(np.array([1000]), q[:1])
    g.remove(np.array([1000]))
    np.testing.assert_array_equal(g.search(q, 7).keys, expected)


def test_batcher_rejects_a_bad_bound(store):
    with pytest.raises(ValueError, match="max_queries must be a positive integer, got 0"):
        SearchBatcher(store, max_queries=0)


WRITER = textwrap.dedent("""
    import sys
    import numpy as np
    from compatkit.index import IndexStore, ItemInput
    store = IndexStore(sys.argv[1])
    coll = store.collection("c")
    coll.add([ItemInput("new", vector=np.eye(8)[int(sys.argv[2])])])
    coll.delete(["i0"])
""")


def test_a_write_committed_by_another_process_is_seen_by_the_next_search(store):
    coll = store.create_collection("c", "vA")
    e = np.eye(DIM)
    coll.add([ItemInput(f"i{i}", vector=e[i % 3] + 0.1 * e[3 + i % 4]) for i in range(20)])
    assert coll.search(e[5], k=1).hits[0].id != "new"  # the cache is built and current
    other = IndexStore(store.root)  # same process, another connection
    other.collection("c").add([ItemInput("other", vector=e[6])])
    assert coll.search(e[6], k=1).hits[0].id == "other"
    env = {**os.environ, "PYTHONPATH": str(SRC)}
    subprocess.run([sys.executable, "-c", WRITER, str(store.root), "5"], env=env, check=True,
                   timeout=120)
    assert coll.search(e[5], k=1).hits[0].id == "new"
    assert "i0" not in {h.id for h in coll.search(e[0], k=20).hits}
    other.close()


def test_the_change_token_moves_with_every_commit_and_only_then(store):
    coll = store.create_collection("c", "vA")
    before = store.change_token()
    assert store.change_token() == before
    coll.count()  # a read commits nothing
    assert store.change_token() == before
    coll.add([ItemInput("x", vector=np.ones(DIM))])  # this thread's own connection
    after = store.change_token()
    assert after != before
    other = IndexStore(store.root)
    other.collection("c").delete(["x"])
    assert store.change_token() != after
    other.close()


def test_a_lone_request_runs_at_once_in_a_batch_of_its_own():
    from compatkit.index.batching import Gatherer

    seen: list[list[int]] = []
    gatherer = Gatherer(lambda batch: seen.append(list(batch)), size=lambda r: 1, max_size=8)
    for r in (1, 2, 3):
        gatherer.submit(r)
    assert seen == [[1], [2], [3]] and gatherer.batches == 3 and gatherer.waiting == 0
