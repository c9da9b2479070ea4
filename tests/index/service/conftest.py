"""An app over a temporary store (vA, vB compatible, collection "c" of 5 items), no worker."""

from __future__ import annotations

import warnings

import pytest

with warnings.catch_warnings():
    warnings.simplefilter("ignore")  # starlette's note about httpx2
    from fastapi.testclient import TestClient

from compatkit.index.service import ServiceSettings, create_app

from ..conftest import fill

TOKEN = "t0ken-for-tests-0123456789"
AUTH = {"Authorization": f"Bearer {TOKEN}"}
MAX_BODY = 64 * 1024


@pytest.fixture()
def app(store, tmp_path):
    fill(store, 5)
    settings = ServiceSettings(admin_token=TOKEN, run_worker=False, max_body_bytes=MAX_BODY,
                               source_root=tmp_path / "sources")
    return create_app(store, settings)


@pytest.fixture()
def client(app):
    with TestClient(app) as c:
        yield c
