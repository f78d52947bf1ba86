"""What a user signs to use an HE model through the gateway (shared by the SDK and the gateway).

HE-mode requests carry no envelope (there is no TEE to open one), so the gateway authenticates
them: the user's Ed25519 signature (`x-veil-he-signature`, principal in `x-veil-principal`) over
a context string, the model and the SHA-256 of the exact body; the body names a fresh
`request_id` and an `expires` (Unix seconds) so a captured request cannot be replayed after its
window, and the gateway remembers ids inside it. Evaluation-key uploads are signed over the model,
the key id the client computed and the SHA-256 of the blob, so only the principal a record names
can have put it in the store.
"""

from __future__ import annotations

HEADER_HE_SIGNATURE = "x-veil-he-signature"
HEADER_HE_KEY_ID = "x-veil-he-key-id"
HEADER_HE_PARTS = "x-veil-he-parts"  # a client's cap on the instances one throughput batch is spread over
REQUEST_CONTEXT = b"veil-he-request-v1"
KEYS_CONTEXT = b"veil-he-keys-v1"
MAX_REQUEST_LIFETIME_S = 300
CLOCK_SKEW_S = 30


def request_payload(model: str, body_sha256: str) -> bytes:
    """The bytes a user signs for one HE inference request."""
    return b"\n".join([REQUEST_CONTEXT, model.encode(), body_sha256.encode()])


def keys_payload(model: str, key_id: str, blob_sha256: str) -> bytes:
    """The bytes a user signs to upload an evaluation-key blob for `model` under `key_id`."""
    return b"\n".join([KEYS_CONTEXT, model.encode(), key_id.encode(), blob_sha256.encode()])


# Routing: the gateway hands the packer `model@<first 16 hex of the key id>` as the "model" of an
# HE request, so the instance that already holds a user's evaluation keys is preferred. The packer
# counts each such key as resident on its instance and, to make room, asks the instance to drop it
# with `unload_value(routing key)` (the HE action then forgets those keys; any instance can fetch
# them again from the store).
ROUTING_SEPARATOR = "@"
ROUTING_KEY_HEX = 16


def routing_key(model: str, key_id: str) -> str:
    return f"{model}{ROUTING_SEPARATOR}{key_id[:ROUTING_KEY_HEX]}"


def unload_value(key: str) -> dict[str, str]:
    """The request that makes an HE instance drop the keys a routing key stands for."""
    return {"op": "unload", "model": key}
