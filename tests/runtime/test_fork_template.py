"""The warm pool and the fork template, with the real runtime, KeyService, gateway and SDK.

A TEE function deployed with `prewarm=2, fork_template=True` keeps two spare instances that
were forked from one pre-imported template and have each attested on their own; a cold start
takes one (the request waits for no start), the pool refills, and the pool's idle cost is
billed apart. Nothing secret exists before the fork: every attestation the KeyService sees
(recorded by a pass-through proxy in front of it) carries a different key and evidence, and the
template's memory holds neither the simulation root's private key nor any instance's session,
while an instance's memory does hold its own session (so the scan can find what is there).
"""

from __future__ import annotations

import dataclasses
import json
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest

from veil.deployment import TEE_FUNCTION, LocalDeployment, StackOptions, free_port
from veil.sdk import ModelOwner, ModelUser

PREWARM = 2


class RecordingProxy:
    """Forwards every request to the KeyService unchanged and records attestations."""

    def __init__(self, upstream: str) -> None:
        self.upstream = upstream
        self.attests: list[tuple[dict[str, Any], dict[str, Any]]] = []
        proxy = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args: object) -> None:
                return

            def _forward(self, method: str) -> None:
                body = self.rfile.read(int(self.headers.get("content-length") or 0))
                headers = {k: v for k, v in self.headers.items() if k.lower() in ("content-type", "authorization")}
                r = httpx.request(method, proxy.upstream + self.path, content=body, headers=headers, timeout=30)
                if self.path.startswith("/v1/attest") and self.path != "/v1/attest/challenge" and r.is_success:
                    proxy.attests.append((json.loads(body), r.json()))
                self.send_response(r.status_code)
                self.send_header("content-type", r.headers.get("content-type", "application/json"))
                self.send_header("content-length", str(len(r.content)))
                self.end_headers()
                self.wfile.write(r.content)

            def do_GET(self) -> None:
                self._forward("GET")

            def do_POST(self) -> None:
                self._forward("POST")

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


def tiny_model() -> tuple[bytes, dict[str, np.ndarray], np.ndarray]:
    from onnx import TensorProto, helper, numpy_helper

    w = np.arange(12, dtype=np.float32).reshape(4, 3) / 10
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "w"], ["y"])],
        "tiny",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 3])],
        [numpy_helper.from_array(w, "w")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    x = np.array([[1, 2, 3, 4]], dtype=np.float32)
    return model.SerializeToString(), {"x": x}, x @ w


def memory_holds(pid: int, needles: list[bytes]) -> list[bool]:
    """Which of `needles` occur anywhere in the readable memory of process `pid`."""
    found = [False] * len(needles)
    maps = Path(f"/proc/{pid}/maps").read_text().splitlines()
    with open(f"/proc/{pid}/mem", "rb", 0) as mem:
        for line in maps:
            addr, perms = line.split()[:2]
            if not perms.startswith("r") or "[vvar]" in line or "[vsyscall]" in line:
                continue
            start, end = (int(a, 16) for a in addr.split("-"))
            try:
                mem.seek(start)
                data = mem.read(end - start)
            except (OSError, ValueError, OverflowError):
                continue
            for i, needle in enumerate(needles):
                found[i] = found[i] or needle in data
    return found


def wait_until(cond: Any, timeout: float) -> Any:
    import time

    end = time.monotonic() + timeout
    while time.monotonic() < end:
        got = cond()
        if got:
            return got
        time.sleep(0.05)
    return cond()


@pytest.fixture
def pooled(tmp_path: Path) -> Iterator[tuple[LocalDeployment, RecordingProxy, Any]]:
    ks_port = free_port()
    proxy = RecordingProxy(f"http://127.0.0.1:{ks_port}")
    d = LocalDeployment(tmp_path, StackOptions(keyservice_port=ks_port, packer_policy=None, he=False, max_instances=2))
    try:
        info = d.start()
        spec = dataclasses.replace(
            d.tee_spec,
            init_value={**d.tee_spec.init_value, "keyservice_url": proxy.url},
            prewarm=PREWARM,
            fork_template=True,
        )
        d.platform.deploy(spec)
        yield d, proxy, info
    finally:
        d.stop()
        proxy.close()


def test_cold_start_takes_a_pre_attested_forked_spare(pooled) -> None:
    d, proxy, info = pooled
    platform = d.platform

    def ready_spares() -> list[Any]:
        got = [s for s in platform.spares(TEE_FUNCTION) if s.state == "ready"]
        return got if len(got) == PREWARM else []

    spares = wait_until(ready_spares, 60)
    assert spares, platform.metrics(TEE_FUNCTION)
    template = platform.template_pid(TEE_FUNCTION)
    assert template is not None
    for s in spares:  # forked from the template, not started by the platform
        ppid = next(line for line in Path(f"/proc/{s.pid}/status").read_text().splitlines() if line.startswith("PPid"))
        assert int(ppid.split()[1]) == template and s.forked
    # each spare attested itself, after the fork: different keys, evidence and sessions
    assert len(proxy.attests) == PREWARM
    keys = {a["public_key"] for a, _ in proxy.attests}
    evidence = {json.dumps(a["evidence"], sort_keys=True) for a, _ in proxy.attests}
    sessions = [r["session"].encode() for _, r in proxy.attests]
    assert len(keys) == PREWARM and len(evidence) == PREWARM and len(set(sessions)) == PREWARM
    # nothing secret in the template: not the simulation root's key, no instance's session
    sim_root = (d.keyservice_dir / "sim-root.key").read_bytes()
    assert memory_holds(template, [sim_root, *sessions]) == [False] * (1 + PREWARM)
    in_spares = [any(memory_holds(s.pid, [token])) for s in spares for token in sessions]
    assert sum(in_spares) >= PREWARM  # each spare holds its own session: the scan does find things

    # a cold start for a model takes a spare: nothing starts on the request path
    trust = d.local_trust_anchors()
    owner, user = ModelOwner(info, trust=trust), ModelUser(info, trust=trust)
    try:
        owner.register()
        user.register()
        onnx, inputs, expected = tiny_model()
        owner.publish("tiny", onnx)
        owner.grant("tiny", user.id)
        user.request_access("tiny")
        got = user.infer("tiny", inputs)
        np.testing.assert_allclose(got["y"], expected, rtol=1e-5)
    finally:
        owner.close()
        user.close()
    serving = platform.instances(TEE_FUNCTION)
    assert len(serving) == 1 and serving[0].prewarmed and serving[0].pid in {s.pid for s in spares}
    m = platform.metrics(TEE_FUNCTION)
    assert m["prewarm_hits"] == 1 and m["cold_starts"] == 1
    # the pool refills in the background (a new fork, a new attestation)
    assert wait_until(ready_spares, 60)
    assert wait_until(lambda: len(proxy.attests) == PREWARM + 1, 30)
    # the idle cost is billed apart: two spares and the template at the function's memory
    m = platform.metrics(TEE_FUNCTION)
    assert m["prewarm_gb_seconds"] > 0
    assert m["prewarm_gb_s_per_hour"] == pytest.approx((PREWARM + 1) * d.tee_spec.memory_mb / 1024 * 3600)
