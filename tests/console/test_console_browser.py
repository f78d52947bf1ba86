"""`veil console` in a real browser: the owner publishes, grants and revokes from the page; the
user requests access and runs an encrypted inference from theirs; the page shows the verified
card, the grant, the revocation with its delay, usage, the platform's instances and billing, and
the audit log's "chain OK". Then a page from another site tries to act through the console.

Set VEIL_CONSOLE_SCREENSHOT=docs/img/console.png to refresh the documentation's screenshot.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import httpx
import pytest
from console_support import BROWSER_TIMEOUT_MS

pytestmark = pytest.mark.timeout(150)

DELAY_S = 30
COLD_START_TIMEOUT_MS = 60_000  # the first request starts a runtime instance (attest, fetch keys and model)


def _page(browser, console):
    page = browser.new_page(viewport={"width": 1300, "height": 1000})
    page.set_default_timeout(BROWSER_TIMEOUT_MS)
    errors: list[str] = []
    page.on("pageerror", lambda exc: errors.append(str(exc)))
    page.goto(console.url)
    page.wait_for_selector("#main:not([hidden])")
    return page, errors


def _act(page, button: str, done: str, timeout_ms: int = BROWSER_TIMEOUT_MS) -> str:
    """Click an action's button and wait for its outcome message; fail with the page's message."""
    page.click(button)
    page.wait_for_function(
        "([done]) => { const t = document.getElementById('message').textContent;"
        " return t.includes(done) || t.includes(' failed: '); }",
        arg=[done],
        timeout=timeout_ms,
    )
    message = page.inner_text("#message")
    assert done in message, message
    return message


def _refresh(page) -> None:
    before = page.get_attribute("body", "data-loaded-at")
    page.click("#refresh")
    # predicates as functions: the console's CSP (rightly) forbids evaluating strings
    page.wait_for_function(f"() => document.body.dataset.loadedAt !== {json.dumps(before)}")


def test_owner_and_user_drive_the_console(
    browser, deployed, owner_console, user_console, iris_onnx, tmp_path: Path
) -> None:
    onnx_path, rows = iris_onnx
    page, errors = _page(browser, owner_console)
    assert "#token=" not in page.url, "the token must leave the address bar"
    assert deployed.owner_id[:12] in page.inner_text("#who")
    assert "attestation verified against your trust anchors" in page.inner_text("#identity")
    assert "accepted (development only)" in page.inner_text("#trust")

    # publish: an ONNX file from disk, signed and sealed by the console's process
    page.fill("#publish-model", "iris")
    page.set_input_files("#publish-file", str(onnx_path))
    page.fill("#publish-delay", str(DELAY_S))
    page.fill("#publish-description", "iris logistic regression, 4 features")
    _act(page, "#publish-button", "published iris v1")
    card = page.wait_for_selector("article[data-model=iris] .card")
    card_text = card.inner_text()
    assert "card v1 signed by owner" in card_text and "verified" in card_text
    assert "float_input" in card_text and "float32 [batch, 4]" in card_text
    assert "iris logistic regression, 4 features" in card_text
    model_text = page.inner_text("article[data-model=iris]")
    assert f"{DELAY_S} s" in model_text and "(you)" in model_text
    assert deployed.owner_dir.joinpath("console-log.jsonl").exists()

    # grant the user (whose id came from `veil user init`)
    page.fill("#grant-model", "iris")
    page.fill("#grant-user", deployed.user_id)
    _act(page, "#grant-button", "granted")
    row = page.wait_for_selector(f"#grants tr.granted[data-user='{deployed.user_id}']")
    assert "granted" in row.inner_text() and "iris" in row.inner_text()

    # the user, from their own console: request access, then an encrypted inference
    user_page, user_errors = _page(browser, user_console)
    user_page.wait_for_selector("article[data-model=iris] .card")  # found through the audit log's grant
    user_page.fill("#access-model", "iris")
    _act(user_page, "#access-button", "request key registered")
    user_page.fill("#infer-model", "iris")
    user_page.fill("#infer-inputs", json.dumps(rows))
    _act(user_page, "#infer-button", "decrypted answer", timeout_ms=COLD_START_TIMEOUT_MS)  # a cold start
    result = user_page.wait_for_selector("#infer-result:not([hidden])")
    outputs = result.inner_text()
    assert "label (int64 [2]): [0,0]" in outputs and "probabilities (float32 [2, 3]): [[" in outputs, outputs
    usage = user_page.wait_for_selector("#usage-console tr[data-model=iris]")
    assert re.match(r"iris\s+1\s+1\s+0\s", usage.inner_text())
    assert json.loads(deployed.user_dir.joinpath("request-keys.json").read_text()).keys() == {"iris"}

    # the owner sees the platform's instance and bill, then revokes
    _refresh(page)
    billing = page.inner_text("#billing")
    assert re.search(r"\b1 cold starts", billing) and "GB-s billed" in billing, billing
    assert page.query_selector("#platform tbody tr td") is not None
    assert re.search(r"tee\s+1\s+0\s", page.inner_text("#usage-gateway")), page.inner_text("#usage-gateway")
    _act(page, f"#grants tr[data-user='{deployed.user_id}'] button.revoke", f"takes effect within {DELAY_S} s")
    revoked = page.wait_for_selector(f"#grants tr.revoked[data-user='{deployed.user_id}']")
    text = revoked.inner_text()
    assert "revoked" in text and f"{DELAY_S} s" in text and re.search(r"within \d+ s", text), text

    # the audit log, verified by `veil keyservice audit` on this machine
    status = page.inner_text("#audit-status")
    assert "chain OK" in status and "policy rows OK" in status, status
    audit_actions = page.inner_text("#audit")
    for action in ("stage_version", "put_card", "commit_version", "grant", "revoke", "release", "put_request_key"):
        assert action in audit_actions, action

    shot = tmp_path / "console.png"
    page.screenshot(path=str(shot), full_page=True)
    assert shot.stat().st_size > 20_000
    if target := os.environ.get("VEIL_CONSOLE_SCREENSHOT"):
        shutil.copyfile(shot, target)
    assert errors == [] and user_errors == [], errors + user_errors
    page.close()
    user_page.close()


def _serve_page(html: str) -> tuple[ThreadingHTTPServer, str]:
    """Serve one HTML page on another loopback port: a local web page the browser might visit."""

    class Page(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            data = html.encode()
            self.send_response(200)
            self.send_header("content-type", "text/html")
            self.send_header("content-length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def log_message(self, *args: object) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Page)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server, f"http://127.0.0.1:{server.server_address[1]}/"


def test_another_page_cannot_act(browser, deployed, owner_console) -> None:
    """A page on another local port (same machine, so the browser's private-network checks do
    not apply) posts to the console as a CSRF attacker would: fetches with and without CORS, and
    a form. Nothing is signed: the console's ledger and the grants stay as they were."""
    console = owner_console
    ledger = deployed.owner_dir / "console-log.jsonl"
    before = ledger.read_text() if ledger.exists() else ""
    target = f"{console.base}/api/owner/grant"
    body = json.dumps({"model": "iris", "user": deployed.user_id})
    hostile = f"""<!doctype html>
      <form id=f method=POST action="{target}" enctype="text/plain" target=sink>
        <input name='{body[:-1]}, "x": "' value='"}}'></form>
      <iframe name=sink></iframe>
      <script>
        window.results = [];
        fetch("{target}", {{method: "POST", mode: "no-cors", credentials: "include", body: {json.dumps(body)}}})
          .then(() => results.push("no-cors sent"), e => results.push("no-cors failed"));
        fetch("{target}", {{method: "POST", credentials: "include", headers: {{"Content-Type": "application/json",
          "Authorization": "Bearer guess"}}, body: {json.dumps(body)}}})
          .then(r => results.push("cors " + r.status), e => results.push("cors blocked"));
      </script>"""
    server, url = _serve_page(hostile)
    try:
        page = browser.new_page()
        page.set_default_timeout(BROWSER_TIMEOUT_MS)
        page.goto(url)
        page.wait_for_function("() => window.results && window.results.length === 2")
        results = page.evaluate("window.results")
        # the CORS request dies at its preflight; the no-cors one reaches the console, is refused
        # (no token) and its answer is withheld from the page (Cross-Origin-Resource-Policy)
        assert "cors blocked" in results and "no-cors failed" in results, results
        with page.expect_response(target) as answer:
            page.evaluate("() => document.getElementById('f').submit()")
        assert answer.value.status == 401  # no token: refused before anything is parsed or signed
        page.close()
    finally:
        server.shutdown()
    assert (ledger.read_text() if ledger.exists() else "") == before


