"""What a real runtime process loads is inside what its measurement covers.

A runtime (`python -m veil.runtime`, run through `runpy` by a small wrapper that only records
`sys.modules` at exit; nothing is added to the measured program) is initialised for TEE mode and
serves a real encrypted request, and another is initialised for HE mode and serves real CKKS
requests. Every Veil module either process loaded must be a measured file, and every loaded
third-party module must come from a measured distribution: a module outside the measured set
would be code that runs in the enclave without the owner or user having approved it.
"""

from __future__ import annotations

import csv
import io
import json
import os
import signal
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
from e2e_support import assert_matches_reference, python_env, wait_until

import veil
from veil.attest import measurement
from veil.attest.measurement import Closure, closure
from veil.crypto.envelope import Envelope, open_envelope
from veil.deployment import free_port
from veil.he.errors import HEError
from veil.runtime import tensors

LR = "breast-cancer-lr"
VEIL_ROOT = Path(veil.__file__).resolve().parent
# The wrapper: run the runtime exactly as `python -m veil.runtime` would, and at exit write every
# loaded module and its file. SIGTERM becomes SystemExit so that atexit runs.
WRAPPER = """
import atexit, json, runpy, signal, sys
out = sys.argv.pop(1)
def dump():
    mods = {name: getattr(m, "__file__", None) for name, m in list(sys.modules.items())}
    with open(out, "w") as f:
        json.dump(mods, f)
atexit.register(dump)
signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
runpy.run_module("veil.runtime", run_name="__main__", alter_sys=True)
"""
DEV_MODULES = (
    "veil.cli",
    "veil.sdk",
    "veil.gateway",
    "veil.platform",
    "veil.packer",
    "veil.deployment",
    "veil.he.compile",
    "veil.he.compiler",
    "veil.he.approx",
    "veil.he.bounds",
    "veil.he.fusion",
    "veil.he.train",
    "veil.he.tasks",
    "veil.he.demo",
    "veil.he.client",
    "veil.store.client",
    "veil.store.server",
    "veil.store.s3",
)


@dataclass
class Process:
    proc: subprocess.Popen
    http: httpx.Client
    modules_file: Path
    logs: tuple[Path, Path]

    def run(self, value: dict[str, Any]) -> httpx.Response:
        return self.http.post("/run", json={"value": value})

    def loaded_modules(self) -> dict[str, str | None]:
        """Stop the process (SIGTERM: the wrapper exits cleanly) and read what it had loaded."""
        self.proc.send_signal(signal.SIGTERM)
        self.proc.wait(timeout=30)
        assert self.modules_file.exists(), f"the runtime wrote no module list: {self.logs[1].read_text()[-2000:]}"
        return json.loads(self.modules_file.read_text())


@pytest.fixture(scope="module")
def measured() -> Closure:
    return closure("runtime")


@pytest.fixture
def start_runtime(stack, tmp_path) -> Iterator[Any]:
    started: list[Process] = []

    def start(name: str) -> Process:
        port = free_port()
        out, err = tmp_path / f"{name}.stdout", tmp_path / f"{name}.stderr"
        modules_file = tmp_path / f"{name}.modules.json"
        env = python_env(
            VEIL_PORT=str(port), VEIL_SIM_ROOT=str(stack.deployment.keyservice_dir / "sim-root.key"), VEIL_THREADS="4"
        )
        with out.open("wb") as fo, err.open("wb") as fe:
            proc = subprocess.Popen(
                [sys.executable, "-c", WRAPPER, str(modules_file)],
                env=env,
                stdout=fo,
                stderr=fe,
                stdin=subprocess.DEVNULL,
            )
        http = httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=120.0)
        p = Process(proc, http, modules_file, (out, err))
        started.append(p)

        def up() -> bool:
            assert proc.poll() is None, f"runtime exited with {proc.returncode}: {err.read_text()[-2000:]}"
            try:
                return http.get("/healthz", timeout=1.0).status_code == 200
            except httpx.HTTPError:
                return False

        assert wait_until(up, timeout=60), "runtime did not answer on its port within 60 s"
        return p

    yield start
    for p in started:
        p.http.close()
        if p.proc.poll() is None:
            p.proc.kill()
            p.proc.wait(timeout=10)
        for log in p.logs:
            data = log.read_bytes()
            leaked = [label for label, needle in stack.secrets.needles.items() if needle in data]
            assert not leaked, f"{log.name} contains {leaked}"


def _file_owners(files: set[str]) -> dict[str, str]:
    """resolved file path -> normalized name of the installed distribution whose RECORD lists it."""
    wanted = {os.path.realpath(f) for f in files}
    owners: dict[str, str] = {}
    for dist in metadata.distributions():
        record = dist.read_text("RECORD")
        if not record:
            continue
        base = str(dist.locate_file(""))
        name = measurement._normalize(dist.metadata["Name"])
        for row in csv.reader(io.StringIO(record)):
            if row:
                path = os.path.realpath(os.path.join(base, row[0]))
                if path in wanted:
                    owners.setdefault(path, name)
    return owners


