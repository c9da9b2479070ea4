"""Dependencies shared by the routers: the store, the settings, the admin guard, a collection."""

from __future__ import annotations

import secrets
from typing import Annotated

from fastapi import Depends, HTTPException, Request, status
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer

from compatkit.index.collection import Collection
from compatkit.index.service.settings import ServiceSettings
from compatkit.index.store import IndexStore

_bearer = HTTPBearer(auto_error=False)


def get_store(request: Request) -> IndexStore:
    """The store the app was created with."""
    return request.app.state.store


def get_settings(request: Request) -> ServiceSettings:
    """The settings the app was created with."""
    return request.app.state.settings


StoreDep = Annotated[IndexStore, Depends(get_store)]
SettingsDep = Annotated[ServiceSettings, Depends(get_settings)]


def require_admin(
    settings: SettingsDep,
    credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(_bearer)],
) -> None:
    """Let the request through only with ``Authorization: Bearer <admin token>``."""
    if credentials is None or credentials.scheme.lower() != "bearer":
        raise HTTPException(status.HTTP_401_UNAUTHORIZED, "missing bearer token",
                            headers={"WWW-Authenticate": "Bearer"})
    expected = settings.admin_token.get_secret_value().encode()
    if not secrets.compare_digest(credentials.credentials.encode(), expected):
        raise HTTPException(status.HTTP_403_FORBIDDEN, "invalid bearer token")


AdminDep = Annotated[None, Depends(require_admin)]


def get_collection(name: str, store: StoreDep) -> Collection:
    """The collection named in the path (404 when it does not exist)."""
    return store.collection(name)


CollectionDep = Annotated[Collection, Depends(get_collection)]


def check_source(source: str | None, settings: ServiceSettings) -> str | None:
    """A source as stored: resolved under ``source_root`` when one is set.

    Raises:
        ValueError: a URI other than file://, or a path outside ``source_root``.
    """
    if source is None or settings.source_root is None:
        return source
    path = source[len("file://"):] if source.startswith("file://") else source
    if "://" in path:
        raise ValueError(f"source {source!r}: only paths under the source root are accepted")
    root = settings.source_root.resolve()
    resolved = (root / path).resolve()
    if not resolved.is_relative_to(root):
        raise ValueError(f"source {source!r} is outside the source root")
    return str(resolved)

