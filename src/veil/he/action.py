"""The HE serverless function: what a runtime instance runs for `{"kind": "he"}`.

The action server builds one `HEAction` per instance and calls `run` from several threads.

Served models are versioned blobs in the model store (`veil.he.bundle`, published by owners
through the gateway); the gateway names the model version and the authenticated user with each
request. Evaluation keys are records in the same store (`veil.he.keys`): an instance that lacks
a request's keys fetches them by id and checks they were uploaded by that user for that model,
so no request depends on landing on a particular instance (`veil.he.serving`).

The older developer layout is still read: `<store>/he/<model>/` written by `veil he compile
--publish`, with keys uploaded per instance (`op: upload_keys`), for `veil he run` and in-process
tests. Every failure is an HEError; untrusted bytes are validated before SEAL parses them.
"""

from __future__ import annotations

import logging
import threading
from pathlib import Path
from typing import Any

from veil.he import bundle, store
from veil.he.errors import HEError
from veil.he.keys import MAX_KEY_BYTES
from veil.he.keys import key_id as compute_key_id
from veil.he.server import ServerModel
from veil.he.serving import KeyRing, ModelSet, evaluate
from veil.he.wire import InferRequest, UploadKeys, check_model_id
from veil.jsonbytes import Encoded, dumps_object
from veil.wire.he import ROUTING_SEPARATOR

log = logging.getLogger("veil.he.action")

DEFAULT_KEY_CACHE_MB = 1024
MAX_MODEL_BYTES = 2 << 30
_USER_CHARS = frozenset("0123456789abcdef")


def _init_number(value: dict[str, Any], name: str, default: int, hi: int) -> int:
    got = value.get(name, default)
    if isinstance(got, bool) or not isinstance(got, int) or not 1 <= got <= hi:
        raise HEError("bad_init", f"init.{name}: must be an integer in [1, {hi}]", 500)
    return got


def _version(value: dict[str, Any]) -> int | None:
    version = value.get("version")
    if version is None:
        return None
    if isinstance(version, bool) or not isinstance(version, int) or not 1 <= version < 10**15:
        raise HEError("bad_request", "field 'version' must be a positive integer")
    return version


def _user(value: dict[str, Any]) -> str | None:
    user = value.get("user")
    if user is None:
        return None
    if not isinstance(user, str) or len(user) != 64 or not set(user) <= _USER_CHARS:
        raise HEError("bad_request", "field 'user' must be a principal id (64 hex digits)")
    return user


