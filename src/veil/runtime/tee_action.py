"""The TEE-mode action: built at OpenWhisk `/init`, it attests once, then serves `/run` calls."""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from veil.attest.measurement import measure
from veil.attest.providers import select_provider
from veil.attest.sim import SimRoot
from veil.crypto.errors import MalformedError
from veil.errors import BadRequest
from veil.keyservice.client import RuntimeKeyClient
from veil.runtime.action_server import activation_deadline, current_activation
from veil.runtime.core import CoreConfig, KeyReleaser, RuntimeCore
from veil.store import open_reader

log = logging.getLogger("veil.runtime")
SIM_ROOT_ENV = "VEIL_SIM_ROOT"


def _number(value: dict, name: str, default: float, lo: float, hi: float) -> float:
    got = value.get(name, default)
    if not isinstance(got, int | float) or isinstance(got, bool) or not lo <= got <= hi:
        raise BadRequest(f"init.{name}: must be a number in [{lo}, {hi}]", code="bad_init")
    return got


IGNORED_INIT = ("key_cache_ttl_s",)  # once accepted; the revocation delay now comes from the KeyService


def core_config(init: dict[str, Any]) -> CoreConfig:
    """Sizes from an init value. Nothing in it can lengthen the revocation delay: a
    `key_cache_ttl_s` left in an old init value is ignored (releases name their own lifetime)."""
    for name in IGNORED_INIT:
        if name in init:
            log.warning("init.%s is ignored: key lifetimes come with each release from the KeyService", name)
    return CoreConfig(
        model_cache_bytes=int(_number(init, "model_cache_mb", 1024, 1, 1 << 20) * (1 << 20)),
        intra_op_threads=int(_number(init, "intra_op_threads", 1, 0, 64)),
        parallel_runs=int(_number(init, "parallel_runs", 0, 0, 256)),
    )


def core_from_init(init: dict[str, Any], keys: KeyReleaser) -> RuntimeCore:
    """The trusted core an init value describes, releasing keys through `keys`."""
    return RuntimeCore(core_config(init), keys, open_reader(init["store"]))


def load_sim_root(environ: Mapping[str, str]) -> SimRoot | None:
    """The simulation root named by VEIL_SIM_ROOT, or None when simulation is not configured.

    Only ever loaded: a root made up on a worker would sign evidence no KeyService trusts, and the
    node would fail every request with a confusing attestation error. The deployment's root is
    installed on each node explicitly (`veil cluster join`)."""
    path = environ.get(SIM_ROOT_ENV)
    if not path:
        return None
    try:
        return SimRoot.load(Path(path))
    except FileNotFoundError:
        raise BadRequest(
            f"{SIM_ROOT_ENV}={path}: no simulation root there; install this deployment's root on the node "
            "(`veil cluster join ROOT_FILE`) or unset it to use real TEE hardware",
            code="bad_init",
        ) from None
    except (OSError, MalformedError) as exc:
        raise BadRequest(f"{SIM_ROOT_ENV}={path}: not a simulation root ({exc})", code="bad_init") from None


def _activation_deadline() -> float | None:
    """When the platform stops waiting for this /run (its `deadline` field), if it said."""
    activation = current_activation()
    return None if activation is None else activation_deadline({"deadline": activation.deadline})


class TeeAction:
    """Init value: {"kind": "tee", "keyservice_url", "store", optional model_cache_mb,
    intra_op_threads, parallel_runs (model runs at once; 0 or absent: one per CPU)}. `store` is
    a directory on this node or the http(s):// URL of
    `veil store serve`. `environ` is where VEIL_SIM_ROOT is looked up (the process environment,
    with what OpenWhisk's /init put in `value.env` on top)."""

    def __init__(self, init: dict[str, Any], environ: Mapping[str, str] | None = None) -> None:
        for name in ("keyservice_url", "store"):
            if not isinstance(init.get(name), str):
                raise BadRequest(f"init.{name}: required string", code="bad_init")
        config = core_config(init)  # refuse a bad init before attesting
        self.timings: dict[str, float] = {}
        t0 = time.perf_counter()
        sim_root = load_sim_root(os.environ if environ is None else environ)
        store = open_reader(init["store"])  # a missing store fails /init, before attesting
        self.measurement = measure("runtime")
        provider = select_provider(sim_root=sim_root, measurement=self.measurement)
        self.provider_description = provider.describe()
        self.keys = RuntimeKeyClient(init["keyservice_url"], provider)
        self.timings["measure_ms"] = (time.perf_counter() - t0) * 1e3
        t1 = time.perf_counter()
        self.keys.attest()
        self.timings["attest_ms"] = (time.perf_counter() - t1) * 1e3
        self.core = RuntimeCore(config, self.keys, store)
        log.info("runtime attested via %s, measurement %s", self.provider_description, self.measurement)

    def describe(self) -> dict[str, Any]:
        return {
            "kind": "tee",
            "measurement": self.measurement,
            "attested_by": self.provider_description,
            "timings": self.timings,
        }

    def run(self, value: dict[str, Any]) -> dict[str, Any]:
        """`{"envelope": JSON form or binary bytes}` (answered in the same form) or `{"op": "stats"}`."""
        if "envelope" in value:
            return self.core.infer(value["envelope"], deadline=_activation_deadline())
        if value.get("op") == "stats":
            return self.core.stats()
        raise BadRequest("value: expected an 'envelope' (or op 'stats')", code="malformed")
