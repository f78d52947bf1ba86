"""Schema-driven fuzzing of the gateway (schemathesis, from its OpenAPI document with request
bodies declared), against the running deployment: no input gets a 5xx other than a declared
`unavailable`, and every error has the standard body."""

from __future__ import annotations

import pytest
import schemathesis
from hypothesis import HealthCheck, settings


@pytest.fixture
def gateway_schema(stack):
    return schemathesis.openapi.from_url(f"{stack.info.gateway_url}/openapi.json")


schema = schemathesis.pytest.from_fixture("gateway_schema")


@schema.parametrize()
@settings(max_examples=30, deadline=None, suppress_health_check=list(HealthCheck), derandomize=True)
def test_no_input_gets_a_server_error(case) -> None:
    response = case.call(timeout=30)
    content_type = response.headers.get("content-type") or [""]
    if response.status_code >= 400 and str(
        content_type[0] if isinstance(content_type, list) else content_type
    ).startswith("application/json"):
        body = response.json()
        assert isinstance(body.get("error"), dict) and {"code", "message"} <= set(body["error"]), body
        if response.status_code >= 500:
            assert body["error"]["code"] in ("unavailable", "busy", "keyservice_unavailable"), body
    else:
        assert response.status_code < 500, (case.method, case.formatted_path, response.status_code, response.text[:300])
