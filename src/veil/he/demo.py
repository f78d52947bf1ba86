"""The HE part of `veil demo`: train, compile, publish, then encrypted requests via the gateway."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from veil.he import store
from veil.he.client import HEClient, HttpTransport, RemoteModel, Transport
from veil.he.compile import compile_model
from veil.he.tasks import breast_cancer_lr, digits_cnn, digits_mlp

# the CryptoNets-style CNN (Conv 3x3/2 -> square -> Dense on the 8x8 digits, compiled from ONNX)
# is the headline; the LR and MLP show the coefficient and rows programs
DEMO_MODELS = {"he-breast-lr": breast_cancer_lr, "he-digits-mlp": digits_mlp, "he-digits-cnn": digits_cnn}


def run_he_demo(
    store_dir: Path,
    gateway_url: str,
    echo: Callable[[str], None],
    transport: Transport | None = None,
    samples: int = 3,
) -> dict[str, Any]:
    """Train and publish the demo models, then run encrypted requests through the gateway.

    Echoes encrypted vs plaintext predictions and latency (labels only, which the user owns);
    returns a summary dict per model. `transport` overrides HTTP (tests use the in-process one).
    """
    summary: dict[str, Any] = {}
    owned = transport is None
    transport = transport or HttpTransport(gateway_url)
    try:
        for model_id, make in DEMO_MODELS.items():
            task = make()
            compiled = compile_model(task.model, task.x_train, name=model_id)
            store.publish(Path(store_dir), model_id, compiled)
            spec = store.client_spec(Path(store_dir), model_id)
            echo(
                f"[he] {model_id}: N={compiled.params.poly_modulus_degree}, log2 QP={compiled.params.log2_qp}, "
                f"{len(compiled.plan.layers)} fused layer{'s' if len(compiled.plan.layers) != 1 else ''}, published"
            )
            client = HEClient(spec)
            remote = RemoteModel(client, transport, model_id)
            remote.upload_keys()
            size = len(client.eval_keys())
            shown = f"{size / 2**20:.1f} MiB" if size >= 2**20 else f"{size / 2**10:.1f} KiB (no rotation keys needed)"
            echo(f"[he]   evaluation keys uploaded: {shown}, id {client.key_id[:12]}")
            latencies, agree = [], 0
            for i in range(samples):
                x = task.x_test[i : i + 1]
                result = remote.infer(x, packing="latency")
                plain = task.model.predict(x)[0]
                agree += int(result.predictions[0] == plain)
                total = result.timings_ms["encrypt"] + result.timings_ms["server"] + result.timings_ms["decrypt"]
                latencies.append(total)
                echo(f"[he]   sample {i}: encrypted -> {result.predictions[0]}, plaintext -> {plain}, {total:.1f} ms")
            batch = remote.infer(task.x_test)
            batch_agree = float(np.mean(batch.predictions == task.model.predict(task.x_test)))
            echo(
                f"[he]   batch of {len(task.x_test)} ({batch.packing}): agreement {batch_agree:.3%}, "
                f"server {batch.timings_ms['server']:.0f} ms"
            )
            summary[model_id] = {
                "poly_modulus_degree": compiled.params.poly_modulus_degree,
                "log2_qp": compiled.params.log2_qp,
                "latency_ms_median": float(np.median(latencies)),
                "single_agreement": agree / samples,
                "batch_packing": batch.packing,
                "batch_agreement": batch_agree,
                "eval_keys_mb": len(client.eval_keys()) / 2**20,
            }
    finally:
        if owned and isinstance(transport, HttpTransport):
            transport.close()
    return summary
