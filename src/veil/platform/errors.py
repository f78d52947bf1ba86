"""Platform failures: a stable `code`, the HTTP `status` a gateway should answer, a `message`.

Every message names the function (and the instance when one is involved) and says why, so an
operator can act on it without reading platform internals.
"""

from __future__ import annotations

from typing import Any

#: code -> HTTP status. The gateway maps these straight to `{"error": {"code", "message"}}`.
STATUS_BY_CODE: dict[str, int] = {
    "unknown_function": 404,
    "unknown_instance": 404,
    "busy": 503,
    "start_failed": 502,
    "instance_crashed": 502,
    "out_of_memory": 502,
    "timeout": 504,
    "action_error": 502,
    "closed": 503,
    "bad_spec": 400,
    "bad_request": 400,
    "platform_error": 502,
}


class PlatformError(Exception):
    """An expected platform failure (`code` in STATUS_BY_CODE).

    `detail` may carry operator-only context (e.g. the tail of an instance's log); it is kept out
    of `message` because messages travel to API clients and logs must not leak action output.
    `sent` is False when the failure came before the request reached any instance (nothing can
    have run, so a caller may place it again), None when unknown.
    """

    def __init__(
        self,
        code: str,
        message: str,
        *,
        status: int | None = None,
        detail: str | None = None,
        sent: bool | None = None,
    ) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        self.status = status if status is not None else STATUS_BY_CODE.get(code, 500)
        self.detail = detail
        self.sent = sent

    def to_json(self) -> dict[str, Any]:
        """The `{"error": {"code", "message"}}` body the HTTP layers answer with."""
        return {"error": {"code": self.code, "message": self.message}}

    def __repr__(self) -> str:
        return f"{type(self).__name__}(code={self.code!r}, status={self.status}, message={self.message!r})"


class ActionError(PlatformError):
    """The action itself answered `{"error": ...}`: an application error, not a platform fault.

    `body` is the action's error object unchanged and `status` the action's HTTP status, so the
    gateway can pass the runtime's own `{"code", "message"}` through to the caller.
    """

    def __init__(self, function: str, body: Any, status: int) -> None:
        if isinstance(body, dict) and "message" in body:
            what = f"{body.get('code', 'error')}: {body['message']}"
        else:
            what = str(body)[:300]
        super().__init__("action_error", f"function {function!r}: action error ({status}) {what}", status=status)
        self.body = body
        self.function = function

    def to_json(self) -> dict[str, Any]:
        """Pass the action's own error object through when it has the standard shape."""
        if isinstance(self.body, dict) and "code" in self.body and "message" in self.body:
            return {"error": self.body}
        return super().to_json()
