"""Ray Serve wrapper: the option mapping (pure) and the clear error when ray is missing.

Ray itself is an optional extra (`veil[ray]`) not installed here; the deployment is not run.
"""

from __future__ import annotations

import importlib.util

import pytest

from veil.platform import FunctionSpec, PlatformError
from veil.platform.ray_serve import build_app, deployment_options


def test_options_mirror_the_function_spec():
    spec = FunctionSpec(
        "veil-tee",
        ["python", "-m", "veil.runtime"],
        memory_mb=1024,
        concurrency=8,
        min_instances=0,
        max_instances=5,
        idle_timeout_s=30,
        max_queue=16,
    )
    o = deployment_options(spec)
    assert o["name"] == "veil-tee"
    assert o["max_ongoing_requests"] == 8 and o["max_queued_requests"] == 16
    a = o["autoscaling_config"]
    assert (a["min_replicas"], a["max_replicas"]) == (0, 5)  # scale to zero
    assert a["downscale_delay_s"] == 30 and a["downscale_to_zero_delay_s"] == 30
    assert 1 <= a["target_ongoing_requests"] <= 8
    assert o["ray_actor_options"]["memory"] == 1024 * 2**20


@pytest.mark.skipif(importlib.util.find_spec("ray") is not None, reason="ray is installed")
def test_missing_ray_is_a_clear_error():
    with pytest.raises(PlatformError) as ei:
        build_app(FunctionSpec("f", ["python", "-m", "veil.runtime"]))
    assert "pip install 'veil[ray]'" in ei.value.message
