"""The orchestrator: strategies, stored orders, idempotent batches, pause/resume/rollback,
items added and deleted during an upgrade, status."""

from __future__ import annotations

import numpy as np
import pytest

from compatkit.errors import CompatkitError, IncompatibleSpacesError, UnknownNameError
from compatkit.index import (
    IndexStore,
    ItemInput,
    StateConflictError,
    claim_batch,
    commit_batch,
    compute_batch,
    finalize,
    job_status,
    pause,
    resume,
    rollback,
    run_backfill,
)
from compatkit.ordering import backfill_order

from .conftest import DIM, fill, hash_versions


def current_vectors(coll) -> dict[str, tuple[str, str | None, np.ndarray]]:
    out = {}
    for item_id in coll.list_ids(limit=10_000):
        cur = coll.get(item_id, with_vectors=True).current
        out[item_id] = (cur.version, cur.transformed_from, cur.vector)
    return out


def claimed_ids(store, job: int) -> list[str]:
    ids = []
    while (batch := claim_batch(store, job)) is not None:
        ids += [it.id for it in batch.items]
        computed = compute_batch(store, batch)
        assert commit_batch(store, job, batch.batch_id, computed.vectors)
    return ids


def test_hot_refresh_ends_equal_to_a_cold_rebuild(store):
    coll = fill(store, 23)
    before = current_vectors(coll)
    st = coll.start_upgrade("vB", batch_size=5, seed=3)
    assert (st.state, st.total, st.phases) == ("running", 23, ("refresh(live, random)",))
    assert coll.serving_version == "vB"  # serves at once
    st = run_backfill(store, st.job)
    assert (st.state, st.done, st.written, st.fraction, st.eta_s) == ("completed", 23, 23, 1.0,
                                                                       0.0)
    rebuilt = store.embedder("vB").embed_sources([f"src{i}" for i in range(23)])
    after = current_vectors(coll)
    for i in range(23):
        version, tf, vec = after[f"i{i}"]
        assert (version, tf) == ("vB", None)
        np.testing.assert_array_equal(vec, rebuilt[i])
    # the old vectors are kept until finalize
    prev = coll.get("i0", with_vectors=True).vectors[1]
    assert prev.slot == "previous"
    np.testing.assert_array_equal(prev.vector, before["i0"][2])
    finalize(store, st.job)
    assert coll.stats().kept_previous == 0


def test_random_order_is_the_stored_seeded_permutation(store):
    fill(store, 17)
    st = store.collection("c").start_upgrade("vB", batch_size=4, seed=11)
    perm = backfill_order("random", 17, seed=11)
    assert claimed_ids(store, st.job) == [f"i{j}" for j in perm]


def test_given_order_then_the_rest_oldest_first(store):
    fill(store, 6)
    st = store.collection("c").start_upgrade("vB", ordering="given", batch_size=4,
                                              given_order=["i4", "i1", "gone"])
    assert claimed_ids(store, st.job) == ["i4", "i1", "i0", "i2", "i3", "i5"]


def test_uncertainty_order_uses_the_old_classifier(tmp_path, make_model):
    from compatkit.ordering import uncertainty_scores

    st = IndexStore(tmp_path / "s")
    st.register_artifact(make_model("old", num_classes=3))
    st.register_version("new", dim=8, embedder={"kind": "hash", "seed": 5})
    st.declare_compatible("new", "old")
    coll = st.create_collection("c", "old")
    rng = np.random.default_rng(0)
    vecs = rng.standard_normal((9, 8)).astype(np.float32)
    coll.add([ItemInput(f"i{i}", source=f"s{i}", vector=v) for i, v in enumerate(vecs)])
    job = coll.start_upgrade("new", ordering="uncertainty", temperature=0.5, batch_size=100)
    weights = st.embedder("old").classifier_weights()
    u = uncertainty_scores(vecs, weights, temperature=0.5)
    assert claimed_ids(st, job.job) == [f"i{j}" for j in np.argsort(-u, kind="stable")]


