"""Python SDK: `ModelOwner` and `ModelUser`.

Both verify the KeyService's attestation before sending it any secret (`PrincipalClient`), and
talk to the untrusted gateway only in ciphertext: sealed model files and request envelopes.
"""

from __future__ import annotations

import hashlib
import json
import random
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NoReturn

import httpx
import numpy as np

from veil import onnx_signature
from veil.crypto import chunked
from veil.crypto.encoding import b64d, b64e
from veil.crypto.envelope import (
    BINARY_CONTENT_TYPE,
    Envelope,
    check_identifier,
    is_binary,
    new_request_id,
    open_envelope,
    seal,
)
from veil.crypto.errors import IntegrityError, MalformedError
from veil.crypto.identity import HEADER_PRINCIPAL, Identity
from veil.crypto.keys import SymmetricKey
from veil.errors import BadRequest, Unavailable, VeilError
from veil.keepalive import KeepAlive
from veil.keyservice import wire
from veil.keyservice.client import PrincipalClient
from veil.runtime import tensors
from veil.trust import ANCHOR_FIELDS, TrustAnchors
from veil.wire.cards import MODES, ModelCard, TensorSpec, mismatches, sign_card, verify_card


@dataclass(frozen=True)
class Deployment:
    """Where a Veil deployment listens: addresses only.

    Written by the operator (`veil up` writes `deployment.json`), so nothing in it is trusted:
    what a principal trusts comes from its own `TrustAnchors`. Any trust setting found in the
    file is kept in `operator_settings`, only so the client can refuse one that disagrees."""

    gateway_url: str
    keyservice_url: str
    operator_settings: dict[str, Any] = field(default_factory=dict)
    extra: dict[str, Any] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        return {"gateway_url": self.gateway_url, "keyservice_url": self.keyservice_url, **self.extra}

    @classmethod
    def from_json(cls, obj: dict[str, Any]) -> Deployment:
        if not isinstance(obj, dict):
            raise BadRequest("deployment: must be a JSON object", code="bad_deployment")
        for name in ("gateway_url", "keyservice_url"):
            if not isinstance(obj.get(name), str) or not obj[name].startswith(("http://", "https://")):
                raise BadRequest(f"deployment.{name}: must be an http(s) URL", code="bad_deployment")
        settings = {k: obj[k] for k in ANCHOR_FIELDS if k in obj}
        known = {"gateway_url", "keyservice_url", *ANCHOR_FIELDS}
        return cls(
            gateway_url=obj["gateway_url"],
            keyservice_url=obj["keyservice_url"],
            operator_settings=settings,
            extra={k: v for k, v in obj.items() if k not in known},
        )

    @classmethod
    def load(cls, path: Path) -> Deployment:
        try:
            obj = json.loads(Path(path).read_text())
        except ValueError:
            raise BadRequest(f"{path}: not valid JSON", code="bad_deployment") from None
        return cls.from_json(obj)


Progress = Callable[[str, int, int], None]
UPLOAD_PIECE = 1 << 20
DEFAULT_DEADLINE_S = 120.0
MAX_RETRIES = 8
TIMEOUT_HEADER = "x-veil-timeout-ms"
# Refusals that mean the request did not run: safe to send again (with a fresh envelope).
CLEAN_REFUSALS = frozenset({"busy", "unavailable", "keyservice_unavailable"})
# what an instance answers when the request was made for another version's parameters
STALE_CARD_CODES = frozenset({"wrong_parameters", "wrong_features", "missing_keys"})
HYBRID_REQUEST, HYBRID_RESPONSE = tensors.HYBRID_REQUEST, tensors.HYBRID_RESPONSE


class _Retryable(Exception):
    """An attempt that failed in a way a retry may fix; `error` is what the caller sees if not."""

    def __init__(self, error: VeilError, *, may_have_run: bool, retry_after: float | None = None) -> None:
        super().__init__(error.message)
        self.error, self.may_have_run, self.retry_after = error, may_have_run, retry_after


def _backoff(attempt: int, base: float = 0.05, cap: float = 2.0) -> float:
    """Full-jitter exponential backoff: uniform in [0, min(cap, base·2^attempt)]."""
    return random.uniform(0, min(cap, base * 2**attempt))  # noqa: S311 - timing jitter, not a secret


def _retry_after(response: httpx.Response) -> float | None:
    value = response.headers.get("retry-after", "")
    try:
        return min(30.0, max(0.0, float(value)))
    except ValueError:
        return None


