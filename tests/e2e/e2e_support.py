"""Shared helpers of the end-to-end tests (the fixtures live in conftest.py)."""

from __future__ import annotations

import os
import sys
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import numpy as np

from veil.crypto import chunked
from veil.crypto.encoding import b64e
from veil.crypto.keys import SymmetricKey
from veil.deployment import TEE_FUNCTION, LocalDeployment, StackOptions
from veil.errors import VeilError
from veil.runtime import tensors
from veil.sdk import ModelOwner, ModelUser

# HTTP timeout of every SDK client in these tests: a hang fails the test instead of blocking it.
CLIENT_TIMEOUT_S = 60.0


# -- secrets the scan looks for -------------------------------------------------------------------


@dataclass
class Secrets:
    """Everything secret a test touched: the leak scan looks for each of these in cloud/."""

    needles: dict[str, bytes] = field(default_factory=dict)

    def key(self, label: str, key: SymmetricKey) -> None:
        raw = key.material()
        self.needles[f"{label} (raw)"] = raw
        self.needles[f"{label} (base64url)"] = b64e(raw).encode()
        self.needles[f"{label} (hex)"] = raw.hex().encode()

    def blob(self, label: str, data: bytes) -> None:
        """A plaintext (tensor bytes, model slice); kept only if distinctive enough to be a
        meaningful needle (a run of zeros would 'occur' in every SQLite page)."""
        if len(data) >= 16 and len(set(data)) >= 8:
            self.needles[label] = bytes(data)

    def tensors(self, label: str, named: dict[str, np.ndarray]) -> None:
        self.blob(f"{label} (encoded)", tensors.encode(named))
        for name, arr in named.items():
            self.blob(f"{label} {name} (raw)", np.ascontiguousarray(arr).tobytes())

    def model(self, label: str, onnx: bytes, slices: int = 6, width: int = 64) -> None:
        """The whole model and several distinctive slices spread over it (weights, graph)."""
        self.needles[f"{label} onnx (whole)"] = onnx
        found = 0
        for i in range(slices * 4):
            start = (len(onnx) - width) * i // (slices * 4)
            part = onnx[start : start + width]
            if len(set(part)) >= 24:
                self.needles[f"{label} onnx [{start}:{start + width}]"] = part
                found += 1
                if found == slices:
                    break
        assert found >= 3, f"{label}: the ONNX file has too few distinctive slices to scan for"


def scan(root: Path, needles: dict[str, bytes]) -> tuple[dict[str, list[str]], int, int]:
    """(needle label -> files containing it, files scanned, bytes scanned)."""
    found: dict[str, list[str]] = {}
    files = size = 0
    for f in sorted(root.rglob("*")):
        if not f.is_file():
            continue
        try:
            data = f.read_bytes()
        except FileNotFoundError:  # a WAL or temporary upload that went away under us
            continue
        files += 1
        size += len(data)
        for label, needle in needles.items():
            if needle in data:
                found.setdefault(label, []).append(str(f.relative_to(root)))
    return found, files, size


# -- models --------------------------------------------------------------------------------------


@dataclass
class Model:
    model_id: str
    onnx: bytes
    x_test: np.ndarray
    y_test: np.ndarray
    _session: Any = None

    def reference(self, x: np.ndarray) -> dict[str, np.ndarray]:
        """Plain ONNX Runtime on the same bytes: the ground truth for Veil's answers."""
        import onnxruntime as ort

        if self._session is None:
            self._session = ort.InferenceSession(self.onnx, providers=["CPUExecutionProvider"])
        names = [o.name for o in self._session.get_outputs()]
        return dict(zip(names, self._session.run(names, {"input": x}), strict=True))


def assert_matches_reference(model: Model, x: np.ndarray, got: dict[str, np.ndarray]) -> None:
    want = model.reference(x)
    assert sorted(got) == sorted(want), f"{model.model_id}: outputs {sorted(got)} != {sorted(want)}"
    for name, ref in want.items():
        out = got[name]
        assert out.dtype == ref.dtype and out.shape == ref.shape, (
            f"{model.model_id}.{name}: {out.dtype}{out.shape} != {ref.dtype}{ref.shape}"
        )
        if np.issubdtype(ref.dtype, np.floating):
            np.testing.assert_allclose(out, ref, rtol=1e-5, atol=1e-6, err_msg=f"{model.model_id}.{name}")
        else:
            np.testing.assert_array_equal(out, ref, err_msg=f"{model.model_id}.{name}")


# -- deployments ----------------------------------------------------------------------------------


