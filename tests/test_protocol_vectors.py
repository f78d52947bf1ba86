"""Check every test vector of docs/protocol.md against the code.

Vectors are the fenced ```json blocks whose object has a "vector" id. Each is recomputed from its
fixed keys, nonces, timestamps and sequence numbers (AES-GCM, HKDF, HMAC, Ed25519 and HPKE with
a fixed ephemeral key are all deterministic then) and also run through Veil's own API: opened,
verified, parsed, served. `test_keyservice_serves_the_story` replays the KeyService vectors
against a real KeyService app holding the vectors' keys, and compares its answers.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import json
import re
import sqlite3
import struct
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from types import SimpleNamespace
from typing import Any
from unittest import mock

import httpx
import numpy as np
import pytest
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from fastapi.testclient import TestClient
from pyhpke import KEMKey, KEMKeyPair

from veil.attest.evidence import Evidence
from veil.attest.sim import SIGN_CONTEXT, SimProvider, SimRoot, verify_sim
from veil.attest.validate import Policy, validate
from veil.attest.verify import TrustConfig, verify
from veil.crypto import chunked, hpke
from veil.crypto.at_rest import AT_REST_CONTEXT, Sealer
from veil.crypto.encoding import b64d, b64e, canonical_json
from veil.crypto.envelope import (
    CLOCK_SKEW_S,
    DEFAULT_LIFETIME_S,
    MAX_LIFETIME_S,
    Envelope,
    default_expires,
    open_envelope,
    response_key,
)
from veil.crypto.errors import CryptoError, IntegrityError, MalformedError
from veil.crypto.identity import (
    SIGNING_CONTEXT,
    Identity,
    SequenceCounter,
    SignedHeaders,
    principal_id,
    signing_payload,
    verify_signature,
)
from veil.crypto.kdf import derive_key
from veil.crypto.keys import SymmetricKey
from veil.errors import StoreIntegrityError, Unauthorized, VeilError
from veil.keyservice import store as ks_store
from veil.keyservice import wire
from veil.keyservice.answers import AnswerSigner
from veil.keyservice.client import PrincipalClient, Release, RuntimeKeyClient
from veil.keyservice.service import check_delay, check_digest, check_measurements
from veil.keyservice.store import GENESIS, RowMacs, Store, chain_hash, verify_audit_chain
from veil.runtime import tensors
from veil.runtime.core import GENERIC_MESSAGE, CoreConfig, EncryptedError, RuntimeCore
from veil.sdk import Deployment
from veil.store import LocalModelStore
from veil.trust import TrustAnchors, TrustError

DOC = Path(__file__).resolve().parents[1] / "docs" / "protocol.md"
REQUIRED = {
    # inference
    "tensors-request",
    "tensors-response",
    "error-payload",
    "envelope-request",
    "envelope-response",
    "envelope-window",
    "envelope-error",
    "envelope-binary",
    # sealed models and secrets in transit
    "sealed-model",
    "hpke-model-key-upload",
    # principals
    "identity",
    "signed-request",
    "sequence-counter",
    # attestation
    "evidence-sim",
    "ks-evidence",
    # KeyService API
    "ks-signed-answer",
    "ks-register",
    "ks-stage-version",
    "ks-version-info",
    "upload-sealed",
    "ks-commit-version",
    "ks-put-measurements",
    "ks-put-revocation-delay",
    "ks-grant",
    "ks-revoke",
    "ks-put-request-key",
    "ks-delete-request-key",
    "ks-attest-challenge",
    "ks-attest",
    "ks-release",
    "error-body",
    # HE serving
    "he-key-record",
    "he-keys-signature",
    "he-request-signature",
    # KeyService state at rest
    "at-rest",
    "policy-row",
    "audit-chain",
    # client configuration
    "trust-anchors",
    "deployment",
}


def load_vectors() -> dict[str, dict[str, Any]]:
    vectors: dict[str, dict[str, Any]] = {}
    for block in re.findall(r"```json\n(.*?)\n```", DOC.read_text(), flags=re.S):
        obj = json.loads(block)
        if isinstance(obj, dict) and "vector" in obj:
            assert obj["vector"] not in vectors, f"duplicate vector {obj['vector']}"
            vectors[obj["vector"]] = obj
    return vectors


VECTORS = load_vectors()
CHECKS: dict[str, Callable[[dict[str, Any]], None]] = {}


def check(name: str) -> Callable:
    def register(fn: Callable[[dict[str, Any]], None]) -> Callable:
        CHECKS[name] = fn
        return fn

    return register


def hx(s: str) -> bytes:
    return bytes.fromhex(s)


def vec(name: str) -> dict[str, Any]:
    return VECTORS[name]


def hpke_fixed(public_key: bytes, plaintext: bytes, info: bytes, aad: bytes, ephemeral: bytes) -> bytes:
    """RFC 9180 sealing with a given ephemeral key (deterministic), for recomputing vectors.

    Uses pyhpke directly, an implementation independent of `veil.crypto.hpke`."""
    sk = X25519PrivateKey.from_private_bytes(ephemeral)
    eks = KEMKeyPair(KEMKey.from_pyca_cryptography_key(sk), KEMKey.from_pyca_cryptography_key(sk.public_key()))
    enc, ctx = hpke.SUITE.create_sender_context(hpke.SUITE.kem.deserialize_public_key(public_key), info=info, eks=eks)
    return enc + ctx.seal(plaintext, aad=aad)


def aes_gcm(key: bytes, nonce_hex: str, plaintext: bytes, aad: bytes) -> bytes:
    nonce = hx(nonce_hex)
    return nonce + AESGCM(key).encrypt(nonce, plaintext, aad)


def body_bytes(req: dict[str, Any]) -> bytes:
    """A signed request's body exactly as the client sends it (`json.dumps`, empty when none)."""
    return json.dumps(req["body"]).encode() if req.get("body") is not None else b""


def check_signed(req: dict[str, Any], private_key: str) -> str:
    """Verify a vector's signed request headers exactly as the KeyService does; return the principal."""
    ident = Identity.from_private_bytes(hx(private_key))
    body = body_bytes(req)
    headers = SignedHeaders.from_headers(req["headers"])
    assert headers.principal == ident.id
    payload = signing_payload(req["method"], req["path"], body, headers.timestamp, headers.nonce, headers.seq)
    assert payload.startswith(SIGNING_CONTEXT + b"\n")
    verify_signature(ident.public_key, payload, headers.signature)
    # Ed25519 is deterministic: the same inputs give the same headers.
    again = ident.sign_request(
        req["method"], req["path"], body, seq=headers.seq, timestamp=headers.timestamp, nonce=headers.nonce
    )
    assert again.as_dict() == req["headers"]
    if req.get("body") is not None:
        assert req["body"]["v"] == wire.VERSION
    return ident.id


def tensor_payload(entries: list[dict[str, Any]], extra: dict[str, Any]) -> tuple[bytes, bytes]:
    """(header, payload) of a VTN1 payload, built by hand from the vector's tensors."""
    header = json.dumps(
        {"tensors": [{k: e[k] for k in ("name", "dtype", "shape")} for e in entries], **extra}, separators=(",", ":")
    ).encode()
    data = b"".join(np.array(e["data"], dtype=e["dtype"]).reshape(e["shape"]).tobytes() for e in entries)
    return header, tensors.MAGIC + struct.pack(">I", len(header)) + header + data


def arrays(entries: list[dict[str, Any]]) -> dict[str, np.ndarray]:
    return {e["name"]: np.array(e["data"], dtype=e["dtype"]).reshape(e["shape"]) for e in entries}


def envelope_of(expect: dict[str, Any]) -> dict[str, Any]:
    """The envelope of an envelope vector: alone, or inside the answer that carries it."""
    if "envelope" in expect:
        return expect["envelope"]
    return (expect.get("answer") or expect["gateway_answer"])["envelope"]


@contextmanager
def temp_dir() -> Iterator[Path]:
    with tempfile.TemporaryDirectory(prefix="veil-vectors-") as d:
        yield Path(d)


# -- inference --------------------------------------------------------------------------------


