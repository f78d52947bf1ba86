"""The HE serverless function: what a runtime instance runs for `{"kind": "he"}`.

The action server builds one `HEAction` per instance and calls `run` from several threads.
Models are loaded once per warm instance (SEAL context, scale schedule, encoded diagonals);
evaluation keys are cached by key id (LRU bounded in bytes), so a client uploads them once per
warm instance and is told `unknown_key` (404) when an instance no longer has them. Every
failure is an HEError; untrusted bytes are validated before SEAL parses them.
"""

from __future__ import annotations

import logging
import math
import threading
import time
from collections import OrderedDict
from pathlib import Path
from typing import Any

from veil.he import store
from veil.he.errors import HEError
from veil.he.keys import key_id as compute_key_id
from veil.he.keys import unpack_eval_keys
from veil.he.packing import LATENCY, throughput_group
from veil.he.seal_backend import EvalKeys, SealBackend
from veil.he.server import ServerModel
from veil.he.wire import InferRequest, InferResponse, UploadKeys, check_model_id

log = logging.getLogger("veil.he.action")

DEFAULT_KEY_CACHE_MB = 1024
MAX_KEY_BYTES = 256 * 1024 * 1024


class HEAction:
    """One instance's HE server: `run(value) -> dict`, thread-safe."""

    def __init__(self, init_value: dict[str, Any]) -> None:
        if not isinstance(init_value, dict) or not isinstance(init_value.get("store"), str):
            raise HEError("bad_init", "init value needs 'store', the model store directory", 500)
        self.store = Path(init_value["store"])
        self.key_cache_bytes = int(init_value.get("key_cache_mb", DEFAULT_KEY_CACHE_MB)) * 1024 * 1024
        self._lock = threading.Lock()
        self._model_locks: dict[str, threading.Lock] = {}
        self._models: dict[str, ServerModel] = {}
        self._backends: dict[str, SealBackend] = {}
        self._keys: OrderedDict[str, tuple[str, EvalKeys]] = OrderedDict()
        self._key_bytes = 0
        self.counters = {"infer": 0, "upload_keys": 0, "errors": 0}

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
                return {"v": 1, "spec": store.client_spec(self.store, check_model_id(value.get("model")))}
            if op == "health":
                return {"v": 1, "ok": True, "models": sorted(self._models), "keys": len(self._keys)}
            raise HEError("bad_request", f"unknown op {op!r}; expected infer, upload_keys, spec or health")
        except HEError as exc:
            self.counters["errors"] += 1
            log.info("he %s refused: %s", op, exc.code)
            raise
        except Exception as exc:  # never let a bug take the instance down with a traceback to the caller
            self.counters["errors"] += 1
            log.exception("he %s failed", op)
            raise HEError("internal", f"internal error ({type(exc).__name__})", 500) from None

    # --- models -----------------------------------------------------------------------------------
    def model(self, model_id: str) -> ServerModel:
        """The warm model, loading it (once, even under concurrency) on first use."""
        with self._lock:
            loaded = self._models.get(model_id)
            if loaded is not None:
                return loaded
            lock = self._model_locks.setdefault(model_id, threading.Lock())
        with lock:
            with self._lock:
                if model_id in self._models:
                    return self._models[model_id]
            compiled = store.load(self.store, model_id)
            digest = compiled.params_digest()
            with self._lock:
                backend = self._backends.get(digest)
            if backend is None:
                backend = SealBackend(compiled.params)
            server = ServerModel(compiled, backend)
            with self._lock:
                self._backends.setdefault(digest, backend)
                self._models[model_id] = server
            log.info("he model %s loaded (N=%d)", model_id, compiled.params.poly_modulus_degree)
            return server

    # --- keys -------------------------------------------------------------------------------------
    def upload_keys(self, value: dict[str, Any]) -> dict[str, Any]:
        req = UploadKeys.parse(value, MAX_KEY_BYTES)
        kid = compute_key_id(req.keys)
        server = self.model(req.model)
        digest = server.params_digest
        with self._lock:
            cached = self._keys.get(kid)
            if cached is not None and cached[0] == digest:
                self._keys.move_to_end(kid)
                return {"v": 1, "key_id": kid, "cached": True, "bytes": len(req.keys)}
        if cached is not None:
            raise HEError("wrong_parameters", "evaluation keys were made for other parameters than this model's")
        blob = unpack_eval_keys(req.keys)
        if blob.params_digest != digest:
            raise HEError("wrong_parameters", "evaluation keys were made for other parameters than this model's")
        if server.compiled.needs_relin() and blob.relin is None:
            raise HEError("missing_keys", "this model needs relinearization keys")
        keys = server.backend.load_eval_keys(blob.relin, blob.galois, blob.galois_elements)
        keys.nbytes = len(req.keys)
        with self._lock:
            self._keys[kid] = (digest, keys)
            self._key_bytes += keys.nbytes
            while self._key_bytes > self.key_cache_bytes and len(self._keys) > 1:
                _, (_, old) = self._keys.popitem(last=False)
                self._key_bytes -= old.nbytes
            self.counters["upload_keys"] += 1
        log.info("he keys %s cached (%d bytes)", kid[:12], keys.nbytes)
        return {"v": 1, "key_id": kid, "cached": False, "bytes": len(req.keys)}

    def _keys_for(self, kid: str, digest: str) -> EvalKeys:
        with self._lock:
            entry = self._keys.get(kid)
            if entry is not None:
                self._keys.move_to_end(kid)
        if entry is None:
            raise HEError("unknown_key", f"evaluation keys {kid[:12]}... are not on this instance; upload them", 404)
        if entry[0] != digest:
            raise HEError("wrong_parameters", "these evaluation keys belong to a model with other parameters")
        return entry[1]

    # --- inference --------------------------------------------------------------------------------
    def infer(self, value: dict[str, Any]) -> dict[str, Any]:
        model_id = check_model_id(value.get("model"))
        server = self.model(model_id)
        be = server.backend
        req = InferRequest.parse(value, be.ciphertext_bound(0))
        compiled = server.compiled
        if req.features != compiled.in_dim:
            raise HEError(
                "wrong_features", f"model {model_id} takes {compiled.in_dim} features, request says {req.features}"
            )
        if req.packing == LATENCY:
            expected = math.ceil(req.batch / server.layout.samples_per_ciphertext)
        else:
            expected = compiled.in_dim * math.ceil(req.batch / throughput_group(be.slot_count))
        if len(req.ciphertexts) != expected:
            raise HEError(
                "wrong_features",
                f"{req.packing} packing of {req.batch} samples x {compiled.in_dim} features needs "
                f"{expected} ciphertexts, got {len(req.ciphertexts)}",
            )
        keys = self._keys_for(req.key_id, server.params_digest)
        level = 0 if req.packing == LATENCY else compiled.params.throughput_level
        cts = [be.load_ciphertext(c, level, server.input_scale) for c in req.ciphertexts]
        t0 = time.perf_counter()
        if req.packing == LATENCY:
            out = server.evaluate(LATENCY, cts, keys)
        else:
            groups = math.ceil(req.batch / throughput_group(be.slot_count))
            out = []
            for g in range(groups):
                out.extend(server.evaluate(req.packing, cts[g * compiled.in_dim : (g + 1) * compiled.in_dim], keys))
        eval_ms = (time.perf_counter() - t0) * 1e3
        with self._lock:
            self.counters["infer"] += 1
        log.info("he infer %s %s batch=%d eval=%.1fms", model_id, req.packing, req.batch, eval_ms)
        result = [be.serialize(c) for c in out]
        return InferResponse(model_id, req.key_id, req.packing, req.batch, result, eval_ms).to_json()