def _model_id(value: str) -> str:
    """A model id checked here, before anything is sent, with the rule it breaks."""
    try:
        return check_identifier(value, "model")
    except MalformedError as exc:
        raise BadRequest(f"model id {value!r}: {exc}", code="malformed") from None


def _check_loads(data: bytes) -> None:
    """Refuse, at publish, a model this Veil's runtime could never load (ONNX Runtime's message,
    in full: the owner is the one who needs it)."""
    import onnxruntime as ort

    try:
        ort.InferenceSession(data, providers=["CPUExecutionProvider"])
    except Exception as exc:  # noqa: BLE001 - ORT raises its own exception types
        raise BadRequest(
            f"model does not load in ONNX Runtime {ort.__version__}: {str(exc).splitlines()[0][:400]}", code="bad_model"
        ) from None


def _gateway_error(response: httpx.Response) -> VeilError:
    try:
        err = response.json().get("error", {})
    except ValueError:
        err = {}
    return VeilError(
        err.get("message", f"gateway answered HTTP {response.status_code}"),
        code=err.get("code", "gateway_error"),
        status=response.status_code,
    )


def _raise_gateway_refusal(response: httpx.Response) -> NoReturn:
    """Raise a refusal in the clear: retryable when it is a clean 503 (`busy`, `unavailable`,
    nothing ran) or a 502/504 (may have run: retried only where the request is idempotent)."""
    error = _gateway_error(response)
    if response.status_code == 503 and error.code in CLEAN_REFUSALS:
        raise _Retryable(error, may_have_run=False, retry_after=_retry_after(response))
    if response.status_code in (502, 504):
        raise _Retryable(error, may_have_run=True)
    raise error


class _Principal:
    def __init__(
        self,
        deployment: Deployment,
        identity: Identity | None = None,
        *,
        trust: TrustAnchors,
        timeout: float = 120.0,
    ) -> None:
        trust.check_operator_settings(deployment.operator_settings)
        self.deployment = deployment
        self.trust = trust
        self.identity = identity or Identity.generate()
        self.keyservice = PrincipalClient(
            deployment.keyservice_url,
            self.identity,
            expected_measurements=set(trust.keyservice_measurements),
            trust=trust.verifier_trust(),
            allow_simulated=trust.allow_simulated,
        )
        self.gateway = httpx.Client(base_url=deployment.gateway_url, timeout=timeout)

    @property
    def id(self) -> str:
        return self.identity.id

    def _allowed(self, given: list[str] | None) -> list[str]:
        """The runtime measurements keys may reach: those given, else this principal's anchors'."""
        measurements = given if given is not None else self.trust.runtime_measurements
        if not measurements:
            raise BadRequest(
                "allowed_measurements: none given and your trust anchors allow no runtime measurement",
                code="no_measurements",
            )
        return measurements

    def register(self) -> str:
        """Verify the KeyService's attestation, then register this principal's public key."""
        self.keyservice.connect()
        return self.keyservice.register()

    def close(self) -> None:
        self.keyservice.close()
        self.gateway.close()


