"""Run the service in one process or several (uvicorn workers) on one store folder.

Every worker process opens the store itself and keeps its own search caches and batcher; they
agree because each search first reads the store's change token (``Database.change_token``),
so a write committed by any process, the backfill worker included, is seen by the next search
of every process. With ``workers > 1`` uvicorn imports ``app_from_env`` in each process; the
store folder and the settings travel in the environment variable ``SERVE_ENV``, and each
process's backfill worker claims batches under its own name (``<worker_name>-<pid>``): a batch
claimed by a process that died is taken over by another once its lease expires.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from fastapi import FastAPI

from compatkit.index.service.api import create_app
from compatkit.index.service.settings import ServiceSettings
from compatkit.index.store import IndexStore

#: Environment variable that carries the store folder and settings to worker processes.
SERVE_ENV = "COMPATKIT_SERVE_CONFIG"


def app_from_env() -> FastAPI:
    """The app of one worker process, from ``$COMPATKIT_SERVE_CONFIG`` (set by ``serve``).

    Raises:
        ValueError: the variable is missing.
    """
    raw = os.environ.get(SERVE_ENV)
    if not raw:
        raise ValueError(f"${SERVE_ENV} is not set; start worker processes with "
                         "compatkit.index.service.launch.serve")
    config = json.loads(raw)
    settings = ServiceSettings.model_validate(config["settings"])
    settings = settings.model_copy(update={"worker_name": f"{settings.worker_name}-{os.getpid()}"})
    return create_app(IndexStore(config["store"]), settings)


def serve(store: Path, settings: ServiceSettings, *, host: str = "127.0.0.1", port: int = 8000,
          workers: int = 1, log_level: str = "info") -> None:
    """Serve ``store`` over HTTP with ``workers`` processes (1: this process).

    Raises:
        ValueError: ``workers`` is not a positive integer.
    """
    import uvicorn

    if isinstance(workers, bool) or not isinstance(workers, int) or workers < 1:
        raise ValueError(f"workers must be a positive integer, got {workers!r}")
    if workers == 1:
        uvicorn.run(create_app(IndexStore(store), settings), host=host, port=port,
                    log_level=log_level)
        return
    IndexStore(store).close()  # create the store (and its schema) once, before the workers
    config = {"store": str(Path(store).resolve()),
              "settings": {**settings.model_dump(mode="json"),
                           "admin_token": settings.admin_token.get_secret_value()}}
    os.environ[SERVE_ENV] = json.dumps(config)
    uvicorn.run(f"{__name__}:app_from_env", factory=True, host=host, port=port,
                workers=workers, log_level=log_level)
