"""The binary form of an OpenWhisk `/run` call, shared by the platform (sender) and the runtime.

OpenWhisk's `/run` body is JSON, `{"value": {...}, "activation_id": ..., "deadline": ...}`, and
stays accepted everywhere. A TEE request whose value is only an envelope may instead travel as
the envelope's binary form (`veil.crypto.envelope`, content type `BINARY_CONTENT_TYPE`) as the
whole body, so no side wraps the ciphertext in base64 and JSON; the activation fields then
travel as the headers below (same names and string values as the JSON fields). The runtime
answers a binary request's success with the binary response envelope as the whole body (same
content type); failures stay the JSON error object of the JSON form.
"""

from __future__ import annotations

from veil.crypto.envelope import BINARY_CONTENT_TYPE, is_binary

ACTIVATION_FIELDS = ("activation_id", "action_name", "namespace", "deadline", "api_host", "transaction_id")
# activation field -> the header carrying it in the binary form
FIELD_HEADERS = {
    name: "X-Veil-" + "-".join(part.capitalize() for part in name.split("_")) for name in ACTIVATION_FIELDS
}

__all__ = ["ACTIVATION_FIELDS", "BINARY_CONTENT_TYPE", "FIELD_HEADERS", "is_binary"]