@check("tensors-request")
@check("tensors-response")
def _tensors(v: dict[str, Any]) -> None:
    g, e = v["given"], v["expect"]
    is_request = v["vector"] == "tensors-request"
    extra = {"options": g["options"]} if is_request else {"timings": g["timings"]}
    header, payload = tensor_payload(g["tensors"], extra)
    assert header.decode() == e["header"] and b64e(payload) == e["payload"]
    named = arrays(g["tensors"])
    if is_request:
        encoded = tensors.encode(named, options=tensors.RequestOptions(**g["options"]))
    else:
        encoded = tensors.encode(named, timings=g["timings"])
    assert encoded == payload
    decoded, meta = tensors.decode_with_meta(payload)
    assert decoded.keys() == named.keys() and all(np.array_equal(decoded[k], named[k]) for k in named)
    if is_request:
        assert tensors.request_options(meta) == tensors.RequestOptions(**g["options"])
    else:
        assert meta == {"timings": g["timings"]}
    assert not tensors.is_error(payload)


@check("error-payload")
def _error_payload(v: dict[str, Any]) -> None:
    g, e = v["given"], v["expect"]
    body = json.dumps({"error": {"code": g["code"], "message": g["message"]}}, separators=(",", ":")).encode()
    assert body.decode() == e["body"]
    payload = tensors.ERROR_MAGIC + struct.pack(">I", len(body)) + body
    assert b64e(payload) == e["payload"] == b64e(tensors.encode_error(g["code"], g["message"]))
    assert tensors.is_error(payload) and tensors.decode_error(payload) == (g["code"], g["message"])
    with pytest.raises(MalformedError):
        tensors.decode(payload)


@check("envelope-request")
@check("envelope-response")
@check("envelope-error")
def _envelope(v: dict[str, Any]) -> None:
    g, e = v["given"], v["expect"]
    wire_env = envelope_of(e)
    env = Envelope.from_json(wire_env)
    assert env.expires == 1767225600
    assert env.aad() == e["aad"].encode() == canonical_json({k: x for k, x in wire_env.items() if k != "ct"})
    request_key = SymmetricKey(hx(g["request_key"]))
    key = request_key
    if env.direction == "response":
        key = response_key(request_key, env.request_id)
        assert key.material().hex() == e["response_key"]
        assert key.material() == derive_key(request_key, b"veil response", env.request_id.encode()).material()
    plaintext = b64d(g["plaintext"])
    assert env.ct == aes_gcm(key.material(), g["nonce"], plaintext, env.aad())
    opened = open_envelope(
        request_key,
        env,
        model=env.model,
        user=env.user,
        direction=env.direction,
        request_id=env.request_id,
        expires=env.expires,
    )
    assert opened == plaintext
    # The plaintexts are the payload vectors; the request is the one the response answers.
    payload = {"envelope-request": "tensors-request", "envelope-response": "tensors-response"}
    payload["envelope-error"] = "error-payload"
    assert g["plaintext"] == vec(payload[v["vector"]])["expect"]["payload"]
    request = vec("envelope-request")["expect"]["envelope"]
    assert {k: x for k, x in wire_env.items() if k not in ("direction", "ct")} == {
        k: x for k, x in request.items() if k not in ("direction", "ct")
    }
    # Version 1 (no window) is refused naming `v`; a changed `expires` does not authenticate.
    with pytest.raises(MalformedError) as refused:
        Envelope.from_json({**wire_env, "v": 1})
    assert refused.value.field == "v"
    stretched = Envelope.from_json({**wire_env, "expires": env.expires + 3600})
    with pytest.raises(IntegrityError):
        open_envelope(request_key, stretched, model=env.model, user=env.user, direction=env.direction)
    if v["vector"] == "envelope-response":
        assert e["answer"] == {"envelope": wire_env}  # a success is the envelope and nothing else
    if v["vector"] == "envelope-error":
        _check_error_answers(v)


class FixedReleaser:
    """Stands in for the KeyService: releases the vectors' keys (version 1, ttl 45 s)."""

    def __init__(self) -> None:
        self.calls = 0

    def release(self, model: str, user: str) -> Release:
        self.calls += 1
        g = vec("ks-release")["given"]
        return Release(
            SymmetricKey(hx(g["model_key"])),
            SymmetricKey(hx(g["request_key"])),
            1,
            vec("sealed-model")["expect"]["digest"],
            45.0,
        )


@contextmanager
def runtime_core(now: float) -> Iterator[RuntimeCore]:
    """A trusted core with the vectors' keys, an empty model store and a clock stopped at `now`."""
    with temp_dir() as d:
        store = LocalModelStore(d, create=True)
        yield RuntimeCore(CoreConfig(), FixedReleaser(), store, clock=lambda: now)


def _check_error_answers(v: dict[str, Any]) -> None:
    """The clear part of an encrypted error, as the runtime and the gateway answer it, and the
    runtime really answering a replayed request that way."""
    from veil.gateway.app import _status
    from veil.platform.errors import ActionError

    e = v["expect"]
    envelope = envelope_of(e)
    assert e["runtime_answer"]["error"]["envelope"] == envelope
    code = vec("error-payload")["given"]["code"]
    runtime_answer = EncryptedError(code, e["status"], envelope).to_json()
    assert runtime_answer == e["runtime_answer"]
    assert runtime_answer["error"]["message"] == GENERIC_MESSAGE
    # The platform keeps only the action's error object (OpenWhisk) or passes the whole body; the
    # gateway lifts the envelope to the top level either way.
    for exc in (
        ActionError("veil-tee", runtime_answer["error"], e["status"]),
        SimpleNamespace(body=runtime_answer, status=e["status"]),
    ):
        lifted = _status(exc)  # type: ignore[arg-type]
        assert lifted.status == e["status"] and lifted.to_json() == e["gateway_answer"]

    # The runtime itself: the request envelope authenticates, its first use fails encrypted
    # (the store is empty), its second is a replay, answered encrypted with this very payload.
    request = vec("envelope-request")["expect"]["envelope"]
    request_key = SymmetricKey(hx(v["given"]["request_key"]))
    with runtime_core(now=request["expires"]) as core:
        with pytest.raises(EncryptedError) as first:
            core.infer(request)
        assert (first.value.code, first.value.status) == ("unknown_model", 404)
        with pytest.raises(EncryptedError) as second:
            core.infer(request)
    err = second.value
    assert (err.code, err.status) == (code, e["status"])
    answer = err.to_json()
    assert {**answer["error"], "envelope": envelope} == e["runtime_answer"]["error"]
    sealed = Envelope.from_json(answer["error"]["envelope"])
    assert {k: x for k, x in sealed.to_json().items() if k != "ct"} == {k: x for k, x in envelope.items() if k != "ct"}
    plaintext = open_envelope(
        request_key,
        sealed,
        model=sealed.model,
        user=sealed.user,
        direction="response",
        request_id=request["request_id"],
        expires=request["expires"],
    )
    assert b64e(plaintext) == v["given"]["plaintext"]


@check("envelope-binary")
def _envelope_binary(v: dict[str, Any]) -> None:
    """The binary form of the request vector, recomputed byte by byte from the layout, parsed
    back to the same envelope (ct read in place), opened, and served by the runtime core in
    the same form as JSON would be (the first use fails encrypted: the store is empty)."""
    e = v["expect"]
    request = vec("envelope-request")
    wire_env = request["expect"]["envelope"]
    header = request["expect"]["aad"].encode()
    ct = b64d(wire_env["ct"])
    prefix = b"VEN2" + struct.pack(">HI", len(header), len(ct))
    assert prefix.hex() == e["prefix"]
    binary = b64d(e["binary"])
    assert binary == prefix + header + ct
    env = Envelope.from_json(wire_env)
    assert env.to_binary() == binary
    parsed = Envelope.from_binary(binary)
    assert parsed == env and isinstance(parsed.ct, memoryview) and parsed.ct.obj is binary  # a view, no copy
    request_key = SymmetricKey(hx(request["given"]["request_key"]))
    opened = open_envelope(request_key, parsed, model=env.model, user=env.user, direction="request")
    assert b64e(opened) == request["given"]["plaintext"]
    with runtime_core(now=wire_env["expires"]) as core, pytest.raises(EncryptedError) as refused:
        core.infer(binary)
    assert refused.value.code == "unknown_model"
    sealed = Envelope.from_json(refused.value.envelope)  # errors keep the JSON form
    assert (sealed.direction, sealed.request_id) == ("response", env.request_id)


