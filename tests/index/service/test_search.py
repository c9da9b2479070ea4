"""Search over HTTP: hits with the answering version, and every bad query a clear 4xx."""

from __future__ import annotations

import base64

import pytest

from .conftest import AUTH


def test_vector_and_image_queries(client, store):
    vec = store.embedder("vA").embed_sources(["src2"])[0].tolist()
    r = client.post("/collections/c/search", json={"vector": vec, "k": 2})
    assert r.status_code == 200
    body = r.json()
    assert body["query_version"] == "vA"
    assert body["hits"][0] == {"id": "i2", "score": pytest.approx(1.0, abs=1e-6),
                               "version": "vA", "transformed_from": None,
                               "metadata": {"label": 2}}
    assert len(body["hits"]) == 2
    # a raw input is embedded by the serving model (the hash embedder hashes the bytes)
    image = base64.b64encode(b"src3").decode()
    r = client.post("/collections/c/search", json={"image_b64": image, "k": 1,
                                                   "with_metadata": False})
    assert r.json()["hits"][0]["id"] == "i3" and r.json()["hits"][0]["metadata"] == {}


def test_mixed_versions_during_an_upgrade(client, store):
    client.post("/collections/c/upgrades", headers=AUTH, json={"version": "vB",
                                                               "ordering": "given",
                                                               "given_order": ["i1"],
                                                               "batch_size": 1})
    from compatkit.index import run_backfill

    run_backfill(store, 1, max_batches=1)  # only i1 is re-embedded
    vec = store.embedder("vB").embed_sources(["src1"])[0].tolist()
    hits = client.post("/collections/c/search", json={"vector": vec, "version": "vB",
                                                      "k": 5}).json()["hits"]
    assert hits[0]["id"] == "i1" and hits[0]["version"] == "vB"
    assert {h["version"] for h in hits[1:]} == {"vA"}


BAD_QUERIES = [
    ({"vector": [1.0, 2.0, 3.0]}, 422, "query vectors of version 'vA' have dimension 3, "
                                       "expected 8"),
    ({"vector": [0.0] * 8}, 422, "query vectors of version 'vA' row 0 is all zeros; a cosine "
                                 "score needs a non-zero vector"),
    ({"vector": [1.0] * 8, "k": 0}, 422,
     "invalid request: body.k: Input should be greater than or equal to 1"),
    ({"vector": [1.0] * 8, "k": 1001}, 422,
     "invalid request: body.k: Input should be less than or equal to 1000"),
    ({"k": 3}, 422, "invalid request: body: Value error, give exactly one of vector or "
                    "image_b64"),
    ({"vector": [1.0] * 8, "image_b64": "AAAA"}, 422,
     "invalid request: body: Value error, give exactly one of vector or image_b64"),
    ({"image_b64": "not base64!"}, 422, "image_b64 is not valid base64"),
    ({"vector": [1.0] * 8, "version": "vZ"}, 404,
     "unknown version 'vZ'; did you mean vB, vA?"),
    ({"vector": [1.0] * 8, "top": 3}, 422,
     "invalid request: body.top: Extra inputs are not permitted"),
    ({"vector": "1,2,3"}, 422, "invalid request: body.vector: Input should be a valid list"),
]


@pytest.mark.parametrize(("body", "status", "detail"), BAD_QUERIES)
def test_bad_queries(client, body, status, detail):
    r = client.post("/collections/c/search", json=body)
    assert (r.status_code, r.json()) == (status, {"detail": detail})


def test_nan_and_infinity_literals(client):
    for literal in ("NaN", "Infinity", "-Infinity"):
        r = client.post("/collections/c/search", content=f'{{"vector": [{literal}, 1, 1, 1, 1, '
                                                         f'1, 1, 1]}}',
                        headers={"content-type": "application/json"})
        assert (r.status_code, r.json()) == (422, {
            "detail": "invalid request: body.vector.0: Input should be a finite number"})


def test_version_mixing_guard(client, store):
    store.register_version("vX", dim=8)
    r = client.post("/collections/c/search", json={"vector": [1.0] * 8, "version": "vX"})
    assert (r.status_code, r.json()) == (422, {"detail": (
        "a query of version 'vX' cannot search vectors of version 'vA': no declared relation "
        "connects them (declare 'vX' compatible with 'vA', or register a transformation "
        "'vX' -> 'vA')")})
