"""Versions, relations and collections over HTTP."""

from __future__ import annotations

from .conftest import AUTH


def test_register_list_and_conflicts(client):
    body = {"name": "vC", "dim": 8, "embedder": {"seed": 3}}
    r = client.post("/versions", headers=AUTH, json=body)
    assert (r.status_code, r.json()) == (201, {"name": "vC", "dim": 8, "normalized": True,
                                               "kind": "model", "embedder": "hash"})
    assert client.post("/versions", headers=AUTH, json=body).status_code == 201  # idempotent
    r = client.post("/versions", headers=AUTH, json={"name": "vC", "dim": 4})
    assert (r.status_code, r.json()) == (409, {"detail": (
        "version 'vC' is already registered with other fields (dim 8, normalized True, "
        "kind model)")})
    assert [v["name"] for v in client.get("/versions").json()["data"]] == ["vA", "vB", "vC"]
    r = client.get("/versions/vc")
    assert (r.status_code, r.json()) == (404, {"detail": "unknown version 'vc'; did you mean "
                                                         "vC, vB, vA?"})


def test_relations(client):
    client.post("/versions", headers=AUTH, json={"name": "w4", "dim": 4})
    r = client.post("/relations", headers=AUTH, json={"kind": "compatible", "old": "vA",
                                                      "new": "w4"})
    assert (r.status_code, r.json()) == (422, {"detail": (
        "'w4' (dim 4) cannot be compatible with 'vA' (dim 8): the dimensions differ")})
    r = client.post("/relations", headers=AUTH, json={"kind": "transform", "old": "vA",
                                                      "new": "vB"})
    assert (r.status_code, r.json()) == (422, {"detail": (
        "invalid request: body: Value error, a transform relation needs artifact")})
    data = client.get("/relations").json()
    assert data["count"] == 1
    assert data["data"][0]["description"] == "vB is compatible with vA"


def test_register_artifact_errors(client, tmp_path):
    r = client.post("/versions/artifacts", headers=AUTH, json={"path": str(tmp_path)})
    assert (r.status_code, r.json()) == (422, {"detail": (
        f"{tmp_path.resolve()} is not a compatkit artifact: manifest.json missing")})


def test_register_artifact(client, make_model):
    path = make_model("m1", compatible_with=("vA",))
    r = client.post("/versions/artifacts", headers=AUTH, json={"path": path})
    assert (r.status_code, r.json()["name"], r.json()["embedder"]) == (201, "m1", "artifact")
    assert [d["description"] for d in client.get("/relations").json()["data"]] == [
        "m1 is compatible with vA", "vB is compatible with vA"]


def test_collections(client):
    r = client.post("/collections", headers=AUTH, json={"name": "d", "version": "vB",
                                                        "index": "hnsw"})
    assert (r.status_code, r.json()["index"], r.json()["items"]) == (201, "hnsw", 0)
    r = client.post("/collections", headers=AUTH, json={"name": "d", "version": "vB"})
    assert (r.status_code, r.json()) == (409, {"detail": "collection 'd' already exists"})
    r = client.post("/collections", headers=AUTH, json={"name": "bad name", "version": "vB"})
    assert r.status_code == 422
    assert r.json()["detail"].startswith("collection name must be 1-128 characters")
    assert client.get("/collections").json() == {"data": ["c", "d"], "count": 2}
    stats = client.get("/collections/c").json()
    assert (stats["items"], stats["current"], stats["active_job"]) == (5, {"vA": 5}, None)
    assert client.delete("/collections/d", headers=AUTH).status_code == 204
    assert client.get("/collections/d").status_code == 404