@check("envelope-window")
def _envelope_window(v: dict[str, Any]) -> None:
    g, e = v["given"], v["expect"]
    expires = g["expires"]
    assert (DEFAULT_LIFETIME_S, MAX_LIFETIME_S, CLOCK_SKEW_S) == (120, 600, 60)
    assert e["accepted_from"] == expires - MAX_LIFETIME_S - CLOCK_SKEW_S
    assert e["accepted_until"] == expires + CLOCK_SKEW_S
    assert default_expires(now=expires - DEFAULT_LIFETIME_S + 0.9) == expires
    request = vec("envelope-request")["expect"]["envelope"]
    assert request["expires"] == expires
    # At both ends of the window the request is accepted (it authenticates, then fails for the
    # empty store, encrypted); one second outside, it is refused in clear.
    for now in (e["accepted_from"], e["accepted_until"]):
        with runtime_core(now=now) as core, pytest.raises(EncryptedError) as accepted:
            core.infer(request)
        assert accepted.value.code == "unknown_model"
        assert core.replay.add(("iris", request["user"], request["request_id"]), 0) is False
    for refusal in e["refusals"]:
        with runtime_core(now=refusal["now"]) as core:
            with pytest.raises(VeilError) as refused:
                core.infer(request)
            assert not isinstance(refused.value, EncryptedError)
            assert (refused.value.status, refused.value.to_json()) == (refusal["status"], refusal["body"])
            assert core._keys.calls == 0  # type: ignore[attr-defined]  # refused before any release


# -- sealed models ----------------------------------------------------------------------------


@check("sealed-model")
def _sealed_model(v: dict[str, Any]) -> None:
    g, e = v["given"], v["expect"]
    key = SymmetricKey(hx(g["model_key"]))
    plain = g["plaintext"].encode()
    digest_key = derive_key(key, b"veil model digest", b"")
    assert digest_key.material().hex() == e["digest_key"]
    digest = hmac.new(digest_key.material(), plain, hashlib.sha256).hexdigest()
    assert digest == e["digest"] == chunked.content_digest(key, plain)
    fields = {
        "v": 2,
        "model": g["model"],
        "version": g["version"],
        "digest": digest,
        "file_id": g["file_id"],
        "chunk_size": g["chunk_size"],
    }
    header = canonical_json(fields)
    assert header.decode() == e["header"]
    header_hash = hashlib.sha256(header).digest()
    assert header_hash.hex() == e["header_sha256"]
    size = g["chunk_size"]
    pieces = [plain[i : i + size] for i in range(0, len(plain), size)] or [b""]
    out = chunked.MAGIC + struct.pack(">I", len(header)) + header
    for i, (piece, nonce_hex) in enumerate(zip(pieces, g["chunk_nonces"], strict=True)):
        aad = header_hash + struct.pack(">QB", i, 1 if i == len(pieces) - 1 else 0)
        assert aad.hex() == e["chunk_aads"][i]
        record = aes_gcm(key.material(), nonce_hex, piece, aad)
        out += struct.pack(">I", len(record)) + record
    assert b64e(out) == e["file"]
    sealed = b64d(e["file"])
    assert chunked.open_bytes(key, sealed, model=g["model"], version=g["version"], digest=digest) == plain
    for field, kwargs in (("version", {"version": g["version"] + 1}), ("digest", {"digest": "0" * 64})):
        with pytest.raises(MalformedError) as refused:
            chunked.open_bytes(key, sealed, model=g["model"], **kwargs)
        assert refused.value.field == field
    # What Veil's own sealer writes for the same inputs differs only by file id and nonces.
    own = chunked.seal_bytes(key, plain, model=g["model"], version=g["version"], chunk_size=size)
    assert chunked.open_bytes(key, own, model=g["model"], version=g["version"], digest=digest) == plain


# -- HPKE, identities, signed requests --------------------------------------------------------


@check("hpke-model-key-upload")
def _hpke(v: dict[str, Any]) -> None:
    g, e = v["given"], v["expect"]
    pair = hpke.HpkeKeyPair.from_private_bytes(hx(g["recipient_private_key"]))
    assert b64e(pair.public_key) == e["recipient_public_key"]
    info, aad = g["info"].encode(), g["aad"].encode()
    assert info == wire.INFO_MODEL_KEY_UPLOAD
    sealed = b64d(e["sealed"])
    assert sealed == hpke_fixed(pair.public_key, hx(g["plaintext_hex"]), info, aad, hx(g["ephemeral_private_key"]))
    assert pair.open(sealed, info=info, aad=aad) == hx(g["plaintext_hex"])


@check("identity")
def _identity(v: dict[str, Any]) -> None:
    ident = Identity.from_private_bytes(hx(v["given"]["ed25519_private_key"]))
    assert b64e(ident.public_key) == v["expect"]["public_key"]
    assert ident.id == v["expect"]["principal_id"] == hashlib.sha256(ident.public_key).hexdigest()


def _vector_user(given: dict[str, Any]) -> Identity:
    assert given["user_private_key"] == 'SHA-256("veil test vector user")'
    return Identity.from_private_bytes(hashlib.sha256(b"veil test vector user").digest())


@check("he-key-record")
def _he_key_record(v: dict[str, Any]) -> None:
    from veil.he.errors import HEError
    from veil.he.keys import open_record, record_header, record_key_id, store_id, unpack_eval_keys

    g, e = v["given"], v["expect"]
    user, blob = _vector_user(g).id, hx(g["eval_key_blob"])
    assert user == e["user"]
    header = record_header(user, g["model"])
    assert header.hex() == e["record_header"]
    assert header[8:12] == struct.pack(">I", len(header) - 12)
    assert json.loads(header[12:]) == {"model": g["model"], "user": user, "v": 1}
    assert hashlib.sha256(header + blob).hexdigest() == e["key_id"] == record_key_id(user, g["model"], blob)
    assert store_id(e["key_id"]) == e["store_id"]
    assert open_record(header + blob, e["key_id"], user, g["model"]) == blob  # Veil's own reader
    assert unpack_eval_keys(blob).relin == b"relin-bytes"
    with pytest.raises(HEError, match="key_not_yours"):
        open_record(header + blob, e["key_id"], "0" * 64, g["model"])


@check("he-keys-signature")
def _he_keys_signature(v: dict[str, Any]) -> None:
    from veil.wire import he as he_wire

    ident = _vector_user(v["given"])
    record = vec(v["given"]["vector_blob"])
    blob = hx(record["given"]["eval_key_blob"])
    payload = b"\n".join(
        [b"veil-he-keys-v1", b"bc", record["expect"]["key_id"].encode(), hashlib.sha256(blob).hexdigest().encode()]
    )
    assert payload == he_wire.keys_payload("bc", record["expect"]["key_id"], hashlib.sha256(blob).hexdigest())
    assert b64e(ident.sign(payload)) == v["expect"]["signature"]  # Ed25519 is deterministic
    verify_signature(ident.public_key, payload, b64d(v["expect"]["signature"]))


@check("he-request-signature")
def _he_request_signature(v: dict[str, Any]) -> None:
    from veil.he.wire import InferRequest
    from veil.wire import he as he_wire

    g = v["given"]
    ident, body = _vector_user(g), g["body"].encode()
    payload = b"\n".join([b"veil-he-request-v1", g["model"].encode(), hashlib.sha256(body).hexdigest().encode()])
    assert payload == he_wire.request_payload(g["model"], hashlib.sha256(body).hexdigest())
    assert b64e(ident.sign(payload)) == v["expect"]["signature"]
    parsed = InferRequest.parse(json.loads(body), 1 << 20)  # what the instance parses
    assert (parsed.model, parsed.batch, parsed.ciphertexts) == ("bc", 1, [b"\x00\x00\x00"])