def test_commit_is_idempotent_and_claims_resume(store):
    fill(store, 10)
    job = store.collection("c").start_upgrade("vB", batch_size=4).job
    b0 = claim_batch(store, job, worker="w1")
    assert claim_batch(store, job, worker="w1").batch_id == b0.batch_id  # restart resumes it
    b1 = claim_batch(store, job, worker="w2")
    assert b1.batch_id == b0.batch_id + 1
    vecs = compute_batch(store, b0).vectors
    assert commit_batch(store, job, b0.batch_id, vecs) is True
    snapshot = current_vectors(store.collection("c"))
    assert commit_batch(store, job, b0.batch_id, vecs) is False  # a second commit: no-op
    again = current_vectors(store.collection("c"))
    for item_id, (version, tf, vec) in snapshot.items():
        assert again[item_id][:2] == (version, tf)
        np.testing.assert_array_equal(again[item_id][2], vec)
    assert job_status(store, job).done == 4
    with pytest.raises(ValueError) as err:
        commit_batch(store, job, b1.batch_id, np.zeros((3, DIM)))
    assert str(err.value) == "batch 1 needs vectors of shape (4, 8), got (3, 8)"
    with pytest.raises(ValueError, match="batch 9 of job 1 \\(phase 0\\) was never claimed"):
        commit_batch(store, job, 9, np.zeros((4, DIM)))


def test_nan_batch_is_refused_whole(store):
    fill(store, 4)
    job = store.collection("c").start_upgrade("vB", batch_size=4).job
    batch = claim_batch(store, job)
    vecs = compute_batch(store, batch).vectors
    vecs[2, 0] = np.nan
    with pytest.raises(ValueError, match="committed 'vB' vectors row 2 holds NaN"):
        commit_batch(store, job, batch.batch_id, vecs)
    assert job_status(store, job).done == 0
    assert store.collection("c").stats().current == {"vA": 4}


def test_pause_resume(store):
    fill(store, 8)
    job = store.collection("c").start_upgrade("vB", batch_size=2).job
    run_backfill(store, job, max_batches=1)
    assert pause(store, job).state == "paused"
    assert claim_batch(store, job) is None
    assert run_backfill(store, job).done == 2  # nothing runs while paused
    with pytest.raises(StateConflictError, match="upgrade job 1 is paused; it must be running"):
        pause(store, job)
    assert resume(store, job).state == "running"
    assert run_backfill(store, job).state == "completed"


def test_rollback_restores_the_old_collection_exactly(store):
    coll = fill(store, 12)
    q = store.embedder("vA").embed_sources(["probe"])
    before_vectors = current_vectors(coll)
    before_hits = coll.search(q[0], version="vA", k=5).hits
    job = coll.start_upgrade("vB", batch_size=5).job
    run_backfill(store, job, max_batches=2)
    st = rollback(store, job)
    assert st.state == "rolled_back" and coll.serving_version == "vA"
    after = current_vectors(coll)
    for item_id, (version, tf, vec) in before_vectors.items():
        assert after[item_id][:2] == (version, tf)
        np.testing.assert_array_equal(after[item_id][2], vec)
    assert coll.search(q[0], version="vA", k=5).hits == before_hits
    assert coll.stats().kept_previous == 0
    # a late commit of the rolled-back job changes nothing
    assert commit_batch(store, job, 2, np.ones((5, DIM))) is False
    with pytest.raises(StateConflictError, match="upgrade job 1 is rolled_back"):
        rollback(store, job)


