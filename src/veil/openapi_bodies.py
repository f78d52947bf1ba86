"""Request-body schemas for the OpenAPI documents of the KeyService and the gateway.

The endpoints read their bodies raw (to check signatures over the exact bytes and to stream
uploads), so FastAPI cannot infer these; declaring them lets clients, and the schema-driven fuzz
tests, see what each endpoint takes. They describe the wire formats of docs/protocol.md; the
handlers still validate every field themselves.
"""

from __future__ import annotations

from typing import Any

from veil.crypto.envelope import BINARY_CONTENT_TYPE

B64 = {"type": "string", "pattern": "^[A-Za-z0-9_-]*$"}
HEX64 = {"type": "string", "pattern": "^[0-9a-f]{64}$"}
V1 = {"type": "integer", "enum": [1]}
MEASUREMENTS = {"type": "array", "items": {"type": "string", "minLength": 1, "maxLength": 512}, "maxItems": 64}
DELAY = {"type": "integer", "minimum": 0, "maximum": 300}
EVIDENCE = {
    "type": "object",
    "properties": {"v": V1, "kind": {"type": "string"}, "raw": B64, "report_data": B64, "collateral": {}},
    "required": ["v", "kind", "raw"],
}


def json_body(properties: dict[str, Any], required: list[str]) -> dict[str, Any]:
    """`openapi_extra` declaring a JSON object body."""
    schema = {"type": "object", "properties": properties, "required": required}
    return {"requestBody": {"required": True, "content": {"application/json": {"schema": schema}}}}


def binary_body() -> dict[str, Any]:
    return {
        "requestBody": {
            "required": True,
            "content": {"application/octet-stream": {"schema": {"type": "string", "format": "binary"}}},
        }
    }


REGISTER = json_body({"v": V1, "public_key": B64}, ["v", "public_key"])
STAGE_VERSION = json_body(
    {"v": V1, "sealed_model_key": B64, "digest": HEX64, "measurements": MEASUREMENTS, "revocation_delay_s": DELAY},
    ["v", "sealed_model_key", "digest"],
)
EMPTY = json_body({"v": V1}, ["v"])
REVOCATION_DELAY = json_body({"v": V1, "revocation_delay_s": DELAY}, ["v", "revocation_delay_s"])
MEASUREMENTS_BODY = json_body({"v": V1, "measurements": MEASUREMENTS}, ["v", "measurements"])
REQUEST_KEY = json_body(
    {"v": V1, "sealed_request_key": B64, "measurements": MEASUREMENTS, "max_revocation_delay_s": DELAY},
    ["v", "sealed_request_key", "measurements"],
)
ATTEST = json_body(
    {"v": V1, "challenge": B64, "public_key": B64, "evidence": EVIDENCE}, ["v", "challenge", "public_key", "evidence"]
)
RELEASE = json_body(
    {"v": V1, "session": {"type": "string"}, "model": {"type": "string"}, "user": {"type": "string"}},
    ["v", "session", "model", "user"],
)
ENVELOPE = json_body(
    {
        "v": {"type": "integer", "enum": [2]},
        "model": {"type": "string"},
        "user": {"type": "string"},
        "request_id": {"type": "string"},
        "direction": {"type": "string", "enum": ["request", "response"]},
        "expires": {"type": "integer"},
        "ct": B64,
    },
    ["v", "model", "user", "request_id", "direction", "expires", "ct"],
)
# the zero-copy form of the same envelope (docs/protocol.md, "Binary form"), what the SDK sends
ENVELOPE["requestBody"]["content"][BINARY_CONTENT_TYPE] = {"schema": {"type": "string", "format": "binary"}}
HE_OBJECT = json_body({}, [])
CARD = json_body({"v": V1, "signed_card": {"type": "object"}}, ["v", "signed_card"])