@check("signed-request")
def _signed_request(v: dict[str, Any]) -> None:
    g, e = v["given"], v["expect"]
    body = g["body"].encode()
    by_hand = "\n".join(
        [
            "veil-request-v2",
            g["method"],
            g["path"],
            hashlib.sha256(body).hexdigest(),
            str(g["timestamp"]),
            g["nonce"],
            str(g["seq"]),
        ]
    )
    payload = signing_payload(g["method"], g["path"], body, g["timestamp"], g["nonce"], g["seq"])
    assert payload.decode() == by_hand == e["signing_payload"]
    ident = Identity.from_private_bytes(hx(g["ed25519_private_key"]))
    headers = ident.sign_request(g["method"], g["path"], body, seq=g["seq"], timestamp=g["timestamp"], nonce=g["nonce"])
    assert headers.as_dict() == e["headers"]
    assert b64d(e["headers"]["x-veil-signature"]) == ident.sign(payload)
    parsed = SignedHeaders.from_headers(e["headers"])
    assert (parsed.seq, parsed.timestamp, parsed.nonce) == (g["seq"], g["timestamp"], g["nonce"])
    for bad in ("0", "01", "-1", "1" * 19, "1e6"):
        with pytest.raises(MalformedError):
            SignedHeaders.from_headers({**e["headers"], "x-veil-seq": bad})


