"""The console's parts without a deployment: the access guard, the audit command's output, the
gateway's figures, inputs typed on the page, and the CLI's setup errors."""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import numpy as np
import pytest
import uvicorn
from click.testing import CliRunner
from fastapi import FastAPI
from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest

from veil.cli import cli
from veil.cli.io import InputError
from veil.console.audit import locate_state_dir, parse_audit_output
from veil.console.guard import AccessGuard
from veil.console.inputs import parse_inputs
from veil.console.metrics import parse_prometheus, platform_view
from veil.console.server import bind
from veil.sdk import Deployment
from veil.trust import TrustAnchors
from veil.wire.cards import ModelCard, TensorSpec


@pytest.fixture
def guarded() -> Iterator[tuple[httpx.Client, AccessGuard]]:
    """A tiny app behind the console's guard, served the way the console serves (loopback socket)."""
    sock = bind(0)
    assert sock.getsockname()[0] == "127.0.0.1"
    guard = AccessGuard(sock.getsockname()[1])
    app = FastAPI()
    app.middleware("http")(guard.middleware)
    app.get("/")(lambda: {"page": True})
    app.get("/api/state")(lambda: {"state": True})
    app.post("/api/act")(lambda: {"done": True})
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 10
    while not server.started:
        assert time.monotonic() < deadline and thread.is_alive(), "the server did not start"
        time.sleep(0.01)
    with httpx.Client(base_url=f"http://127.0.0.1:{guard.port}", timeout=10) as client:
        yield client, guard
    server.should_exit = True
    thread.join(timeout=10)


def test_guard_token_host_and_origin(guarded) -> None:
    client, guard = guarded
    bearer = {"authorization": f"Bearer {guard.token}"}
    port = guard.port
    assert guard.url() == f"http://127.0.0.1:{port}/#token={guard.token}" and len(guard.token) >= 43
    assert client.get("/").status_code == 200  # the static shell holds no data
    assert client.get("/anything-else").status_code == 401  # the shell's paths only, nothing else
    assert client.get("/api/state").status_code == 401
    assert client.get("/api/state", headers={"authorization": f"Bearer {guard.token}x"}).status_code == 401
    assert client.get("/api/state", headers=bearer).json() == {"state": True}
    assert client.get("/api/state", headers={**bearer, "host": f"localhost:{port}"}).status_code == 200
    for host in (f"attacker.example:{port}", "127.0.0.1:1", "127.0.0.1"):
        refused = client.get("/", headers={"host": host})
        assert refused.status_code == 403 and refused.json()["error"]["code"] == "bad_host"
    assert client.post("/api/act", headers=bearer).status_code == 200
    assert client.post("/api/act", headers={**bearer, "origin": f"http://localhost:{port}"}).status_code == 200
    for bad in ({"origin": "http://attacker.example"}, {"origin": "null"}, {"sec-fetch-site": "same-site"}):
        assert client.post("/api/act", headers={**bearer, **bad}).json()["error"]["code"] == "cross_origin"
    headers = client.get("/").headers
    assert "frame-ancestors 'none'" in headers["content-security-policy"]
    assert headers["x-frame-options"] == "DENY" and headers["cache-control"] == "no-store"


def test_each_run_has_its_own_token() -> None:
    assert AccessGuard(1).token != AccessGuard(1).token


def test_audit_output_verdicts() -> None:
    entry = {"ts": 1.5, "actor": "a" * 64, "action": "grant", "subject": "m/" + "b" * 64, "outcome": "allowed"}
    entries, status = parse_audit_output(
        json.dumps(entry) + "\nnot json\n",
        "accepting SIMULATED attestation\nchain OK: 1 entries, chain intact\npolicy rows OK: every row matches\n",
        0,
    )
    assert entries == [entry] and status["chain_ok"] and status["policy_ok"]
    assert status["chain_message"] == "chain OK: 1 entries, chain intact"
    _, broken = parse_audit_output("", "CHAIN BROKEN: entry 3: content does not match its hash (altered)\n", 1)
    assert broken["chain_ok"] is False and "entry 3" in broken["chain_message"]
    _, altered = parse_audit_output("", "chain OK: 2 entries, chain intact\nPOLICY ROW ALTERED: grant/m/u\n", 1)
    assert altered["chain_ok"] and altered["policy_ok"] is False and altered["policy_problems"] == ["grant/m/u"]
    _, silent = parse_audit_output("", "Error: no such dir\n", 2)
    assert silent["chain_ok"] is False and "no verdict (exit 2)" in silent["chain_message"]