def test_items_added_and_deleted_during_an_upgrade(store):
    coll = fill(store, 10)
    job = coll.start_upgrade("vB", batch_size=3).job
    run_backfill(store, job, max_batches=1)
    coll.add([ItemInput("new", source="fresh"), ItemInput("i9", source="src9-v2")])
    coll.delete(["i8", "i7"])
    new = coll.get("new", with_vectors=True)
    assert [(v.slot, v.version) for v in new.vectors] == [("current", "vB"), ("previous", "vA")]
    np.testing.assert_array_equal(new.vectors[0].vector,
                                  store.embedder("vB").embed_sources(["fresh"])[0])
    st = run_backfill(store, job)
    assert st.state == "completed" and st.done == 10
    final = current_vectors(coll)
    assert sorted(final) == sorted([f"i{i}" for i in range(7)] + ["i9", "new"])
    assert {v[0] for v in final.values()} == {"vB"}
    np.testing.assert_array_equal(final["i9"][2],
                                  store.embedder("vB").embed_sources(["src9-v2"])[0])
    # rollback still restores every item, including the ones added during the upgrade
    rollback(store, job)
    np.testing.assert_array_equal(coll.get("new", with_vectors=True).current.vector,
                                  store.embedder("vA").embed_sources(["fresh"])[0])


def test_a_raw_new_vector_that_rollback_could_not_keep_is_refused(store):
    coll = fill(store, 3)
    job = coll.start_upgrade("vB", batch_size=3).job
    with pytest.raises(StateConflictError) as err:
        coll.add([ItemInput("raw", vector=np.ones(DIM), version="vB")])  # vB only, no source
    assert str(err.value) == (
        "item 'raw': upgrade job 1 (vA -> vB) is running and needs a vector that 'vA' can "
        "search, so that a rollback keeps it; the item has a vector of version 'vB' and no "
        "source that 'vA' can embed. Add it with a source or a 'vA' vector, or wait until "
        "upgrade job 1 completes and finalize it (`compatkit index finalize c --job 1`)")
    assert coll.count() == 3
    coll.add([ItemInput("raw", vector=np.ones(DIM), version="vA")])  # an old vector is fine
    assert coll.get("raw").current.version == "vA"  # vB searches it through compatibility
    assert rollback(store, job).state == "rolled_back"
    assert coll.count() == 4


def test_cold_keeps_serving_the_old_version_until_the_switch(store):
    coll = fill(store, 9)
    job = coll.start_upgrade("vB", strategy="cold", batch_size=4).job
    run_backfill(store, job, max_batches=2)
    assert coll.serving_version == "vA"
    assert coll.stats().current == {"vA": 9} and coll.stats().pending_next == 8
    coll.add([ItemInput("late", source="late")])  # built aside too
    assert coll.stats().pending_next == 9
    assert {h.version for h in coll.search(source="src1", k=10).hits} == {"vA"}
    assert run_backfill(store, job).state == "completed"
    assert coll.serving_version == "vB"
    assert coll.stats().current == {"vB": 10}
    assert coll.search(source="late", k=1).hits[0].id == "late"


