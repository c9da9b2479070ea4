"""Prometheus text-format metrics of the service: HTTP traffic, collections and upgrades.

No client library: counters and one latency histogram live in a ``ServiceMetrics`` object owned
by the app (no module globals); collection and upgrade gauges are read from the store at scrape
time.
"""

from __future__ import annotations

import bisect
import threading
import time
from collections import defaultdict
from typing import TYPE_CHECKING, Any

from compatkit.errors import UnknownNameError

if TYPE_CHECKING:
    from compatkit.index.store import IndexStore

#: Upper bounds (seconds) of the request-latency histogram.
LATENCY_BUCKETS: tuple[float, ...] = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5,
                                      1.0, 2.5, 5.0)
CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"


def _escape(value: str) -> str:
    return value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


def _labels(**labels: Any) -> str:
    if not labels:
        return ""
    inner = ",".join(f'{k}="{_escape(str(v))}"' for k, v in labels.items())
    return "{" + inner + "}"


class ServiceMetrics:
    """Thread-safe counters of one app: requests, latencies, backfill batches, worker errors."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._requests: dict[tuple[str, str, int], int] = defaultdict(int)
        self._latency: dict[str, list[int]] = {}
        self._latency_sum: dict[str, float] = defaultdict(float)
        self.batches_committed = 0
        self.worker_errors = 0
        self.started = time.time()

    def observe(self, method: str, route: str, status: int, seconds: float) -> None:
        """Count one finished request and its latency."""
        with self._lock:
            self._requests[(method, route, status)] += 1
            counts = self._latency.setdefault(route, [0] * (len(LATENCY_BUCKETS) + 1))
            counts[bisect.bisect_left(LATENCY_BUCKETS, seconds)] += 1
            self._latency_sum[route] += seconds

    def count_batch(self) -> None:
        """Count one batch committed by the background worker."""
        with self._lock:
            self.batches_committed += 1

    def count_worker_error(self) -> None:
        """Count one failed background-worker step."""
        with self._lock:
            self.worker_errors += 1

    def render(self, store: IndexStore) -> str:
        """Every metric in the Prometheus text exposition format (version 0.0.4)."""
        lines: list[str] = []

        def family(name: str, kind: str, help_text: str) -> None:
            lines.append(f"# HELP {name} {help_text}")
            lines.append(f"# TYPE {name} {kind}")

        with self._lock:
            requests = dict(self._requests)
            latency = {k: list(v) for k, v in self._latency.items()}
            sums = dict(self._latency_sum)
            batches, errors = self.batches_committed, self.worker_errors
        family("compatkit_http_requests_total", "counter", "HTTP requests by route and status.")
        for (method, route, status), n in sorted(requests.items()):
            lines.append(f"compatkit_http_requests_total"
                         f"{_labels(method=method, route=route, status=status)} {n}")
        family("compatkit_http_request_duration_seconds", "histogram",
               "HTTP request latency by route.")
        for route, counts in sorted(latency.items()):
            cumulative = 0
            for bound, n in zip((*LATENCY_BUCKETS, float("inf")), counts, strict=True):
                cumulative += n
                le = "+Inf" if bound == float("inf") else repr(bound)
                lines.append(f"compatkit_http_request_duration_seconds_bucket"
                             f"{_labels(route=route, le=le)} {cumulative}")
            lines.append(f"compatkit_http_request_duration_seconds_sum{_labels(route=route)} "
                         f"{sums[route]:.6f}")
            lines.append(f"compatkit_http_request_duration_seconds_count{_labels(route=route)} "
                         f"{cumulative}")
        family("compatkit_backfill_batches_total", "counter",
               "Upgrade batches committed by this service's worker.")
        lines.append(f"compatkit_backfill_batches_total {batches}")
        family("compatkit_worker_errors_total", "counter", "Failed background-worker steps.")
        lines.append(f"compatkit_worker_errors_total {errors}")
        lines += _store_metrics(store)
        return "\n".join(lines) + "\n"


def _store_metrics(store: IndexStore) -> list[str]:
    from compatkit.index.upgrade import job_status, latest_job

    lines = ["# HELP compatkit_items Items per collection.", "# TYPE compatkit_items gauge"]
    vectors, upgrades = [], []
    for name in store.collection_names():
        stats = store.collection(name).stats()
        lines.append(f"compatkit_items{_labels(collection=name)} {stats.items}")
        for version, n in sorted(stats.current.items()):
            vectors.append(f"compatkit_current_vectors"
                           f"{_labels(collection=name, version=version)} {n}")
        try:
            st = job_status(store, latest_job(store, name))
        except UnknownNameError:
            continue
        labels = _labels(collection=name, job=st.job, state=st.state)
        upgrades.append(f"compatkit_upgrade_fraction{labels} {st.fraction:.6f}")
        if st.rate is not None:
            upgrades.append(f"compatkit_upgrade_rate_items_per_second{labels} {st.rate:.3f}")
    lines += ["# HELP compatkit_current_vectors Searched vectors by collection and version.",
              "# TYPE compatkit_current_vectors gauge", *vectors]
    lines += ["# HELP compatkit_upgrade_fraction Done fraction of the latest upgrade phase.",
              "# TYPE compatkit_upgrade_fraction gauge",
              *[u for u in upgrades if u.startswith("compatkit_upgrade_fraction")],
              "# HELP compatkit_upgrade_rate_items_per_second Recent backfill rate.",
              "# TYPE compatkit_upgrade_rate_items_per_second gauge",
              *[u for u in upgrades if u.startswith("compatkit_upgrade_rate")]]
    return lines