@check("sequence-counter")
def _sequence_counter(v: dict[str, Any]) -> None:
    clock = iter(v["given"]["clock_ns"])
    fake_time = SimpleNamespace(time_ns=lambda: next(clock), time=time.time)
    counter = SequenceCounter()
    with mock.patch("veil.crypto.identity.time", fake_time):
        issued = [counter.next() for _ in v["given"]["clock_ns"]]
    assert issued == v["expect"]["seq"]
    last = 0
    for now_ns, seq in zip(v["given"]["clock_ns"], issued, strict=True):
        assert seq == max(last + 1, now_ns // 1000) and seq > last
        last = seq


# -- attestation ------------------------------------------------------------------------------


def _sim_root(private_key: str) -> SimRoot:
    return SimRoot(Identity.from_private_bytes(hx(private_key)))


def sim_evidence(root: SimRoot, measurement: str, report_data: bytes, issued_at: int) -> tuple[bytes, bytes]:
    """(body, raw) of simulated evidence, built by hand."""
    body = canonical_json(
        {
            "v": 1,
            "measurement": measurement,
            "report_data": b64e(report_data),
            "debug": False,
            "root": root.id,
            "issued_at": issued_at,
        }
    )
    sig = root.sign(body)
    verify_signature(root.public_key, SIGN_CONTEXT + body, sig)
    return body, canonical_json({"body": b64e(body), "sig": b64e(sig)})


@check("evidence-sim")
def _evidence_sim(v: dict[str, Any]) -> None:
    g, e = v["given"], v["expect"]
    root = _sim_root(g["sim_root_private_key"])
    assert root.id == e["sim_root_id"]
    report_data = wire.runtime_binding(b64d(g["runtime_public_key"]), b64d(g["challenge"]))
    assert report_data == hashlib.sha256(b64d(g["runtime_public_key"]) + b64d(g["challenge"])).digest()
    assert report_data.hex() == e["report_data"]
    body, raw = sim_evidence(root, g["measurement"], report_data, g["issued_at"])
    assert body.decode() == e["body"] and raw.decode() == e["raw"]
    evidence = Evidence.from_json(e["evidence"])
    assert evidence.raw == e["raw"].encode()
    report = verify_sim(evidence, [root.public_key])
    assert (report.measurement, report.report_data, report.debug) == (g["measurement"], report_data, False)
    with mock.patch("veil.attest.sim.time", SimpleNamespace(time=lambda: g["issued_at"])):
        own = SimProvider(root, g["measurement"]).get_evidence(report_data)
    assert own.to_json() == e["evidence"]


@check("ks-evidence")
def _ks_evidence(v: dict[str, Any]) -> None:
    g, resp = v["given"], v["response"]
    root = _sim_root(g["sim_root_private_key"])
    pair = hpke.HpkeKeyPair.from_private_bytes(hx(g["keyservice_hpke_private_key"]))
    signer = Identity.from_private_bytes(hx(g["keyservice_signing_private_key"]))
    assert v["request"]["method"] == "GET" and set(resp) == {"v", "public_key", "signing_key", "evidence"}
    assert resp["v"] == 1 and b64d(resp["public_key"]) == pair.public_key
    assert b64d(resp["signing_key"]) == signer.public_key
    nonce = b64d(v["request"]["path"].split("nonce=", 1)[1])
    assert 16 <= len(nonce) <= 64
    binding = hashlib.sha256(b"veil-keyservice-v2" + pair.public_key + signer.public_key + nonce).digest()
    assert binding.hex() == v["expect"]["report_data"]
    assert binding == wire.keyservice_binding(pair.public_key, signer.public_key, nonce)
    assert b64d(resp["evidence"]["report_data"]) == binding
    _, raw = sim_evidence(root, g["measurement"], binding, 1700000000)
    assert b64d(resp["evidence"]["raw"]) == raw
    report = verify(Evidence.from_json(resp["evidence"]), TrustConfig(sim_roots=[root.public_key]))
    validate(report, Policy(allowed_measurements=frozenset({g["measurement"]}), allow_simulated=True), binding)
    # A principal's client verifies it against its own trust anchors and pins both keys.
    client = _principal_client(Identity.generate(), {g["measurement"]}, root)
    with mock.patch("veil.keyservice.client.os", SimpleNamespace(urandom=lambda n: nonce)):
        client._send = lambda method, path, **_: resp  # type: ignore[method-assign]
        assert client.connect() == pair.public_key
    assert client._signing_key == signer.public_key
    other = _principal_client(Identity.generate(), {"ef" * 32}, root)
    with mock.patch("veil.keyservice.client.os", SimpleNamespace(urandom=lambda n: nonce)):
        other._send = lambda method, path, **_: resp  # type: ignore[method-assign]
        with pytest.raises(VeilError) as refused:
            other.connect()
    assert refused.value.code == "keyservice_not_trusted"


def _principal_client(ident: Identity, measurements: set[str], root: SimRoot) -> PrincipalClient:
    return PrincipalClient(
        "http://keyservice.invalid",
        ident,
        expected_measurements=measurements,
        trust=TrustConfig(sim_roots=[root.public_key]),
        allow_simulated=True,
    )


# -- KeyService API ---------------------------------------------------------------------------


def _run_answer_signer(signer: Identity, req: dict[str, Any], status: int, answer: bytes) -> dict[str, str]:
    """Run `AnswerSigner` around an endpoint answering (status, answer); return its headers."""

    async def endpoint(scope: dict, receive: Callable, send: Callable) -> None:
        message = await receive()
        assert message["body"] == req["body"].encode()
        headers = [(b"content-type", b"application/json"), (b"content-length", str(len(answer)).encode())]
        await send({"type": "http.response.start", "status": status, "headers": headers})
        await send({"type": "http.response.body", "body": answer, "more_body": False})

    sent: list[dict] = []

    async def receive() -> dict:
        return {"type": "http.request", "body": req["body"].encode(), "more_body": False}

    async def send(message: dict) -> None:
        sent.append(message)

    path, _, query = req["path"].partition("?")
    scope = {
        "type": "http",
        "method": req["method"],
        "path": path,
        "query_string": query.encode(),
        "headers": [(k.encode(), x.encode()) for k, x in req["headers"].items()],
    }
    asyncio.run(AnswerSigner(endpoint, signer.sign, wire.MAX_BODY)(scope, receive, send))
    assert sent[0]["status"] == status and sent[1]["body"] == answer
    return {k.decode(): x.decode() for k, x in sent[0]["headers"]}


@check("ks-signed-answer")
def _ks_signed_answer(v: dict[str, Any]) -> None:
    g, e = v["given"], v["expect"]
    signer = Identity.from_private_bytes(hx(g["keyservice_signing_private_key"]))
    assert b64e(signer.public_key) == e["signing_key"] == vec("ks-evidence")["response"]["signing_key"]
    req, answer, status = g["request"], g["answer"].encode(), g["status"]
    # It answers ks-register: the same request, and the body the KeyService sends for it.
    register = vec("ks-register")
    assert req["body"].encode() == body_bytes(register["request"])
    assert {k: register["request"]["headers"][k] for k in req["headers"]} == req["headers"]
    assert json.loads(answer) == register["response"]
    assert answer == json.dumps(register["response"], separators=(",", ":"), ensure_ascii=False).encode()
    h = req["headers"]
    by_hand = "\n".join(
        [
            "veil-answer-v1",
            h["x-veil-principal"],
            h["x-veil-nonce"],
            h["x-veil-seq"],
            req["method"],
            req["path"],
            hashlib.sha256(req["body"].encode()).hexdigest(),
            str(status),
            hashlib.sha256(answer).hexdigest(),
        ]
    )
    payload = wire.answer_payload(
        h["x-veil-principal"],
        h["x-veil-nonce"],
        h["x-veil-seq"],
        req["method"],
        req["path"],
        hashlib.sha256(req["body"].encode()).hexdigest(),
        status,
        answer,
    )
    assert payload.decode() == by_hand == e["answer_payload"]
    signature = e["headers"][wire.HEADER_ANSWER_SIGNATURE]
    assert b64d(signature) == signer.sign(payload)
    # The KeyService's middleware signs exactly this, and the client accepts it and nothing else.
    assert _run_answer_signer(signer, req, status, answer)[wire.HEADER_ANSWER_SIGNATURE] == signature
    client = _principal_client(
        Identity.from_private_bytes(hx(register["given"]["ed25519_private_key"])), set(), _any_root()
    )
    client._signing_key = signer.public_key
    signed = SignedHeaders.from_headers(register["request"]["headers"])
    body = req["body"].encode()
    client._verify_answer(signed, req["method"], req["path"], body, status, e["headers"], answer)  # type: ignore[arg-type]
    for changed in (
        (201, e["headers"], answer),
        (status, e["headers"], answer.replace(b"true", b"false")),
        (status, {}, answer),
    ):
        with pytest.raises(VeilError) as refused:
            client._verify_answer(signed, req["method"], req["path"], body, *changed)  # type: ignore[arg-type]
        assert refused.value.code == "answer_unauthenticated"


def _any_root() -> SimRoot:
    return _sim_root(vec("evidence-sim")["given"]["sim_root_private_key"])


@check("ks-register")
def _ks_register(v: dict[str, Any]) -> None:
    req = v["request"]
    pid = check_signed(req, v["given"]["ed25519_private_key"])
    assert principal_id(b64d(req["body"]["public_key"])) == pid
    assert v["response"] == {"v": 1, "id": pid, "created": True}


@check("ks-stage-version")
@check("ks-put-request-key")
def _ks_put_key(v: dict[str, Any]) -> None:
    g, req, body = v["given"], v["request"], v["request"]["body"]
    is_model = v["vector"] == "ks-stage-version"
    pid = check_signed(req, g["owner_private_key"] if is_model else g["user_private_key"])
    model = req["path"].split("/")[3]
    field, info, key = ("sealed_model_key", wire.INFO_MODEL_KEY_UPLOAD, g.get("model_key"))
    if not is_model:
        field, info, key = ("sealed_request_key", wire.INFO_REQUEST_KEY_UPLOAD, g["request_key"])
    pair = hpke.HpkeKeyPair.from_private_bytes(hx(g["keyservice_hpke_private_key"]))
    aad = wire.upload_aad(model, pid)
    assert aad == f"{model}\n{pid}".encode()
    sealed = b64d(body[field])
    assert sealed == hpke_fixed(pair.public_key, hx(key), info, aad, hx(g["ephemeral_private_key"]))
    assert pair.open(sealed, info=info, aad=aad).hex() == key
    assert check_measurements(body["measurements"]) == body["measurements"]
    if is_model:
        assert body["sealed_model_key"] == vec("hpke-model-key-upload")["expect"]["sealed"]
        assert check_digest(body["digest"]) == vec("sealed-model")["expect"]["digest"]
        assert check_delay(body["revocation_delay_s"]) == body["revocation_delay_s"]
        assert req["method"] == "POST" and req["path"] == f"/v1/models/{model}/versions"
        assert v["response"] == {"v": 1, "model": model, "version": 1, "state": "staged", "owner": pid}
    else:
        assert check_delay(body["max_revocation_delay_s"], "max_revocation_delay_s") == 45
        assert v["response"] == {"v": 1, "model": model, "user": pid}


@check("ks-version-info")
def _ks_version_info(v: dict[str, Any]) -> None:
    owner = Identity.from_private_bytes(hx(v["given"]["owner_private_key"]))
    resp = v["response"]
    assert v["request"] == {"method": "GET", "path": "/v1/models/iris/versions/1"}
    assert "headers" not in v["request"]  # public: the gateway asks it unsigned
    assert b64d(resp["owner_public_key"]) == owner.public_key
    assert principal_id(b64d(resp["owner_public_key"])) == resp["owner"] == owner.id
    assert resp == {
        "v": 1,
        "model": "iris",
        "version": 1,
        "state": "staged",
        "current_version": 0,
        "owner": owner.id,
        "owner_public_key": b64e(owner.public_key),
    }


@check("ks-commit-version")
def _ks_commit(v: dict[str, Any]) -> None:
    check_signed(v["request"], v["given"]["owner_private_key"])
    assert v["request"]["body"] == {"v": 1}
    assert v["request"]["path"] == "/v1/models/iris/versions/1/commit"
    delay = vec("ks-stage-version")["request"]["body"]["revocation_delay_s"]
    assert v["response"] == {"v": 1, "state": "current", "model": "iris", "version": 1, "revocation_delay_s": delay}


@check("ks-put-measurements")
@check("ks-put-revocation-delay")
@check("ks-grant")
@check("ks-revoke")
@check("ks-delete-request-key")
def _ks_plain_signed(v: dict[str, Any]) -> None:
    given = v["given"]
    check_signed(v["request"], given.get("owner_private_key") or given.get("user_private_key"))
    parts = v["request"]["path"].split("/")
    resp = v["response"]
    assert resp["v"] == 1 and resp["model"] == parts[3]
    if v["vector"] in ("ks-grant", "ks-revoke"):
        assert resp == {"v": 1, "model": parts[3], "user": parts[5], "granted": v["vector"] == "ks-grant"}
        assert v["request"]["method"] == ("PUT" if v["vector"] == "ks-grant" else "DELETE")
        assert v["request"]["body"] is None
    if v["vector"] == "ks-put-revocation-delay":
        delay = check_delay(v["request"]["body"]["revocation_delay_s"])
        assert resp == {"v": 1, "model": parts[3], "revocation_delay_s": delay}
    if v["vector"] == "ks-delete-request-key":
        assert v["request"]["method"] == "DELETE" and v["request"]["body"] is None
        assert resp == {"v": 1, "model": parts[3], "deleted": True}
    if v["vector"] == "ks-put-measurements":
        assert check_measurements(v["request"]["body"]["measurements"]) == v["request"]["body"]["measurements"]


@check("upload-sealed")
def _upload_sealed(v: dict[str, Any]) -> None:
    g, e, req = v["given"], v["expect"], v["request"]
    owner = Identity.from_private_bytes(hx(g["owner_private_key"]))
    sealed = b64d(g["body"])
    assert g["body"] == vec("sealed-model")["expect"]["file"]
    assert hashlib.sha256(sealed).hexdigest() == e["sealed_sha256"]
    by_hand = f"veil-upload-v1\niris\n1\n{e['sealed_sha256']}"
    assert wire.upload_payload("iris", 1, e["sealed_sha256"]).decode() == by_hand == e["upload_payload"]
    signature = req["headers"][wire.HEADER_UPLOAD_SIGNATURE]
    assert b64d(signature) == owner.sign(e["upload_payload"].encode())
    assert req["headers"]["x-veil-principal"] == owner.id
    assert req["method"] == "PUT" and req["headers"]["content-type"] == "application/octet-stream"
    assert v["response"] == {"v": 1, "model": "iris", "version": 1, "bytes": len(sealed)}

    # The gateway itself, asking a stand-in KeyService (answering ks-version-info) who owns it.
    info = vec("ks-version-info")["response"]
    headers = req["headers"]
    ok = _gateway_upload(req["path"], sealed, headers, info)
    assert ok == (200, v["response"], sealed)
    other = Identity.from_private_bytes(hx(vec("ks-put-request-key")["given"]["user_private_key"]))
    refusals = {
        "unsigned_upload": (401, {"content-type": "application/octet-stream"}, info, None),
        "not_owner": (403, {**headers, "x-veil-principal": other.id}, info, None),
        "bad_upload_signature": (403, {**headers, wire.HEADER_UPLOAD_SIGNATURE: b64e(other.sign(b"x"))}, info, None),
        "not_staged": (409, headers, {**info, "state": "current", "current_version": 1}, None),
        "too_large": (413, headers, info, len(sealed) - 1),
    }
    for code, (status, hdrs, answer, limit) in refusals.items():
        got_status, got, stored = _gateway_upload(req["path"], sealed, hdrs, answer, max_bytes=limit)
        assert (got_status, got["error"]["code"], stored) == (status, code, None), code
    # A body changed after signing is refused, and nothing of it is kept.
    tampered = sealed[:-1] + bytes([sealed[-1] ^ 1])
    status, got, stored = _gateway_upload(req["path"], tampered, headers, info)
    assert (status, got["error"]["code"], stored) == (403, "bad_upload_signature", None)


def _gateway_upload(
    path: str, body: bytes, headers: dict[str, str], version_info: dict, *, max_bytes: int | None = None
) -> tuple[int, dict, bytes | None]:
    """(status, answer, stored file or None) of one upload to a fresh gateway."""
    from veil.gateway import app as gateway_app

    def keyservice(request: httpx.Request) -> httpx.Response:
        assert request.method == "GET" and request.url.path == "/v1/models/iris/versions/1"
        return httpx.Response(200, json=version_info)

    real = httpx.AsyncClient

    def client(**kwargs: Any) -> httpx.AsyncClient:
        return real(transport=httpx.MockTransport(keyservice), **kwargs)

    with temp_dir() as d:
        store = LocalModelStore(d, create=True)
        kwargs = {"max_model_bytes": max_bytes} if max_bytes is not None else {}
        with mock.patch.object(gateway_app.httpx, "AsyncClient", client):
            app = gateway_app.create_app(None, store, keyservice_url="http://keyservice.invalid", **kwargs)  # type: ignore[arg-type]
        with TestClient(app) as http:
            r = http.put(path, content=body, headers=headers)
        stored = store.path("iris", 1).read_bytes() if store.exists("iris", 1) else None
        return r.status_code, r.json(), stored


@check("ks-attest-challenge")
def _ks_challenge(v: dict[str, Any]) -> None:
    assert v["request"] == {"method": "POST", "path": "/v1/attest/challenge"}
    assert v["response"]["v"] == wire.VERSION and len(b64d(v["response"]["challenge"])) == 32
    assert v["response"]["challenge"] == vec("ks-attest")["request"]["body"]["challenge"]


@check("ks-attest")
def _ks_attest(v: dict[str, Any]) -> None:
    body = v["request"]["body"]
    assert (v["request"]["method"], v["request"]["path"]) == ("POST", "/v1/attest")
    assert body["v"] == v["response"]["v"] == wire.VERSION
    runtime = hpke.HpkeKeyPair.from_private_bytes(hx(v["given"]["runtime_hpke_private_key"]))
    assert b64d(body["public_key"]) == runtime.public_key
    root = _sim_root(v["given"]["sim_root_private_key"])
    report = verify_sim(Evidence.from_json(body["evidence"]), [root.public_key])
    assert report.report_data == wire.runtime_binding(runtime.public_key, b64d(body["challenge"]))
    assert body["evidence"] == vec("evidence-sim")["expect"]["evidence"]
    resp = v["response"]
    assert re.fullmatch(r"[0-9a-f]{64}", resp["session"]) and resp["measurement"] == report.measurement
    assert resp["expires_at"] == 1700000000 + wire.SESSION_TTL_S and isinstance(resp["expires_at"], float)


@check("ks-release")
def _ks_release(v: dict[str, Any]) -> None:
    g, body, resp = v["given"], v["request"]["body"], v["response"]
    runtime = hpke.HpkeKeyPair.from_private_bytes(hx(g["runtime_hpke_private_key"]))
    ttl = min(g["owner_revocation_delay_s"], g["user_max_revocation_delay_s"], wire.MAX_REVOCATION_DELAY_S)
    assert resp["ttl_s"] == ttl and wire.MAX_REVOCATION_DELAY_S == 300
    assert (v["request"]["method"], v["request"]["path"]) == ("POST", "/v1/release")
    assert body["v"] == resp["v"] == wire.VERSION
    assert g["owner_revocation_delay_s"] == vec("ks-put-revocation-delay")["response"]["revocation_delay_s"]
    assert g["user_max_revocation_delay_s"] == vec("ks-put-request-key")["request"]["body"]["max_revocation_delay_s"]
    assert resp["model_digest"] == vec("sealed-model")["expect"]["digest"] and resp["model_version"] == 1
    assert body["session"] == vec("ks-attest")["response"]["session"]
    by_hand = "\n".join(
        ["veil-release-v2", body["session"], body["model"], body["user"], "1", resp["model_digest"], str(ttl)]
    )
    aad = wire.release_aad(body["session"], body["model"], body["user"], 1, resp["model_digest"], ttl)
    assert aad.decode() == by_hand == v["expect"]["aad"]
    pairs = [
        ("model_key", wire.INFO_RELEASE_MODEL_KEY, g["model_key"]),
        ("request_key", wire.INFO_RELEASE_REQUEST_KEY, g["request_key"]),
    ]
    for (field, info, expected), ephemeral in zip(pairs, g["ephemeral_private_keys"], strict=True):
        sealed = b64d(resp[field])
        assert runtime.open(sealed, info=info, aad=aad).hex() == expected
        assert sealed == hpke_fixed(runtime.public_key, hx(expected), info, aad, hx(ephemeral))
    assert set(resp) == {"v", "model_key", "request_key", "model_version", "model_digest", "ttl_s"}

    # The runtime's client opens it, and obeys ttl_s, capped at MAX_REVOCATION_DELAY_S.
    release = _runtime_release(runtime, body, resp)
    assert (release.model_key.material().hex(), release.request_key.material().hex()) == (
        g["model_key"],
        g["request_key"],
    )
    assert (release.version, release.digest, release.ttl_s) == (1, resp["model_digest"], ttl)
    with pytest.raises(CryptoError):  # the terms are bound: a lengthened ttl_s does not open
        _runtime_release(runtime, body, {**resp, "ttl_s": 300})
    long = wire.release_aad(body["session"], body["model"], body["user"], 1, resp["model_digest"], 600)
    resealed = {
        **resp,
        "ttl_s": 600,
        "model_key": b64e(hpke.seal(runtime.public_key, hx(g["model_key"]), info=pairs[0][1], aad=long)),
        "request_key": b64e(hpke.seal(runtime.public_key, hx(g["request_key"]), info=pairs[1][1], aad=long)),
    }
    assert _runtime_release(runtime, body, resealed).ttl_s == wire.MAX_REVOCATION_DELAY_S


def _runtime_release(runtime: hpke.HpkeKeyPair, request: dict, answer: dict) -> Release:
    """What the runtime's KeyService client makes of `answer` to the release `request`."""
    client = RuntimeKeyClient("http://keyservice.invalid", provider=None)  # type: ignore[arg-type]
    client._keypair = runtime
    client._session = request["session"]

    def send(method: str, path: str, *, body: bytes | None = None, headers: dict | None = None) -> dict:
        assert (method, path) == ("POST", "/v1/release") and json.loads(body or b"") == request
        return answer

    client._send = send  # type: ignore[method-assign]
    return client.release(request["model"], request["user"])


@check("error-body")
def _error_body(v: dict[str, Any]) -> None:
    err = Unauthorized(v["response"]["error"]["message"], code=v["response"]["error"]["code"])
    assert err.to_json() == v["response"] and err.status == v["status"]
    assert v["response"]["error"]["code"] == "stale_sequence"


# -- KeyService state at rest -----------------------------------------------------------------


@check("at-rest")
def _at_rest(v: dict[str, Any]) -> None:
    from veil.keyservice import server

    g, e = v["given"], v["expect"]
    root = _sim_root(g["sim_root_private_key"])
    seed = SymmetricKey(hx(g["sim_root_private_key"]))
    sealing = derive_key(seed, b"veil sim sealing key", b"keyservice/" + g["keyservice_measurement"].encode())
    assert sealing.material().hex() == e["sealing_key"]
    assert not server.GRAMINE_SEALING_KEY.exists()
    assert server.sealing_key(root, g["keyservice_measurement"]).material() == sealing.material()
    assert root.sealing_key("keyservice/" + g["keyservice_measurement"]).material() == sealing.material()
    # The database key, sealed under the measurement-bound sealing key.
    wrap = aes_gcm(sealing.material(), g["wrap_nonce"], hx(g["database_key"]), AT_REST_CONTEXT + b"database-key")
    assert b64e(wrap) == e["database_key_sealed"]
    with temp_dir() as d:
        (d / server.DATABASE_KEY_FILE).write_bytes(wrap)
        assert server.database_key(d, sealing, create=False).material().hex() == g["database_key"]
        other = server.sealing_key(root, "ef" * 32)
        with pytest.raises(StoreIntegrityError):
            server.database_key(d, other, create=False)
    # A record sealed under the database key.
    aad = AT_REST_CONTEXT + g["record_key"].encode()
    assert aad.decode() == e["aad"]
    sealed = b64d(e["sealed"])
    assert sealed == aes_gcm(hx(g["database_key"]), g["nonce"], hx(g["plaintext_hex"]), aad)
    sealer, _, _ = server.store_keys(SymmetricKey(hx(g["database_key"])))
    assert sealer.open(g["record_key"], sealed).hex() == g["plaintext_hex"]
    with pytest.raises(CryptoError):
        sealer.open(g["record_key"].replace("iris", "iris2"), sealed)


def _store_keys(database_key: str) -> tuple[Sealer, SymmetricKey, SymmetricKey]:
    from veil.keyservice.server import store_keys

    key = SymmetricKey(hx(database_key))
    sealer, audit_key, policy_key = store_keys(key)
    assert audit_key.material() == derive_key(key, b"veil audit chain", b"").material()
    assert policy_key.material() == derive_key(key, b"veil policy rows", b"").material()
    return sealer, audit_key, policy_key


def _story_ids() -> tuple[Identity, Identity]:
    owner = Identity.from_private_bytes(hx(vec("ks-register")["given"]["ed25519_private_key"]))
    user = Identity.from_private_bytes(hx(vec("ks-put-request-key")["given"]["user_private_key"]))
    return owner, user


@check("policy-row")
def _policy_row(v: dict[str, Any]) -> None:
    g, e = v["given"], v["expect"]
    sealer, _, policy_key = _store_keys(g["database_key"])
    assert policy_key.material().hex() == e["policy_key"]
    owner, user = _story_ids()
    measurement = vec("ks-put-measurements")["request"]["body"]["measurements"]
    digest = vec("sealed-model")["expect"]["digest"]
    sealed_mk, sealed_rk = b64d(g["sealed_model_key"]), b64d(g["sealed_request_key"])
    model_key = vec("ks-release")["given"]["model_key"]
    mk_aad = AT_REST_CONTEXT + b"models/iris/v1/key"
    assert sealed_mk == aes_gcm(hx(g["database_key"]), g["model_key_nonce"], hx(model_key), mk_aad)
    assert sealer.open("models/iris/v1/key", sealed_mk).hex() == model_key
    assert g["sealed_request_key"] == vec("at-rest")["expect"]["sealed"]
    expected = [
        (ks_store.rec_principal(owner.id), ks_store.principal_fields(owner.public_key)),
        (ks_store.rec_model("iris"), ks_store.model_fields(owner.id, measurement, 1, 90)),
        (ks_store.rec_version("iris", 1), ks_store.version_fields(digest, sealed_mk, "current", measurement, 120)),
        (ks_store.rec_grant("iris", user.id), ks_store.grant_fields(True)),
        (ks_store.rec_request_key("iris", user.id), ks_store.request_key_fields(sealed_rk, measurement, 45)),
    ]
    rows = e["rows"]
    assert [(r["record"], r["fields"]) for r in rows] == expected
    macs = RowMacs(policy_key)
    for row in rows:
        by_hand = hmac.new(
            policy_key.material(), row["record"].encode() + b"\n" + canonical_json(row["fields"]), hashlib.sha256
        ).hexdigest()
        assert row["mac"] == by_hand == macs.mac(row["record"], row["fields"])
    # The same rows as database rows: the store computes the same MACs from its columns.
    with temp_dir() as d:
        _new_store(d, g["database_key"]).close()
        db = sqlite3.connect(d / "keyservice.db", isolation_level=None)
        m = json.dumps(measurement)
        db.execute("INSERT INTO principals VALUES (?, ?, 0)", (owner.id, owner.public_key))
        db.execute(
            "INSERT INTO models (model_id, owner_id, measurements, created, updated, current_version, "
            "revocation_delay_s) VALUES ('iris', ?, ?, 0, 0, 1, 90)",
            (owner.id, m),
        )
        db.execute(
            "INSERT INTO model_versions (model_id, version, digest, sealed_key, state, measurements, "
            "revocation_delay_s, created) VALUES ('iris', 1, ?, ?, 'current', ?, 120, 0)",
            (digest, sealed_mk, m),
        )
        db.execute("INSERT INTO grants VALUES ('iris', ?, 0, NULL)", (user.id,))
        db.execute(
            "INSERT INTO request_keys (model_id, user_id, sealed_key, measurements, updated, max_delay_s) "
            "VALUES ('iris', ?, ?, ?, 0, 45)",
            (user.id, sealed_rk, m),
        )
        assert ks_store.current_rows(db, macs) == {r["record"]: r["mac"] for r in rows}
        db.close()


def _new_store(path: Path, database_key: str) -> Store:
    sealer, audit_key, policy_key = _store_keys(database_key)
    return Store(path / "keyservice.db", sealer, audit_key, policy_key=policy_key)


@check("audit-chain")
def _audit_chain(v: dict[str, Any]) -> None:
    _, audit_key, _ = _store_keys(v["given"]["database_key"])
    assert audit_key.material().hex() == v["expect"]["audit_key"]
    rows = v["expect"]["rows"]
    prev = GENESIS
    for row in rows:
        assert row["entry"] == canonical_json(json.loads(row["entry"])).decode()
        by_hand = hmac.new(audit_key.material(), (prev + "\n" + row["entry"]).encode(), hashlib.sha256).hexdigest()
        assert row["prev_hash"] == prev and row["hash"] == by_hand == chain_hash(audit_key, prev, row["entry"])
        prev = row["hash"]
    entries = [(r["seq"], r["entry"], r["prev_hash"], r["hash"]) for r in rows]
    assert verify_audit_chain(entries, audit_key)[0]
    # The entries' `state` commits to the policy-row MACs of the rows they wrote.
    macs = {r["record"]: r["mac"] for r in vec("policy-row")["expect"]["rows"]}
    state = ks_store.expected_state(entries)
    assert state and all(macs[record] == mac for record, mac in state.items())

    # A store holding these rows and this chain trusts them; an edited row is refused and reported.
    owner, user = _story_ids()
    with temp_dir() as d:
        _new_store(d, v["given"]["database_key"]).close()
        db = sqlite3.connect(d / "keyservice.db", isolation_level=None)
        db.execute("INSERT INTO principals VALUES (?, ?, 0)", (owner.id, owner.public_key))
        db.execute("INSERT INTO grants VALUES ('iris', ?, 0, NULL)", (user.id,))
        for r in rows:
            ts = json.loads(r["entry"])["ts"]
            db.execute(
                "INSERT INTO audit VALUES (?, ?, ?, ?, ?)", (r["seq"], ts, r["entry"], r["prev_hash"], r["hash"])
            )
        store = _new_store(d, v["given"]["database_key"])
        assert store.integrity_failure is None and store.tampered == set() and store.policy_problems() == []
        assert store.principal_key(owner.id) == owner.public_key and store.is_granted("iris", user.id)
        store.close()
        db.execute("UPDATE grants SET revoked_at=1")
        db.close()
        store = _new_store(d, v["given"]["database_key"])
        grant = ks_store.rec_grant("iris", user.id)
        assert store.tampered == {grant} and any(p.startswith(grant) for p in store.policy_problems())
        with pytest.raises(StoreIntegrityError):
            store.is_granted("iris", user.id)
        store.close()


# -- client configuration ---------------------------------------------------------------------


@check("trust-anchors")
def _trust_anchors(v: dict[str, Any]) -> None:
    trust = v["expect"]["trust.json"]
    root = _sim_root(v["given"]["sim_root_private_key"])
    anchors = TrustAnchors.from_json(trust)
    assert anchors.sim_roots == [root.public_key] and anchors.allow_simulated
    assert anchors.keyservice_measurements == [vec("ks-evidence")["given"]["measurement"]]
    assert anchors.runtime_measurements == vec("ks-put-measurements")["request"]["body"]["measurements"]
    assert anchors.to_json() == trust
    assert anchors.verifier_trust().sim_roots == [root.public_key]
    with temp_dir() as d:
        path = anchors.save(d)
        assert path.name == "trust.json" and json.loads(path.read_text()) == trust
        assert path.stat().st_mode & 0o777 == 0o600
        assert TrustAnchors.load(d) == anchors
    for bad in ({**trust, "allow_simulated": False}, {**trust, "keyservice_measurements": []}, {**trust, "v": 2}):
        with pytest.raises(TrustError):
            TrustAnchors.from_json(bad)


@check("deployment")
def _deployment(v: dict[str, Any]) -> None:
    obj = v["expect"]["deployment.json"]
    deployment = Deployment.from_json(obj)
    assert deployment.operator_settings == {} and deployment.to_json() == obj
    anchors = TrustAnchors.from_json(vec("trust-anchors")["expect"]["trust.json"])
    anchors.check_operator_settings(deployment.operator_settings)
    for widening in ({"runtime_measurements": ["ef" * 32]}, {"keyservice_measurements": ["ef" * 32]}):
        settings = Deployment.from_json({**obj, **widening}).operator_settings
        assert settings == widening
        with pytest.raises(TrustError):
            anchors.check_operator_settings(settings)
    strict = TrustAnchors(anchors.keyservice_measurements, anchors.runtime_measurements)
    with pytest.raises(TrustError):
        strict.check_operator_settings(Deployment.from_json({**obj, "allow_simulated": True}).operator_settings)


# -- the tests --------------------------------------------------------------------------------


def test_every_required_format_has_a_vector() -> None:
    assert VECTORS.keys() >= REQUIRED, f"missing vectors: {sorted(REQUIRED - VECTORS.keys())}"
    assert VECTORS.keys() <= CHECKS.keys(), f"vectors without a check: {sorted(VECTORS.keys() - CHECKS.keys())}"
    assert VECTORS.keys() <= REQUIRED, f"vectors not listed in REQUIRED: {sorted(VECTORS.keys() - REQUIRED)}"


@pytest.mark.parametrize("name", sorted(VECTORS))
def test_vector(name: str) -> None:
    CHECKS[name](VECTORS[name])


def test_a_corrupted_vector_is_caught() -> None:
    """The checks are not vacuous: one changed character in a vector fails its check."""
    for name, path in (
        ("envelope-request", ("expect", "envelope", "ct")),
        ("sealed-model", ("expect", "file")),
        ("ks-release", ("response", "model_key")),
        ("policy-row", ("expect", "policy_key")),
    ):
        v = json.loads(json.dumps(VECTORS[name]))
        parent = v
        for key in path[:-1]:
            parent = parent[key]
        text = parent[path[-1]]
        parent[path[-1]] = text[:5] + ("B" if text[5] != "B" else "C") + text[6:]
        with pytest.raises(Exception):  # noqa: B017 - any failure will do
            CHECKS[name](v)


def test_story_sequence_numbers_increase() -> None:
    """Each principal's signed vectors, in the order of the document, have increasing numbers."""
    last: dict[str, int] = {}
    for v in VECTORS.values():
        headers = (v.get("request") or {}).get("headers") or {}
        if "x-veil-seq" not in headers:
            continue
        principal, seq = headers["x-veil-principal"], int(headers["x-veil-seq"])
        assert seq > last.get(principal, 0), v["vector"]
        last[principal] = seq


def test_keyservice_serves_the_story(tmp_path: Path) -> None:
    """A real KeyService app holding the vectors' keys, its clock at the vectors' timestamp,
    answers the vectors' requests with the vectors' answers, each signed."""
    from veil.keyservice.api import create_app
    from veil.keyservice.service import KeyService, _token_key

    database_key = vec("policy-row")["given"]["database_key"]
    store = _new_store(tmp_path, database_key)
    ev = vec("ks-evidence")["given"]
    store.service_secret("hpke_private_key", lambda: hx(ev["keyservice_hpke_private_key"]))
    store.service_secret("answer_signing_key", lambda: hx(ev["keyservice_signing_private_key"]))
    root = _sim_root(ev["sim_root_private_key"])
    signer = Identity.from_private_bytes(hx(ev["keyservice_signing_private_key"]))
    owner, user = _story_ids()
    clock = SimpleNamespace(time=lambda: 1700000000.0)
    with (
        mock.patch("veil.keyservice.service.time", clock),
        mock.patch("veil.attest.sim.time", clock),
    ):
        ks = KeyService(
            store,
            SimProvider(root, ev["measurement"]),
            TrustConfig(sim_roots=[root.public_key]),
            Policy(allow_simulated=True),
        )
        ks.register(user.id, user.public_key)
        http = TestClient(create_app(ks))

        def call(req: dict[str, Any], body: bytes | None = None) -> httpx.Response:
            content = body_bytes(req) if body is None else body
            headers = {**req.get("headers", {}), "content-type": "application/json"}
            r = http.request(req["method"], req["path"], content=content, headers=headers)
            if "headers" in req:  # signed: so is the answer
                s = SignedHeaders.from_headers(req["headers"])
                payload = wire.answer_payload(
                    s.principal,
                    s.nonce,
                    str(s.seq),
                    req["method"],
                    req["path"],
                    hashlib.sha256(content).hexdigest(),
                    r.status_code,
                    r.content,
                )
                verify_signature(signer.public_key, payload, b64d(r.headers[wire.HEADER_ANSWER_SIGNATURE]))
            return r

        assert call(vec("ks-evidence")["request"]).json() == vec("ks-evidence")["response"]
        r = call(vec("ks-register")["request"])
        answer = vec("ks-signed-answer")
        assert (r.status_code, r.content) == (200, answer["given"]["answer"].encode())
        assert r.headers[wire.HEADER_ANSWER_SIGNATURE] == answer["expect"]["headers"][wire.HEADER_ANSWER_SIGNATURE]
        for name in ("ks-stage-version", "ks-version-info", "ks-commit-version", "ks-put-measurements"):
            r = call(vec(name)["request"])
            assert (r.status_code, r.json()) == (200, vec(name)["response"]), name
        for name in ("ks-put-revocation-delay", "ks-grant", "ks-put-request-key"):
            r = call(vec(name)["request"])
            assert (r.status_code, r.json()) == (200, vec(name)["response"]), name
        # A replayed (or held-back) request is refused, and that answer is signed too.
        r = call(vec("ks-register")["request"])
        assert (r.status_code, r.json()) == (vec("error-body")["status"], vec("error-body")["response"])

        # The runtime attests with the vectors' challenge and evidence, and gets its release.
        attest = vec("ks-attest")
        # challenges are MACed under a per-process key; accept the vector's as if this process issued it
        ks._check_challenge = lambda challenge: 1700000000.0 + wire.CHALLENGE_TTL_S
        r = call(attest["request"])
        got = r.json()
        assert r.status_code == 200 and {**got, "session": attest["response"]["session"]} == attest["response"]
        ks._sessions[_token_key(attest["response"]["session"])] = ks._sessions.pop(_token_key(got["session"]))
        release = vec("ks-release")
        r = call(release["request"])
        got = r.json()
        assert r.status_code == 200
        assert {k: got[k] for k in ("v", "model_version", "model_digest", "ttl_s")} == {
            k: release["response"][k] for k in ("v", "model_version", "model_digest", "ttl_s")
        }
        runtime = hpke.HpkeKeyPair.from_private_bytes(hx(release["given"]["runtime_hpke_private_key"]))
        opened = _runtime_release(runtime, release["request"]["body"], got)
        assert opened.model_key.material().hex() == release["given"]["model_key"]
        assert opened.request_key.material().hex() == release["given"]["request_key"]

        for name in ("ks-revoke", "ks-delete-request-key"):
            r = call(vec(name)["request"])
            assert (r.status_code, r.json()) == (200, vec(name)["response"]), name
        r = call(release["request"])
        assert (r.status_code, r.json()["error"]["code"]) == (403, "not_granted")
        assert store.policy_problems() == []
    store.close()
