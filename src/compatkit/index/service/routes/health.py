"""Liveness and Prometheus metrics."""

from __future__ import annotations

from fastapi import APIRouter, Request
from fastapi.responses import PlainTextResponse

from compatkit.index.service.deps import StoreDep
from compatkit.index.service.metrics import CONTENT_TYPE
from compatkit.index.service.schemas import HealthPublic

router = APIRouter(tags=["health"])


@router.get("/health", response_model=HealthPublic)
def health(request: Request, store: StoreDep) -> HealthPublic:
    """The service answers; how many collections it holds; whether its worker runs."""
    worker = request.app.state.worker
    state = "disabled" if worker is None else ("running" if worker.alive else "stopped")
    return HealthPublic(status="ok", collections=len(store.collection_names()), worker=state,
                        worker_error=None if worker is None else worker.last_error)


@router.get("/metrics", response_class=PlainTextResponse)
def metrics(request: Request, store: StoreDep) -> PlainTextResponse:
    """Prometheus text-format metrics."""
    return PlainTextResponse(request.app.state.metrics.render(store), media_type=CONTENT_TYPE)
