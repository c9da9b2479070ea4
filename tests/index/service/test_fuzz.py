"""Fuzz the HTTP API from its own OpenAPI schema (schemathesis, in-process over ASGI).

Every operation gets a bounded number of generated requests that fit the schema and as many
that do not, all with the admin token: no answer is a 5xx, every error is the documented
``{"detail": "<one sentence>"}``, every answer conforms to the schema's status codes, content
types and bodies, and the token never appears in an answer.
"""

from __future__ import annotations

import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.errors import Unsatisfiable
from schemathesis import GenerationMode
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    response_schema_conformance,
    status_code_conformance,
)

from compatkit.index import IndexStore, ItemInput
from compatkit.index.service import ServiceSettings, create_app

from ..conftest import DIM, fill, hash_versions
from .conftest import AUTH, MAX_BODY, TOKEN

#: Generated requests per operation and mode (19 operations, 2 modes: well under a minute).
EXAMPLES = 10
#: Path values that exist in the fuzzed store, drawn half of the time so that requests reach
#: past the 404 of an unknown collection, item, version or job.
KNOWN = {"name": ["c"], "item_id": ["i0", "i4", "dir/x y.png"], "version": ["vA", "vB"],
         "job": [1]}
CHECKS = [status_code_conformance, content_type_conformance, response_schema_conformance]


def _check(case, response) -> None:
    where = f"{case.method} {case.formatted_path}"
    assert response.status_code < 500, (where, response.status_code, response.text)
    assert TOKEN not in response.text, where
    assert all(TOKEN not in str(v) for v in response.headers.values()), where
    if response.status_code >= 400:
        body = response.json()
        assert set(body) == {"detail"} and isinstance(body["detail"], str), (where, body)
        assert body["detail"] and "\n" not in body["detail"], (where, body)
    case.validate_response(response, checks=CHECKS)


def _app(root):
    """A fresh service over vA, vB (compatible), collection "c" of 6 items and a running job 1."""
    store = IndexStore(root)
    hash_versions(store)
    store.declare_compatible("vB", "vA")
    coll = fill(store, 5)
    coll.add([ItemInput("dir/x y.png", vector=[1.0] * DIM)])
    coll.start_upgrade("vB", strategy="cold")  # job 1, running (no worker)
    return store, create_app(store, ServiceSettings(
        admin_token=TOKEN, run_worker=False, max_body_bytes=MAX_BODY,
        source_root=root / "sources"))


@pytest.mark.parametrize("mode", [GenerationMode.POSITIVE, GenerationMode.NEGATIVE])
def test_api_never_fails_or_leaks(tmp_path, mode):
    store, app = _app(tmp_path / "schema")
    schema = schemathesis.openapi.from_asgi("/openapi.json", app)
    operations = [result.ok() for result in schema.get_all_operations()]
    store.close()
    assert len(operations) >= 19

    fuzzed = 0
    for n, operation in enumerate(operations):  # each on a fresh store (one may drop "c")
        store, app = _app(tmp_path / f"op{n}")
        try:
            _fuzz(operation, mode, app)
            fuzzed += 1
        except Unsatisfiable:  # nothing to make invalid (no parameters, no body)
            assert mode == GenerationMode.NEGATIVE, operation.label
        finally:
            store.close()
    assert fuzzed >= 15, fuzzed


def _fuzz(operation, mode: GenerationMode, app) -> None:
    """Send ``EXAMPLES`` generated requests of ``operation`` to ``app`` and check each answer."""

    @given(case=operation.as_strategy(generation_mode=mode), data=st.data())
    @settings(max_examples=EXAMPLES, deadline=None, derandomize=True, database=None,
              suppress_health_check=list(HealthCheck))
    def fuzz(case, data) -> None:
        if data.draw(st.booleans(), label="known path values"):
            for key in set(case.path_parameters) & set(KNOWN):
                case.path_parameters[key] = data.draw(st.sampled_from(KNOWN[key]), label=key)
        _check(case, case.call(headers=AUTH, app=app))

    fuzz()
