"""Items over HTTP: add, get, list, delete; every bad input is a 4xx that changes nothing."""

from __future__ import annotations

import json

import pytest

from .conftest import AUTH, MAX_BODY

V8 = [1.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0]


def test_add_get_list_delete(client, store):
    r = client.post("/collections/c/items", headers=AUTH, json={"items": [
        {"id": "v", "vector": V8, "metadata": {"tag": "x"}},
        {"id": "i0", "source": "img/0.png"}]})
    assert (r.status_code, r.json()) == (200, {"added": 1, "replaced": 1})
    r = client.get("/collections/c/items/v", params={"with_vectors": True})
    assert r.status_code == 200
    body = r.json()
    assert (body["metadata"], body["vectors"][0]["vector"]) == ({"tag": "x"}, V8)
    assert body["vectors"][0]["version"] == "vA"
    # sources are resolved under the configured source root
    assert client.get("/collections/c/items/i0").json()["source"] == str(
        (store.root.parent / "sources" / "img" / "0.png").resolve())
    r = client.get("/collections/c/items", params={"limit": 2})
    assert r.json() == {"data": ["i0", "i1"], "count": 6}
    assert client.delete("/collections/c/items/v", headers=AUTH).status_code == 204
    r = client.delete("/collections/c/items/v", headers=AUTH)
    assert (r.status_code, r.json()) == (404, {"detail": "collection 'c' has no item 'v'"})
    r = client.post("/collections/c/items/delete", headers=AUTH, json={"ids": ["i1", "zz"]})
    assert r.json() == {"deleted": 1}


BAD_ADDS = [
    ('{"items": [{"id": "a", "vector": [NaN, 0, 0, 0, 0, 0, 0, 0]}]}', 422,
     "invalid request: body.items.0.vector.0: Input should be a finite number"),
    ('{"items": [{"id": "a", "vector": [1, 2, 3]}]}', 422,
     "item 'a' vector have dimension 3, expected 8"),
    ('{"items": [{"id": "a", "source": "s", "colour": 1}]}', 422,
     "invalid request: body.items.0.colour: Extra inputs are not permitted"),
    ('{"items": []}', 422,
     "invalid request: body.items: List should have at least 1 item after validation, not 0"),
    (json.dumps({"items": [{"id": f"x{i}", "source": "s"} for i in range(1001)]}), 422,
     "invalid request: body.items: List should have at most 1000 items after validation, "
     "not 1001"),
    ('{"items": [{"id": "a", "vector": [1, 0', 422, "malformed JSON body: Expecting ',' delimiter"),
    ('{"items": [{"id": "a"}]}', 422,
     "invalid request: body.items.0: Value error, an item needs a vector or a source"),
    ('{"items": [{"id": "a", "vector": [1, 0, 0, 0, 0, 0, 0, 0], "version": "vZ"}]}', 404,
     "unknown version 'vZ'; did you mean vB, vA?"),
    ('{"items": [{"id": "a", "source": "../../etc/passwd"}]}', 422,
     "source '../../etc/passwd' is outside the source root"),
    ('{"items": [{"id": "a", "source": "http://example.com/x.png"}]}', 422,
     "source 'http://example.com/x.png': only paths under the source root are accepted"),
    ('{"items": [{"id": "", "source": "s"}]}', 422,
     "invalid request: body.items.0.id: String should have at least 1 character"),
    ('[1, 2]', 422, "invalid request: body: Input should be a valid dictionary or object to "
                    "extract fields from"),
]


@pytest.mark.parametrize(("body", "status", "detail"), BAD_ADDS)
def test_bad_adds_change_nothing(client, store, body, status, detail):
    before = store.collection("c").stats()
    r = client.post("/collections/c/items", content=body,
                    headers={**AUTH, "content-type": "application/json"})
    assert (r.status_code, r.json()) == (status, {"detail": detail})
    assert store.collection("c").stats() == before


def test_incompatible_vector_is_refused(client, store):
    store.register_version("vX", dim=8)
    r = client.post("/collections/c/items", headers=AUTH, json={"items": [
        {"id": "ok", "source": "s"}, {"id": "a", "vector": V8, "version": "vX"}]})
    assert r.status_code == 422
    assert r.json()["detail"] == (
        "item 'a': the serving version 'vA' cannot search a vector of version 'vX' (no declared "
        "relation), and the item has no source that 'vA' can embed")
    assert store.collection("c").count() == 5


def test_oversized_body_is_refused_before_parsing(client, store):
    body = json.dumps({"items": [{"id": "big", "source": "s" * 4000, "metadata": {
        "pad": "x" * MAX_BODY}}]})
    r = client.post("/collections/c/items", content=body,
                    headers={**AUTH, "content-type": "application/json"})
    assert (r.status_code, r.json()) == (413, {"detail": f"request body of {len(body)} bytes "
                                                         f"exceeds the limit of {MAX_BODY} bytes"})
    assert store.collection("c").count() == 5


def test_unknown_collection_and_item(client):
    r = client.post("/collections/nope/items", headers=AUTH, json={"items": [
        {"id": "a", "source": "s"}]})
    assert (r.status_code, r.json()) == (404, {"detail": "unknown collection 'nope'"})
    r = client.get("/collections/c/items/zz")
    assert (r.status_code, r.json()) == (404, {"detail": "collection 'c' has no item 'zz'"})


@pytest.mark.parametrize("path", ["a/b c.png", "a%2Fb%20c.png"])
def test_ids_with_slashes_are_read_and_deleted(client, store, path):
    r = client.post("/collections/c/items", headers=AUTH, json={"items": [
        {"id": "a/b c.png", "vector": V8}, {"id": "a", "vector": V8}]})
    assert r.status_code == 200
    r = client.get(f"/collections/c/items/{path}")
    assert (r.status_code, r.json()["id"]) == (200, "a/b c.png")
    assert client.delete(f"/collections/c/items/{path}").status_code == 401  # still guarded
    assert client.delete(f"/collections/c/items/{path}", headers=AUTH).status_code == 204
    assert client.get(f"/collections/c/items/{path}").status_code == 404
    assert client.get("/collections/c/items/a").json()["id"] == "a"  # its prefix untouched
    assert store.collection("c").count() == 6


def test_deeply_nested_metadata_is_a_422(client, store):
    depth = 5000  # deeper than the JSON parser's recursion limit
    body = ('{"items": [{"id": "deep", "vector": [1, 0, 0, 0, 0, 0, 0, 0], "metadata": '
            + '{"a": ' * depth + "1" + "}" * depth + "}]}")
    r = client.post("/collections/c/items", headers={**AUTH, "content-type": "application/json"},
                    content=body)
    assert r.status_code == 422
    assert r.json()["detail"].startswith("malformed JSON body")
    assert store.collection("c").count() == 5


def test_huge_vectors_are_stored_and_found_by_direction(client):
    big = [3e38, 3e38, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0]
    r = client.post("/collections/c/items", headers=AUTH, json={"items": [
        {"id": "big", "vector": big}]})
    assert r.status_code == 200
    r = client.post("/collections/c/search", json={"vector": [1e20, 1e20] + [0.0] * 6, "k": 1})
    hit = r.json()["hits"][0]
    assert (hit["id"], hit["score"]) == ("big", pytest.approx(1.0, abs=1e-6))
