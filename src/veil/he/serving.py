"""What serving an HE request takes, shared by HE mode (`veil.he.action`) and hybrid mode (the
attested TEE runtime, `veil.runtime.hybrid`): warm models, evaluation keys and one evaluation.

- `ModelSet`: compiled models bound to SEAL contexts, one per (model, version), loaded once per
  warm instance even under concurrency, contexts shared between models with equal parameters;
- `KeyRing`: evaluation keys by key id, LRU bounded in bytes. A key an instance lacks is fetched
  from the model store (`veil.he.keys` records), so no request needs to land where its keys were
  uploaded; a record is used only for the principal and model it names;
- `evaluate`: one request's checks (features, ciphertext count against the packing) and the
  evaluation, in either packing.
"""

from __future__ import annotations

import logging
import math
import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from typing import Any

from veil.errors import NotFound, VeilError
from veil.he.compiled import CompiledModel
from veil.he.errors import HEError
from veil.he.keys import (
    MAX_KEY_BYTES,
    EvalKeyHeader,
    RecordStream,
    read_eval_key_header,
    store_id,
    unpack_eval_keys,
)
from veil.he.packing import LATENCY, throughput_group
from veil.he.seal_backend import EvalKeys, SealBackend
from veil.he.server import ServerModel
from veil.he.wire import InferRequest, InferResponse

log = logging.getLogger("veil.he.serving")

DEFAULT_KEY_CACHE_BYTES = 1 << 30
# SEAL serialises keys compressed (seeded, zstd): loaded, they take ~3.4-4.2x their blob's size
# (measured: 12.5 MiB -> 53 MiB for the MLP, 60 MiB -> 201 MiB for the 64-32-16-10 MLP)
IN_MEMORY_FACTOR = 4


