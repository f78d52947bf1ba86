"""Measure cold and warm costs on the real local platform, for the simulator.

For each model, on a fresh instance of the benchmark's model action: the instance start (spawn
until /init answered), the first request (cold: model load plus run), a few warm requests
(client-seen latency, so HTTP and platform overheads are in) and the resident memory the model
adds (the action reports its RSS; a fresh process per model keeps the deltas honest, since freed
memory is not always returned to the OS).
"""

from __future__ import annotations

import statistics
import time

from sim import Costs

from veil.platform import FunctionSpec, LocalPlatform


def calibrate(platform: LocalPlatform, spec: FunctionSpec, models: list[str], *, warm: int = 10) -> Costs:
    platform.deploy(spec)
    starts: list[float] = []
    bases: list[float] = []
    costs = Costs()
    for model in models:
        t0 = time.perf_counter()
        inst = platform.start_instance(spec.name)
        starts.append(time.perf_counter() - t0)
        try:
            base = platform.invoke_instance(spec.name, inst, {"op": "unload", "model": "-"})["rss_mb"]
            bases.append(base)
            t0 = time.perf_counter()
            first = platform.invoke_instance(spec.name, inst, {"model": model})
            cold = time.perf_counter() - t0
            samples = []
            for _ in range(warm):
                t0 = time.perf_counter()
                platform.invoke_instance(spec.name, inst, {"model": model})
                samples.append(time.perf_counter() - t0)
        finally:
            platform.stop_instance(spec.name, inst)
        costs.warm_s[model] = [round(s, 6) for s in samples]
        costs.load_s[model] = round(max(0.0, cold - statistics.median(samples)), 6)
        costs.model_mb[model] = round(max(1.0, first["rss_mb"] - base), 1)
    costs.start_s = round(statistics.median(starts), 6)
    costs.base_mb = round(statistics.median(bases), 1)
    return costs