class ModelOwner(_Principal):
    """Seals models, uploads the ciphertext, gives the model key to the attested KeyService."""

    def publish(
        self,
        model_id: str,
        onnx: bytes | Path | Any,
        *,
        mode: str = "tee",
        allowed_measurements: list[str] | None = None,
        revocation_delay_s: int | None = None,
        description: str = "",
        progress: Progress | None = None,
        optimize: bool = False,
    ) -> dict[str, Any]:
        """Publish a new version of `model_id`, staged so that a failure changes nothing.

        `mode` is how users will be served, and goes into the owner-signed card:
        "tee" (an ONNX model, sealed, run by attested runtimes), "he" (a compiled HE model, a
        `veil.he.compiled.CompiledModel` or the directory `veil he compile --out` wrote; its
        weights reach the cloud in clear, inputs and outputs stay CKKS ciphertexts) or "hybrid"
        (the same compiled model, sealed like a TEE model and evaluated on ciphertexts inside
        attested runtimes: the cloud sees neither weights nor inputs).

        `optimize` converts the model to ONNX Runtime's ORT format first (graph optimisations done
        once, here: `veil.ort_format.to_ort`) and seals that; runtimes then load it without
        re-optimising and without copying it. The card still describes the original ONNX graph.

        `progress(step, done, total)` hears each step ("check", "stage", "seal", "upload" in
        bytes, "card", "commit"), for a progress bar on large models.

        1. the KeyService stages the version (fresh model key, keyed content digest, the
           allow-list and revocation delay that apply once it is current) and names its number;
        2. the model is sealed for that version and uploaded with this owner's signature over
           (model, version, SHA-256 of the sealed file): the store takes no one else's bytes;
        3. the owner-signed model card (inputs, outputs, mode, description) is attached;
        4. the KeyService makes the version current; runtimes serve it within the delay.
        A refused stage, a failed upload or a refused commit leaves the previous version serving."""
        model_id = _model_id(model_id)
        if mode not in MODES:
            raise BadRequest(f"mode: must be one of {list(MODES)}, not {mode!r}", code="bad_mode")
        if mode != "tee":
            return self._publish_he(
                model_id,
                onnx,
                mode=mode,
                allowed_measurements=allowed_measurements,
                revocation_delay_s=revocation_delay_s,
                description=description,
                progress=progress,
            )
        report = progress or (lambda step, done, total: None)
        original = Path(onnx).read_bytes() if isinstance(onnx, Path) else onnx
        report("check", 0, 1)
        if optimize:
            from veil.ort_format import to_ort

            data = to_ort(original)
        else:
            data = original
        _check_loads(data)
        key = SymmetricKey.generate()
        measurements = self._allowed(allowed_measurements)
        digest = chunked.content_digest(key, data)
        report("stage", 0, 1)
        version = self.keyservice.stage_version(
            model_id, key, digest, measurements=measurements, revocation_delay_s=revocation_delay_s
        )
        report("seal", 0, 1)
        sealed = chunked.seal_bytes(key, data, model=model_id, version=version)
        self.upload_sealed(model_id, version, sealed, progress=lambda done, total: report("upload", done, total))
        report("card", 0, 1)
        inputs, outputs = onnx_signature.signature(original)
        committed = self._sign_card_and_commit(
            ModelCard(model_id, version, "tee", self.id, inputs, outputs, description), report
        )
        return {
            "model": model_id,
            "version": version,
            "replaced_version": version - 1 if version > 1 else None,
            "plaintext_bytes": len(data),
            "sealed_bytes": len(sealed),
            "measurements": measurements,
            "revocation_delay_s": committed.get("revocation_delay_s"),
        }

    def _sign_card_and_commit(self, card: ModelCard, report: Progress) -> dict[str, Any]:
        """The last two steps of every publish: attach the signed card, make the version current."""
        self.keyservice.put_card(card.model, card.version, sign_card(self.identity, card))
        report("commit", 0, 1)
        committed = self.keyservice.commit_version(card.model, card.version)
        report("commit", 1, 1)
        return committed

    def _publish_he(
        self,
        model_id: str,
        compiled: Any,
        *,
        mode: str,
        allowed_measurements: list[str] | None,
        revocation_delay_s: int | None,
        description: str,
        progress: Progress | None,
    ) -> dict[str, Any]:
        """HE and hybrid publishing: the same stage → upload → card → commit as a TEE model.
        The blob is `veil.he.bundle`; hybrid seals it with the version's model key (released only
        to allowed measurements), HE mode uploads it as it is, owner-signed either way."""
        from veil.he import bundle
        from veil.he.compiled import CompiledModel
        from veil.he.packing import throughput_group

        report = progress or (lambda step, done, total: None)
        report("check", 0, 1)
        if not isinstance(compiled, CompiledModel):
            directory = Path(compiled)
            if not (directory / "manifest.json").is_file():
                raise BadRequest(
                    f"{directory}: not a compiled HE model (run `veil he compile --out DIR` first)", code="bad_model"
                )
            compiled = CompiledModel.load(directory)
        data = bundle.pack(compiled, model_id)
        spec = compiled.client_spec()
        key = SymmetricKey.generate()
        measurements = self._allowed(allowed_measurements)
        report("stage", 0, 1)
        version = self.keyservice.stage_version(
            model_id,
            key,
            chunked.content_digest(key, data),
            measurements=measurements,
            revocation_delay_s=revocation_delay_s,
        )
        uploaded = lambda done, total: report("upload", done, total)  # noqa: E731
        if mode == "hybrid":
            report("seal", 0, 1)
            blob = chunked.seal_bytes(key, data, model=model_id, version=version)
            self.upload_sealed(model_id, version, blob, progress=uploaded)
        else:
            blob = data
            self.upload_sealed(model_id, version, blob, progress=uploaded, route="he")
        report("card", 0, 1)
        inputs = (TensorSpec("input", "float64", (None, compiled.in_dim)),)
        outputs = (
            TensorSpec("scores", "float64", (None, compiled.out_dim)),
            TensorSpec("predictions", "int64" if spec.get("output") != "regression" else "float64", (None,)),
        )
        extra = {
            "he_spec": spec,
            "throughput_group": throughput_group(compiled.params.slots),
            "params_digest": spec["params_digest"],
        }
        committed = self._sign_card_and_commit(
            ModelCard(model_id, version, mode, self.id, inputs, outputs, description, extra), report
        )
        return {
            "model": model_id,
            "version": version,
            "mode": mode,
            "replaced_version": version - 1 if version > 1 else None,
            "plaintext_bytes": len(data),
            "uploaded_bytes": len(blob),
            "poly_modulus_degree": compiled.params.poly_modulus_degree,
            "measurements": measurements,
            "revocation_delay_s": committed.get("revocation_delay_s"),
        }

    def upload_sealed(
        self,
        model_id: str,
        version: int,
        sealed: bytes,
        *,
        progress: Callable[[int, int], None] | None = None,
        route: str = "sealed",
    ) -> dict[str, Any]:
        """Upload a sealed file (or, `route="he"`, an HE-mode model blob) for a staged version,
        signed by this owner, streamed in 1 MiB pieces (`progress(bytes sent, total)` after each)."""
        signature = self.identity.sign(wire.upload_payload(model_id, version, hashlib.sha256(sealed).hexdigest()))
        headers = {
            "content-type": "application/octet-stream",
            HEADER_PRINCIPAL: self.id,
            wire.HEADER_UPLOAD_SIGNATURE: b64e(signature),
        }
        headers["content-length"] = str(len(sealed))

        def pieces() -> Iterator[bytes]:
            view = memoryview(sealed)
            for start in range(0, len(sealed), UPLOAD_PIECE):
                yield bytes(view[start : start + UPLOAD_PIECE])
                if progress is not None:
                    progress(min(start + UPLOAD_PIECE, len(sealed)), len(sealed))

        try:
            response = self.gateway.put(
                f"/v1/models/{model_id}/versions/{version}/{route}", content=pieces(), headers=headers
            )
        except httpx.HTTPError as exc:
            raise Unavailable(f"gateway unreachable: {type(exc).__name__}") from None
        if not response.is_success:
            raise _gateway_error(response)
        return response.json()

    def set_measurements(self, model_id: str, measurements: list[str]) -> None:
        self.keyservice.set_measurements(model_id, measurements)

    def set_revocation_delay(self, model_id: str, seconds: int) -> None:
        """How long runtimes may keep this model's keys after a revoke (0 to 300 s)."""
        self.keyservice.set_revocation_delay(model_id, seconds)

    def grant(self, model_id: str, user_id: str) -> None:
        self.keyservice.grant(model_id, user_id)

    def revoke(self, model_id: str, user_id: str) -> None:
        """Takes effect within the model's revocation delay (60 s unless the owner set another)."""
        self.keyservice.revoke(model_id, user_id)


