"""Helpers of the runtime-core tests (fixtures in conftest.py): real ONNX models, a real model store in a temporary
directory holding files sealed with `chunked.seal_bytes`, the real `RuntimeCore`, and two small
stand-ins the core's own logic is tested against:

- `Clock`: a controllable clock (Unix seconds) for envelope windows and key-cache lifetimes;
- `Releases`: the KeyService's answers as `Release` objects (keys, current version and digest,
  the lifetime per user), counting the releases asked for.
"""

from __future__ import annotations

import io
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from veil.crypto import chunked
from veil.crypto.envelope import Envelope, new_request_id, open_envelope, seal
from veil.crypto.keys import SymmetricKey
from veil.errors import Forbidden
from veil.keyservice.client import Release
from veil.runtime import tensors
from veil.runtime.action_server import ActionServer, ActionState, make_handler
from veil.runtime.core import RuntimeCore
from veil.store import LocalModelStore

MODEL = "breast-cancer-lr"
START = 1_700_000_000.0


@dataclass(frozen=True)
class TrainedModels:
    v1: bytes  # logistic regression
    v2: bytes  # the same pipeline trained on the opposite labels: every prediction flips
    x: np.ndarray
    n_features: int


def _to_onnx(estimator: object, n_features: int) -> bytes:
    from skl2onnx import to_onnx
    from skl2onnx.common.data_types import FloatTensorType

    onx = to_onnx(
        estimator,
        initial_types=[("input", FloatTensorType([None, n_features]))],
        options={id(estimator): {"zipmap": False}},
        target_opset=17,
    )
    return onx.SerializeToString()


def train_models() -> TrainedModels:
    from sklearn.datasets import load_breast_cancer
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    x, y = load_breast_cancer(return_X_y=True)
    x = x.astype(np.float32)
    v1 = make_pipeline(StandardScaler(), LogisticRegression(max_iter=2000)).fit(x, y)
    v2 = make_pipeline(StandardScaler(), LogisticRegression(max_iter=2000)).fit(x, 1 - y)
    return TrainedModels(_to_onnx(v1, 30), _to_onnx(v2, 30), x[:8].copy(), 30)


class Clock:
    """Unix seconds that move only when told to."""

    def __init__(self, now: float = START) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


@dataclass
class Releases:
    """What the KeyService would release: per model its key and current (version, digest), per
    (model, user) the request key and the lifetime the owner/user settings give."""

    models: dict[str, tuple[SymmetricKey, int, str]] = field(default_factory=dict)
    users: dict[tuple[str, str], tuple[SymmetricKey, float]] = field(default_factory=dict)
    calls: list[tuple[str, str]] = field(default_factory=list)

    def release(self, model: str, user: str) -> Release:
        self.calls.append((model, user))
        if (model, user) not in self.users or model not in self.models:
            raise Forbidden(f"user {user!r} is not granted model {model!r}", code="not_granted")
        model_key, version, digest = self.models[model]
        request_key, ttl_s = self.users[(model, user)]
        return Release(model_key, request_key, version, digest, ttl_s)

    def count(self, model: str, user: str) -> int:
        return self.calls.count((model, user))


@dataclass
class Harness:
    """A real RuntimeCore on a real store, with the stand-ins above."""

    root: Path
    clock: Clock
    releases: Releases
    store: LocalModelStore
    core: RuntimeCore

    def publish(self, model: str, version: int, onnx: bytes, *, key: SymmetricKey | None = None) -> SymmetricKey:
        """Seal and store `onnx` as `version` and make it the version the KeyService releases."""
        key = key or (self.releases.models[model][0] if model in self.releases.models else SymmetricKey.generate())
        sealed = chunked.seal_bytes(key, onnx, model=model, version=version)
        self.store.put(model, version, io.BytesIO(sealed))
        self.releases.models[model] = (key, version, chunked.content_digest(key, onnx))
        return key

    def grant(self, model: str, user: str, *, ttl_s: float = 60.0) -> SymmetricKey:
        key = SymmetricKey.generate()
        self.releases.users[(model, user)] = (key, ttl_s)
        return key

    def request(
        self,
        model: str,
        user: str,
        inputs: dict[str, np.ndarray],
        *,
        request_id: str | None = None,
        expires: int | None = None,
        options: tensors.RequestOptions | None = None,
        key: SymmetricKey | None = None,
    ) -> dict[str, Any]:
        """A request envelope (JSON) as the SDK seals it, valid for 120 s of the harness clock."""
        key = key or self.releases.users[(model, user)][0]
        return seal(
            key,
            tensors.encode(inputs, options=options),
            model=model,
            user=user,
            request_id=request_id or new_request_id(),
            direction="request",
            expires=int(self.clock()) + 120 if expires is None else expires,
        ).to_json()

    def open_answer(self, request: dict[str, Any], answer: dict[str, Any]) -> bytes:
        """Open a response envelope as the user who sent `request` would."""
        key = self.releases.users[(request["model"], request["user"])][0]
        return open_envelope(
            key,
            Envelope.from_json(answer),
            model=request["model"],
            user=request["user"],
            direction="response",
            request_id=request["request_id"],
            expires=request["expires"],
        )

    def infer(self, model: str, user: str, inputs: dict[str, np.ndarray], **kw: Any) -> dict[str, np.ndarray]:
        env = self.request(model, user, inputs, **kw)
        return tensors.decode(self.open_answer(env, self.core.infer(env)["envelope"]))


def reference(onnx: bytes, x: np.ndarray) -> dict[str, np.ndarray]:
    """Plain ONNX Runtime on the same bytes: ground truth."""
    import onnxruntime as ort

    session = ort.InferenceSession(onnx, providers=["CPUExecutionProvider"])
    names = [o.name for o in session.get_outputs()]
    return dict(zip(names, session.run(names, {"input": x}), strict=True))


def refused(h: Harness, env: dict[str, Any]) -> tuple[str, str, int]:
    """Send `env`, expect an encrypted error: (detailed code, detailed message, status), after
    checking that only the code and the fixed message are in clear."""
    from veil.runtime.core import GENERIC_MESSAGE, EncryptedError

    try:
        h.core.infer(env)
    except EncryptedError as exc:
        clear = exc.to_json()["error"]
        assert set(clear) == {"code", "message", "envelope"} and clear["message"] == GENERIC_MESSAGE, clear
        code, message = tensors.decode_error(h.open_answer(env, clear["envelope"]))
        assert code == clear["code"] == exc.code
        return code, message, exc.status
    raise AssertionError("the request was served")


@contextmanager
def action_server(action: Any, threads: int, queue: int) -> Iterator[int]:
    """The real action server on a loopback port, serving `action` (any object with `run`)
    from `threads` workers with `queue` waiting; yields the port and shuts it down after."""
    state = ActionState(threads=threads, queue=queue)
    state.action = action
    srv = ActionServer(("127.0.0.1", 0), make_handler(state))
    thread = threading.Thread(target=srv.serve_forever, daemon=True)
    thread.start()
    try:
        yield srv.server_address[1]
    finally:
        srv.shutdown()
        srv.server_close()
