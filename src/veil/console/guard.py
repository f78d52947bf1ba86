"""Who may talk to the console: the page this console served, and nothing else on the machine.

The console signs with the principal's keys, so another local process, another user of the
machine or a web page from another site must not be able to drive it. Defences:

- **A per-run access token** (256 random bits), printed in the URL's fragment (`#token=`), which
  browsers never send to a server. The page keeps it in `sessionStorage` (scoped to this exact
  origin, port included) and sends it as `Authorization: Bearer` on every API call. Not a
  cookie: cookies on 127.0.0.1 are shared by every port, so any local web server the browser
  visited would receive it, and a cookie is ambient authority a cross-site form could ride on.
- **Host check** on every request (DNS rebinding: a hostile name resolving to 127.0.0.1).
- **Origin and Fetch-Metadata checks** on actions, which are POST only, with a JSON or ONNX body
  (never a form encoding), so no cross-site request can even be formed without a preflight the
  console never grants.
- A strict Content-Security-Policy: the page loads only its own script and style, no CDN.
"""

from __future__ import annotations

import hmac
import secrets
from collections.abc import Awaitable, Callable

from fastapi import Request
from starlette.responses import Response

from veil.errors import Forbidden, Unauthorized, VeilError
from veil.http import error_response

SAFE_METHODS = frozenset({"GET", "HEAD"})
# the page's shell: static, no data in it, loadable before the page has read its token; every
# other path (the API, and any path not known) needs the token
PUBLIC_PATHS = frozenset({"/", "/static/index.html", "/static/console.js", "/static/console.css"})
SECURITY_HEADERS = {
    "content-security-policy": (
        "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; connect-src 'self'; "
        "form-action 'none'; frame-ancestors 'none'; base-uri 'none'"
    ),
    "x-frame-options": "DENY",
    "x-content-type-options": "nosniff",
    "referrer-policy": "no-referrer",
    "cross-origin-opener-policy": "same-origin",
    "cross-origin-resource-policy": "same-origin",
    "cache-control": "no-store",
}


class AccessGuard:
    """The token and the origins of one console run on `port`."""

    def __init__(self, port: int, token: str | None = None) -> None:
        self.port = port
        self.token = token or secrets.token_urlsafe(32)
        self.hosts = frozenset({f"127.0.0.1:{port}", f"localhost:{port}"})
        self.origins = frozenset(f"http://{h}" for h in self.hosts)

    def url(self, host: str = "127.0.0.1") -> str:
        """The address to open: the token rides in the fragment, never sent over HTTP."""
        return f"http://{host}:{self.port}/#token={self.token}"

    def check(self, request: Request) -> VeilError | None:
        """Why this request is refused, or None. The page's shell needs only the right Host;
        everything else needs the token; actions also need this console's own origin."""
        host = request.headers.get("host", "")
        if host not in self.hosts:
            return Forbidden(f"Host {host!r} is not this console (DNS rebinding?)", code="bad_host")
        if request.url.path in PUBLIC_PATHS and request.method in SAFE_METHODS:
            return None
        scheme, _, presented = request.headers.get("authorization", "").partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(presented.encode(), self.token.encode()):
            return Unauthorized(
                "missing or wrong console token: open the URL `veil console` printed", code="console_token"
            )
        if request.method in SAFE_METHODS:
            return None
        origin = request.headers.get("origin")
        if origin is not None and origin not in self.origins:
            return Forbidden(f"Origin {origin!r} may not act through this console", code="cross_origin")
        site = request.headers.get("sec-fetch-site")
        if site is not None and site not in ("same-origin", "none"):
            return Forbidden(f"a {site} request may not act through this console", code="cross_origin")
        return None

    async def middleware(self, request: Request, call_next: Callable[[Request], Awaitable[Response]]) -> Response:
        """Refuse what `check` refuses; put the security headers on every answer."""
        refusal = self.check(request)
        response = error_response(refusal) if refusal is not None else await call_next(request)
        response.headers.update(SECURITY_HEADERS)
        return response
