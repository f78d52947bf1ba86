"""The HE part of `veil demo` and `veil he demo`: train and compile, publish through the gateway
(owner-signed, HE and hybrid mode), then encrypted requests as a user, through the SDK."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import numpy as np

from veil.he.compile import compile_model
from veil.he.tasks import breast_cancer_lr, digits_cnn, digits_mlp

# the CryptoNets-style CNN (Conv 3x3/2 -> square -> Dense on the 8x8 digits, compiled from ONNX)
# is the headline; the LR and MLP show the coefficient and rows programs
DEMO_MODELS = {"he-breast-lr": breast_cancer_lr, "he-digits-mlp": digits_mlp, "he-digits-cnn": digits_cnn}


def run_he_demo(
    deployment: Any,
    trust: Any,
    echo: Callable[[str], None],
    samples: int = 3,
    *,
    hybrid: bool = True,
    models: dict[str, Callable[[], Any]] | None = None,
) -> dict[str, Any]:
    """Publish the demo models in HE mode (and the LR in hybrid mode) and query them.

    `deployment` is a `veil.sdk.Deployment`, `trust` the principals' `TrustAnchors`. Echoes
    encrypted vs plaintext predictions and latency (labels only, which the user owns); returns a
    summary dict per model."""
    from veil.sdk import ModelOwner, ModelUser

    owner, user = ModelOwner(deployment, trust=trust), ModelUser(deployment, trust=trust)
    summary: dict[str, Any] = {}
    try:
        owner.register()
        user.register()
        for model_id, make in (models or DEMO_MODELS).items():
            task = make()
            compiled = compile_model(task.model, task.x_train, name=model_id)
            modes = ["he", "hybrid"] if hybrid and model_id == "he-breast-lr" else ["he"]
            for mode in modes:
                name = model_id if mode == "he" else f"{model_id}-hybrid"
                published = owner.publish(name, compiled, mode=mode, description=f"{model_id} ({mode} demo)")
                owner.grant(name, user.id)
                if mode == "hybrid":
                    user.request_access(name)
                echo(
                    f"[he] {name}: {mode} mode, N={compiled.params.poly_modulus_degree}, "
                    f"log2 QP={compiled.params.log2_qp}, published v{published['version']} (owner-signed)"
                )
                summary[name] = _query(user, name, mode, task, echo, samples)
    finally:
        owner.close()
        user.close()
    return summary


def _query(user: Any, name: str, mode: str, task: Any, echo: Callable[[str], None], samples: int) -> dict[str, Any]:
    latencies, agree = [], 0
    for i in range(samples):
        x = task.x_test[i : i + 1]
        t0 = time.perf_counter()
        out = user.infer(name, x, packing="latency")
        latencies.append((time.perf_counter() - t0) * 1e3)
        plain = task.model.predict(x)[0]
        agree += int(out["predictions"][0] == plain)
        echo(f"[he]   sample {i}: encrypted -> {out['predictions'][0]}, plaintext -> {plain}, {latencies[-1]:.1f} ms")
    t0 = time.perf_counter()
    batch = user.infer(name, task.x_test)
    batch_ms = (time.perf_counter() - t0) * 1e3
    batch_agree = float(np.mean(batch["predictions"] == task.model.predict(task.x_test)))
    echo(f"[he]   batch of {len(task.x_test)}: agreement {batch_agree:.3%}, {batch_ms:.0f} ms")
    return {
        "mode": mode,
        "latency_ms_median": float(np.median(latencies)),
        "single_agreement": agree / samples,
        "batch_agreement": batch_agree,
        "batch_ms": batch_ms,
    }
