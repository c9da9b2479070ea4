"""Health and Prometheus metrics."""

from __future__ import annotations

from .conftest import AUTH


def test_health(client):
    assert client.get("/health").json() == {"status": "ok", "collections": 1,
                                            "worker": "disabled", "worker_error": None}


def test_metrics_text_format(client):
    client.post("/collections/c/search", json={"vector": [1.0] * 8})
    client.post("/collections/c/search", json={"vector": [1.0] * 3})
    client.post("/collections/c/upgrades", headers=AUTH, json={"version": "vB"})
    r = client.get("/metrics")
    assert r.headers["content-type"] == "text/plain; version=0.0.4; charset=utf-8"
    lines = r.text.splitlines()
    search = 'route="/collections/{name}/search"'
    assert (f'compatkit_http_requests_total{{method="POST",{search},status="200"}} 1'
            in lines)
    assert (f'compatkit_http_requests_total{{method="POST",{search},status="422"}} 1'
            in lines)
    assert f'compatkit_http_request_duration_seconds_count{{{search}}} 2' in lines
    assert f'compatkit_http_request_duration_seconds_bucket{{{search},le="+Inf"}} 2' in lines
    assert 'compatkit_items{collection="c"} 5' in lines
    assert 'compatkit_current_vectors{collection="c",version="vA"} 5' in lines
    assert 'compatkit_upgrade_fraction{collection="c",job="1",state="running"} 0.000000' in lines
    assert "# TYPE compatkit_http_request_duration_seconds histogram" in lines
