"""The OpenWhisk action protocol, spoken directly to a runtime subprocess (`python -m veil.runtime`
on VEIL_PORT), as OpenWhisk's invoker (or Knative, or the local platform) would.

`/run` failures are application errors: HTTP 200 with `{"error": {"code", "message", "status"}}`
(OpenWhisk destroys a container that answers /run with anything but 200); `/init` failures keep
their HTTP status. test_openwhisk_invoker.py drives the exact bodies of OpenWhisk's invoker."""

from __future__ import annotations

import contextlib
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest
from e2e_support import assert_matches_reference, error_of, python_env, wait_until

from veil.crypto.encoding import b64e
from veil.crypto.envelope import Envelope, open_envelope
from veil.deployment import free_port
from veil.runtime import tensors

SENTINEL = "XXX_THE_END_OF_A_WHISK_ACTIVATION_XXX"
LR = "breast-cancer-lr"
# the shape of OpenWhisk's guest API key (a well-known development default, not a secret)
OW_GUEST_KEY = (
    "23bc46b1-71f6-4ed5-8c54-816aa4f8c502:" + "123zO3xZCLrMN6v2BKK1dXYFpXlPkccOFqm12CdAsMgRU4VrNZ9lyGVCGuMDGIwP"
)


@dataclass
class Runtime:
    proc: subprocess.Popen
    url: str
    stdout: Path
    stderr: Path
    http: httpx.Client

    def post(self, path: str, body: object) -> httpx.Response:
        if isinstance(body, bytes):
            return self.http.post(path, content=body, headers={"content-type": "application/json"})
        return self.http.post(path, json=body)

    def sentinels(self) -> tuple[int, int]:
        return _count(self.stdout), _count(self.stderr)

    def last_lines(self) -> tuple[str, str]:
        return _last(self.stdout), _last(self.stderr)


def _count(path: Path) -> int:
    return sum(1 for line in path.read_text(errors="replace").splitlines() if line == SENTINEL)


def _last(path: Path) -> str:
    lines = [line for line in path.read_text(errors="replace").splitlines() if line.strip()]
    return lines[-1] if lines else ""


@contextlib.contextmanager
def _start_runtime(stack, tmp_path: Path, **extra_env: str) -> Iterator[Runtime]:
    """A fresh, uninitialised runtime process (stdout and stderr to separate files)."""
    port = free_port()
    out, err = tmp_path / "stdout.log", tmp_path / "stderr.log"
    env = python_env(
        VEIL_PORT=str(port),
        VEIL_SIM_ROOT=str(stack.deployment.keyservice_dir / "sim-root.key"),
        VEIL_THREADS="4",
        **extra_env,
    )
    with out.open("wb") as fo, err.open("wb") as fe:
        proc = subprocess.Popen(
            [sys.executable, "-m", "veil.runtime"], env=env, stdout=fo, stderr=fe, stdin=subprocess.DEVNULL
        )
    url = f"http://127.0.0.1:{port}"
    http = httpx.Client(base_url=url, timeout=30.0)
    try:

        def up() -> bool:
            assert proc.poll() is None, f"runtime exited with {proc.returncode}: {err.read_text()[-2000:]}"
            try:
                return http.get("/healthz", timeout=1.0).status_code == 200
            except httpx.HTTPError:
                return False

        assert wait_until(up, timeout=30), "runtime did not answer on its port within 30 s"
        yield Runtime(proc, url, out, err, http)
    finally:
        http.close()
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=10)
        # whatever the runtime printed must not contain any secret either
        for f in (out, err):
            data = f.read_bytes()
            leaked = [label for label, needle in stack.secrets.needles.items() if needle in data]
            assert not leaked, f"{f.name} contains {leaked}"


@pytest.fixture
def runtime(stack, tmp_path) -> Iterator[Runtime]:
    with _start_runtime(stack, tmp_path) as r:
        yield r


def _init_value(stack, **extra) -> dict:
    return {
        "kind": "tee",
        "keyservice_url": stack.info.keyservice_url,
        "store": str(stack.deployment.store_dir),
        **extra,
    }


def _activation(value: dict) -> dict:
    """A /run body as OpenWhisk's invoker sends it."""
    return {
        "value": value,
        "activation_id": uuid.uuid4().hex,
        "transaction_id": uuid.uuid4().hex,
        "action_name": "/guest/veil-tee",
        "action_version": "0.0.1",
        "namespace": "guest",
        "deadline": str(int(time.time() * 1000) + 60_000),
        "api_key": OW_GUEST_KEY,
    }


