"""Prestarted, preloaded Ray workers (`veil.platform.ray_serve.workers`), the parts that need no
cluster: the preload list names importable modules (Ray only logs a module it cannot import, so
a wrong name would silently cost every cold start its imports), the nodes the local cluster
starts get it, and asking for workers without a Ray connection is a quiet no-op, never an error
in a replica."""

from __future__ import annotations

import importlib
import subprocess
import sys

from veil.platform.ray_serve import RayOptions
from veil.platform.ray_serve.cluster import NODE_ENV
from veil.platform.ray_serve.workers import PRELOAD_ENV, PRELOAD_MODULES, node_env, prestart, seed_nodes


def test_the_preloaded_modules_exist_and_include_the_replica():
    for name in PRELOAD_MODULES:
        assert importlib.util.find_spec(name) is not None, name
    assert "veil.platform.ray_serve.replica" in PRELOAD_MODULES
    assert node_env() == {PRELOAD_ENV: ",".join(PRELOAD_MODULES)}


def test_the_preload_imports_in_a_fresh_interpreter():
    """What a Ray worker does with the list (`try_import_each_module`), in a clean process."""
    code = "import importlib, sys; [importlib.import_module(m) for m in sys.argv[1].split(',')]"
    out = subprocess.run([sys.executable, "-c", code, ",".join(PRELOAD_MODULES)], capture_output=True, timeout=120)
    assert out.returncode == 0, out.stderr.decode()[-2000:]


def test_local_cluster_nodes_preload_and_set_no_runtime_env():
    assert NODE_ENV[PRELOAD_ENV] == ",".join(PRELOAD_MODULES)
    # a per-deployment runtime_env would give replicas workers of their own (no idle one fits)
    from veil.platform import FunctionSpec
    from veil.platform.ray_serve import deployment_options

    opts = deployment_options(FunctionSpec("f", ["true"]))
    assert "runtime_env" not in opts["ray_actor_options"]


def test_without_a_ray_connection_prestart_and_seed_do_nothing():
    assert prestart(0) is False
    assert seed_nodes(1) == 0
    code = (
        "import logging; logging.basicConfig(level='WARNING');"
        "from veil.platform.ray_serve.workers import prestart; print(prestart(1), prestart(1))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and out.stdout.strip() == "False False", (out.stdout, out.stderr)
    assert out.stderr.count("could not prestart Ray workers") == 1  # said once, not per replica


def test_prestart_options_round_trip():
    o = RayOptions(prestart_workers=2, prestart_delay_s=0.5, prestart_keepalive_s=60.0)
    assert RayOptions.from_json(o.to_json()) == o
    assert RayOptions().prestart_workers == 1
