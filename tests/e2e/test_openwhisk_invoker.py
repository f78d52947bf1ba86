"""The runtime driven exactly as OpenWhisk's invoker drives a blackbox action, and started as
Knative starts it.

OpenWhisk (docs/actions-new.md "Action interface"; `WhiskAction.containerInitializer`,
`ContainerProxy.initializeAndRun`, `Container.run`): the container gets `__OW_API_HOST` in its
environment; `/init` receives `{"value": {"name", "binary", "main"[, "code"], "env"}}` where `env`
holds the action's init parameters (strings) and the first activation's `__OW_*` context; each
`/run` receives `{"value": <parameters>, "namespace", "action_name", "action_version",
"activation_id", "transaction_id", "deadline", "api_key"}`. Any /run answer but 200 is taken for a
broken container (destroyed), so failures are 200 with `{"error": ...}`; both streams end each
activation with the sentinel line.

Knative: no /init call; the init value comes from VEIL_INIT in the container's environment.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import httpx
import pytest
from e2e_support import assert_matches_reference, python_env, wait_until

from veil.crypto.envelope import Envelope, open_envelope
from veil.deployment import free_port
from veil.runtime import tensors

SENTINEL = "XXX_THE_END_OF_A_WHISK_ACTIVATION_XXX"
LR = "breast-cancer-lr"
GUEST_KEY = "23bc46b1-71f6-4ed5-8c54-816aa4f8c502:" + "123zO3xZCLrMN6v2BKK1dXYFpXlPkccOFqm12CdAsMgRU4VrNZ9lyGVCGuMDGIwP"


class Container:
    """A runtime process with OpenWhisk's container environment, stdout/stderr in files."""

    def __init__(self, proc: subprocess.Popen, port: int, out: Path, err: Path) -> None:
        self.proc, self.out, self.err = proc, out, err
        self.http = httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=60)

    def sentinels(self) -> tuple[int, int]:
        count = lambda p: sum(1 for line in p.read_text(errors="replace").splitlines() if line == SENTINEL)  # noqa: E731
        return count(self.out), count(self.err)

    def wait_sentinels(self, n: int) -> tuple[int, int]:
        return wait_until(lambda: self.sentinels() if self.sentinels() == (n, n) else None, 10) or self.sentinels()


@pytest.fixture
def start(tmp_path: Path) -> Iterator[Callable[..., Container]]:
    started: list[Container] = []

    def run(env: dict[str, str], *, wait: bool = True) -> Container:
        port = free_port()
        out, err = tmp_path / f"c{len(started)}.out", tmp_path / f"c{len(started)}.err"
        full = python_env(VEIL_PORT=str(port), VEIL_HOST="127.0.0.1", **env)
        for name in ("VEIL_SIM_ROOT", "VEIL_INIT"):  # only what this container is given
            if name not in env:
                full.pop(name, None)
        with out.open("wb") as fo, err.open("wb") as fe:
            proc = subprocess.Popen(
                [sys.executable, "-m", "veil.runtime"], env=full, stdout=fo, stderr=fe, stdin=subprocess.DEVNULL
            )
        c = Container(proc, port, out, err)
        started.append(c)
        if wait:

            def up() -> bool:
                assert proc.poll() is None, f"exited {proc.returncode}: {err.read_text()[-2000:]}"
                try:
                    return c.http.get("/healthz", timeout=1).status_code == 200
                except httpx.HTTPError:
                    return False

            assert wait_until(up, timeout=60)
        return c

    yield run
    for c in started:
        c.http.close()
        if c.proc.poll() is None:
            c.proc.terminate()
            c.proc.wait(timeout=10)


def _init_value(stack) -> dict:
    return {"kind": "tee", "keyservice_url": stack.info.keyservice_url, "store": str(stack.deployment.store_dir)}


def _ow_context(activation_id: str) -> dict[str, str]:
    """What ContainerProxy adds to /init's env: the first activation's context, `__OW_`-prefixed."""
    return {
        "__OW_API_KEY": GUEST_KEY,
        "__OW_NAMESPACE": "guest",
        "__OW_ACTION_NAME": "/guest/veil-tee",
        "__OW_ACTION_VERSION": "0.0.1",
        "__OW_ACTIVATION_ID": activation_id,
        "__OW_TRANSACTION_ID": uuid.uuid4().hex,
        "__OW_DEADLINE": str(int(time.time() * 1000) + 60_000),
    }


def _run_body(parameters: dict) -> dict:
    """Container.run: `{"value": parameters}` merged with the activation environment."""
    return {
        "value": parameters,
        "api_key": GUEST_KEY,
        "namespace": "guest",
        "action_name": "/guest/veil-tee",
        "action_version": "0.0.1",
        "activation_id": uuid.uuid4().hex,
        "transaction_id": uuid.uuid4().hex,
        "deadline": str(int(time.time() * 1000) + 60_000),
    }


def _infer(stack, c: Container, rows: slice) -> None:
    model = stack.models[LR]
    x = model.x_test[rows]
    stack.secrets.tensors(f"input {LR}", {"input": x})
    rid, env = stack.user.sealed_request(LR, {"input": x})
    r = c.http.post("/run", json=_run_body({"envelope": env}))
    assert r.status_code == 200 and "error" not in r.json(), r.text
    answer = Envelope.from_json(r.json()["envelope"])
    key = stack.user.request_keys[LR]
    out = tensors.decode(open_envelope(key, answer, model=LR, user=stack.user.id, direction="response", request_id=rid))
    stack.secrets.tensors(f"output {LR}", out)
    assert_matches_reference(model, x, out)