def test_transform_then_refresh(tmp_path, make_transformation):
    from compatkit.feature_upgrade import apply_transformation

    st = IndexStore(tmp_path / "s")
    hash_versions(st)  # no compatibility: vB serves only after the transform phase
    rel = st.register_artifact(make_transformation("t", "vA", "vB", sigma_dim=1))
    coll = st.create_collection("c", "vA")
    coll.add([ItemInput(f"i{i}", source=f"src{i}") for i in range(6)])
    old = np.stack([coll.get(f"i{i}", with_vectors=True).current.vector for i in range(6)])
    coll.add([ItemInput("private", vector=old[0])])  # no source: stays transformed
    job = coll.start_upgrade("vB", strategy="transform", ordering="sigma", batch_size=4,
                             then_refresh=True, refresh_ordering="random").job
    status = job_status(st, job)
    assert status.phases == ("transform(aside, sigma)", "refresh(live, random)")
    sigma = st.transformer(rel).sigma(np.concatenate([old, old[:1]]))
    expected = [(["i0", "i1", "i2", "i3", "i4", "i5", "private"])[j]
                for j in np.argsort(-sigma, kind="stable")]
    batch = claim_batch(st, job)
    assert [it.id for it in batch.items] == expected[:4]
    commit_batch(st, job, batch.batch_id, compute_batch(st, batch).vectors)
    assert coll.serving_version == "vA"  # transformed vectors wait aside
    run_backfill(st, job, max_batches=1)  # completes the transform phase: switch
    assert coll.serving_version == "vB"
    transformed = coll.get("private", with_vectors=True).current
    assert (transformed.version, transformed.transformed_from) == ("vB", "vA")
    module = st.transformer(rel).module
    np.testing.assert_allclose(transformed.vector,
                               apply_transformation(module, old[:1])[0], rtol=1e-5, atol=1e-6)
    final = run_backfill(st, job)
    assert (final.state, final.phase, final.skipped) == ("completed", 1, 1)
    vecs = current_vectors(coll)
    assert vecs["private"][:2] == ("vB", "vA")
    assert all(vecs[f"i{i}"][:2] == ("vB", None) for i in range(6))
    rollback(st, job)
    np.testing.assert_array_equal(coll.get("private", with_vectors=True).current.vector, old[0])


def test_failed_sources_are_counted_not_fatal(tmp_path):
    from compatkit.index import HashEmbedder

    class Flaky(HashEmbedder):
        def embed_sources(self, sources):
            if "bad" in sources:
                raise CompatkitError("source 'bad' cannot be read")
            return super().embed_sources(sources)

    st = IndexStore(tmp_path / "s", embedders={"vB": Flaky("vB", DIM, seed=1)})
    hash_versions(st)
    st.declare_compatible("vB", "vA")
    coll = st.create_collection("c", "vA")
    coll.add([ItemInput(s, source=s) for s in ("a", "bad", "c")])
    status = run_backfill(st, coll.start_upgrade("vB").job)
    assert (status.state, status.written, status.failed) == ("completed", 2, 1)
    assert coll.get("bad").current.version == "vA"


def test_status_reports_rate_and_eta(store):
    fill(store, 20)
    job = store.collection("c").start_upgrade("vB", batch_size=5).job
    st = run_backfill(store, job, max_batches=3)
    assert (st.done, st.fraction) == (15, 0.75)
    assert st.rate is not None and st.rate > 0
    assert st.eta_s == pytest.approx(5 / st.rate)


@pytest.mark.parametrize(("kwargs", "error", "message"), [
    ({"strategy": "warm"}, ValueError,
     "strategy must be one of hot-refresh, transform, cold, got 'warm'"),
    ({"batch_size": 0}, ValueError, "batch_size must be an integer in [1, 100000], got 0"),
    ({"ordering": "oracle"}, ValueError,
     "ordering 'oracle' needs the new vectors of every item and is for analysis only; use "
     "random, uncertainty, sigma or given"),
    ({"ordering": "given"}, ValueError, "ordering 'given' needs given_order (a list of item ids)"),
    ({"ordering": "randon"}, UnknownNameError, "unknown backfill ordering 'randon'"),
    ({"strategy": "transform"}, IncompatibleSpacesError,
     "strategy 'transform' needs a transformation 'vA' -> 'vB'; register one first"),
])
def test_bad_upgrade_requests(store, kwargs, error, message):
    fill(store, 2)
    with pytest.raises(error) as err:
        store.collection("c").start_upgrade("vB", **kwargs)
    assert str(err.value).startswith(message)
    assert store.collection("c").serving_version == "vA"