@dataclass
class Stack:
    """A running deployment with an owner and a user who can use its published models."""

    deployment: LocalDeployment
    owner: ModelOwner
    user: ModelUser
    models: dict[str, Model]
    model_keys: dict[str, SymmetricKey]
    secrets: Secrets
    principals: list = field(default_factory=list)
    revocation_delay_s: int | None = None

    @property
    def info(self):
        return self.deployment.info

    @property
    def platform(self):
        return self.deployment.platform

    @property
    def trust(self):
        """The clients' own trust anchors in these tests: this code, this simulated TEE."""
        return self.deployment.local_trust_anchors()

    @property
    def measurement(self) -> str:
        return self.trust.runtime_measurements[0]

    def new_owner(self) -> ModelOwner:
        owner = ModelOwner(self.info, trust=self.trust, timeout=CLIENT_TIMEOUT_S)
        self.principals.append(owner)
        owner.register()
        return owner

    def new_user(self, models: list[str] | None = None, *, grant: bool = True, **access: Any) -> ModelUser:
        """A registered user, granted (by `owner`) and with request keys for `models`."""
        user = ModelUser(self.info, trust=self.trust, timeout=CLIENT_TIMEOUT_S)
        self.principals.append(user)
        user.register()
        for model_id in models if models is not None else list(self.models):
            if grant:
                self.owner.grant(model_id, user.id)
            user.request_access(model_id, **access)
            self.secrets.key(f"request key {user.id[:8]}/{model_id}", user.request_keys[model_id])
        return user

    def publish(
        self,
        model_id: str,
        onnx: bytes,
        *,
        key: SymmetricKey | None = None,
        measurements: list[str] | None = None,
        owner: ModelOwner | None = None,
        revocation_delay_s: int | None = None,
    ) -> SymmetricKey:
        """ModelOwner.publish, with a model key the test knows: stage, seal, signed upload, commit."""
        owner = owner or self.owner
        key = key or SymmetricKey.generate()
        self.model_keys[model_id] = key
        self.secrets.key(f"model key {model_id}", key)
        version = owner.keyservice.stage_version(
            model_id,
            key,
            chunked.content_digest(key, onnx),
            measurements=measurements if measurements is not None else self.trust.runtime_measurements,
            revocation_delay_s=revocation_delay_s if revocation_delay_s is not None else self.revocation_delay_s,
        )
        owner.upload_sealed(model_id, version, chunked.seal_bytes(key, onnx, model=model_id, version=version))
        owner.keyservice.commit_version(model_id, version)
        return key

    def infer(self, user: ModelUser, model_id: str, x: np.ndarray) -> dict[str, np.ndarray]:
        """user.infer, recording the plaintext input and output for the leak scan."""
        self.secrets.tensors(f"input {model_id}", {"input": x})
        out = user.infer(model_id, x)
        self.secrets.tensors(f"output {model_id}", out)
        return out

    def tee_instances(self) -> list:
        return [i for i in self.platform.instances(TEE_FUNCTION) if i.state in ("ready", "starting")]

    def instance_stats(self) -> dict[str, dict]:
        """The runtime's own cache statistics, per live instance of the TEE function."""
        out = {}
        for inst in self.tee_instances():
            if inst.state == "ready":
                out[inst.id] = self.platform.invoke_instance(TEE_FUNCTION, inst.id, {"op": "stats"}, timeout=10)
        return out

    def close(self) -> None:
        for p in [self.owner, self.user, *self.principals]:
            p.close()
        self.deployment.stop()


def start_stack(
    root: Path, models: dict[str, Model], secrets: Secrets, *, revocation_delay_s: int | None = None, **options: Any
) -> Stack:
    options.setdefault("he", False)
    deployment = LocalDeployment(root, StackOptions(**options))
    info = deployment.start()
    try:
        owner = ModelOwner(info, trust=deployment.local_trust_anchors(), timeout=CLIENT_TIMEOUT_S)
        owner.register()
        stack = Stack(deployment, owner, None, models, {}, secrets, revocation_delay_s=revocation_delay_s)  # type: ignore[arg-type]
        for m in models.values():
            stack.publish(m.model_id, m.onnx)
            secrets.model(m.model_id, m.onnx)
        stack.user = stack.new_user()
        stack.principals.remove(stack.user)
        return stack
    except BaseException:
        deployment.stop()
        raise


# -- helpers --------------------------------------------------------------------------------------


def wait_until(cond: Callable[[], Any], timeout: float, interval: float = 0.05) -> Any:
    """Poll `cond` until truthy (returns its value) or `timeout` seconds pass (returns the last)."""
    deadline = time.monotonic() + timeout
    while True:
        value = cond()
        if value or time.monotonic() >= deadline:
            return value
        time.sleep(interval)


def gateway_post(stack: Stack, path: str, body: Any, timeout: float = 30.0) -> httpx.Response:
    """A raw POST to the gateway (for hand-made, tampered or replayed envelopes)."""
    with httpx.Client(base_url=stack.info.gateway_url, timeout=timeout) as client:
        if isinstance(body, bytes):
            return client.post(path, content=body, headers={"content-type": "application/json"})
        return client.post(path, json=body)


def error_of(response: httpx.Response) -> dict[str, str]:
    """The `{"code", "message"}` of an error answer (asserting the standard shape)."""
    body = response.json()
    assert isinstance(body, dict) and isinstance(body.get("error"), dict), body
    err = body["error"]
    assert isinstance(err.get("code"), str) and isinstance(err.get("message"), str) and err["message"], err
    return err


def run_concurrently(fns: list[Callable[[], Any]], timeout: float) -> list[tuple[str, Any]]:
    """Run all at once; [("ok", value) | ("error", VeilError)] in order. Fails if any hangs
    past `timeout` or raises anything but a VeilError."""
    import threading

    barrier = threading.Barrier(len(fns))

    def call(fn: Callable[[], Any]) -> tuple[str, Any]:
        barrier.wait(timeout=timeout)
        try:
            return "ok", fn()
        except VeilError as exc:
            return "error", exc

    with ThreadPoolExecutor(max_workers=len(fns)) as pool:
        futures = [pool.submit(call, fn) for fn in fns]
        deadline = time.monotonic() + timeout
        return [f.result(timeout=max(0.0, deadline - time.monotonic())) for f in futures]


def python_env(**extra: str) -> dict[str, str]:
    env = dict(os.environ)
    env.update(extra)
    return env


PYTHON = sys.executable
