"""Constants and bindings shared by the KeyService and its clients (runtime, SDK).

Keeping them in one small module means the runtime's measured code and the KeyService agree on
every label by construction.
"""

from __future__ import annotations

import hashlib

from veil.wire.blobs import KEY_PREFIX

VERSION = 1
MAX_BODY = 256 * 1024
CLOCK_SKEW_S = 300
SESSION_TTL_S = 3600
CHALLENGE_TTL_S = 120
# The revocation delay: how long a runtime may cache released keys. The owner sets it per model
# and the user may ask for less (the shorter wins); the KeyService returns it with every release
# and the runtime obeys it, never longer than MAX_REVOCATION_DELAY_S (this constant is measured
# code: nothing the platform writes can lengthen it).
DEFAULT_REVOCATION_DELAY_S = 60
MAX_REVOCATION_DELAY_S = 300

# HPKE `info` labels: each says what a sealed message is for, so none can be re-purposed.
INFO_MODEL_KEY_UPLOAD = b"veil v1 model key upload"
INFO_REQUEST_KEY_UPLOAD = b"veil v1 request key upload"
INFO_RELEASE_MODEL_KEY = b"veil v1 release model key"
INFO_RELEASE_REQUEST_KEY = b"veil v1 release request key"


def upload_aad(model_id: str, principal_id: str) -> bytes:
    """AAD of an uploaded key: which model and which principal it belongs to."""
    return f"{model_id}\n{principal_id}".encode()


def release_aad(session_id: str, model_id: str, user_id: str, version: int, digest: str, ttl_s: int) -> bytes:
    """AAD of a released key: which session, model and user it was released for, and the terms
    (model version, content digest, cache lifetime) that travel beside it in clear."""
    return f"veil-release-v2\n{session_id}\n{model_id}\n{user_id}\n{version}\n{digest}\n{ttl_s}".encode()


def runtime_binding(public_key: bytes, challenge: bytes) -> bytes:
    """Report data of a runtime's evidence: SHA-256(ephemeral public key ‖ challenge)."""
    return hashlib.sha256(public_key + challenge).digest()


def keyservice_binding(public_key: bytes, signing_key: bytes, client_nonce: bytes) -> bytes:
    """Report data of the KeyService's evidence: SHA-256(label ‖ HPKE public key ‖ Ed25519
    answer-signing key ‖ client nonce). Both keys are born in the TEE; clients pin both."""
    return hashlib.sha256(b"veil-keyservice-v2" + public_key + signing_key + client_nonce).digest()


HEADER_ANSWER_SIGNATURE = "x-veil-answer-signature"
ANSWER_CONTEXT = b"veil-answer-v1"


def answer_payload(
    principal: str, nonce: str, seq: str, method: str, path: str, request_sha256: str, status: int, answer: bytes
) -> bytes:
    """What the KeyService signs for every answer to a principal: the request it answers (its
    principal, nonce, sequence number, method, path and body hash), the status and the body hash.
    A dropped, forged or swapped answer therefore fails at the client."""
    return b"\n".join(
        [
            ANSWER_CONTEXT,
            principal.encode(),
            nonce.encode(),
            seq.encode(),
            method.upper().encode(),
            path.encode(),
            request_sha256.encode(),
            str(status).encode(),
            hashlib.sha256(answer).hexdigest().encode(),
        ]
    )


UPLOAD_CONTEXT = b"veil-upload-v1"
HEADER_UPLOAD_SIGNATURE = "x-veil-upload-signature"


def upload_payload(model_id: str, version: int, sealed_sha256: str) -> bytes:
    """What an owner signs to upload a sealed model: which model, which (staged) version, and
    the SHA-256 of the exact sealed file, so the store keeps only the owner's bytes."""
    return b"\n".join([UPLOAD_CONTEXT, model_id.encode(), str(version).encode(), sealed_sha256.encode()])


# Model ids with this prefix name users' HE evaluation-key records in the model store
# (`veil.wire.blobs`); the KeyService refuses to register a model under one.
RESERVED_MODEL_PREFIX = KEY_PREFIX
