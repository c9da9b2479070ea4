"""Worker threads and reusable work buffers for the chunked retrieval walks.

On the CPU each worker runs its own single-threaded GEMM and the numpy/torch steps after it
(both release the GIL in their heavy parts), so every core works on the whole pipeline instead
of a multi-threaded GEMM followed by single-threaded post-processing. Other devices run the
work on the calling thread.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any, TypeVar

import torch

T = TypeVar("T")


class Workspace:
    """Work buffers reused from one call to the next: fresh large arrays cost page faults
    that are a sizeable part of a walk."""

    def __init__(self) -> None:
        self._buffers: dict[str, torch.Tensor] = {}

    def take(self, name: str, n: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
        """A buffer of ``n`` elements (contents undefined), reusing the one called ``name``."""
        buf = self._buffers.get(name)
        if buf is None or buf.numel() < n or buf.dtype != dtype or buf.device != device:
            size = max(n, 1) if buf is None else max(n, buf.numel() * 5 // 4)
            buf = torch.empty(size, dtype=dtype, device=device)
            self._buffers[name] = buf
        return buf[:n]


class Workers:
    """A pool of worker threads, each with its own :class:`Workspace` and single-threaded
    torch ops. Use as a context manager (it owns the pool).

    Args:
        device: where the work runs; off the CPU there is one worker, the calling thread.
        threads: workers on the CPU; default torch's intra-op thread count.
    """

    def __init__(self, device: torch.device, threads: int | None = None) -> None:
        n = torch.get_num_threads() if threads is None else threads
        if n < 1:
            raise ValueError(f"threads must be a positive integer, got {threads!r}")
        self.device = device
        self.threads = n if device.type == "cpu" else 1
        self._local = threading.local()
        self._pool = (
            ThreadPoolExecutor(self.threads, initializer=torch.set_num_threads, initargs=(1,))
            if self.threads > 1
            else None
        )

    def __enter__(self) -> Workers:
        return self

    def __exit__(self, *exc: object) -> None:
        if self._pool is not None:
            self._pool.shutdown()

    def workspace(self) -> Workspace:
        """The calling thread's work buffers."""
        ws = getattr(self._local, "workspace", None)
        if ws is None:
            ws = self._local.workspace = Workspace()
        return ws

    def map(self, fn: Callable[[Any], T], units: Sequence[Any]) -> list[T]:
        """``fn(unit)`` for every unit, on the workers; results in unit order. Units run
        concurrently, so they must write to disjoint memory."""
        if self._pool is None or len(units) <= 1:
            return [fn(u) for u in units]
        return list(self._pool.map(fn, units))