def test_the_invokers_init_and_run_bodies(stack, start):
    # the container's own environment has no init value and no simulation root: both arrive as
    # the action's init parameters, the way OpenWhiskClient.deploy_function sets them
    c = start({"__OW_API_HOST": "https://openwhisk.invalid"})
    init = {
        "value": {
            "name": "veil-tee",
            "binary": False,
            "main": "main",
            "env": {
                "VEIL_INIT": json.dumps(_init_value(stack), separators=(",", ":")),
                "VEIL_SIM_ROOT": str(stack.deployment.keyservice_dir / "sim-root.key"),
                "VEIL_THREADS": "2",
                **_ow_context(uuid.uuid4().hex),
            },
        }
    }
    r = c.http.post("/init", json=init)
    assert r.status_code == 200, r.text
    assert r.json()["measurement"] == stack.measurement
    assert c.sentinels() == (0, 0)  # /init is no activation

    _infer(stack, c, slice(0, 2))
    assert c.wait_sentinels(1) == (1, 1)
    # an application error: 200, the error object (with its status), and the container lives on
    r = c.http.post("/run", json=_run_body({"nonsense": True}))
    assert r.status_code == 200
    assert r.json()["error"]["code"] == "malformed" and r.json()["error"]["status"] == 400
    assert c.wait_sentinels(2) == (2, 2)
    stats = c.http.post("/run", json=_run_body({"op": "stats"}))
    assert stats.status_code == 200 and "error" not in stats.json()
    _infer(stack, c, slice(2, 5))
    assert c.wait_sentinels(4) == (4, 4)
    # the activation context of /init's env is not the later activations': nothing of it was kept
    assert c.proc.poll() is None
    # re-initialisation is refused, as the action interface asks
    again = c.http.post("/init", json=init)
    assert again.status_code == 403 and again.json()["error"]["code"] == "already_initialized"


def test_the_invokers_init_without_an_init_value_is_a_clear_init_error(stack, start):
    c = start({"__OW_API_HOST": "https://openwhisk.invalid"})
    r = c.http.post("/init", json={"value": {"name": "veil-tee", "binary": False, "main": "main", "code": ""}})
    assert r.status_code == 400
    err = r.json()["error"]
    assert err["code"] == "bad_init" and "VEIL_INIT" in err["message"]


def test_a_missing_simulation_root_is_an_init_error_and_none_is_created(stack, start, tmp_path):
    missing = tmp_path / "node-b" / "sim-root.key"
    c = start({"VEIL_SIM_ROOT": str(missing)})
    r = c.http.post("/init", json={"value": _init_value(stack)})
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert err["code"] == "bad_init" and "VEIL_SIM_ROOT" in err["message"] and "veil cluster join" in err["message"]
    assert not missing.exists() and not missing.parent.exists()


def test_knative_style_start_from_veil_init(stack, start):
    init = json.dumps(_init_value(stack))
    c = start({"VEIL_INIT": init, "VEIL_SIM_ROOT": str(stack.deployment.keyservice_dir / "sim-root.key")})
    assert c.http.get("/healthz").json() == {"ok": True, "initialized": True}  # attested before listening
    _infer(stack, c, slice(0, 1))
    # a platform's own /init afterwards (no value, or the same one) is accepted once
    r = c.http.post("/init", json={"value": {"name": "veil-tee", "binary": False, "main": "main"}})
    assert r.status_code == 200 and r.json()["preinitialized"] is True
    assert c.http.post("/init", json={"value": {}}).status_code == 403


@pytest.mark.parametrize(
    ("veil_init", "words"),
    [
        ('{"kind": "tee"}', "init.keyservice_url: required string"),  # what the old manifests set
        ("{not json", "VEIL_INIT: not valid JSON"),
    ],
    ids=["incomplete", "not-json"],
)
def test_a_bad_veil_init_exits_at_start_with_one_clear_line(start, veil_init, words):
    c = start({"VEIL_INIT": veil_init}, wait=False)
    assert c.proc.wait(timeout=60) == 2
    err = c.err.read_text()
    assert words in err and "Traceback" not in err, err


def test_the_shipped_openwhisk_action_document_initialises_a_runtime(stack, start):
    """deploy/openwhisk/action.yaml, turned into /init exactly as the invoker turns an action into
    its initializer (init parameters -> env, stringified), with only the addresses changed to
    this machine's (and the simulation root a development image would carry)."""
    import yaml

    doc = yaml.safe_load((Path(__file__).resolve().parents[2] / "deploy" / "openwhisk" / "action.yaml").read_text())
    action = doc["actions"]["veil-tee"]
    env = {
        p["key"]: p["value"] if isinstance(p["value"], str) else json.dumps(p["value"])
        for p in action["parameters"]
        if p.get("init")
    }
    init = json.loads(env["VEIL_INIT"])
    init.update(keyservice_url=stack.info.keyservice_url, store=str(stack.deployment.store_dir))
    env["VEIL_INIT"] = json.dumps(init)
    env["VEIL_SIM_ROOT"] = str(stack.deployment.keyservice_dir / "sim-root.key")
    c = start({"__OW_API_HOST": "https://openwhisk.invalid"})
    body = {"value": {"name": action["name"], "binary": False, "main": "main", "env": {**env, **_ow_context("0" * 32)}}}
    r = c.http.post("/init", json=body)
    assert r.status_code == 200, r.text
    _infer(stack, c, slice(0, 2))
    stats = c.http.post("/run", json=_run_body({"op": "stats"})).json()
    assert stats["model_cache_bytes"] <= init["model_cache_mb"] << 20
