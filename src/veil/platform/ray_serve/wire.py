"""What crosses a Ray handle between a replica and its caller: plain dicts, never exceptions.

A runtime's `/run` answer crosses as it came (`{"raw": body, "status": http_status}`): the
replica neither decodes nor re-encodes it, and the caller decodes it once, with the local
platform's rules (`veil.platform.instance.parse_run`). Requests cross the same way: the caller
encodes the value to JSON once (which is also its validation) and the replica splices those
bytes into the `/run` body.

Ray pickles an exception raised in a replica into a `RayTaskError` whose text carries the
replica's traceback, and Veil's error classes (keyword-only constructors) do not unpickle
cleanly. So a replica never raises for an expected failure: it answers `{"ok": result}` or
`{"error": {...}}`, and the caller rebuilds the very `PlatformError` / `ActionError` the local
platform raises, with the same code, status and message, and no traceback.
"""

from __future__ import annotations

from typing import Any

from veil.platform.errors import ActionError, PlatformError
from veil.platform.instance import parse_run


def raw(status: int, body: bytes) -> dict[str, Any]:
    """A runtime's `/run` answer, undecoded."""
    return {"raw": body, "status": status}


def ok(result: dict[str, Any]) -> dict[str, Any]:
    return {"ok": result}


def error(exc: PlatformError) -> dict[str, Any]:
    """The answer for `exc` (an ActionError keeps the action's own body and status)."""
    if isinstance(exc, ActionError):
        return {"error": {"kind": "action", "function": exc.function, "body": exc.body, "status": exc.status}}
    return {
        "error": {
            "kind": "platform",
            "code": exc.code,
            "message": exc.message,
            "status": exc.status,
            "detail": exc.detail,
        }
    }


def result(answer: Any, function: str) -> dict[str, Any]:
    """The action's result from a replica's answer, or the error it carries, raised."""
    if isinstance(answer, dict) and isinstance(answer.get("raw"), bytes) and isinstance(answer.get("status"), int):
        return parse_run(function, answer["status"], answer["raw"])
    if isinstance(answer, dict) and isinstance(answer.get("ok"), dict) and len(answer) == 1:
        return answer["ok"]
    err = answer.get("error") if isinstance(answer, dict) else None
    if isinstance(err, dict) and err.get("kind") == "action":
        raise ActionError(str(err.get("function") or function), err.get("body"), int(err.get("status") or 502))
    if isinstance(err, dict) and err.get("kind") == "platform":
        raise PlatformError(
            str(err.get("code") or "platform_error"),
            str(err.get("message") or f"function {function!r}: the replica failed"),
            status=int(err["status"]) if err.get("status") is not None else None,
            detail=err.get("detail"),
        )
    raise PlatformError("platform_error", f"function {function!r}: the replica sent an answer Veil does not know")
