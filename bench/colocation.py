"""Three 400 MB models on 1 GiB instances are never co-located (issue 14's memory figure).

The real deployment (KeyService, gateway, Veil's packer, the local platform with memory
enforced, `python -m veil.runtime` instances) serves three models of 402.7 MB each (the large
MLP `bench/runtime.py` generates, published in ORT format: the runtime's resident set is about
1.24x a model's size when it loads that format), on instances of 1024 MB. Two of them would
need more than an instance has, so the packer must never place two on one instance: it plans
with the sealed size from the store, then the resident size it measured after the first load.

The check sends each model a cold request, then rounds of requests in mixed orders and
concurrently, and after each round asks every instance which models it holds (the runtime's
`op: stats`). It reports the most models any instance held, the out-of-memory stops, and
whether every answer matched NumPy's evaluation of the same weights. Used by
`veil bench chaos` (a phase after the soak) and by tests/runtime/test_colocation.py (slow).
"""

from __future__ import annotations

import hashlib
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))

from runtime import LARGE_DIM, LARGE_LAYERS, write_large_model  # noqa: E402

MODELS = ("big-a", "big-b", "big-c")


def reference(path: Path, x: np.ndarray) -> np.ndarray:
    """The model's answer computed with NumPy from its own initializers (MatMul, Relu)."""
    import onnx
    from onnx import numpy_helper

    model = onnx.load(str(path))
    weights = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
    y = x
    for i in range(LARGE_LAYERS):
        y = np.maximum(y @ weights[f"w{i}"], 0.0)
    return y


def _memo_to_ort() -> Callable[[], None]:
    """Convert the (identical) ONNX bytes to ORT format once for the three publishes: each
    publish still seals, uploads and commits its own model under its own key."""
    import veil.ort_format as ort_format

    original = ort_format.to_ort
    cache: dict[str, bytes] = {}

    def to_ort(data: bytes, *args: Any, **kwargs: Any) -> bytes:
        key = hashlib.sha256(data).hexdigest()
        if key not in cache:
            cache[key] = original(data, *args, **kwargs)
        return cache[key]

    ort_format.to_ort = to_ort
    return lambda: setattr(ort_format, "to_ort", original)


def colocation_check(workdir: Path, *, memory_mb: int = 1024, rounds: int = 3, echo=print) -> dict[str, Any]:
    from veil.deployment import TEE_FUNCTION, LocalDeployment, StackOptions
    from veil.sdk import ModelOwner, ModelUser

    t0 = time.monotonic()
    out: dict[str, Any] = {
        "what": "three models of 402.7 MB (ORT format) on instances of memory_mb through the gateway and "
        "Veil's packer; after every round each instance is asked which models it holds",
        "memory_mb": memory_mb,
        "models": list(MODELS),
    }
    opts = StackOptions(packer_policy="veil", he=False, memory_mb=memory_mb, concurrency=2, max_instances=len(MODELS))
    restore = _memo_to_ort()
    with tempfile.TemporaryDirectory(prefix="veil-colocation-") as tmp, LocalDeployment(workdir, opts) as d:
        path, inputs = write_large_model(Path(tmp))
        expected = reference(path, inputs["x"])
        out["model_bytes"] = path.stat().st_size
        out["enforcement"] = d.platform.memory_enforcement
        trust = d.local_trust_anchors()
        owner, user = ModelOwner(d.info, trust=trust), ModelUser(d.info, trust=trust)
        try:
            owner.register()
            user.register()
            for m in MODELS:
                echo(f"colocation: publishing {m} ({out['model_bytes'] / 1e6:.0f} MB, ORT format)")
                owner.publish(m, path, optimize=True)
                owner.grant(m, user.id)
                user.request_access(m)
            restore()
            answers: list[bool] = []
            errors: list[str] = []
            held: list[dict[str, list[str]]] = []
            lock = threading.Lock()

            def ask(m: str) -> None:
                try:
                    y = user.infer(m, inputs, deadline_s=60.0)["y"]
                    ok = bool(np.allclose(y, expected, rtol=1e-3, atol=1e-4))
                    with lock:
                        answers.append(ok)
                except Exception as exc:  # noqa: BLE001 - counted and reported
                    with lock:
                        errors.append(f"{type(exc).__name__}: {getattr(exc, 'code', '')} {exc}"[:200])

            def census() -> None:
                snapshot = {}
                for inst in d.platform.instances(TEE_FUNCTION):
                    if inst.state != "ready":
                        continue
                    stats = d.platform.invoke_instance(TEE_FUNCTION, inst.id, {"op": "stats"}, timeout=30)
                    snapshot[inst.id] = sorted(stats.get("models_cached", []))
                held.append(snapshot)

            order = list(MODELS)
            for m in order:  # a cold start each
                echo(f"colocation: first request for {m}")
                ask(m)
                census()
            rng = np.random.default_rng(14)
            for _ in range(rounds):
                rng.shuffle(order)
                threads = [threading.Thread(target=ask, args=(m,)) for m in order]
                for t in threads:
                    t.start()
                for t in threads:
                    t.join(120)
                census()
        finally:
            restore()
            owner.close()
            user.close()
        metrics = d.platform.metrics(TEE_FUNCTION)
        sizes = d.router.stats().get("model_sizes", {}) if hasattr(d.router, "stats") else {}
    most = max((len(models) for snap in held for models in snap.values()), default=0)
    out.update(
        requests=len(answers) + len(errors),
        correct=sum(answers),
        wrong=len(answers) - sum(answers),
        errors=errors,
        out_of_memory=metrics["out_of_memory"],
        instances_started=metrics["cold_starts"],
        max_models_per_instance=most,
        census=held,
        packer_model_sizes=sizes,
        never_co_located=most == 1 and not errors and metrics["out_of_memory"] == 0 and sum(answers) == len(answers),
        seconds=round(time.monotonic() - t0, 1),
    )
    out["model"] = f"MLP, {LARGE_LAYERS} x MatMul {LARGE_DIM}x{LARGE_DIM} float32 + Relu (bench/runtime.py)"
    return out


if __name__ == "__main__":
    import json

    with tempfile.TemporaryDirectory(prefix="veil-colocation-root-") as root:
        print(json.dumps(colocation_check(Path(root), echo=lambda s: print(s, file=sys.stderr)), indent=2))
