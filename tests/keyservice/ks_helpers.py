"""Helpers shared by the KeyService tests (hand-made signed requests, a registered model)."""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

import httpx

from veil.crypto.identity import Identity
from veil.crypto.keys import SymmetricKey

RUNTIME = "a1" * 32  # a fixed stand-in: the live tree is being edited by others while tests run
OTHER = "ee" * 32


def signed(
    http: httpx.Client,
    ident: Identity,
    method: str,
    path: str,
    obj: dict[str, Any] | None = None,
    *,
    body: bytes | None = None,
    timestamp: int | None = None,
    nonce: str | None = None,
    seq: int | None = None,
    headers: dict[str, str] | None = None,
) -> httpx.Response:
    """Send one request signed by `ident` (the body defaults to `{"v": 1, **obj}`)."""
    if body is None:
        body = json.dumps({"v": 1, **obj}).encode() if obj is not None else b""
    sig = ident.sign_request(method, path, body, timestamp=timestamp, nonce=nonce, seq=seq).as_dict()
    all_headers = {**sig, "content-type": "application/json", **(headers or {})}
    return http.request(method, path, content=body, headers=all_headers)


def error_of(response: httpx.Response) -> tuple[int, str]:
    """(status, code) of an error answer, asserting the body has the documented shape."""
    body = response.json()
    assert set(body) == {"error"} and set(body["error"]) == {"code", "message"}, body
    assert body["error"]["message"]
    return response.status_code, body["error"]["code"]


@dataclass
class Model:
    owner: Any
    user: Any
    model_key: SymmetricKey
    request_key: SymmetricKey
    model: str = "iris"


def setup_model(
    ks: Any, owner_measurements: list[str] | None = None, user_measurements: list[str] | None = None
) -> Model:
    """Owner registers and puts a model key (+ allow-list), grants a user, who puts a request key."""
    owner, user = ks.principal(), ks.principal()
    mk, rk = SymmetricKey.generate(), SymmetricKey.generate()
    owner.put_model_key("iris", mk, owner_measurements or [RUNTIME])
    owner.grant("iris", user.identity.id)
    user.put_request_key("iris", rk, user_measurements or [RUNTIME])
    return Model(owner, user, mk, rk)


def _keys(release: Any) -> tuple[SymmetricKey, SymmetricKey]:
    """(model key, request key) of a `Release`."""
    return release.model_key, release.request_key