class ModelSet:
    """Warm `ServerModel`s by key; `load()` runs once per key, whatever the concurrency."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._locks: dict[Any, threading.Lock] = {}
        self._models: dict[Any, ServerModel] = {}
        self._backends: dict[str, SealBackend] = {}

    def get(self, key: Any, load: Callable[[], CompiledModel]) -> ServerModel:
        with self._lock:
            found = self._models.get(key)
            if found is not None:
                return found
            lock = self._locks.setdefault(key, threading.Lock())
        with lock:
            with self._lock:
                if key in self._models:
                    return self._models[key]
            server = self.bind(load())
            with self._lock:
                self._models[key] = server
            log.info("he model %s loaded (N=%d)", key, server.compiled.params.poly_modulus_degree)
            return server

    def bind(self, compiled: CompiledModel) -> ServerModel:
        """`compiled` on a SEAL context, reusing one for equal parameters."""
        digest = compiled.params_digest()
        with self._lock:
            backend = self._backends.get(digest)
        if backend is None:
            backend = SealBackend(compiled.params)
        server = ServerModel(compiled, backend)
        with self._lock:
            self._backends.setdefault(digest, backend)
        return server

    def names(self) -> list[str]:
        with self._lock:
            return sorted({str(k[0] if isinstance(k, tuple) else k) for k in self._models})


class KeyRing:
    """Evaluation keys by key id: (owner principal or None, model, params digest, keys).

    `reader()` returns the model store (or raises); records are fetched from it on a miss."""

    def __init__(self, reader: Callable[[], Any] | None, cache_bytes: int = DEFAULT_KEY_CACHE_BYTES) -> None:
        self._reader = reader
        self.cache_bytes = cache_bytes
        self._lock = threading.Lock()
        self._fetching: dict[str, threading.Lock] = {}
        self._keys: OrderedDict[str, tuple[str | None, str, str, EvalKeys]] = OrderedDict()
        self._bytes = 0
        self.fetches = 0

    def __len__(self) -> int:
        return len(self._keys)

    def add(self, kid: str, user: str | None, model: str, server: ServerModel, blob: bytes | memoryview) -> bool:
        """Parse, check and cache an eval-key blob; False when `kid` was already cached."""
        with self._lock:
            if kid in self._keys:
                self._keys.move_to_end(kid)
                return False
        parsed = unpack_eval_keys(blob)
        header = EvalKeyHeader(parsed.params_digest, parsed.galois_elements, len(parsed.relin or b""), 0)
        self._check_header(header, server)
        self._make_room(IN_MEMORY_FACTOR * len(blob))  # before loading: the peak is the cache plus this one key set
        keys = server.backend.load_eval_keys(parsed.relin, parsed.galois, parsed.galois_elements)
        self._insert(kid, user, model, server, keys, len(blob))
        return True

    @staticmethod
    def _check_header(header: EvalKeyHeader, server: ServerModel) -> None:
        if header.params_digest != server.params_digest:
            raise HEError("wrong_parameters", "evaluation keys were made for other parameters than this model's")
        if server.compiled.needs_relin() and not header.relin_len:
            raise HEError("missing_keys", "this model needs relinearization keys")

    def _insert(self, kid: str, user: str | None, model: str, server: ServerModel, keys: EvalKeys, size: int) -> None:
        keys.nbytes = IN_MEMORY_FACTOR * size
        with self._lock:
            if kid not in self._keys:
                self._keys[kid] = (user, model, server.params_digest, keys)
                self._bytes += keys.nbytes

    def _make_room(self, size: int) -> None:
        """Evict least recently used keys until `size` more bytes fit (an evicted user's next
        request fetches them again from the store)."""
        with self._lock:
            while self._keys and self._bytes + size > self.cache_bytes:
                _, (_, _, _, old) = self._keys.popitem(last=False)
                self._bytes -= old.nbytes

    def drop(self, model: str, prefix: str) -> int:
        """Forget the keys for `model` whose id starts with `prefix`; how many went."""
        with self._lock:
            gone = [k for k, entry in self._keys.items() if k.startswith(prefix) and entry[1] == model]
            for k in gone:
                self._bytes -= self._keys.pop(k)[3].nbytes
        return len(gone)

    def _cached(self, kid: str) -> tuple[str | None, str, str, EvalKeys] | None:
        with self._lock:
            entry = self._keys.get(kid)
            if entry is not None:
                self._keys.move_to_end(kid)
            return entry

    def get(self, kid: str, user: str | None, model: str, server: ServerModel) -> EvalKeys:
        """The keys `kid` names, for a request by `user` for `model`; fetched from the store when
        this instance lacks them (and the request names a user: legacy uploads are per instance)."""
        entry = self._cached(kid)
        if entry is None and user is not None and self._reader is not None:
            with self._lock:
                lock = self._fetching.setdefault(kid, threading.Lock())
            with lock:  # one fetch per key id, however many requests wait for it
                entry = self._cached(kid)
                if entry is None:
                    self._fetch(kid, user, model, server)
                    self.fetches += 1
                    entry = self._cached(kid)
        if entry is None:
            raise HEError("unknown_key", f"evaluation keys {kid[:12]}... are unknown; upload them", 404)
        owner, for_model, digest, keys = entry
        if owner != user or (user is not None and for_model != model):
            raise HEError("key_not_yours", f"evaluation keys {kid[:12]}... are another principal's or model's", 403)
        if digest != server.params_digest:
            raise HEError("wrong_parameters", "these evaluation keys belong to a model with other parameters")
        return keys

    def _fetch(self, kid: str, user: str, model: str, server: ServerModel) -> None:
        """Stream the record `kid` from the store and cache its keys: each key is loaded as it
        is read (the record is never held whole), and nothing is cached unless the whole record
        hashes to `kid` and names this user and model."""
        assert self._reader is not None
        reader = self._reader()
        try:
            info = reader.stat(store_id(kid), 1)
            if info.size > MAX_KEY_BYTES + 4096:
                raise HEError("too_large", f"evaluation-key record exceeds {MAX_KEY_BYTES} bytes", 413)
            with reader.open(store_id(kid), 1) as f:
                record = RecordStream(f, kid, user, model)
                header = read_eval_key_header(record.read)
                self._check_header(header, server)
                size = header.relin_len + header.galois_len
                if size > info.size:
                    raise HEError("key_integrity", "the store's evaluation-key record is truncated", 403)
                self._make_room(IN_MEMORY_FACTOR * size)
                keys = server.backend.read_eval_keys(
                    record.read, header.relin_len, header.galois_len, header.galois_elements
                )
                record.finish()
        except NotFound:
            raise HEError("unknown_key", f"evaluation keys {kid[:12]}... are not in the model store", 404) from None
        except VeilError as exc:
            raise HEError(exc.code, exc.message, exc.status) from None
        self._insert(kid, user, model, server, keys, size)
        log.info("he keys %s fetched from the store (%d bytes)", kid[:12], info.size)


def expected_ciphertexts(req: InferRequest, server: ServerModel) -> int:
    """How many input ciphertexts `req`'s packing and batch take for this model."""
    if req.packing == LATENCY:
        return math.ceil(req.batch / server.layout.samples_per_ciphertext)
    return server.compiled.in_dim * math.ceil(req.batch / throughput_group(server.backend.slot_count))


def evaluate(server: ServerModel, keys: EvalKeys, req: InferRequest) -> InferResponse:
    """Check `req` against the model and evaluate it (the caller found `keys`)."""
    compiled, be = server.compiled, server.backend
    if req.features != compiled.in_dim:
        raise HEError(
            "wrong_features", f"model {req.model} takes {compiled.in_dim} features, request says {req.features}"
        )
    expected = expected_ciphertexts(req, server)
    if len(req.ciphertexts) != expected:
        raise HEError(
            "wrong_features",
            f"{req.packing} packing of {req.batch} samples x {compiled.in_dim} features needs "
            f"{expected} ciphertexts, got {len(req.ciphertexts)}",
        )
    level = 0 if req.packing == LATENCY else compiled.params.throughput_level
    cts = [be.load_ciphertext(c, level, server.input_scale) for c in req.ciphertexts]
    t0 = time.perf_counter()
    if req.packing == LATENCY:
        out = server.evaluate(LATENCY, cts, keys)
    else:
        out = []
        for g in range(len(cts) // compiled.in_dim):
            out.extend(server.evaluate(req.packing, cts[g * compiled.in_dim : (g + 1) * compiled.in_dim], keys))
    eval_ms = (time.perf_counter() - t0) * 1e3
    # per request: debug only (an INFO line per request costs every request a formatted write)
    log.debug("he infer %s %s batch=%d eval=%.1fms", req.model, req.packing, req.batch, eval_ms)
    return InferResponse(req.model, req.key_id, req.packing, req.batch, [be.serialize(c) for c in out], eval_ms)