class HEAction:
    """One instance's HE server: `run(value) -> dict`, thread-safe."""

    def __init__(self, init_value: dict[str, Any]) -> None:
        if not isinstance(init_value, dict) or not isinstance(init_value.get("store"), str):
            raise HEError("bad_init", "init value needs 'store', the model store (directory or URL)", 500)
        self.location = init_value["store"]
        self.store = Path(self.location)  # the developer layout <store>/he/<model>/
        self.key_cache_bytes = _init_number(init_value, "key_cache_mb", DEFAULT_KEY_CACHE_MB, 1 << 20) << 20
        self._lock = threading.Lock()
        self._reader: Any = None
        self.models = ModelSet()
        self.keys = KeyRing(self.reader, self.key_cache_bytes)
        self.counters = {"infer": 0, "upload_keys": 0, "errors": 0}

    def reader(self) -> Any:
        """The model store, opened on first use (a developer store has no models/ directory)."""
        with self._lock:
            if self._reader is None:
                from veil.store import open_reader

                try:
                    self._reader = open_reader(self.location)
                except Exception as exc:  # noqa: BLE001 - a VeilError from the store, told as HE's
                    raise HEError(getattr(exc, "code", "no_store"), getattr(exc, "message", str(exc)), 503) from None
            return self._reader

    # --- dispatch ---------------------------------------------------------------------------------
    def run(self, value: dict[str, Any]) -> dict[str, Any]:
        if not isinstance(value, dict):
            raise HEError("bad_request", "value must be a JSON object")
        op = value.get("op")
        try:
            if op == "infer":
                return self.infer(value)
            if op == "upload_keys":
                return self.upload_keys(value)
            if op == "spec":
                model_id, version = check_model_id(value.get("model")), _version(value)
                if version is None:
                    return {"v": 1, "spec": store.client_spec(self.store, model_id)}
                return {"v": 1, "spec": self.model(model_id, version).compiled.client_spec()}
            if op == "health":
                return {"v": 1, "ok": True, "models": self.models.names(), "keys": len(self.keys)}
            if op == "unload":
                return {"v": 1, "dropped": self.unload(value.get("model"))}
            raise HEError("bad_request", f"unknown op {op!r}; expected infer, upload_keys, spec, health or unload")
        except HEError as exc:
            self.counters["errors"] += 1
            log.info("he %s refused: %s", op if op in ("infer", "upload_keys", "spec", "health") else "?", exc.code)
            raise
        except Exception as exc:  # never let a bug take the instance down with a traceback to the caller
            self.counters["errors"] += 1
            log.exception("he op failed")
            raise HEError("internal", f"internal error ({type(exc).__name__})", 500) from None

    # --- models -----------------------------------------------------------------------------------
    def model(self, model_id: str, version: int | None = None) -> ServerModel:
        """The warm model (a published version, or the developer layout when `version` is None)."""
        if version is None:
            return self.models.get(model_id, lambda: store.load(self.store, model_id))
        return self.models.get((model_id, version), lambda: self._load_version(model_id, version))

    def _load_version(self, model_id: str, version: int) -> Any:
        from veil.errors import NotFound, VeilError

        reader = self.reader()
        try:
            info = reader.stat(model_id, version)
            if info.size > MAX_MODEL_BYTES:
                raise HEError("too_large", f"HE model blob exceeds {MAX_MODEL_BYTES} bytes", 413)
            with reader.open(model_id, version) as f:
                data = f.read(info.size + 1)
        except NotFound:
            raise HEError("unknown_model", f"no HE model {model_id!r} version {version} in the store", 404) from None
        except VeilError as exc:
            raise HEError(exc.code, exc.message, exc.status) from None
        return bundle.unpack(data, model_id)

    # --- keys (developer layout: uploaded to this instance) ----------------------------------------
    def upload_keys(self, value: dict[str, Any]) -> dict[str, Any]:
        req = UploadKeys.parse(value, MAX_KEY_BYTES)
        kid = compute_key_id(req.keys)
        server = self.model(req.model)
        added = self.keys.add(kid, None, req.model, server, req.keys)
        if added:
            with self._lock:
                self.counters["upload_keys"] += 1
            log.info("he keys %s cached (%d bytes)", kid[:12], len(req.keys))
        else:
            self.keys.get(kid, None, req.model, server)  # same parameters as the cached ones?
        return {"v": 1, "key_id": kid, "cached": not added, "bytes": len(req.keys)}

    def unload(self, key: Any) -> int:
        """Drop the evaluation keys a packer routing key (`model@<key id prefix>`) stands for, so
        the packer can make room on this instance; a bare model id drops nothing (models stay)."""
        if not isinstance(key, str) or len(key) > 256:
            raise HEError("bad_request", "field 'model' must be a routing key (model@key-id-prefix)")
        model, sep, prefix = key.partition(ROUTING_SEPARATOR)
        if not sep or len(prefix) < 8 or not set(prefix) <= _USER_CHARS:
            return 0
        return self.keys.drop(check_model_id(model), prefix)

    # --- inference --------------------------------------------------------------------------------
    def infer(self, value: dict[str, Any]) -> dict[str, Any]:
        model_id, version, user = check_model_id(value.get("model")), _version(value), _user(value)
        if version is not None and user is None:
            raise HEError("bad_request", "a request for a published version names its authenticated 'user'")
        server = self.model(model_id, version)
        req = InferRequest.parse(value, server.backend.ciphertext_bound(0))
        keys = self.keys.get(req.key_id, user, model_id, server)
        out = evaluate(server, keys, req)
        with self._lock:
            self.counters["infer"] += 1
        answer = out.to_json()
        # its ciphertexts are base64url text made here: encoded without per-character escaping
        return Encoded(answer, dumps_object(answer, trusted=True))