def test_hot_refresh_needs_compatibility_and_one_job_at_a_time(tmp_path):
    st = IndexStore(tmp_path / "s")
    hash_versions(st)
    coll = st.create_collection("c", "vA")
    coll.add([ItemInput("a", source="a")])
    with pytest.raises(IncompatibleSpacesError) as err:
        coll.start_upgrade("vB")
    assert str(err.value) == (
        "hot-refresh serves 'vB' at once, so 'vB' must be able to search 'vA' vectors; declare "
        "'vB' compatible with 'vA' or a query adapter (a transformation 'vB' -> 'vA'), or use "
        "the 'cold' or 'transform' strategy")
    coll.start_upgrade("vB", strategy="cold")
    with pytest.raises(StateConflictError, match=r"collection 'c' has upgrade job 1 \(running\)"):
        coll.start_upgrade("vB", strategy="cold")


def test_transformation_with_side_information(tmp_path, make_transformation):
    from compatkit.feature_upgrade import apply_transformation
    from compatkit.index import HashEmbedder

    st = IndexStore(tmp_path / "s")
    hash_versions(st)
    st.declare_compatible("vB", "vA")
    st.register_version("side", dim=4, kind="side_info", embedder=HashEmbedder("side", 4, seed=9))
    rel = st.register_artifact(make_transformation("t", "vA", "vB", d_side=4),
                               side_version="side")
    coll = st.create_collection("c", "vA", side_versions=["side"])
    side_raw = np.array([1.0, 2.0, 3.0, 4.0], dtype=np.float32)
    coll.add([ItemInput(f"i{i}", source=f"src{i}") for i in range(4)]
             + [ItemInput("raw", vector=np.ones(DIM), side={"side": side_raw})])
    assert coll.get("i0").side_versions == ("side",)
    job = coll.start_upgrade("vB", strategy="transform", batch_size=2).job
    assert job_status(st, job).phases == ("transform(live, random)",)
    assert run_backfill(st, job).written == 5
    ids = ["i0", "i1", "i2", "i3"]
    old = st.embedder("vA").embed_sources([f"src{i}" for i in range(4)])
    side = st.embedder("side").embed_sources([f"src{i}" for i in range(4)])
    module = st.transformer(rel).module
    expected = apply_transformation(module, np.vstack([old, np.ones((1, DIM))]),
                                    np.vstack([side, side_raw]))
    for row, item_id in enumerate([*ids, "raw"]):
        cur = coll.get(item_id, with_vectors=True).current
        assert (cur.version, cur.transformed_from) == ("vB", "vA")
        np.testing.assert_allclose(cur.vector, expected[row], rtol=1e-5, atol=1e-6)


def test_an_item_added_while_the_upgrade_is_planned_is_not_skipped(store, monkeypatch):
    from compatkit.index import upgrade as up

    coll = fill(store, 4)
    real_plan = up.plan_order
    calls = []

    def plan_with_a_concurrent_add(*args, **kwargs):
        out = real_plan(*args, **kwargs)
        if not calls:  # another client adds an item between the plan and the job's creation
            coll.add([ItemInput("late", source="late")])
        calls.append(1)
        return out

    monkeypatch.setattr(up, "plan_order", plan_with_a_concurrent_add)
    status = coll.start_upgrade("vB", batch_size=10)
    assert (len(calls), status.total) == (2, 5)  # planned again, with the new item
    assert run_backfill(store, status.job).written == 5
    assert coll.get("late").current.version == "vB"


def test_a_completed_upgrade_says_to_finalize_before_raw_new_vectors(store):
    coll = fill(store, 3)
    job = coll.start_upgrade("vB", batch_size=3).job
    assert run_backfill(store, job).state == "completed"
    with pytest.raises(StateConflictError, match=(
            r"is completed .* or finalize upgrade job 1 first \(`compatkit index finalize c "
            r"--job 1` or POST /collections/c/upgrades/1/finalize")):
        coll.add([ItemInput("raw", vector=np.ones(DIM), version="vB")])
    assert coll.count() == 3
    finalize(store, job)
    coll.add([ItemInput("raw", vector=np.ones(DIM), version="vB")])  # what the message said
    assert coll.get("raw").current.version == "vB"
