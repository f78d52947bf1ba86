"""Signed answers: an ASGI middleware that signs every KeyService answer to a principal.

A request that carries a principal's signature headers gets an answer whose status and body are
signed, with the KeyService's attested Ed25519 key, over the request it answers
(`wire.answer_payload`). The client verifies before it believes anything, so a man in the middle
can neither drop a revoke and answer 200, nor answer a request with another one's result.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Awaitable, Callable
from typing import Any

from veil.crypto.encoding import b64e
from veil.crypto.identity import HEADER_NONCE, HEADER_PRINCIPAL, HEADER_SEQ
from veil.keyservice import wire

Scope = dict[str, Any]
Message = dict[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
DRAIN_FACTOR = 16  # an oversized body is read (hashed, not kept) up to this many times the limit


class AnswerSigner:
    """Wraps an ASGI app; `sign(payload) -> signature` is the KeyService's answer signer."""

    def __init__(self, app: Callable, sign: Callable[[bytes], bytes], max_body: int) -> None:
        self.app = app
        self.sign = sign
        self.max_body = max_body

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope.get("headers", [])}
        nonce = headers.get(HEADER_NONCE)
        if not nonce:
            await self.app(scope, receive, send)
            return
        # Read the whole (small, bounded) body first, so the answer can name its hash whatever
        # the endpoint reads; then replay it to the app.
        chunks: list[bytes] = []
        digest = hashlib.sha256()
        size = 0
        more = True
        while more:
            message = await receive()
            if message["type"] == "http.disconnect":
                return
            chunk = message.get("body", b"")
            size += len(chunk)
            digest.update(chunk)
            if size <= self.max_body:
                chunks.append(chunk)
            elif size > DRAIN_FACTOR * self.max_body:
                return  # far past the limit: not worth reading to sign a refusal; the client sees a drop
            more = message.get("more_body", False)
        if size > self.max_body:  # refused, but signed over what the client really sent
            await self._send_signed(scope, headers, digest.hexdigest(), send, 413, _too_large(self.max_body))
            return
        body = b"".join(chunks)
        replayed = False

        async def replay() -> Message:
            nonlocal replayed
            if replayed:
                return await receive()
            replayed = True
            return {"type": "http.request", "body": body, "more_body": False}

        start: Message | None = None
        parts: list[bytes] = []

        async def capture(message: Message) -> None:
            nonlocal start
            if message["type"] == "http.response.start":
                start = message
                return
            if message["type"] == "http.response.body":
                parts.append(message.get("body", b""))
                if not message.get("more_body", False) and start is not None:
                    await self._finish(scope, headers, hashlib.sha256(body).hexdigest(), send, start, b"".join(parts))

        await self.app(scope, replay, capture)

    async def _finish(
        self, scope: Scope, headers: dict[str, str], body_sha256: str, send: Send, start: Message, answer: bytes
    ) -> None:
        payload = self._payload(scope, headers, body_sha256, start["status"], answer)
        out = [(k, v) for k, v in start.get("headers", []) if k.lower() != b"content-length"]
        out.append((b"content-length", str(len(answer)).encode()))
        out.append((wire.HEADER_ANSWER_SIGNATURE.encode(), b64e(self.sign(payload)).encode()))
        await send({"type": "http.response.start", "status": start["status"], "headers": out})
        await send({"type": "http.response.body", "body": answer, "more_body": False})

    async def _send_signed(
        self, scope: Scope, headers: dict[str, str], body_sha256: str, send: Send, status: int, answer: bytes
    ) -> None:
        start = {"type": "http.response.start", "status": status, "headers": [(b"content-type", b"application/json")]}
        await self._finish(scope, headers, body_sha256, send, start, answer)

    @staticmethod
    def _payload(scope: Scope, headers: dict[str, str], body_sha256: str, status: int, answer: bytes) -> bytes:
        query = scope.get("query_string", b"").decode("latin-1")
        path = scope["path"] + (f"?{query}" if query else "")
        return wire.answer_payload(
            headers.get(HEADER_PRINCIPAL, ""),
            headers.get(HEADER_NONCE, ""),
            headers.get(HEADER_SEQ, ""),
            scope["method"],
            path,
            body_sha256,
            status,
            answer,
        )


def _too_large(limit: int) -> bytes:
    return json.dumps({"error": {"code": "too_large", "message": f"body exceeds the {limit}-byte limit"}}).encode()