def test_the_audit_is_local_only(tmp_path: Path) -> None:
    remote = Deployment("https://gw.example", "https://ks.example")
    state_dir, why = locate_state_dir(tmp_path / "deployment.json", remote, None)
    assert state_dir is None and "not on this machine" in why
    local = Deployment("http://127.0.0.1:1", "http://127.0.0.1:2")
    state_dir, why = locate_state_dir(tmp_path / "deployment.json", local, None)
    assert state_dir is None and str(tmp_path / "cloud" / "keyservice") in why
    (tmp_path / "cloud" / "keyservice").mkdir(parents=True)
    (tmp_path / "cloud" / "keyservice" / "keyservice.db").write_bytes(b"")
    assert locate_state_dir(tmp_path / "deployment.json", local, None) == (tmp_path / "cloud" / "keyservice", "")


def test_gateway_figures_parse() -> None:
    registry = CollectorRegistry()
    requests = Counter("veil_requests_total", "r", ["mode", "outcome"], registry=registry)
    latency = Histogram("veil_request_seconds", "l", ["mode"], registry=registry, buckets=(0.01, 0.1, 1))
    requests.labels("tee", "ok").inc(3)
    requests.labels("tee", "error").inc()
    for seconds in (0.005, 0.05, 0.5):
        latency.labels("tee").observe(seconds)
    tee = parse_prometheus(generate_latest(registry).decode())["tee"]
    assert (tee["ok"], tee["error"], tee["count"]) == (3, 1, 3)
    assert tee["mean_ms"] == pytest.approx(185.0) and tee["p50_le_ms"] == pytest.approx(100.0)
    view = platform_view(
        {"uptime_s": 9, "functions": {"veil-tee": {"instances": 1, "instance_timeline": [[0, 0]]}},
         "totals": {"gb_seconds": 2.0}},
        0.5,
    )  # fmt: skip
    assert view["functions"] == {"veil-tee": {"instances": 1}} and view["billing"]["cost"] == 1.0


def test_inputs_follow_the_card() -> None:
    card = ModelCard(
        "m", 1, "tee", "a" * 64, (TensorSpec("input_ids", "int64", (None, 3)), TensorSpec("mask", "int64", (None, 3))),
        (TensorSpec("y", "float32", (None, 1)),),
    )  # fmt: skip
    named = parse_inputs('{"input_ids": [[1, 2, 3]], "mask": [[1, 1, 0]]}', card)
    assert named["input_ids"].dtype == np.int64 and named["mask"].shape == (1, 3)
    with pytest.raises(InputError, match="several inputs"):
        parse_inputs("[[1, 2, 3]]", card)
    with pytest.raises(InputError, match="whole numbers"):
        parse_inputs('{"input_ids": [[1.5, 2, 3]], "mask": [[1, 1, 0]]}', card)
    single = ModelCard("m", 1, "tee", "a" * 64, (TensorSpec("float_input", "float32", (None, 2)),), ())
    assert parse_inputs("[0.5, 1]", single)["float_input"].shape == (1, 2)
    with pytest.raises(InputError, match="not JSON"):
        parse_inputs("[1,", single)


def test_console_says_what_is_missing(tmp_path: Path) -> None:
    deployment = tmp_path / "deployment.json"
    runner = CliRunner()
    missing = runner.invoke(cli, ["console", "--client-dir", str(tmp_path), "--deployment", str(deployment)])
    assert missing.exit_code != 0 and "veil up" in missing.output
    deployment.write_text(json.dumps({"gateway_url": "http://127.0.0.1:9", "keyservice_url": "http://127.0.0.1:9"}))
    no_trust = runner.invoke(cli, ["console", "--client-dir", str(tmp_path), "--deployment", str(deployment)])
    assert no_trust.exit_code != 0 and "veil trust init" in no_trust.output
    TrustAnchors(["a" * 64], ["b" * 64]).save(tmp_path)
    no_identity = runner.invoke(cli, ["console", "--client-dir", str(tmp_path), "--deployment", str(deployment)])
    assert no_identity.exit_code != 0 and "veil owner init" in no_identity.output
