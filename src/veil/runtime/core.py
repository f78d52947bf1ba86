"""The trusted core of a TEE-mode runtime instance: keys in, model in, envelope in, envelope out.

Everything secret lives here, in memory only: released keys (cached per (model, user) for the
TTL), decrypted models (ONNX Runtime sessions, LRU by bytes), request plaintext (for the duration
of one inference). Logs carry ids and error codes, never contents.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from typing import Any, Protocol

from veil.crypto import chunked
from veil.crypto.envelope import Envelope, open_envelope, seal
from veil.crypto.errors import IntegrityError, MalformedError
from veil.crypto.keys import SymmetricKey
from veil.errors import BadRequest, Forbidden
from veil.runtime import tensors
from veil.runtime.backend import OnnxModel
from veil.runtime.caches import KeyCache, ModelCache
from veil.store import ModelStore

log = logging.getLogger("veil.runtime")


class KeyReleaser(Protocol):
    def release(self, model: str, user: str) -> tuple[SymmetricKey, SymmetricKey]: ...


@dataclass(frozen=True)
class CoreConfig:
    key_cache_ttl_s: float = 60.0
    model_cache_bytes: int = 1 << 30
    intra_op_threads: int = 1


class RuntimeCore:
    """Serves encrypted inference requests for any model its KeyService lets it have."""

    def __init__(self, config: CoreConfig, keys: KeyReleaser, store: ModelStore) -> None:
        self.config = config
        self._keys = keys
        self._store = store
        self.key_cache: KeyCache[tuple[SymmetricKey, SymmetricKey]] = KeyCache(config.key_cache_ttl_s)
        self.models = ModelCache(config.model_cache_bytes)

    # -- pieces -----------------------------------------------------------------------------------
    def _keys_for(self, model: str, user: str, timings: dict[str, float]) -> tuple[SymmetricKey, SymmetricKey]:
        t0 = time.perf_counter()
        value, hit = self.key_cache.get((model, user), lambda: self._keys.release(model, user))
        if not hit:
            timings["key_release_ms"] = (time.perf_counter() - t0) * 1e3
        return value

    def _load_model(self, model: str, model_key: SymmetricKey, timings: dict[str, float]) -> tuple[OnnxModel, int]:
        t0 = time.perf_counter()
        with self._store.open(model) as sealed:
            try:
                plaintext = chunked.open_bytes(model_key, sealed, model=model)
            except (IntegrityError, MalformedError):
                # a swapped, foreign or damaged file in the untrusted store, not a bad request
                raise Forbidden(
                    f"sealed model {model!r} failed authentication (tampered or wrong key)", code="model_integrity"
                ) from None
        t1 = time.perf_counter()
        loaded = OnnxModel(plaintext, intra_op_threads=self.config.intra_op_threads)
        t2 = time.perf_counter()
        timings["model_fetch_decrypt_ms"] = (t1 - t0) * 1e3
        timings["session_create_ms"] = (t2 - t1) * 1e3
        log.info("model %s loaded (%d bytes sealed-decrypted in memory)", model, loaded.nbytes)
        return loaded, loaded.nbytes

    def _run(self, model: str, model_key: SymmetricKey, inputs: dict, timings: dict[str, float]) -> dict:
        loaded, cached = self.models.acquire(model, lambda: self._load_model(model, model_key, timings))
        try:
            t0 = time.perf_counter()
            outputs = loaded.run(inputs)
            timings["infer_ms"] = (time.perf_counter() - t0) * 1e3
        finally:
            self.models.release(model)
        timings["model_cached"] = cached
        return outputs

    # -- requests -------------------------------------------------------------------------------
    def infer(self, envelope_json: Any) -> dict[str, Any]:
        """Decrypt, check, infer, encrypt. Returns {"envelope": ..., "timings": ...}."""
        timings: dict[str, Any] = {}
        envelope = Envelope.from_json(envelope_json)
        if envelope.direction != "request":
            raise BadRequest("envelope.direction: must be 'request'", code="malformed")
        model_key, request_key = self._keys_for(envelope.model, envelope.user, timings)
        t0 = time.perf_counter()
        try:
            plaintext = open_envelope(
                request_key, envelope, model=envelope.model, user=envelope.user, direction="request"
            )
        except IntegrityError:
            raise BadRequest(
                "envelope does not authenticate (tampered, swapped or wrong key)", code="integrity"
            ) from None
        inputs = tensors.decode(plaintext)
        timings["decrypt_ms"] = (time.perf_counter() - t0) * 1e3
        outputs = self._run(envelope.model, model_key, inputs, timings)
        t1 = time.perf_counter()
        answer = seal(
            request_key,
            tensors.encode(outputs),
            model=envelope.model,
            user=envelope.user,
            request_id=envelope.request_id,
            direction="response",
        )
        timings["encrypt_ms"] = (time.perf_counter() - t1) * 1e3
        return {"envelope": answer.to_json(), "timings": timings}

    def stats(self) -> dict[str, Any]:
        return {
            "models_cached": [str(k) for k in self.models.cached_models()],
            "model_cache_bytes": self.models.used_bytes,
            "model_loads": self.models.loads,
            "model_evictions": self.models.evictions,
            "key_cache_entries": len(self.key_cache),
            "key_cache_hits": self.key_cache.hits,
            "key_cache_misses": self.key_cache.misses,
        }
