"""The service's background worker: runs the batches of every running upgrade job."""

from __future__ import annotations

import logging
import threading

from compatkit.index.service.metrics import ServiceMetrics
from compatkit.index.store import IndexStore
from compatkit.index.upgrade import active_jobs, run_backfill

logger = logging.getLogger(__name__)

#: Batches run per job before looking at the other jobs again.
BATCHES_PER_TURN = 8
ERROR_BACKOFF_S = 5.0


class BackfillWorker:
    """A daemon thread that claims, computes and commits upgrade batches until stopped."""

    def __init__(self, store: IndexStore, metrics: ServiceMetrics, *, name: str = "service",
                 poll_s: float = 0.5) -> None:
        self.store, self.metrics = store, metrics
        self.name, self.poll_s = name, poll_s
        self.stop_event = threading.Event()
        self.last_error: str | None = None
        self._thread = threading.Thread(target=self._loop, name=f"backfill-{name}", daemon=True)

    def start(self) -> None:
        """Start the thread."""
        self._thread.start()

    def stop(self, timeout: float = 30.0) -> None:
        """Ask the thread to stop after its current batch and wait for it."""
        self.stop_event.set()
        if self._thread.is_alive():
            self._thread.join(timeout)

    @property
    def alive(self) -> bool:
        """Whether the thread runs."""
        return self._thread.is_alive()

    def _loop(self) -> None:
        while not self.stop_event.is_set():
            worked = False
            try:
                for job in active_jobs(self.store):
                    before = self.metrics.batches_committed
                    run_backfill(self.store, job, worker=self.name, stop=self.stop_event,
                                 max_batches=BATCHES_PER_TURN,
                                 on_batch=lambda _status: self.metrics.count_batch())
                    worked = worked or self.metrics.batches_committed > before
                self.last_error = None
            except Exception as err:  # keep serving; the job stays resumable
                logger.exception("backfill worker step failed")
                self.metrics.count_worker_error()
                self.last_error = f"{type(err).__name__}: {err}"
                self.stop_event.wait(ERROR_BACKOFF_S)
                continue
            if not worked:
                self.stop_event.wait(self.poll_s)
