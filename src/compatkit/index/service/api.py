"""``create_app(store, settings)``: the FastAPI app, its routers, error mapping and middleware.

Errors map to statuses in one place: unknown names 404, state conflicts 409, anything else a
user can fix (bad values, incompatible versions, malformed bodies) 422, oversized bodies 413.
Every error answer is ``{"detail": "<one clear sentence>"}`` and changes nothing.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

from fastapi import FastAPI, Request, status
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from compatkit import __version__
from compatkit.errors import CompatkitError, UnknownNameError
from compatkit.index.errors import StateConflictError
from compatkit.index.service.metrics import ServiceMetrics
from compatkit.index.service.routes import (
    collections,
    health,
    items,
    search,
    upgrades,
    versions,
)
from compatkit.index.service.schemas import ErrorPublic
from compatkit.index.service.settings import ServiceSettings
from compatkit.index.service.worker import BackfillWorker
from compatkit.index.store import IndexStore

logger = logging.getLogger(__name__)

#: The error answers every route documents in the OpenAPI schema (all ``{"detail": "..."}``).
ERROR_RESPONSES: dict[int | str, dict[str, Any]] = {
    code: {"model": ErrorPublic, "description": why} for code, why in (
        (401, "no bearer token (writes and admin routes)"),
        (403, "a wrong bearer token"),
        (404, "an unknown collection, item, version or job"),
        (409, "a state conflict (a name taken, an upgrade running)"),
        (413, "a request body over the limit"),
        (422, "malformed JSON, unknown fields, bad values, incompatible versions"),
    )}


def create_app(store: IndexStore, settings: ServiceSettings) -> FastAPI:
    """The HTTP service over ``store``; a background worker runs upgrades if the settings say so.

    Raises:
        TypeError: ``settings`` is not a ``ServiceSettings``.
    """
    if not isinstance(settings, ServiceSettings):
        raise TypeError(f"settings must be ServiceSettings, got {type(settings).__name__}")
    metrics = ServiceMetrics()

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        worker = None
        if settings.run_worker:
            worker = BackfillWorker(store, metrics, name=settings.worker_name,
                                    poll_s=settings.worker_poll_s)
            worker.start()
        app.state.worker = worker
        try:
            yield
        finally:
            if worker is not None:
                worker.stop()

    app = FastAPI(title="compatkit index", version=__version__, lifespan=lifespan)
    app.state.store, app.state.settings, app.state.metrics = store, settings, metrics
    app.state.worker = None
    for module in (health, versions, collections, items, search, upgrades):
        app.include_router(module.router, responses=ERROR_RESPONSES)
    _add_error_handlers(app)
    app.add_middleware(_BodyLimitMiddleware, max_bytes=settings.max_body_bytes)
    app.add_middleware(_MetricsMiddleware, metrics=metrics)  # outermost: counts 413s too
    return app


def _detail(status_code: int, message: str, headers: dict[str, str] | None = None
            ) -> JSONResponse:
    """The one error shape: ``{"detail": "<one line>"}`` (line breaks of echoed input escaped)."""
    line = message.replace("\r", "\\r").replace("\n", "\\n")
    return JSONResponse({"detail": line}, status_code=status_code, headers=headers)


def _validation_message(err: RequestValidationError) -> str:
    parts = []
    for e in err.errors():
        if e.get("type") == "json_invalid":
            return f"malformed JSON body: {e.get('ctx', {}).get('error', 'cannot be parsed')}"
        loc = ".".join(str(x) for x in e.get("loc", ()))
        msg = str(e.get("msg", "invalid"))
        parts.append(f"{loc}: {msg}" if loc else msg)
    return "invalid request: " + "; ".join(parts)


def _add_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(RequestValidationError)
    async def _invalid(_: Request, err: RequestValidationError) -> JSONResponse:
        return _detail(status.HTTP_422_UNPROCESSABLE_CONTENT, _validation_message(err))

    @app.exception_handler(StarletteHTTPException)
    async def _http(_: Request, err: StarletteHTTPException) -> JSONResponse:
        if err.status_code == status.HTTP_400_BAD_REQUEST:  # FastAPI could not parse the body
            return _detail(status.HTTP_422_UNPROCESSABLE_CONTENT,
                           f"malformed JSON body: {err.detail} (e.g. nested too deeply)")
        return _detail(err.status_code, str(err.detail), getattr(err, "headers", None))

    @app.exception_handler(UnknownNameError)
    async def _unknown(_: Request, err: UnknownNameError) -> JSONResponse:
        return _detail(status.HTTP_404_NOT_FOUND, str(err))

    @app.exception_handler(StateConflictError)
    async def _conflict(_: Request, err: StateConflictError) -> JSONResponse:
        return _detail(status.HTTP_409_CONFLICT, str(err))

    @app.exception_handler(CompatkitError)
    async def _user_error(_: Request, err: CompatkitError) -> JSONResponse:
        return _detail(status.HTTP_422_UNPROCESSABLE_CONTENT, str(err))

    @app.exception_handler(OverflowError)
    async def _too_large(_: Request, err: OverflowError) -> JSONResponse:  # e.g. SQLite ints
        return _detail(status.HTTP_422_UNPROCESSABLE_CONTENT, f"a number is out of range: {err}")

    @app.exception_handler(ValueError)
    async def _bad_value(_: Request, err: ValueError) -> JSONResponse:
        return _detail(status.HTTP_422_UNPROCESSABLE_CONTENT, str(err))


class _BodyLimitMiddleware:
    """Refuse request bodies over ``max_bytes`` with 413 before any handler runs."""

    def __init__(self, app: Any, *, max_bytes: int) -> None:
        self.app, self.max_bytes = app, max_bytes

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        declared = dict(scope.get("headers") or []).get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.max_bytes:
            await self._refuse(send, int(declared))
            return
        chunks, size, more = [], 0, True
        while more:
            message = await receive()
            if message["type"] == "http.disconnect":
                return
            body = message.get("body", b"")
            size += len(body)
            if size > self.max_bytes:
                await self._refuse(send, size)
                return
            chunks.append(body)
            more = message.get("more_body", False)
        replayed = False

        async def replay() -> dict:
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": b"".join(chunks), "more_body": False}
            return await receive()

        await self.app(scope, replay, send)

    async def _refuse(self, send: Any, size: int) -> None:
        body = json.dumps({"detail": f"request body of {size} bytes exceeds the limit of "
                                     f"{self.max_bytes} bytes"}).encode()
        await send({"type": "http.response.start", "status": 413,
                    "headers": [(b"content-type", b"application/json"),
                                (b"content-length", str(len(body)).encode())]})
        await send({"type": "http.response.body", "body": body})


class _MetricsMiddleware:
    """Count every request by method, route template and status, with its latency."""

    def __init__(self, app: Any, *, metrics: ServiceMetrics) -> None:
        self.app, self.metrics = app, metrics

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        start = time.perf_counter()
        status_code = 500

        async def send_status(message: dict) -> None:
            nonlocal status_code
            if message["type"] == "http.response.start":
                status_code = int(message["status"])
            await send(message)

        try:
            await self.app(scope, receive, send_status)
        finally:
            route = getattr(scope.get("route"), "path", "unmatched")
            self.metrics.observe(scope.get("method", ""), route, status_code,
                                 time.perf_counter() - start)