def run_error(r: httpx.Response) -> tuple[int, dict[str, str]]:
    """(status, error) of a failed /run: answered 200, the status inside the error object."""
    assert r.status_code == 200, r.text
    err = error_of(r)
    assert isinstance(err.get("status"), int), err
    return err["status"], err


def _wait_sentinels(rt: Runtime, n: int) -> tuple[int, int]:
    """The sentinel is printed after the reply is sent: wait (bounded) for both streams."""
    return wait_until(lambda: rt.sentinels() if rt.sentinels() == (n, n) else None, timeout=10) or rt.sentinels()


def test_run_before_init_is_refused(runtime):
    r = runtime.post("/run", _activation({"op": "stats"}))
    status, err = run_error(r)
    assert status == 403 and err["code"] == "not_initialized" and "/init" in err["message"], err
    assert runtime.http.get("/healthz").json() == {"ok": True, "initialized": False}
    # refused before admission, and still an activation: both end markers follow it
    assert _wait_sentinels(runtime, 1) == (1, 1)


def test_init_once_then_refused(stack, runtime):
    r = runtime.post("/init", {"value": _init_value(stack)})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["ok"] is True and body["kind"] == "tee"
    assert body["measurement"] == stack.measurement  # the genuine runtime attested
    assert runtime.http.get("/healthz").json()["initialized"] is True

    for value in (_init_value(stack), {"kind": "he", "store": "/tmp"}):
        r = runtime.post("/init", {"value": value})
        assert r.status_code == 403, r.text
        err = error_of(r)
        assert err["code"] == "already_initialized" and "more than once" in err["message"], err
    # still serving after the refused re-inits
    assert runtime.post("/run", _activation({"op": "stats"})).status_code == 200


def test_activation_in_openwhisk_shape_is_served_and_ends_with_sentinels(stack, runtime):
    assert runtime.post("/init", {"value": _init_value(stack)}).status_code == 200
    model = stack.models[LR]
    before = _wait_sentinels(runtime, 0)
    assert before == (0, 0), "sentinels printed before any activation"

    for n, rows in enumerate((slice(0, 1), slice(1, 5)), start=1):
        x = model.x_test[rows]
        stack.secrets.tensors(f"input {LR}", {"input": x})
        rid, env = stack.user.sealed_request(LR, {"input": x})
        r = runtime.post("/run", _activation({"envelope": env}))
        assert r.status_code == 200, r.text
        assert r.headers["content-type"] == "application/json"
        body = r.json()
        assert set(body) == {"envelope"}  # timings travel only inside the envelope, when asked for
        answer = Envelope.from_json(body["envelope"])
        out = tensors.decode(
            open_envelope(
                stack.user.request_keys[LR], answer, model=LR, user=stack.user.id, direction="response", request_id=rid
            )
        )
        stack.secrets.tensors(f"output {LR}", out)
        assert_matches_reference(model, x, out)
        assert _wait_sentinels(runtime, n) == (n, n)
        assert runtime.last_lines() == (SENTINEL, SENTINEL)

    # an activation that fails in the action is still an activation: error body, then sentinels
    r = runtime.post("/run", _activation({"nonsense": 1}))
    status, err = run_error(r)
    assert status == 400 and err["code"] == "malformed"
    assert _wait_sentinels(runtime, 3) == (3, 3)
    assert runtime.last_lines() == (SENTINEL, SENTINEL)


def test_malformed_json_is_a_400_json_error(stack, runtime):
    bodies = (b"{not json", b"[1, 2]", b'{"value": 5}', b'{"value": "x"}')
    for body in bodies:
        r = runtime.post("/init", body)
        assert r.status_code == 400, (body, r.text)
        assert r.headers["content-type"] == "application/json"
        assert error_of(r)["code"] == "malformed", body
        r = runtime.post("/run", body)
        assert r.headers["content-type"] == "application/json"
        assert run_error(r)[0] == 400 and error_of(r)["code"] == "malformed", body
    # every /run, even one whose body did not parse, is followed by its end markers
    assert _wait_sentinels(runtime, len(bodies)) == (len(bodies), len(bodies))
    # nothing of that initialised the action; a good init still works
    assert runtime.http.get("/healthz").json()["initialized"] is False
    assert runtime.post("/init", {"value": _init_value(stack)}).status_code == 200
    r = runtime.post("/run", b"{oops")
    assert run_error(r)[0] == 400 and error_of(r)["code"] == "malformed"
    r = runtime.post("/run", _activation({"op": "stats"}))
    assert r.status_code == 200 and "error" not in r.json()


