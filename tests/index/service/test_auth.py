"""The token guard: every write and admin endpoint needs the bearer token; reads do not."""

from __future__ import annotations

import pytest

from .conftest import TOKEN

WRITES = [
    ("post", "/versions", {"name": "vQ", "dim": 4}),
    ("post", "/versions/artifacts", {"path": "/nowhere"}),
    ("post", "/relations", {"kind": "compatible", "old": "vA", "new": "vB"}),
    ("post", "/collections", {"name": "d", "version": "vA"}),
    ("delete", "/collections/c", None),
    ("post", "/collections/c/items", {"items": [{"id": "z", "source": "s"}]}),
    ("delete", "/collections/c/items/i0", None),
    ("post", "/collections/c/items/delete", {"ids": ["i0"]}),
    ("post", "/collections/c/upgrades", {"version": "vB"}),
    ("post", "/collections/c/upgrades/1/pause", None),
    ("post", "/collections/c/upgrades/1/resume", None),
    ("post", "/collections/c/upgrades/1/rollback", None),
    ("post", "/collections/c/upgrades/1/finalize", None),
]


@pytest.mark.parametrize(("method", "path", "body"), WRITES)
@pytest.mark.parametrize(("headers", "status", "detail"), [
    ({}, 401, "missing bearer token"),
    ({"Authorization": "Basic dXNlcjpwYXNz"}, 401, "missing bearer token"),
    ({"Authorization": "Bearer wrong-token-0123456789"}, 403, "invalid bearer token"),
    ({"Authorization": f"Bearer {TOKEN}x"}, 403, "invalid bearer token"),
])
def test_writes_need_the_token(client, store, method, path, body, headers, status, detail):
    before = (store.collection_names(), store.collection("c").stats(), store.versions(),
              store.relations())
    kwargs = {"headers": headers} | ({"json": body} if body is not None else {})
    r = getattr(client, method)(path, **kwargs)
    assert (r.status_code, r.json()) == (status, {"detail": detail})
    if status == 401:
        assert r.headers["www-authenticate"] == "Bearer"
    assert (store.collection_names(), store.collection("c").stats(), store.versions(),
            store.relations()) == before


@pytest.mark.parametrize("path", ["/health", "/metrics", "/versions", "/relations",
                                  "/collections", "/collections/c", "/collections/c/items",
                                  "/collections/c/items/i0"])
def test_reads_need_no_token(client, path):
    assert client.get(path).status_code == 200


def test_settings_refuse_a_weak_token():
    from compatkit.index.service import ServiceSettings

    with pytest.raises(ValueError, match="admin_token must be at least 16 characters"):
        ServiceSettings(admin_token="short")
