"""Hybrid mode: an HE model sealed like a TEE model, evaluated on CKKS ciphertexts inside the
attested runtime.

The runtime core decrypts a sealed model with the key the KeyService released to this
measurement; when the plaintext is an HE model blob (`veil.he.bundle`) rather than an ONNX or
ORT model, it becomes a `HybridModel` instead of an ONNX Runtime session. The request envelope
(opened with the user's request key, so the request is the user's and not a replay) holds an HE
request (`tensors.HYBRID_REQUEST`): ciphertexts under the user's CKKS key, which this runtime
cannot decrypt. The answer goes back the same way. A TEE that leaks its memory reveals the
model's weights, never a user's inputs or outputs; a cloud without that leak sees neither.
Evaluation keys come from the model store (`veil.he.serving.KeyRing`), used only for the
principal the envelope authenticated.
"""

from __future__ import annotations

import json
from typing import Any

import numpy as np

from veil.errors import BadRequest, VeilError
from veil.he import bundle
from veil.he.errors import HEError
from veil.he.serving import KeyRing, ModelSet, evaluate
from veil.he.wire import InferRequest
from veil.runtime.backend import _Model
from veil.runtime.tensors import HYBRID_REQUEST, HYBRID_RESPONSE


def is_he_model(plaintext: bytes | bytearray | memoryview) -> bool:
    return bundle.is_bundle(plaintext)


def _veil_error(exc: HEError) -> VeilError:
    return VeilError(exc.message, code=exc.code, status=exc.status)


class HybridModel(_Model):
    """A decrypted HE model in the model cache: what the core runs instead of an ORT session."""

    format = "he"
    zero_copy = False

    def __init__(self, plaintext: bytes | bytearray, model: str, models: ModelSet, keys: KeyRing) -> None:
        super().__init__()
        try:
            self.server = models.bind(bundle.unpack(plaintext, model))
        except HEError as exc:
            raise _veil_error(exc) from None
        self.model = model
        self.keys = keys
        self.nbytes = len(plaintext)

    def run(self, inputs: dict[str, np.ndarray], *, user: str) -> dict[str, np.ndarray]:  # type: ignore[override]
        raw = inputs.get(HYBRID_REQUEST)
        if raw is None or set(inputs) != {HYBRID_REQUEST} or raw.dtype != np.uint8 or raw.ndim != 1:
            raise BadRequest(
                f"inputs: a hybrid model takes one uint8 tensor {HYBRID_REQUEST!r} (an HE request)", code="bad_input"
            )
        try:
            value = json.loads(raw.tobytes())
        except (ValueError, RecursionError):
            raise BadRequest(f"inputs.{HYBRID_REQUEST}: not an HE request (JSON)", code="bad_input") from None
        try:
            req = InferRequest.parse(value, self.server.backend.ciphertext_bound(0))
            if req.model != self.model:
                raise HEError("bad_request", f"field 'model' is {req.model!r}, the envelope's is {self.model!r}")
            out = evaluate(self.server, self.keys.get(req.key_id, user, self.model, self.server), req)
        except HEError as exc:
            raise _veil_error(exc) from None
        answer = json.dumps(out.to_json(), separators=(",", ":")).encode()
        return {HYBRID_RESPONSE: np.frombuffer(answer, dtype=np.uint8)}


def keyring_for(reader: Any, cache_bytes: int) -> KeyRing:
    """The runtime's evaluation-key ring, fetching records from the store it reads models from."""
    return KeyRing(lambda: reader, cache_bytes)