@pytest.mark.parametrize(
    ("value", "status", "code", "words"),
    [
        ({"kind": "nope"}, 400, "bad_init", ["kind"]),
        ({"kind": "tee", "store": "/tmp"}, 400, "bad_init", ["init.keyservice_url"]),
        ({"kind": "tee", "keyservice_url": "http://127.0.0.1:9"}, 400, "bad_init", ["init.store"]),
        ("bad-cache", 400, "bad_init", ["init.model_cache_mb"]),
        ("no-keyservice", 503, "keyservice_unavailable", ["unreachable"]),
        ("missing-store-dir", 503, "no_store", ["does not exist"]),
        ("store-service-down", 503, "no_store", ["unreachable", "veil store serve"]),
        ({"kind": "tee", "keyservice_url": "http://127.0.0.1:9", "store": "s3://b/p"}, 400, "bad_init", ["s3://"]),
    ],
    ids=[
        "kind",
        "no-keyservice-url",
        "no-store",
        "bad-cache",
        "keyservice-unreachable",
        "missing-store-dir",
        "store-service-down",
        "s3-store",
    ],
)
def test_bad_init_is_a_clear_error_and_leaves_the_action_uninitialised(stack, runtime, value, status, code, words):
    if value == "bad-cache":
        value = _init_value(stack, model_cache_mb="lots")
    elif value == "no-keyservice":
        value = _init_value(stack, keyservice_url=f"http://127.0.0.1:{free_port()}")
    elif value == "missing-store-dir":
        value = _init_value(stack, store=str(stack.deployment.root / "no-such-store"))
    elif value == "store-service-down":
        value = _init_value(stack, store=f"http://127.0.0.1:{free_port()}")
    t0 = time.monotonic()
    r = runtime.post("/init", {"value": value})
    assert time.monotonic() - t0 < 15, "a bad init must fail fast"
    assert r.status_code == status, r.text
    err = error_of(r)
    assert err["code"] == code, err
    for word in words:
        assert word in err["message"], (word, err)
    assert runtime.http.get("/healthz").json()["initialized"] is False
    assert run_error(runtime.post("/run", _activation({"op": "stats"})))[0] == 403
    # a correct init afterwards is accepted
    assert runtime.post("/init", {"value": _init_value(stack)}).status_code == 200
    assert runtime.post("/run", _activation({"op": "stats"})).status_code == 200


@pytest.fixture
def runtime_with_bench_switches(stack, tmp_path) -> Iterator[Runtime]:
    """A runtime whose operator set every switch the old benchmark-only plaintext path read."""
    with _start_runtime(stack, tmp_path, VEIL_BENCH_ALLOW_PLAINTEXT="1") as r:
        yield r


def test_no_init_or_environment_setting_gives_a_plaintext_answer(stack, runtime_with_bench_switches):
    """The measured runtime has no plaintext path: whatever `/init` and the environment say, a
    plaintext request for a granted user's model is refused and returns no prediction."""
    runtime = runtime_with_bench_switches
    init = _init_value(stack, allow_plaintext=True, copies_per_thread=True)
    assert runtime.post("/init", {"value": init}).status_code == 200
    x = stack.models[LR].x_test[:1]
    encoded = b64e(tensors.encode({"input": x}))
    for value in (
        {"plain": {"model": LR, "user": stack.user.id, "tensors": encoded}},
        {"op": "plain", "model": LR, "user": stack.user.id, "tensors": encoded},
        {"model": LR, "user": stack.user.id, "tensors": encoded},
    ):
        r = runtime.post("/run", _activation(value))
        assert run_error(r)[0] == 400, r.text
        assert error_of(r)["code"] == "malformed"
        assert "tensors" not in r.json() and "envelope" not in r.json()


def test_unknown_paths_and_methods(runtime):
    assert runtime.http.get("/nope").status_code == 404
    r = runtime.post("/nope", {"value": {}})
    assert r.status_code == 404 and error_of(r)["code"] == "not_found"
