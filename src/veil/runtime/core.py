"""The trusted core of a TEE-mode runtime instance: keys in, model in, envelope in, envelope out.

Everything secret lives here, in memory only: released keys (cached per (model, user) for the
lifetime their release names, never longer than `wire.MAX_REVOCATION_DELAY_S`), decrypted models
(ONNX Runtime sessions per (model, version), LRU by bytes), request plaintext (for the duration of
one inference). Logs carry ids and error codes, never contents.

A request goes: parse the envelope and check its validity window → release keys → authenticate
and decrypt → record its request id (a replay is refused) → decode, infer, encode → seal the
answer. Failures before authentication carry no user data and are answered in clear as before.
From authentication on, every answer is a response envelope: a success holds the output tensors
(and, when the request asked, timings), an error holds the detailed error (`tensors.encode_error`)
and only its code, with a fixed message, travels in clear (`EncryptedError`).

A model loads as: stream the sealed file's chunks, authenticated and decrypted, into one buffer
sized from the file (`chunked.open_into`), then build its session from that buffer
(`backend.load_model`): an ORT-format model is read in place, so the buffer, held by the cached
model, is the model's only copy. The timings of the request that loads it split the cold path
into `model_fetch_decrypt_ms`, `session_create_ms` and, for the session's first run (ONNX
Runtime's warm-up), `first_run_ms`, besides the `infer_ms` every request reports.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol

from veil.crypto import chunked
from veil.crypto.envelope import CLOCK_SKEW_S, MAX_LIFETIME_S, Envelope, open_envelope, seal
from veil.crypto.errors import IntegrityError, MalformedError
from veil.errors import BadRequest, Conflict, Forbidden, VeilError, from_exception
from veil.he.serving import ModelSet
from veil.keyservice import wire
from veil.keyservice.client import Release
from veil.runtime import tensors
from veil.runtime.backend import load_model, prepare_loader
from veil.runtime.caches import KeyCache, ModelCache, ReplayCache
from veil.runtime.hybrid import HybridModel, is_he_model, keyring_for
from veil.store import ModelReader

log = logging.getLogger("veil.runtime")
GENERIC_MESSAGE = "request failed; details are in the encrypted envelope"


class KeyReleaser(Protocol):
    def release(self, model: str, user: str) -> Release: ...


@dataclass(frozen=True)
class CoreConfig:
    """Sizes only: nothing here can lengthen the revocation delay or widen what is accepted."""

    model_cache_bytes: int = 1 << 30
    intra_op_threads: int = 1
    replay_capacity: int = 100_000  # request ids remembered at once (within their windows)
    parallel_runs: int = 0  # inferences at once per instance; 0: one per CPU this process may use


def run_slots(config: CoreConfig) -> int:
    """How many model runs may execute at once: `parallel_runs`, or the CPUs this process may
    use divided by each run's intra-op threads. ONNX Runtime's activation memory is per run in
    progress (one shared session, but each concurrent run has its own intermediate tensors: ~7 MB
    for a ResNet-50-thin), and runs beyond the CPUs only time-slice them: so requests beyond
    this wait for a slot holding only their own input, not a run's working memory."""
    if config.parallel_runs > 0:
        return config.parallel_runs
    try:
        cpus = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        cpus = os.cpu_count() or 1
    return max(1, cpus // max(1, config.intra_op_threads))


class RunSlots:
    """A counting semaphore that admits waiters in arrival order, each until its deadline. A
    plain semaphore lets a newly arrived run take a freed slot ahead of one that has waited, so
    under a burst some requests wait several turns and miss their deadlines; in order, each waits
    only for the runs ahead of it. A waiter whose caller has stopped waiting leaves the line
    (its turn is skipped) instead of running for nobody."""

    def __init__(self, slots: int) -> None:
        self.slots = slots
        self._free = slots
        self._next = 0  # the ticket the next arrival gets
        self._turn = 0  # the ticket admitted next
        self._left: set[int] = set()  # tickets whose waiters gave up before their turn
        self._cond = threading.Condition()

    def acquire(self, deadline: float | None = None) -> bool:
        """Take a slot, waiting in line until `deadline` (Unix seconds; None: no limit). False
        when the deadline passed first (nothing is held then)."""
        with self._cond:
            ticket = self._next
            self._next += 1
            while ticket != self._turn or self._free == 0:
                remaining = None if deadline is None else deadline - time.time()
                if remaining is not None and remaining <= 0:
                    self._left.add(ticket)
                    self._skip_left()
                    self._cond.notify_all()
                    return False
                self._cond.wait(remaining)
            self._turn += 1
            self._free -= 1
            self._skip_left()
            if self._free:
                self._cond.notify_all()  # the next ticket may go too
            return True

    def release(self) -> None:
        with self._cond:
            self._free += 1
            self._cond.notify_all()

    def __enter__(self) -> RunSlots:
        self.acquire()
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()

    def _skip_left(self) -> None:
        while self._turn in self._left:
            self._left.discard(self._turn)
            self._turn += 1


class EncryptedError(VeilError):
    """An error answered after the request authenticated: code and a fixed message in clear, the
    detail only inside `envelope` (a response envelope holding `tensors.encode_error(...)`).

    Wire form: `{"error": {"code": code, "message": GENERIC_MESSAGE, "envelope": {...}}}` with the
    HTTP status of the underlying error. The envelope sits inside the error object because
    platforms (OpenWhisk, the local one) keep only an action's `error` field on failure.
    """

    def __init__(self, code: str, status: int, envelope: dict[str, Any]) -> None:
        super().__init__(GENERIC_MESSAGE, code=code, status=status)
        self.envelope = envelope

    def to_json(self) -> dict[str, Any]:
        return {"error": {"code": self.code, "message": self.message, "envelope": self.envelope}}


class RuntimeCore:
    """Serves encrypted inference requests for any model its KeyService lets it have.

    `clock` (Unix seconds) judges envelope windows; `monotonic` times key-cache entries.
    """

    def __init__(
        self,
        config: CoreConfig,
        keys: KeyReleaser,
        store: ModelReader,
        *,
        clock: Callable[[], float] = time.time,
        monotonic: Callable[[], float] = time.monotonic,
    ) -> None:
        self.config = config
        self._keys = keys
        self._store = store
        self._clock = clock
        self.key_cache: KeyCache[Release] = KeyCache(wire.MAX_REVOCATION_DELAY_S, clock=monotonic)
        self.models = ModelCache(config.model_cache_bytes, family=lambda key: key[0])  # type: ignore[index]
        self.replay = ReplayCache(config.replay_capacity, clock=clock)
        self._current: dict[str, int] = {}  # model → version named by its latest fresh release
        self._current_lock = threading.Lock()
        self.he_models = ModelSet()  # hybrid models share SEAL contexts per parameter set
        self.he_keys = keyring_for(store, config.model_cache_bytes // 2)  # hybrid users' loaded eval keys
        self.run_slots = run_slots(config)
        self._runs = RunSlots(self.run_slots)
        prepare_loader()  # at /init, not on the first model's request path

    # -- pieces -----------------------------------------------------------------------------------
    def _check_window(self, envelope: Envelope) -> float:
        """The instant after which this request is refused (its replay record is kept until then)."""
        now = self._clock()
        if envelope.expires + CLOCK_SKEW_S < now:
            raise BadRequest(
                f"envelope expired at {envelope.expires} (now {int(now)}): seal the request again", code="expired"
            )
        if envelope.expires > now + MAX_LIFETIME_S + CLOCK_SKEW_S:
            raise BadRequest(
                f"expires: {envelope.expires} is more than {MAX_LIFETIME_S} s (+{CLOCK_SKEW_S} s clock skew) "
                "in the future",
                code="malformed",
            )
        return float(envelope.expires + CLOCK_SKEW_S)

    def _fetch_release(self, model: str, user: str) -> tuple[Release, float]:
        release = self._keys.release(model, user)
        with self._current_lock:
            self._current[model] = release.version
        return release, min(float(release.ttl_s), float(wire.MAX_REVOCATION_DELAY_S))

    def _release_for(self, model: str, user: str, timings: dict[str, Any]) -> Release:
        t0 = time.perf_counter()
        key = (model, user)
        release, hit = self.key_cache.get(key, lambda: self._fetch_release(model, user))
        with self._current_lock:
            current = self._current.get(model, release.version)
        if hit and release.version != current:
            # a fresher release (another user's) named another version: these keys are stale too
            self.key_cache.invalidate(key)
            release, hit = self.key_cache.get(key, lambda: self._fetch_release(model, user))
        if not hit:
            timings["key_release_ms"] = (time.perf_counter() - t0) * 1e3
        return release

    def _load_model(self, model: str, release: Release, timings: dict[str, Any]) -> tuple[Any, int]:
        t0 = time.perf_counter()
        version = release.version
        with self._store.open(model, version) as sealed:
            try:
                plaintext = chunked.open_into(
                    release.model_key,
                    sealed,
                    model=model,
                    version=version,
                    digest=release.digest,
                    sealed_size=_sealed_size(sealed),
                )
            except MalformedError as exc:
                if exc.field in ("version", "digest", "model"):
                    raise Forbidden(
                        f"sealed model {model!r}: the store's file for version {version} is not the one the "
                        f"KeyService released ({exc.field} mismatch: rollback or substitution)",
                        code="model_integrity",
                    ) from None
                raise Forbidden(
                    f"sealed model {model!r} version {version} is damaged or not a sealed model (tampering)",
                    code="model_integrity",
                ) from None
            except IntegrityError:
                # a tampered, truncated or foreign file in the untrusted store, not a bad request
                raise Forbidden(
                    f"sealed model {model!r} version {version} failed authentication (tampering or wrong key)",
                    code="model_integrity",
                ) from None
        t1 = time.perf_counter()
        if is_he_model(plaintext):  # hybrid mode: evaluated on the user's CKKS ciphertexts
            loaded: Any = HybridModel(plaintext, model, self.he_models, self.he_keys)
        else:
            loaded = load_model(plaintext, intra_op_threads=self.config.intra_op_threads)  # takes the buffer over
        del plaintext
        t2 = time.perf_counter()
        timings["model_fetch_decrypt_ms"] = (t1 - t0) * 1e3
        timings["session_create_ms"] = (t2 - t1) * 1e3
        timings["model_zero_copy"] = loaded.zero_copy
        log.info(
            "model %s version %d loaded (%d bytes decrypted in memory, %s format%s)",
            model,
            version,
            loaded.nbytes,
            loaded.format,
            ", read in place" if loaded.zero_copy else "",
        )
        return loaded, loaded.nbytes

    def _run(
        self, model: str, release: Release, inputs: dict, timings: dict[str, Any], user: str, deadline: float | None
    ) -> dict:
        key = (model, release.version)
        loaded, cached = self.models.acquire(key, lambda: self._load_model(model, release, timings))
        try:
            t_wait = time.perf_counter()
            # at most `run_slots` runs hold working memory at once
            if not self._runs.acquire(deadline):
                raise VeilError(
                    "the request's deadline passed while it waited for a model run; dropped without running",
                    code="deadline_exceeded",
                    status=504,
                )
            try:
                first = loaded.take_first_run()
                t0 = time.perf_counter()
                outputs = loaded.run(inputs, user=user) if loaded.format == "he" else loaded.run(inputs)
                timings["infer_ms"] = (time.perf_counter() - t0) * 1e3
            finally:
                self._runs.release()
            timings["run_wait_ms"] = (t0 - t_wait) * 1e3
            if first:
                timings["first_run_ms"] = timings["infer_ms"]  # the session's warm-up run
        finally:
            self.models.release(key)
        timings["model_cached"] = cached
        return outputs

    # -- requests -------------------------------------------------------------------------------
    def infer(self, envelope_in: Any, *, deadline: float | None = None) -> dict[str, Any]:
        """Decrypt, check, infer, encrypt. `envelope_in` is the JSON form (a dict) or the binary
        form (bytes, read in place); returns {"envelope": ...} in the same form. `deadline`
        (Unix seconds) is when the caller stops waiting: a run not started by then is dropped,
        answered `deadline_exceeded` in the envelope. Raises
        `EncryptedError` for any failure after the request authenticated (its envelope in the
        JSON form), a plain `VeilError` before."""
        timings: dict[str, Any] = {}
        binary = isinstance(envelope_in, bytes | bytearray | memoryview)
        envelope = Envelope.from_binary(envelope_in) if binary else Envelope.from_json(envelope_in)
        if envelope.direction != "request":
            raise BadRequest("envelope.direction: must be 'request'", code="malformed")
        valid_until = self._check_window(envelope)
        release = self._release_for(envelope.model, envelope.user, timings)
        t0 = time.perf_counter()
        try:
            plaintext = open_envelope(
                release.request_key, envelope, model=envelope.model, user=envelope.user, direction="request"
            )
        except IntegrityError:
            raise BadRequest(
                "envelope does not authenticate (tampered, swapped or wrong key)", code="integrity"
            ) from None
        # authenticated: from here on every answer is a response envelope
        try:
            if not self.replay.add((envelope.model, envelope.user, envelope.request_id), valid_until):
                raise Conflict("request id already used within its validity window (replay)", code="replay")
            inputs, meta = tensors.decode_with_meta(plaintext)
            options = tensors.request_options(meta)
            timings["decrypt_ms"] = (time.perf_counter() - t0) * 1e3
            outputs = self._run(envelope.model, release, inputs, timings, envelope.user, deadline)
            payload = tensors.encode(outputs, timings=timings if options.timings else None)
        except Exception as exc:  # noqa: BLE001 - every failure is answered, encrypted
            raise self._sealed_error(envelope, release, exc) from None
        answer = self._seal_answer(envelope, release, payload)
        return {"envelope": answer.to_binary() if binary else answer.to_json()}

    def _seal_answer(self, envelope: Envelope, release: Release, payload: bytes) -> Envelope:
        return seal(
            release.request_key,
            payload,
            model=envelope.model,
            user=envelope.user,
            request_id=envelope.request_id,
            direction="response",
            expires=envelope.expires,
        )

    def _sealed_error(self, envelope: Envelope, release: Release, exc: Exception) -> EncryptedError:
        err = from_exception(exc)
        if err.code == "internal":
            log.error("internal error serving model %s: %s", envelope.model, type(exc).__name__)
        else:
            log.info("request for model %s refused: %s", envelope.model, err.code)
        answer = self._seal_answer(envelope, release, tensors.encode_error(err.code, err.message))
        return EncryptedError(err.code, err.status, answer.to_json())

    def stats(self) -> dict[str, Any]:
        cached = self.models.cached_models()
        return {
            "models_cached": list(dict.fromkeys(str(k[0]) for k in cached)),  # type: ignore[index]
            "model_versions_cached": [[str(k[0]), int(k[1])] for k in cached],  # type: ignore[index]
            "model_cache_bytes": self.models.used_bytes,
            "model_loads": self.models.loads,
            "model_evictions": self.models.evictions,
            "key_cache_entries": len(self.key_cache),
            "key_cache_hits": self.key_cache.hits,
            "key_cache_misses": self.key_cache.misses,
            "replay_window_entries": len(self.replay),
            "run_slots": self.run_slots,
        }


def _sealed_size(sealed: Any) -> int | None:
    """The sealed file's length as the store reports it (it bounds the plaintext's, so the
    decryption buffer is allocated once): a remote blob's declared size, a local file's."""
    size = getattr(sealed, "size", None)
    if type(size) is int and size >= 0:
        return size
    try:
        return os.fstat(sealed.fileno()).st_size - sealed.tell()
    except (AttributeError, OSError, ValueError):
        return None
