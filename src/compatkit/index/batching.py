"""Concurrent searches of one process gathered into batched calls, as inference servers batch.

A search that finds the process idle runs at once (a lone query pays no window); searches that
arrive while a batch runs wait for it and then go together as the next batch, at most
``max_queries`` query rows. A batch runs one ``SearchCache.search`` per (collection, query
version) with the largest ``k`` asked, cuts each request's rows to its own ``k``, and reads
every hit's item row in one SQLite read (``fetch_hits_batch``). The cache rescores its
candidates exactly, so a query's answer does not depend on what it was batched with.
``Gatherer`` is the batching alone (``benchmarks/serve_load.py`` batches bare FAISS with it).
"""

from __future__ import annotations

import threading
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Generic, Protocol, TypeVar

import numpy as np

from compatkit.index.options import GroupKey
from compatkit.index.search import SearchResult, SearchStore, fetch_hits_batch

#: Query rows per batch by default; a request with more rows still runs whole.
MAX_BATCH_QUERIES = 256

Rows = list[tuple[float, int, GroupKey]]
R = TypeVar("R")


class Gatherer(Generic[R]):
    """Leader/follower batching of the calls of many threads, one batch at a time.

    ``submit(request)`` returns once ``run`` has processed a batch that held the request (the
    request object carries its own answer). A caller that finds no batch running runs one at
    once; callers that arrive meanwhile queue, and when the batch ends the first of them runs
    the next with everyone queued, up to ``max_size`` (by ``size``; one request always fits).

    Args:
        run: processes a batch of requests; must not raise (errors go into the requests).
        size: the size of a request (query rows). max_size: the bound of a batch.
    """

    def __init__(self, run: Callable[[list[R]], None], *, size: Callable[[R], int],
                 max_size: int) -> None:
        if isinstance(max_size, bool) or not isinstance(max_size, int) or max_size < 1:
            raise ValueError(f"max_size must be a positive integer, got {max_size!r}")
        self.run, self.size, self.max_size = run, size, max_size
        self._lock = threading.Lock()
        self._pending: list[_Entry[R]] = []
        self._busy = False
        self.batches = 0  # batches run so far (for benchmarks and tests)

    @property
    def waiting(self) -> int:
        """Requests queued for the next batch now."""
        with self._lock:
            return len(self._pending)

    def submit(self, request: R) -> None:
        """Return once ``request`` was processed in a batch (possibly run by this thread)."""
        entry = _Entry(request)
        with self._lock:
            self._pending.append(entry)
            lead = not self._busy
            self._busy = True
        if not lead:
            entry.wake.wait()
        if not entry.finished:  # first, or woken to run the next batch, which holds entry
            self._lead()

    def _lead(self) -> None:
        with self._lock:
            batch: list[_Entry[R]] = []
            rows = 0
            while self._pending and (not batch or rows + self.size(self._pending[0].request)
                                     <= self.max_size):
                entry = self._pending.pop(0)
                batch.append(entry)
                rows += self.size(entry.request)
        try:
            self.batches += 1
            self.run([e.request for e in batch])
        finally:
            with self._lock:
                successor = self._pending[0] if self._pending else None
                self._busy = successor is not None
            for entry in batch:
                entry.finished = True
                entry.wake.set()
            if successor is not None:
                successor.wake.set()


@dataclass(eq=False)
class _Entry(Generic[R]):
    request: R
    wake: threading.Event = field(default_factory=threading.Event)
    finished: bool = False


@dataclass(eq=False)
class _Request:
    collection: str
    version: str
    queries: np.ndarray
    k: int
    with_metadata: bool
    rows: list[Rows] = field(default_factory=list)
    results: list[SearchResult] | None = None
    error: BaseException | None = None


class SearchBatcher:
    """Runs the searches of many threads as batches (a ``Gatherer``); one batch at a time.

    Args:
        store: the store whose search caches answer.
        max_queries: query rows per batch (at least 1).
    """

    def __init__(self, store: SearchStore, *, max_queries: int = MAX_BATCH_QUERIES) -> None:
        if isinstance(max_queries, bool) or not isinstance(max_queries, int) or max_queries < 1:
            raise ValueError(f"max_queries must be a positive integer, got {max_queries!r}")
        self.store = store
        self.gatherer: Gatherer[_Request] = Gatherer(self._run, size=lambda r: len(r.queries),
                                                     max_size=max_queries)

    def search(self, collection: str, queries: np.ndarray, version: str, k: int, *,
               with_metadata: bool = True) -> list[SearchResult]:
        """Top-k of each row of ``queries`` (nq, d) of ``version`` over ``collection``.

        The same answer as ``SearchCache.search`` + ``fetch_hits`` for these queries alone;
        it sees every write committed before the call. Errors of the search (unknown
        collection, incompatible spaces) are raised here, to this caller only.
        """
        req = _Request(collection, version, queries, k, with_metadata)
        self.gatherer.submit(req)
        if req.error is not None:
            raise req.error
        if req.results is None:  # the thread running the batch was interrupted
            raise RuntimeError(f"the search batch holding this query on {collection!r} was "
                               "interrupted; retry")
        return req.results

    def _run(self, batch: list[_Request]) -> None:
        try:
            self._search(batch)
        except Exception as err:  # a failure outside one group: every request gets it
            for req in batch:
                if req.error is None:
                    req.error = err

    def _search(self, batch: list[_Request]) -> None:
        by_space: dict[tuple[str, str], list[_Request]] = defaultdict(list)
        for req in batch:
            by_space[(req.collection, req.version)].append(req)
        for (collection, version), reqs in by_space.items():
            queries = np.concatenate([r.queries for r in reqs]) if len(reqs) > 1 \
                else reqs[0].queries
            try:
                found = self.store.search_cache(collection).search(
                    queries, version, max(r.k for r in reqs))
            except Exception as err:  # this group's requests only
                for req in reqs:
                    req.error = err
                continue
            start = 0
            for req in reqs:
                req.rows = [r[:req.k] for r in found[start:start + len(req.queries)]]
                start += len(req.queries)
        answered = [r for r in batch if r.error is None]
        hits = fetch_hits_batch(self.store, [rows for r in answered for rows in r.rows],
                                with_metadata=[r.with_metadata for r in answered
                                               for _ in r.rows])
        start = 0
        for req in answered:
            req.results = [SearchResult(req.version, h)
                           for h in hits[start:start + len(req.rows)]]
            start += len(req.rows)


class BatchingStore(SearchStore, Protocol):
    """A store with a search cache per collection and one batcher (``IndexStore``)."""

    def search_batcher(self) -> SearchBatcher: ...