def test_the_console_refuses_other_callers(deployed, owner_console) -> None:
    """Without the token, under another Host, from another Origin, with a form body or by GET:
    refused before anything is signed."""
    console = owner_console
    auth = {"authorization": f"Bearer {console.token}"}
    grant = {"model": "iris", "user": deployed.user_id}
    with httpx.Client(base_url=console.base, timeout=30) as http:
        assert http.get("/api/state").status_code == 401
        assert http.get("/api/state", headers={"authorization": "Bearer wrong"}).status_code == 401
        assert http.get("/api/state", headers={**auth, "host": f"attacker.example:{console.port}"}).status_code == 403
        assert http.get("/", headers={"host": "attacker.example"}).status_code == 403
        page = http.get("/")
        assert page.status_code == 200 and "script-src 'self'" in page.headers["content-security-policy"]
        assert console.token not in page.text
        cross = http.post("/api/owner/grant", json=grant, headers={**auth, "origin": "http://attacker.example"})
        assert cross.status_code == 403 and cross.json()["error"]["code"] == "cross_origin"
        site = http.post("/api/owner/grant", json=grant, headers={**auth, "sec-fetch-site": "cross-site"})
        assert site.status_code == 403
        form = http.post("/api/owner/grant", data=grant, headers=auth)
        assert form.status_code == 400 and form.json()["error"]["code"] == "bad_content_type"
        assert http.get("/api/owner/grant", headers=auth).status_code == 405
        state = http.get("/api/state", headers=auth)
        assert state.status_code == 200 and state.headers["cache-control"] == "no-store"
    # the console listens on loopback only
    assert all("127.0.0.1" in line for line in console.output if line.strip().startswith("open "))
