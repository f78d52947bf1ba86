"""Schema-driven fuzzing of the KeyService's HTTP API (schemathesis, from its own OpenAPI
document, request bodies declared): whatever arrives, the answer is never a 5xx."""

from __future__ import annotations

import pytest
import schemathesis
from hypothesis import HealthCheck, settings


@pytest.fixture
def ks_schema(keyservice_server):
    return schemathesis.openapi.from_url(f"{keyservice_server.url}/openapi.json")


schema = schemathesis.pytest.from_fixture("ks_schema")


@schema.parametrize()
@settings(max_examples=40, deadline=None, suppress_health_check=list(HealthCheck), derandomize=True)
def test_no_input_gets_a_server_error(case) -> None:
    response = case.call(timeout=10)
    assert response.status_code < 500, (case.method, case.formatted_path, response.status_code, response.text[:300])
    if response.status_code >= 400:
        body = response.json()
        assert set(body) == {"error"} and {"code", "message"} <= set(body["error"]), body
