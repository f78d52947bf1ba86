"""Constants and bindings shared by the KeyService and its clients (runtime, SDK).

Keeping them in one small module means the runtime's measured code and the KeyService agree on
every label by construction.
"""

from __future__ import annotations

import hashlib

VERSION = 1
MAX_BODY = 256 * 1024
CLOCK_SKEW_S = 300
SESSION_TTL_S = 3600
CHALLENGE_TTL_S = 120
KEY_CACHE_TTL_S = 60  # runtimes cache released keys this long: the revocation delay

# HPKE `info` labels: each says what a sealed message is for, so none can be re-purposed.
INFO_MODEL_KEY_UPLOAD = b"veil v1 model key upload"
INFO_REQUEST_KEY_UPLOAD = b"veil v1 request key upload"
INFO_RELEASE_MODEL_KEY = b"veil v1 release model key"
INFO_RELEASE_REQUEST_KEY = b"veil v1 release request key"


def upload_aad(model_id: str, principal_id: str) -> bytes:
    """AAD of an uploaded key: which model and which principal it belongs to."""
    return f"{model_id}\n{principal_id}".encode()


def release_aad(session_id: str, model_id: str, user_id: str) -> bytes:
    """AAD of a released key: which session, model and user it was released for."""
    return f"{session_id}\n{model_id}\n{user_id}".encode()


def runtime_binding(public_key: bytes, challenge: bytes) -> bytes:
    """Report data of a runtime's evidence: SHA-256(ephemeral public key ‖ challenge)."""
    return hashlib.sha256(public_key + challenge).digest()


def keyservice_binding(public_key: bytes, client_nonce: bytes) -> bytes:
    """Report data of the KeyService's evidence: SHA-256(label ‖ HPKE public key ‖ client nonce)."""
    return hashlib.sha256(b"veil-keyservice-v1" + public_key + client_nonce).digest()
