"""Worker threads: the walks give identical results on 1 and several threads, tiles of a block
run on every worker, and the caller's thread count is left as it was."""

import threading

import numpy as np
import pytest
import torch

from compatkit.eval import ranking
from compatkit.eval.curve import backfill_curve
from compatkit.eval.metrics import per_query_metrics
from compatkit.eval.retrieval import knn
from compatkit.eval.testing import reference_metrics, tied_features
from compatkit.eval.threads import Workers, Workspace

METRICS = ["map", "cmc@1", "cmc@3", "map@r", "precision@2"]


@pytest.fixture
def torch_threads():
    """Set torch's intra-op thread count for one test, then restore it."""
    before = torch.get_num_threads()
    yield torch.set_num_threads
    torch.set_num_threads(before)


def tiny_problem(seed):
    rng = np.random.default_rng(seed)
    g_old, g_new = tied_features(rng, 90, 4), tied_features(rng, 90, 4)
    g_new[:30] = g_old[:30]  # ties between the two states
    gl = rng.integers(0, 5, 90)
    q, ql = tied_features(rng, 40, 4), rng.integers(0, 5, 40)
    return q, ql, g_old, g_new, gl, tied_features(rng, 40, 4), rng.permutation(90)


@pytest.mark.parametrize("seed", [0, 1])
def test_walks_equal_on_one_and_several_threads(monkeypatch, torch_threads, seed):
    """Tiny tiles give each worker many tiles: metrics, curves and knn equal the 1-thread
    results and the dense reference exactly."""
    monkeypatch.setattr(ranking, "TILE_ROWS", 3)
    q, ql, go, gn, gl, oq, order = tiny_problem(seed)
    runs = {}
    for threads in (1, 3):
        torch_threads(threads)
        runs[threads] = (
            per_query_metrics(q, ql, gn, gl, metrics=METRICS, chunk_size=16),
            backfill_curve(
                q, ql, go, gn, gl, order, steps=6, metrics=METRICS, old_query=oq, chunk_size=16
            ).to_json(),
            knn(q, gn, 5, chunk_size=16, query_block=7),
            knn(q, gn, 1, chunk_size=16, query_block=7),
        )
        assert torch.get_num_threads() == threads  # the workers' count stays theirs
    (pq1, curve1, knn5_1, knn1_1), (pq3, curve3, knn5_3, knn1_3) = runs[1], runs[3]
    want = reference_metrics(q, ql, gn, gl, metrics=METRICS, per_query=True)
    for name in METRICS:
        np.testing.assert_array_equal(pq1[name], pq3[name])
        np.testing.assert_allclose(pq3[name], want[name], atol=1e-12)
    assert curve1 == curve3
    for a, b in ((knn5_1, knn5_3), (knn1_1, knn1_3)):
        np.testing.assert_array_equal(a.indices, b.indices)
        np.testing.assert_array_equal(a.scores, b.scores)


def test_workers_map_in_order_on_several_threads():
    seen = set()

    def unit(i):
        seen.add(threading.get_ident())
        ws = workers.workspace()
        assert ws is workers.workspace()  # one workspace per thread
        return i * i, torch.get_num_threads()

    with Workers(torch.device("cpu"), threads=2) as workers:
        out = workers.map(unit, range(64))
    assert [x for x, _ in out] == [i * i for i in range(64)]
    assert {n for _, n in out} == {1}  # workers run their ops single-threaded
    assert threading.get_ident() not in seen


def test_workers_single_thread_runs_on_the_caller():
    with Workers(torch.device("cpu"), threads=1) as workers:
        assert workers.map(lambda _: threading.get_ident(), range(3)) == [threading.get_ident()] * 3
    assert Workers(torch.device("meta"), threads=4).threads == 1  # one stream off the CPU


def test_workers_reject_bad_thread_counts():
    with pytest.raises(ValueError, match="threads must be a positive integer, got 0"):
        Workers(torch.device("cpu"), threads=0)


def test_workspace_reuses_and_grows_buffers():
    ws = Workspace()
    a = ws.take("x", 10, torch.float32, torch.device("cpu"))
    assert ws.take("x", 8, torch.float32, torch.device("cpu")).data_ptr() == a.data_ptr()
    b = ws.take("x", 11, torch.float32, torch.device("cpu"))
    assert b.numel() == 11 and b.data_ptr() != a.data_ptr()
    assert ws.take("x", 4, torch.int32, torch.device("cpu")).dtype == torch.int32


def test_worker_errors_reach_the_caller():
    def fail(i):
        if i == 5:
            raise ValueError("unit 5 failed")
        return i

    with (
        Workers(torch.device("cpu"), threads=2) as workers,
        pytest.raises(ValueError, match="unit 5"),
    ):
        workers.map(fail, range(8))