def _outside_measurement(modules: dict[str, str | None], measured: Closure) -> list[str]:
    """Loaded modules the measurement does not cover (empty when all is measured)."""
    problems = []
    third_party: dict[str, str] = {}
    for name, file in sorted(modules.items()):
        top = name.partition(".")[0]
        if top in ("__main__", "__mp_main__") or (top in sys.stdlib_module_names and top != "veil"):
            continue
        if file is None:  # built in, a namespace package, or made by an extension module (no code)
            continue
        if top == "veil":
            path = Path(file).resolve()
            if not path.is_relative_to(VEIL_ROOT):
                problems.append(f"{name}: loaded from {file}, outside the measured package")
            elif path.relative_to(VEIL_ROOT).as_posix() not in measured.files:
                problems.append(f"{name}: {path.relative_to(VEIL_ROOT)} is not in the measured files")
            continue
        third_party[name] = file
    owners = _file_owners(set(third_party.values()))
    for name, file in third_party.items():
        owner = owners.get(os.path.realpath(file))
        if owner is None:
            if name.partition(".")[0] not in measured.unowned:
                problems.append(f"{name}: {file} belongs to no installed distribution and is not measured")
        elif owner not in measured.distributions:
            problems.append(f"{name}: from distribution {owner}, which is not measured")
    return problems


def _no_dev_code(modules: dict[str, str | None], measured: Closure) -> None:
    for name in [*modules, *measured.modules]:
        assert not any(name == d or name.startswith(d + ".") for d in DEV_MODULES), name


def test_tee_runtime_loads_only_measured_code(stack, start_runtime, measured):
    rt = start_runtime("tee")
    init = {"kind": "tee", "keyservice_url": stack.info.keyservice_url, "store": str(stack.deployment.store_dir)}
    r = rt.http.post("/init", json={"value": init})
    assert r.status_code == 200, r.text
    # the runtime attested with the very measurement of the closure this test checks against
    assert r.json()["measurement"] == measured.digest()

    model = stack.models[LR]
    x = model.x_test[:3]
    stack.secrets.tensors(f"input {LR}", {"input": x})
    rid, env = stack.user.sealed_request(LR, {"input": x})
    r = rt.run({"envelope": env})
    assert r.status_code == 200, r.text
    answer = Envelope.from_json(r.json()["envelope"])
    key = stack.user.request_keys[LR]
    out = tensors.decode(open_envelope(key, answer, model=LR, user=stack.user.id, direction="response", request_id=rid))
    stack.secrets.tensors(f"output {LR}", out)
    assert_matches_reference(model, x, out)

    modules = rt.loaded_modules()
    assert "veil.runtime.tee_action" in modules and "onnxruntime" in modules  # it did the work
    assert _outside_measurement(modules, measured) == []
    _no_dev_code(modules, measured)


class _RuntimeTransport:
    """HE requests straight to a runtime's /run, as the gateway would forward them."""

    def __init__(self, rt: Process) -> None:
        self.rt = rt

    def _run(self, value: dict[str, Any]) -> dict[str, Any]:
        r = self.rt.run(value)
        body = r.json()
        if r.status_code >= 400 or "error" in body:  # failures are 200 with error.status
            err = body.get("error", {})
            raise HEError(str(err.get("code")), str(err.get("message")), int(err.get("status", r.status_code)))
        return body

    def upload_keys(self, body: dict[str, Any]) -> dict[str, Any]:
        return self._run({**body, "op": "upload_keys"})

    def infer(self, model: str, body: dict[str, Any]) -> dict[str, Any]:
        return self._run({**body, "op": "infer", "model": model})


def test_he_runtime_loads_only_measured_code(start_runtime, measured, tmp_path):
    # owner side (dev code, in this process only): compile and publish two HE models
    from veil.he import store
    from veil.he.client import HEClient, RemoteModel
    from veil.he.compile import compile_model
    from veil.he.tasks import breast_cancer_lr, digits_mlp

    he_store = tmp_path / "store"
    tasks = {"he-lr": breast_cancer_lr(), "he-mlp": digits_mlp()}
    compiled = {name: compile_model(t.model, t.x_train, name=name) for name, t in tasks.items()}
    for name, c in compiled.items():
        store.publish(he_store, name, c)

    rt = start_runtime("he")
    r = rt.http.post("/init", json={"value": {"kind": "he", "store": str(he_store)}})
    assert r.status_code == 200, r.text
    for name, packings in (("he-lr", ("latency", "throughput")), ("he-mlp", ("latency",))):
        remote = RemoteModel(HEClient(store.client_spec(he_store, name)), _RuntimeTransport(rt), name)
        x = tasks[name].x_test[:4]
        for packing in packings:
            result = remote.infer(x, packing=packing)
            assert np.max(np.abs(result.scores - compiled[name].predict_plain(x))) <= 1e-3

    modules = rt.loaded_modules()
    assert "veil.he.action" in modules and "tenseal" in modules  # it did the work
    assert _outside_measurement(modules, measured) == []
    _no_dev_code(modules, measured)
