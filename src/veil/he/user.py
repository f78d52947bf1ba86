"""A user's side of HE serving, for the SDK: CKKS keys kept in the client directory, evaluation
keys uploaded once, requests encrypted, signed and decrypted.

Keys live under `<key_dir>/<model>/<params digest>/`: `secret.key` (0600, never uploaded, never
logged), `evalkeys.bin` (public evaluation keys, kept so that their key id stays the same across
processes and a 73 MiB upload happens once) and `uploaded` (the key id the store is known to
hold). A new model version with the same parameters reuses them; new parameters get new keys.
"""

from __future__ import annotations

import hashlib
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from veil.crypto.encoding import b64e
from veil.crypto.fields import new_request_id
from veil.he.client import HEClient, write_private
from veil.he.errors import HEError
from veil.he.keys import record_key_id
from veil.he.wire import InferRequest, InferResponse
from veil.wire import he as he_wire

if TYPE_CHECKING:  # signing needs the cryptography library; encrypting and decrypting do not
    from veil.crypto.identity import Identity

UPLOAD_PIECE = 1 << 20


@dataclass
class HEModelKeys:
    """One (user, model, parameters)'s client: its HEClient and the key id of its eval keys."""

    client: HEClient
    key_id: str
    directory: Path | None

    def uploaded(self) -> bool:
        marker = self.directory / "uploaded" if self.directory is not None else None
        return marker is not None and marker.is_file() and marker.read_text().strip() == self.key_id

    def mark_uploaded(self) -> None:
        if self.directory is not None:
            (self.directory / "uploaded").write_text(self.key_id + "\n")


class HEKeyChain:
    """The user's HE keys per (model, parameters), made once and kept in `key_dir` (None: in
    memory only, for tests and throw-away users)."""

    def __init__(self, user: str, key_dir: Path | None) -> None:
        self.user = user
        self.key_dir = Path(key_dir) if key_dir is not None else None
        self._lock = threading.Lock()
        self._clients: dict[tuple[str, str], HEModelKeys] = {}

    def for_model(self, model: str, spec: dict[str, Any]) -> HEModelKeys:
        digest = str(spec.get("params_digest", ""))
        with self._lock:
            found = self._clients.get((model, digest))
            if found is None:
                found = self._load(model, spec, digest)
                self._clients[(model, digest)] = found
            return found

    def _load(self, model: str, spec: dict[str, Any], digest: str) -> HEModelKeys:
        if self.key_dir is None:
            client = HEClient(spec)
            return HEModelKeys(client, record_key_id(self.user, model, client.eval_keys()), None)
        directory = self.key_dir / model / digest[:32]
        directory.mkdir(parents=True, exist_ok=True, mode=0o700)
        secret, blob = directory / "secret.key", directory / "evalkeys.bin"
        if secret.is_file() and blob.is_file():  # the same public keys, hence the same key id
            client = HEClient(spec, secret_key=secret.read_bytes(), eval_keys_file=blob)
        else:
            blob.unlink(missing_ok=True)  # keys of a lost secret key are of no use
            client = HEClient(spec, eval_keys_file=blob)
            write_private(secret, client.export_secret_key())
            (directory / "uploaded").unlink(missing_ok=True)
        # the blob stays in its file, read again only for an upload (tens of MiB per model)
        return HEModelKeys(client, record_key_id(self.user, model, client.eval_keys()), directory)


def signed_headers(identity: Identity, payload: bytes) -> dict[str, str]:
    from veil.crypto.identity import HEADER_PRINCIPAL

    return {HEADER_PRINCIPAL: identity.id, he_wire.HEADER_HE_SIGNATURE: b64e(identity.sign(payload))}


def key_upload(
    identity: Identity, model: str, keys: HEModelKeys
) -> tuple[dict[str, str], Callable[[], Iterator[bytes]]]:
    """Headers and a body generator for `PUT /v1/he/models/{model}/keys` (streamed, 1 MiB pieces)."""
    blob = keys.client.eval_keys()
    payload = he_wire.keys_payload(model, keys.key_id, hashlib.sha256(blob).hexdigest())
    headers = {
        **signed_headers(identity, payload),
        he_wire.HEADER_HE_KEY_ID: keys.key_id,
        "content-type": "application/octet-stream",
        "content-length": str(len(blob)),
    }

    def pieces() -> Iterator[bytes]:
        view = memoryview(blob)
        for start in range(0, len(blob), UPLOAD_PIECE):
            yield bytes(view[start : start + UPLOAD_PIECE])

    return headers, pieces


def encrypt_request(model: str, keys: HEModelKeys, x: np.ndarray, packing: str | None) -> tuple[InferRequest, Any]:
    """The HE request for samples `x` (rows of features), and the batch it encrypts."""
    batch = keys.client.encrypt(x, packing)
    req = InferRequest(model, keys.key_id, batch.packing, batch.batch, batch.features, batch.ciphertexts)
    return req, batch


def signed_request(identity: Identity, req: InferRequest, lifetime_s: float) -> tuple[bytes, dict[str, str]]:
    """The body and headers of an HE-mode `POST /v1/he/models/{model}:infer`."""
    import json

    body = {
        **req.to_json(),
        "request_id": new_request_id(),
        "expires": int(time.time() + min(max(1.0, lifetime_s), he_wire.MAX_REQUEST_LIFETIME_S - 5)),
    }
    data = json.dumps(body, separators=(",", ":")).encode()
    payload = he_wire.request_payload(req.model, hashlib.sha256(data).hexdigest())
    return data, {**signed_headers(identity, payload), "content-type": "application/json"}


def decrypt_response(keys: HEModelKeys, raw: Any, packing: str, batch: int) -> dict[str, np.ndarray]:
    """`{"scores", "predictions"}` from the server's answer (its ciphertexts under our key)."""
    resp = InferResponse.parse(raw)
    if resp.key_id != keys.key_id or resp.packing != packing or resp.batch != batch:
        raise HEError("bad_response", "the answer is for another request (key id, packing or batch differ)", 502)
    scores = keys.client.decrypt(resp, packing, batch)
    return {"scores": scores, "predictions": np.asarray(keys.client.predict(scores))}
