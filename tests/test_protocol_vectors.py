"""Check every test vector of docs/protocol.md against the code.

Vectors are the fenced ```json blocks whose object has a "vector" id. Each is recomputed from its
fixed keys and nonces (AES-GCM, HKDF, Ed25519 and HPKE with a fixed ephemeral key are all
deterministic then) and also opened/verified through Veil's own API, which draws its own
randomness and so can only be checked by decrypting.
"""

from __future__ import annotations

import hashlib
import json
import re
import struct
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from pyhpke import KEMKey, KEMKeyPair

from veil.attest.evidence import Evidence
from veil.attest.sim import SIGN_CONTEXT, SimRoot, verify_sim
from veil.crypto import chunked, hpke
from veil.crypto.at_rest import AT_REST_CONTEXT, Sealer
from veil.crypto.encoding import b64d, b64e, canonical_json
from veil.crypto.envelope import Envelope, open_envelope, response_key
from veil.crypto.identity import Identity, SignedHeaders, principal_id, signing_payload, verify_signature
from veil.crypto.kdf import derive_key
from veil.crypto.keys import SymmetricKey
from veil.keyservice import wire
from veil.keyservice.store import GENESIS, chain_hash, verify_audit_chain

DOC = Path(__file__).resolve().parents[1] / "docs" / "protocol.md"
REQUIRED = {
    "envelope-request",
    "envelope-response",
    "sealed-model",
    "hpke-model-key-upload",
    "identity",
    "signed-request",
    "evidence-sim",
    "ks-evidence",
    "ks-register",
    "ks-put-model-key",
    "ks-put-measurements",
    "ks-grant",
    "ks-revoke",
    "ks-put-request-key",
    "ks-delete-request-key",
    "ks-attest-challenge",
    "ks-attest",
    "ks-release",
    "error-body",
    "at-rest",
    "audit-chain",
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


def hpke_fixed(public_key: bytes, plaintext: bytes, info: bytes, aad: bytes, ephemeral: bytes) -> bytes:
    """RFC 9180 sealing with a given ephemeral key (deterministic), for recomputing vectors."""
    sk = X25519PrivateKey.from_private_bytes(ephemeral)
    eks = KEMKeyPair(KEMKey.from_pyca_cryptography_key(sk), KEMKey.from_pyca_cryptography_key(sk.public_key()))
    enc, ctx = hpke.SUITE.create_sender_context(hpke.SUITE.kem.deserialize_public_key(public_key), info=info, eks=eks)
    return enc + ctx.seal(plaintext, aad=aad)


def check_signed(req: dict[str, Any], private_key: str) -> str:
    """Verify a vector's signed request headers exactly as the KeyService does; return the principal."""
    ident = Identity.from_private_bytes(hx(private_key))
    body = json.dumps(req["body"]).encode() if req.get("body") is not None else b""
    headers = SignedHeaders.from_headers(req["headers"])
    assert headers.principal == ident.id
    payload = signing_payload(req["method"], req["path"], body, headers.timestamp, headers.nonce)
    verify_signature(ident.public_key, payload, headers.signature)
    # Ed25519 is deterministic: the same inputs give the same headers.
    again = ident.sign_request(req["method"], req["path"], body, timestamp=headers.timestamp, nonce=headers.nonce)
    assert again.as_dict() == req["headers"]
    if req.get("body") is not None:
        assert req["body"]["v"] == wire.VERSION
    return ident.id


@check("envelope-request")
@check("envelope-response")
def _envelope(v: dict[str, Any]) -> None:
    g, e = v["given"], v["expect"]
    env = Envelope.from_json(e["envelope"])
    assert env.aad() == e["aad"].encode() == canonical_json({k: e["envelope"][k] for k in env.header()})
    request_key = SymmetricKey(hx(g["request_key"]))
    key = request_key
    if env.direction == "response":
        key = response_key(request_key, env.request_id)
        assert key.material().hex() == e["response_key"]
    nonce = hx(g["nonce"])
    assert env.ct == nonce + AESGCM(key.material()).encrypt(nonce, g["plaintext"].encode(), env.aad())
    assert (
        open_envelope(request_key, env, model=env.model, user=env.user, direction=env.direction)
        == g["plaintext"].encode()
    )


@check("sealed-model")
def _sealed_model(v: dict[str, Any]) -> None:
    g, e = v["given"], v["expect"]
    key = SymmetricKey(hx(g["model_key"]))
    header = g["header"].encode()
    assert header == canonical_json(json.loads(header))
    header_hash = hashlib.sha256(header).digest()
    assert header_hash.hex() == e["header_sha256"]
    plain = g["plaintext"].encode()
    size = json.loads(header)["chunk_size"]
    pieces = [plain[i : i + size] for i in range(0, len(plain), size)] or [b""]
    out = chunked.MAGIC + struct.pack(">I", len(header)) + header
    for i, (piece, nonce_hex) in enumerate(zip(pieces, g["chunk_nonces"], strict=True)):
        aad = header_hash + struct.pack(">QB", i, 1 if i == len(pieces) - 1 else 0)
        assert aad.hex() == e["chunk_aads"][i]
        nonce = hx(nonce_hex)
        record = nonce + AESGCM(key.material()).encrypt(nonce, piece, aad)
        out += struct.pack(">I", len(record)) + record
    assert b64e(out) == e["file"]
    assert chunked.open_bytes(key, b64d(e["file"]), model=g["model"]) == plain


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


@check("signed-request")
def _signed_request(v: dict[str, Any]) -> None:
    g, e = v["given"], v["expect"]
    payload = signing_payload(g["method"], g["path"], g["body"].encode(), g["timestamp"], g["nonce"])
    assert payload.decode() == e["signing_payload"]
    ident = Identity.from_private_bytes(hx(g["ed25519_private_key"]))
    headers = ident.sign_request(g["method"], g["path"], g["body"].encode(), timestamp=g["timestamp"], nonce=g["nonce"])
    assert headers.as_dict() == e["headers"]


def _sim_root(private_key: str) -> SimRoot:
    return SimRoot(Identity.from_private_bytes(hx(private_key)))


@check("evidence-sim")
def _evidence_sim(v: dict[str, Any]) -> None:
    g, e = v["given"], v["expect"]
    root = _sim_root(g["sim_root_private_key"])
    assert root.id == e["sim_root_id"]
    report_data = wire.runtime_binding(b64d(g["runtime_public_key"]), b64d(g["challenge"]))
    assert report_data.hex() == e["report_data"]
    body = canonical_json(
        {
            "v": 1,
            "measurement": g["measurement"],
            "report_data": b64e(report_data),
            "debug": False,
            "root": root.id,
            "issued_at": g["issued_at"],
        }
    )
    assert body.decode() == e["body"]
    verify_signature(root.public_key, SIGN_CONTEXT + body, b64d(json.loads(e["raw"])["sig"]))
    assert canonical_json({"body": b64e(body), "sig": b64e(root.sign(body))}).decode() == e["raw"]
    evidence = Evidence.from_json(e["evidence"])
    assert evidence.raw == e["raw"].encode()
    report = verify_sim(evidence, [root.public_key])
    assert (report.measurement, report.report_data, report.debug) == (g["measurement"], report_data, False)


@check("ks-evidence")
def _ks_evidence(v: dict[str, Any]) -> None:
    root = _sim_root(v["given"]["sim_root_private_key"])
    pair = hpke.HpkeKeyPair.from_private_bytes(hx(v["given"]["keyservice_hpke_private_key"]))
    resp = v["response"]
    assert resp["v"] == 1 and b64d(resp["public_key"]) == pair.public_key
    nonce = b64d(v["request"]["path"].split("nonce=", 1)[1])
    assert 16 <= len(nonce) <= 64
    report = verify_sim(Evidence.from_json(resp["evidence"]), [root.public_key])
    assert report.report_data == wire.keyservice_binding(pair.public_key, nonce)


@check("ks-register")
def _ks_register(v: dict[str, Any]) -> None:
    req = v["request"]
    pid = check_signed(req, v["given"]["ed25519_private_key"])
    assert principal_id(b64d(req["body"]["public_key"])) == pid
    assert v["response"] == {"v": 1, "id": pid, "created": True}


@check("ks-put-model-key")
@check("ks-put-request-key")
def _ks_put_key(v: dict[str, Any]) -> None:
    g, req = v["given"], v["request"]
    is_model = v["vector"] == "ks-put-model-key"
    pid = check_signed(req, g["owner_private_key"] if is_model else g["user_private_key"])
    model = req["path"].split("/")[3]
    field, info = ("sealed_model_key", wire.INFO_MODEL_KEY_UPLOAD)
    if not is_model:
        field, info = ("sealed_request_key", wire.INFO_REQUEST_KEY_UPLOAD)
    pair = hpke.HpkeKeyPair.from_private_bytes(hx(g["keyservice_hpke_private_key"]))
    key = pair.open(b64d(req["body"][field]), info=info, aad=wire.upload_aad(model, pid))
    assert key.hex() == (g["model_key"] if is_model else g["request_key"])
    assert all(isinstance(m, str) for m in req["body"]["measurements"])
    assert v["response"] == {"v": 1, "model": model, ("owner" if is_model else "user"): pid}


@check("ks-put-measurements")
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


@check("ks-attest-challenge")
def _ks_challenge(v: dict[str, Any]) -> None:
    assert v["request"] == {"method": "POST", "path": "/v1/attest/challenge"}
    assert len(b64d(v["response"]["challenge"])) == 32


@check("ks-attest")
def _ks_attest(v: dict[str, Any]) -> None:
    body = v["request"]["body"]
    runtime = hpke.HpkeKeyPair.from_private_bytes(hx(v["given"]["runtime_hpke_private_key"]))
    assert b64d(body["public_key"]) == runtime.public_key
    root = _sim_root(v["given"]["sim_root_private_key"])
    report = verify_sim(Evidence.from_json(body["evidence"]), [root.public_key])
    assert report.report_data == wire.runtime_binding(runtime.public_key, b64d(body["challenge"]))
    resp = v["response"]
    assert re.fullmatch(r"[0-9a-f]{64}", resp["session"]) and resp["measurement"] == report.measurement
    assert isinstance(resp["expires_at"], float)


@check("ks-release")
def _ks_release(v: dict[str, Any]) -> None:
    g, body, resp = v["given"], v["request"]["body"], v["response"]
    runtime = hpke.HpkeKeyPair.from_private_bytes(hx(g["runtime_hpke_private_key"]))
    aad = wire.release_aad(body["session"], body["model"], body["user"])
    pairs = [
        ("model_key", wire.INFO_RELEASE_MODEL_KEY, g["model_key"]),
        ("request_key", wire.INFO_RELEASE_REQUEST_KEY, g["request_key"]),
    ]
    for (field, info, expected), ephemeral in zip(pairs, g["ephemeral_private_keys"], strict=True):
        sealed = b64d(resp[field])
        assert runtime.open(sealed, info=info, aad=aad).hex() == expected
        assert sealed == hpke_fixed(runtime.public_key, hx(expected), info, aad, hx(ephemeral))
    assert resp["ttl_s"] == wire.KEY_CACHE_TTL_S


@check("error-body")
def _error_body(v: dict[str, Any]) -> None:
    from veil.errors import Unauthorized

    err = Unauthorized(v["response"]["error"]["message"], code=v["response"]["error"]["code"])
    assert err.to_json() == v["response"] and err.status == v["status"]


@check("at-rest")
def _at_rest(v: dict[str, Any]) -> None:
    g, e = v["given"], v["expect"]
    key = _sim_root(g["sim_root_private_key"]).sealing_key("keyservice")
    assert key.material().hex() == e["sealing_key"]
    aad = AT_REST_CONTEXT + g["record_key"].encode()
    assert aad.decode() == e["aad"]
    nonce = hx(g["nonce"])
    sealed = b64d(e["sealed"])
    assert sealed == nonce + AESGCM(key.material()).encrypt(nonce, hx(g["plaintext_hex"]), aad)
    assert Sealer(key).open(g["record_key"], sealed).hex() == g["plaintext_hex"]


@check("audit-chain")
def _audit_chain(v: dict[str, Any]) -> None:
    sealing = _sim_root(v["given"]["sim_root_private_key"]).sealing_key("keyservice")
    audit_key = derive_key(sealing, b"veil audit chain", b"")
    assert audit_key.material().hex() == v["expect"]["audit_key"]
    rows = v["expect"]["rows"]
    prev = GENESIS
    for row in rows:
        assert row["entry"] == canonical_json(json.loads(row["entry"])).decode()
        assert row["prev_hash"] == prev and row["hash"] == chain_hash(audit_key, prev, row["entry"])
        prev = row["hash"]
    entries = [(r["seq"], r["entry"], r["prev_hash"], r["hash"]) for r in rows]
    assert verify_audit_chain(entries, audit_key)[0]


def test_every_required_format_has_a_vector() -> None:
    assert VECTORS.keys() >= REQUIRED, f"missing vectors: {sorted(REQUIRED - VECTORS.keys())}"
    assert VECTORS.keys() <= CHECKS.keys(), f"vectors without a check: {sorted(VECTORS.keys() - CHECKS.keys())}"


@pytest.mark.parametrize("name", sorted(VECTORS))
def test_vector(name: str) -> None:
    CHECKS[name](VECTORS[name])


def test_a_corrupted_vector_is_caught() -> None:
    """The checks are not vacuous: one changed character in a vector fails its check."""
    v = json.loads(json.dumps(VECTORS["envelope-request"]))
    ct = v["expect"]["envelope"]["ct"]
    v["expect"]["envelope"]["ct"] = ("B" if ct[5] != "B" else "C").join([ct[:5], ct[6:]])
    with pytest.raises(Exception):  # noqa: B017 - any failure will do
        CHECKS["envelope-request"](v)