class ModelUser(_Principal):
    """Registers request keys and runs encrypted inference."""

    def __init__(
        self,
        deployment: Deployment,
        identity: Identity | None = None,
        *,
        trust: TrustAnchors,
        timeout: float = 120.0,
        key_dir: Path | None = None,
    ) -> None:
        """`key_dir` keeps this user's HE keys (CKKS secret keys 0600, evaluation keys) so they
        are made and uploaded once per model parameters; None keeps them in memory only."""
        super().__init__(deployment, identity, trust=trust, timeout=timeout)
        from veil.he.user import HEKeyChain

        self.he_keys = HEKeyChain(self.id, key_dir)
        self._he_uploaded: set[str] = set()
        self._he_http: KeepAlive | None = None  # HE inference requests (see _he_post)
        self.request_keys: dict[str, SymmetricKey] = {}
        self._cards: dict[str, ModelCard | None] = {}  # None: the model has no card (asked once)
        self.last_timings: dict[str, Any] = {}

    def request_access(
        self,
        model_id: str,
        *,
        allowed_measurements: list[str] | None = None,
        key: SymmetricKey | None = None,
        max_revocation_delay_s: int | None = None,
    ) -> None:
        """Make (or reuse) a request key for `model_id` and give it to the KeyService, releasable
        only to runtimes whose measurement this user allows (default: the user's trust anchors).
        `max_revocation_delay_s` shortens how long runtimes may cache it (the shorter wins)."""
        model_id = _model_id(model_id)
        key = key or self.request_keys.get(model_id) or SymmetricKey.generate()
        measurements = self._allowed(allowed_measurements)
        self.keyservice.put_request_key(model_id, key, measurements, max_revocation_delay_s=max_revocation_delay_s)
        self.request_keys[model_id] = key

    def infer(
        self,
        model_id: str,
        inputs: np.ndarray | dict[str, np.ndarray],
        *,
        input_name: str | None = None,
        timings: bool = False,
        deadline_s: float = DEFAULT_DEADLINE_S,
        idempotent: bool = False,
        packing: str | None = None,
        max_parts: int | None = None,
    ) -> dict[str, np.ndarray]:
        """Encrypt `inputs`, send them, decrypt and return the model's named outputs.

        The model card says how: TEE mode seals tensors in an envelope; HE mode encrypts the
        samples (rows of features) under this user's CKKS key and returns `scores` and
        `predictions`; hybrid mode does both (CKKS ciphertexts inside the envelope, evaluated in
        an attested runtime). `packing` ("latency" or "throughput") overrides the HE cost
        model's choice; `max_parts` caps how many instances share one HE throughput batch (1: no
        split; default: as many as the deployment runs). HE keys are made, kept (`key_dir`) and
        uploaded once per model parameters.

        An error the runtime answers after authenticating the request comes encrypted (only its
        code travels in clear): it is opened here and raised as a VeilError with the detailed code
        and message and the HTTP status. `timings=True` asks the runtime for its timings, which
        come back inside the response envelope; `last_timings` holds them (when asked) and
        `round_trip_ms`, measured here on every call.

        The whole call, retries included, ends within `deadline_s`: the envelope expires then (a
        runtime drops it after that) and the gateway is told the time left. Clean refusals that
        did not run (`busy`, `unavailable`, a connection that never opened) are retried with
        jittered backoff, honouring `Retry-After`, each with a fresh envelope; a failure after
        which the request may have run (a timeout, a crashed instance) is retried only if
        `idempotent` is set."""
        model_id = _model_id(model_id)
        card = self._card_or_none(model_id)
        if card is not None and card.mode in ("he", "hybrid"):
            options = {"packing": packing, "deadline_s": deadline_s, "idempotent": idempotent, "max_parts": max_parts}
            try:
                return self._infer_he(model_id, card, inputs, **options)
            except VeilError as exc:
                if exc.code not in STALE_CARD_CODES:
                    raise
                fresh = self.card(model_id, refresh=True)  # a new version may have new parameters
                if fresh.version == card.version:
                    raise
                if fresh.mode not in ("he", "hybrid"):
                    return self.infer(model_id, inputs, input_name=input_name, timings=timings, deadline_s=deadline_s)
                return self._infer_he(model_id, fresh, inputs, **options)
        named = self._named_inputs(model_id, inputs, input_name)
        key = self.request_keys.get(model_id)
        if key is None:
            raise BadRequest(
                f"no request key for model {model_id!r}: run `veil user request-access {model_id}` "
                "(SDK: request_access) first",
                code="no_request_key",
            )
        deadline = time.monotonic() + deadline_s
        attempt = 0
        while True:
            remaining = deadline - time.monotonic()
            try:
                return self._infer_once(model_id, key, named, timings=timings, remaining_s=remaining)
            except _Retryable as exc:
                attempt += 1
                ran = exc.may_have_run
                pause = exc.retry_after if exc.retry_after is not None else _backoff(attempt)
                if (ran and not idempotent) or attempt > MAX_RETRIES or time.monotonic() + pause >= deadline:
                    raise exc.error from None
                time.sleep(pause)

    def _card_or_none(self, model_id: str) -> ModelCard | None:
        try:
            return self.card(model_id)
        except VeilError as exc:
            if exc.code in ("no_card", "unknown_model"):
                return None
            raise

    # -- HE and hybrid ------------------------------------------------------------------------
    def _infer_he(
        self,
        model_id: str,
        card: ModelCard,
        inputs: np.ndarray | dict[str, np.ndarray],
        *,
        packing: str | None,
        deadline_s: float,
        idempotent: bool,
        max_parts: int | None = None,
    ) -> dict[str, np.ndarray]:
        from veil.he.errors import HEError
        from veil.he.user import decrypt_response, encrypt_request

        if isinstance(inputs, dict):
            if len(inputs) != 1:
                raise BadRequest(f"inputs: {model_id} takes one input, {card.inputs[0].name!r}", code="card_mismatch")
            inputs = next(iter(inputs.values()))
        x = np.atleast_2d(np.asarray(inputs, dtype=np.float64))
        spec = card.extra.get("he_spec")
        if not isinstance(spec, dict) or spec.get("params_digest") != card.extra.get("params_digest"):
            raise VeilError(f"model card of {model_id!r} carries no usable HE spec", code="bad_card", status=502)
        width = int(spec.get("in_dim", 0))
        if x.ndim != 2 or x.shape[1] != width:
            raise BadRequest(
                f"inputs do not fit {model_id} v{card.version}: expected float64 [batch, {width}], got "
                f"{x.dtype} {list(x.shape)}",
                code="card_mismatch",
            )
        if card.mode == "hybrid" and model_id not in self.request_keys:
            raise BadRequest(
                f"no request key for model {model_id!r}: run `veil user request-access {model_id}` "
                "(SDK: request_access) first",
                code="no_request_key",
            )
        keys = self.he_keys.for_model(model_id, spec)
        self._upload_he_keys(model_id, keys)
        try:
            req, batch = encrypt_request(model_id, keys, x, packing)
        except HEError as exc:
            raise BadRequest(exc.message, code=exc.code) from None
        deadline = time.monotonic() + deadline_s
        attempt, reuploaded = 0, False
        while True:
            remaining = deadline - time.monotonic()
            try:
                raw = (
                    self._he_once(model_id, req, remaining, max_parts)
                    if card.mode == "he"
                    else self._hybrid_once(model_id, req, remaining)
                )
                break
            except VeilError as exc:
                if exc.code != "unknown_key" or reuploaded:
                    raise
                reuploaded = True  # the store lost them (or never had them): upload, then once more
                self._upload_he_keys(model_id, keys, force=True)
            except _Retryable as exc:
                attempt += 1
                pause = exc.retry_after if exc.retry_after is not None else _backoff(attempt)
                if (exc.may_have_run and not idempotent) or attempt > MAX_RETRIES:
                    raise exc.error from None
                if time.monotonic() + pause >= deadline:
                    raise exc.error from None
                time.sleep(pause)
        if isinstance(raw, dict) and isinstance(raw.get("eval_ms"), int | float):
            self.last_timings["eval_ms"] = float(raw["eval_ms"])  # the slowest part's, when split
            self.last_timings["parts"] = int(raw.get("parts", 1)) if isinstance(raw.get("parts", 1), int) else 1
        try:
            return decrypt_response(keys, raw, batch.packing, batch.batch)
        except HEError as exc:
            raise VeilError(exc.message, code=exc.code, status=502) from None

    def _upload_he_keys(self, model_id: str, keys: Any, *, force: bool = False) -> None:
        """Make sure the store holds this user's evaluation keys for the model: once per key id
        (remembered in the key directory), streamed, signed by this user."""
        from veil.he.user import key_upload

        if not force and (keys.key_id in self._he_uploaded or keys.uploaded()):
            self._he_uploaded.add(keys.key_id)
            return
        try:
            if not force:
                stored = self.gateway.get(f"/v1/he/models/{model_id}/keys/{keys.key_id}")
                if stored.is_success and stored.json().get("stored"):
                    keys.mark_uploaded()
                    self._he_uploaded.add(keys.key_id)
                    return
            headers, pieces = key_upload(self.identity, model_id, keys)
            response = self.gateway.put(f"/v1/he/models/{model_id}/keys", content=pieces(), headers=headers)
        except httpx.HTTPError as exc:
            raise Unavailable(f"gateway unreachable: {type(exc).__name__}") from None
        if not response.is_success:
            raise _gateway_error(response)
        keys.mark_uploaded()
        self._he_uploaded.add(keys.key_id)

    def _he_once(self, model_id: str, req: Any, remaining_s: float, max_parts: int | None = None) -> dict[str, Any]:
        """One HE-mode attempt: a freshly signed request to the gateway's HE route."""
        from veil.he.user import signed_request
        from veil.wire.he import HEADER_HE_PARTS

        if remaining_s <= 0:
            raise VeilError("deadline passed before the request could be sent", code="deadline_exceeded", status=504)
        body, headers = signed_request(self.identity, req, remaining_s)
        headers[TIMEOUT_HEADER] = str(int(remaining_s * 1000))
        if max_parts is not None:
            headers[HEADER_HE_PARTS] = str(max(1, int(max_parts)))
        t0 = time.perf_counter()
        try:
            response = self._he_post(f"/v1/he/models/{model_id}:infer", body, headers, remaining_s)
        except httpx.HTTPError as exc:
            never_sent = isinstance(exc, httpx.ConnectError | httpx.ConnectTimeout)
            raise _Retryable(
                Unavailable(f"gateway unreachable: {type(exc).__name__}"), may_have_run=not never_sent
            ) from None
        self.last_timings = {"round_trip_ms": (time.perf_counter() - t0) * 1e3}
        if not response.is_success:
            _raise_gateway_refusal(response)
        return response.json()

    def _he_post(self, path: str, body: bytes, headers: dict[str, str], timeout: float) -> httpx.Response:
        """POST an HE request over a keep-alive connection (`veil.keepalive`): every HE request
        pays this hop, and httpx costs about a millisecond more per call. Failures are raised as
        the same httpx exceptions; the answer is handed on as an httpx.Response."""
        if self._he_http is None:
            self._he_http = KeepAlive(self.deployment.gateway_url, keep=4)
        status, answer_headers, content = self._he_http.request(
            "POST", path, body, headers, timeout=timeout, connect_timeout=min(timeout, 10.0)
        )
        return httpx.Response(status, headers=answer_headers, content=content)

    def close(self) -> None:
        super().close()
        if self._he_http is not None:
            self._he_http.close()

    def _hybrid_once(self, model_id: str, req: Any, remaining_s: float) -> dict[str, Any]:
        """One hybrid attempt: the HE request sealed in an envelope for the attested runtime."""
        payload = json.dumps(req.to_json(), separators=(",", ":")).encode()
        named = {HYBRID_REQUEST: np.frombuffer(payload, dtype=np.uint8)}
        outputs = self._infer_once(model_id, self.request_keys[model_id], named, timings=False, remaining_s=remaining_s)
        answer = outputs.get(HYBRID_RESPONSE)
        if answer is None:
            raise VeilError("the runtime's answer holds no HE response", code="bad_response", status=502)
        try:
            return json.loads(answer.tobytes())
        except ValueError:
            raise VeilError("the runtime's HE response is not JSON", code="bad_response", status=502) from None

    def card(self, model_id: str, *, refresh: bool = False) -> ModelCard:
        """The model's card for its current version, verified: fetched through the (untrusted)
        gateway, its signature checked against the owner's key and version that the KeyService
        states over its signed channel."""
        model_id = _model_id(model_id)
        if not refresh and model_id in self._cards:
            cached = self._cards[model_id]
            if cached is None:
                raise VeilError(f"model {model_id!r} has no card", code="no_card", status=404)
            return cached
        info = self.keyservice.model_info(model_id)
        try:
            response = self.gateway.get(f"/v1/models/{model_id}/card")
        except httpx.HTTPError as exc:
            raise Unavailable(f"gateway unreachable: {type(exc).__name__}") from None
        if not response.is_success:
            error = _gateway_error(response)
            if error.code == "no_card":
                self._cards[model_id] = None
            raise error
        try:
            owner_key = b64d(info.get("owner_public_key"), "owner_public_key")
            card = verify_card(response.json().get("signed_card"), owner_key)
        except (ValueError, AttributeError) as exc:
            raise VeilError(f"model card of {model_id!r} does not verify: {exc}", code="bad_card", status=502) from None
        if card.model != model_id or card.owner != info.get("owner") or card.version != info.get("current_version"):
            raise VeilError(
                f"model card of {model_id!r} is not the owner's card of the current version "
                f"(card v{card.version}, current v{info.get('current_version')})",
                code="bad_card",
                status=502,
            )
        self._cards[model_id] = card
        return card

    def _named_inputs(
        self, model_id: str, inputs: np.ndarray | dict[str, np.ndarray], input_name: str | None
    ) -> dict[str, np.ndarray]:
        """Name a bare array after the card's only input (or `input_name`), and explain any
        mismatch with the card before anything is sent. Models without a card are sent as given."""
        try:
            card: ModelCard | None = self.card(model_id)
        except VeilError as exc:
            if exc.code != "no_card":
                raise
            card = None
        if isinstance(inputs, dict):
            named = inputs
        elif input_name is not None:
            named = {input_name: inputs}
        elif card is not None and len(card.inputs) == 1:
            named = {card.inputs[0].name: inputs}
        else:
            named = {"input": inputs}
        if card is not None and (problems := mismatches(card, named)):
            card = self.card(model_id, refresh=True)  # a new version may have a new signature
            if problems := mismatches(card, named):
                raise BadRequest(
                    f"inputs do not fit {model_id} v{card.version}: " + "; ".join(problems), code="card_mismatch"
                )
        return named

    def _infer_once(
        self, model_id: str, key: SymmetricKey, named: dict[str, np.ndarray], *, timings: bool, remaining_s: float
    ) -> dict[str, np.ndarray]:
        """One attempt: a fresh envelope that expires with the deadline."""
        if remaining_s <= 0:
            raise VeilError("deadline passed before the request could be sent", code="deadline_exceeded", status=504)
        expires = int(time.time() + max(1.0, remaining_s)) + 1
        request = self._seal_request(model_id, named, timings=timings, expires=expires)
        request_id = request.request_id

        def open_answer(obj: object) -> bytes:
            try:
                answer = Envelope.from_binary(obj) if isinstance(obj, bytes) else Envelope.from_json(obj)
                return open_envelope(
                    key,
                    answer,
                    model=model_id,
                    user=self.id,
                    direction="response",
                    request_id=request_id,
                    expires=request.expires,
                )
            except (IntegrityError, ValueError):  # ValueError: MalformedError, a foreign envelope
                raise VeilError(
                    "response does not authenticate (tampered, swapped or not an envelope)",
                    code="integrity",
                    status=502,
                ) from None

        def raise_sealed_error(plaintext: bytes, status: int) -> None:
            try:
                code, message = tensors.decode_error(plaintext)
            except ValueError:
                raise VeilError("runtime answered an unreadable error", code="bad_response", status=502) from None
            raise VeilError(message, code=code, status=status)

        t0 = time.perf_counter()
        try:
            response = self.gateway.post(
                f"/v1/models/{model_id}:infer",
                content=request.to_binary(),
                headers={"Content-Type": BINARY_CONTENT_TYPE, TIMEOUT_HEADER: str(int(remaining_s * 1000))},
                timeout=remaining_s,
            )
        except httpx.HTTPError as exc:
            never_sent = isinstance(exc, httpx.ConnectError | httpx.ConnectTimeout)
            if isinstance(exc, httpx.TimeoutException) and not never_sent:
                # the HTTP timeout is the time left: the deadline passed with the request out there
                error = VeilError(
                    f"no answer within the deadline ({remaining_s:.2f} s were left when this attempt was sent)",
                    code="deadline_exceeded",
                    status=504,
                )
            else:
                error = Unavailable(f"gateway unreachable: {type(exc).__name__}")
            raise _Retryable(error, may_have_run=not never_sent) from None
        self.last_timings = {"round_trip_ms": (time.perf_counter() - t0) * 1e3}
        if response.is_success and is_binary(response.headers.get("content-type")):
            body: Any = {"envelope": response.content}  # the binary answer, read in place
        else:
            try:
                body = response.json()
            except ValueError:
                body = None
        if not response.is_success:
            err = body.get("error") if isinstance(body, dict) else None
            sealed = (body.get("envelope") if isinstance(body, dict) else None) or (
                err.get("envelope") if isinstance(err, dict) else None
            )
            if sealed is None:  # refused before the request authenticated (or by the gateway)
                _raise_gateway_refusal(response)
            raise_sealed_error(open_answer(sealed), response.status_code)
        plaintext = open_answer(body.get("envelope") if isinstance(body, dict) else None)
        if tensors.is_error(plaintext):
            raise_sealed_error(plaintext, 502)
        outputs, meta = tensors.decode_with_meta(plaintext)
        self.last_timings = {**meta.get("timings", {}), **self.last_timings}
        return outputs

    def sealed_request(
        self, model_id: str, inputs: dict[str, np.ndarray], *, timings: bool = False, expires: int | None = None
    ) -> tuple[str, dict[str, Any]]:
        """(request id, envelope JSON) without sending: for tests and tools that replay or tamper.
        `expires` (Unix seconds) defaults to now + the envelope's default lifetime. (`infer` sends
        the same envelope in its binary form.)"""
        env = self._seal_request(model_id, inputs, timings=timings, expires=expires)
        return env.request_id, env.to_json()

    def _seal_request(
        self, model_id: str, inputs: dict[str, np.ndarray], *, timings: bool, expires: int | None
    ) -> Envelope:
        request_id = new_request_id()
        return seal(
            self.request_keys[model_id],
            tensors.encode(inputs, options=tensors.RequestOptions(timings=True) if timings else None),
            model=model_id,
            user=self.id,
            request_id=request_id,
            direction="request",
            expires=expires,
        )


__all__ = ["Deployment", "ModelOwner", "ModelUser", "TrustAnchors"]
