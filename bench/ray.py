"""`veil bench ray`: Veil on a real local Ray cluster (head 127.0.0.2 + a node 127.0.0.3), side by
side with the local platform, in one run.

1. warm p50 through the gateway, Ray vs local: the same user, model and inputs, the real TEE
   runtime and KeyService, requests alternating between the two gateways (`warm_p50_ratio`);
2. cold start from zero replicas through the Ray gateway, median of `--cold-runs`; with
   `--prewarm N`, also the cold start of the same model on a spare of the warm pool (N model-free
   replicas kept started and attested: `FunctionSpec.prewarm`) and the pool's idle cost;
3. a `--models`-model trace (bench/workloads/tracegen, Azure-like) replayed in real time on Ray
   with Veil's router (and Veil's keep-alive autoscaling) and with Serve's default multiplex
   router (and its fixed keep-alive): GB-s (replica lifetimes x memory) and p99;
4. throughput at 1, 2 and 4 replicas (closed loop, the benchmark's model action).

    veil bench ray --json out/ray.json            # about 10 minutes
    veil bench ray --json out/ray.json --quick    # about 4 minutes, shorter trace

Everything stays on loopback; the cluster is stopped at the end (and on any failure).
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib.metadata
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

# This file is bench/ray.py: with bench/ on sys.path, `import ray` would find it instead of Ray.
# So Ray is imported first (run as a script, bench/ is sys.path[0]: drop it), and bench/ is on
# the path only while _common is imported.
_BENCH = Path(__file__).resolve().parent
if sys.path and sys.path[0] and Path(sys.path[0]).resolve() == _BENCH:
    sys.path.pop(0)
import ray  # noqa: E402, F401  (the real package, cached in sys.modules from here on)

sys.path.insert(0, str(_BENCH))
from _common import machine, percentile, write_json  # noqa: E402

sys.path.remove(str(_BENCH))
sys.path.insert(0, str(_BENCH / "workloads"))
from models import make_models, widths  # noqa: E402
from replay import replay  # noqa: E402
from tracegen import TraceConfig, generate  # noqa: E402

from veil.packer import Packer  # noqa: E402
from veil.platform import FunctionSpec  # noqa: E402

WORKLOADS = Path(__file__).resolve().parent / "workloads"


def _args(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="veil bench ray", description=__doc__.split("\n\n")[0])
    p.add_argument("--json", type=Path, help="write the report here")
    p.add_argument("--quick", action="store_true", help="shorter trace and fewer samples")
    p.add_argument(
        "--only",
        default="latency,router,throughput",
        help="comma-separated parts to run: latency (warm p50 and cold start), router (the trace), throughput",
    )
    p.add_argument("--warm", type=int, default=200, help="warm requests per platform")
    p.add_argument("--cold-runs", type=int, default=5)
    p.add_argument("--prewarm", type=int, default=0, help="also measure the cold start with a warm pool of N spares")
    p.add_argument("--models", type=int, default=20)
    p.add_argument("--rate", type=float, default=2.0, help="trace: total requests per second (mean)")
    p.add_argument("--trace-seconds", type=float, default=180.0)
    p.add_argument("--idle-timeout", type=float, default=60.0, help="fixed keep-alive (Serve's default router)")
    p.add_argument("--memory-mb", type=int, default=512)
    p.add_argument("--capacity", type=int, default=4, help="requests in flight per replica")
    p.add_argument("--max-replicas", type=int, default=8)
    p.add_argument("--num-cpus", type=float, default=0.25, help="logical CPUs reserved per replica")
    p.add_argument("--throughput-seconds", type=float, default=10.0)
    p.add_argument("--seed", type=int, default=3)
    p.add_argument("--trace-dir", type=Path, help="write each router's per-request results (CSV) here")
    p.add_argument("--model-dir", type=Path, default=Path.home() / ".cache" / "veil-bench" / "packer-models")
    args = p.parse_args(argv)
    if args.quick:
        args.warm, args.cold_runs = min(args.warm, 100), min(args.cold_runs, 5)
        args.trace_seconds, args.throughput_seconds = min(args.trace_seconds, 60.0), min(args.throughput_seconds, 5.0)
    return args


def log(msg: str) -> None:
    print(f"[bench ray] {msg}", file=sys.stderr, flush=True)


# -- 1 and 2: the real runtime through the gateway -----------------------------------------------


def warm_and_cold(args: argparse.Namespace, ray_platform: Any, root: Path) -> dict[str, Any]:
    from veil.demo_models import train_demo_models
    from veil.deployment import LocalDeployment, StackOptions
    from veil.ray_deployment import gateway_on_platform
    from veil.sdk import Deployment, ModelOwner, ModelUser

    model = next(m for m in train_demo_models(seed=0) if m.model_id == "digits-mlp")
    # a short keep-alive on both platforms, so the cold start from zero can be measured
    with LocalDeployment(root / "stack", StackOptions(he=False, idle_timeout_s=3.0)) as stack:
        trust = stack.local_trust_anchors()
        assert stack.info is not None
        owner = ModelOwner(stack.info, trust=trust, timeout=120)
        owner.register()
        owner.publish(model.model_id, model.onnx)
        user = ModelUser(stack.info, trust=trust, timeout=120)
        user.register()
        owner.grant(model.model_id, user.id)
        user.request_access(model.model_id)
        gateway = gateway_on_platform(stack, ray_platform, policy="veil")
        ray_user = ModelUser(
            Deployment(gateway_url=gateway.url, keyservice_url=stack.info.keyservice_url),
            user.identity,
            trust=trust,
            timeout=120,
        )
        ray_user.request_keys = user.request_keys
        x = model.x_test[:1]
        try:
            for client in (user, ray_user):  # cold starts, key release, model load: not measured
                for _ in range(10):
                    client.infer(model.model_id, x)
            samples: dict[str, list[float]] = {"local": [], "ray": []}
            for _ in range(args.warm):
                for label, client in (("local", user), ("ray", ray_user)):
                    t0 = time.perf_counter()
                    client.infer(model.model_id, x)
                    samples[label].append((time.perf_counter() - t0) * 1000)
            p50 = {k: round(percentile(v, 50), 3) for k, v in samples.items()}
            ray_m = ray_platform.metrics(stack.tee_spec.name)
            direct = ray_m["direct_requests"]
            # the platforms' own share (invoke to answer, warm-up included), beside the gateway's
            at_platform = {
                "local": stack.platform.metrics(stack.tee_spec.name)["exec_ms"]["p50"],
                "ray": ray_m["exec_ms"]["p50"],
            }
            log(
                f"warm p50 through the gateway: local {p50['local']} ms, ray {p50['ray']} ms ({direct} direct); "
                f"at the platform: local {at_platform['local']} ms, ray {at_platform['ray']} ms"
            )

            cold: list[float] = []
            for run in range(args.cold_runs):
                if not _wait(lambda: ray_platform.metrics(stack.tee_spec.name)["instances"] == 0, 60):
                    raise RuntimeError("the Ray function did not scale to zero within 60 s")
                time.sleep(0.5)  # let the handle see zero replicas too
                t0 = time.perf_counter()
                ray_user.infer(model.model_id, x)
                cold.append((time.perf_counter() - t0) * 1000)
                log(f"cold start from zero replicas #{run + 1}: {cold[-1]:.0f} ms")
            pool = pool_cold_starts(args, ray_platform, stack, user, trust, model.model_id, x) if args.prewarm else {}
            return {
                **pool,
                "warm_p50_ratio": round(p50["ray"] / p50["local"], 3),
                "warm_p50_ms": p50,
                "warm_p90_ms": {k: round(percentile(v, 90), 3) for k, v in samples.items()},
                "warm_samples": len(samples["ray"]),
                "warm_ray_direct_requests": direct,
                "warm_platform_p50_ms": at_platform,
                "cold_start_ms": round(statistics.median(cold), 1),
                "cold_start_samples_ms": [round(c, 1) for c in cold],
                "model": model.model_id,
            }
        finally:
            ray_user.close()
            gateway.close()
            user.close()
            owner.close()
            ray_platform.remove(stack.tee_spec.name)


def pool_cold_starts(
    args: argparse.Namespace, ray_platform: Any, stack: Any, user: Any, trust: Any, model: str, x: Any
) -> dict[str, Any]:
    """The cold start of a model no replica holds, taken by a spare of a `--prewarm` pool: the
    same stack, model and user as the cold start from zero, through a gateway of its own."""
    from veil.ray_deployment import gateway_on_platform
    from veil.sdk import Deployment, ModelUser

    name = stack.tee_spec.name
    ray_platform.remove(name)
    plain = stack.tee_spec
    # The stack's TEE function with a pool (the local platform deployed its own already).
    stack.tee_spec = dataclasses.replace(plain, prewarm=args.prewarm)
    gateway = gateway_on_platform(stack, ray_platform, policy="veil")
    client = ModelUser(
        Deployment(gateway_url=gateway.url, keyservice_url=stack.info.keyservice_url),
        user.identity,
        trust=trust,
        timeout=120,
    )
    client.request_keys = user.request_keys

    def spares_ready() -> bool:
        """No replica holds the model, N spares are RUNNING with their runtime up (a spare
        whose model left replaces its runtime first)."""
        m = ray_platform.metrics(name)
        if m["instances"] or m["spares_ready"] < args.prewarm or m["spares_starting"]:
            return False
        return all(r["runtime_pid"] and not r["models"] for r in ray_platform.replicas(name))

    try:
        cold: list[float] = []
        released = 0
        for run in range(args.cold_runs):
            if not _wait(spares_ready, 90):
                raise RuntimeError(f"the pool of {name!r} was not back to {args.prewarm} clean spares within 90 s")
            time.sleep(0.5)
            t0 = time.perf_counter()
            client.infer(model, x, timings=True)
            cold.append((time.perf_counter() - t0) * 1000)
            # a spare holds no key: the runtime must have released this model's keys now
            released += "key_release_ms" in (client.last_timings or {})
            log(f"cold start on a spare of the warm pool #{run + 1}: {cold[-1]:.0f} ms")
        _wait(lambda: ray_platform.metrics(name)["spares_ready"] >= args.prewarm, 60)  # the pool refilled
        m = ray_platform.metrics(name)
        return {
            "cold_start_pool_ms": round(statistics.median(cold), 1),
            "cold_start_pool_samples_ms": [round(c, 1) for c in cold],
            "prewarm": args.prewarm,
            "prewarm_hits": m["prewarm_hits"],
            "pool_cold_starts_with_key_release": released,
            "prewarm_gb_seconds": m["prewarm_gb_seconds"],
            "prewarm_gb_s_per_hour": m["prewarm_gb_s_per_hour"],
        }
    finally:  # (the caller removes the function)
        client.close()
        gateway.close()
        stack.tee_spec = plain


# -- 3: the multi-model trace on both routers ----------------------------------------------------


def _model_action(args: argparse.Namespace, name: str, **kw: Any) -> FunctionSpec:
    base: dict[str, Any] = dict(
        init_value={"model_dir": str(args.model_dir.resolve())},
        memory_mb=args.memory_mb,
        concurrency=args.capacity,
        max_instances=args.max_replicas,
        idle_timeout_s=args.idle_timeout,
        max_queue=256,
        start_timeout_s=60.0,
    )
    base.update(kw)
    return FunctionSpec(name, [sys.executable, str(WORKLOADS / "model_action.py")], **base)


def model_sizes(n: int) -> dict[str, float]:
    """Resident MB of each model in an ONNX Runtime session, estimated from its parameters
    (float32 weights, about twice their size once loaded, plus a little per session)."""
    out = {}
    for i, w in enumerate(widths(n)):
        params = 64 * w + w * w + 10 * w + 2 * w + 10
        out[f"m{i:0{len(str(n - 1))}d}"] = round(2 * params * 4 / 2**20 + 2.0, 1)
    return out


def trace_run(args: argparse.Namespace, ray_platform: Any, policy: str, trace: Any, sizes: dict[str, float]) -> dict:
    name = f"trace-{'veil' if policy == 'veil' else 'serve'}"
    packer = Packer(
        ray_platform,
        _model_action(args, name),
        policy,
        base_mb=60.0,
        model_mb=sizes,
        default_model_mb=statistics.fmean(sizes.values()),
        unload_value=lambda m: {"op": "unload", "model": m},
    )
    cold = {"n": 0}
    lock = threading.Lock()

    def invoke(model: str) -> None:
        out = packer.invoke(model, {"model": model}, timeout=120.0)
        if out.get("cold"):
            with lock:
                cold["n"] += 1

    # Both routers start from one ready replica: from zero, how many replicas a start-up burst
    # gets depends on when the new handle's first queue report reaches Serve's controller.
    packer.invoke(trace.models[0], {"model": trace.models[0]}, timeout=120.0)
    g0 = ray_platform.metrics(name)["gb_seconds"]
    t0 = time.monotonic()
    sent = replay(list(trace.times), trace.models, invoke, max_inflight=64)
    wall = time.monotonic() - t0
    m = ray_platform.metrics(name)
    ok = [s.latency_s * 1000 for s in sent if s.ok]
    if args.trace_dir is not None:
        args.trace_dir.mkdir(parents=True, exist_ok=True)
        with (args.trace_dir / f"ray-trace-{name}.csv").open("w") as fh:
            fh.write("at_s,model,latency_ms,lag_ms,ok,error\n")
            for r in sent:
                fh.write(f"{r.at:.3f},{r.model},{r.latency_s * 1000:.2f},{r.lag_s * 1000:.2f},{int(r.ok)},{r.error}\n")
    result = {
        "gb_s": round(m["gb_seconds"] - g0, 3),
        "p50_ms": round(float(percentile(ok, 50)), 2) if ok else None,
        "p99_ms": round(float(percentile(ok, 99)), 2) if ok else None,
        "requests": len(sent),
        "failed": sum(not s.ok for s in sent),
        "model_loads": cold["n"],
        "replicas_started": m["cold_starts"],
        "peak_replicas": m["peak_instances"],
        "duration_s": round(wall, 1),
    }
    packer.close()
    ray_platform.remove(name)
    log(f"trace on {policy}: {result}")
    return result


# -- 4: throughput -------------------------------------------------------------------------------


def throughput(args: argparse.Namespace, ray_platform: Any) -> dict[str, float]:
    from veil.platform.protocol import Routing

    name = "tput"
    models = ["m00", "m01", "m02", "m03"]
    out: dict[str, float] = {}
    routing = Routing("veil", base_mb=60.0, default_model_mb=40.0)
    for n in (1, 2, 4):
        ray_platform.deploy(_model_action(args, name, min_instances=n, max_instances=n), routing=routing)
        if not _wait(lambda n=n: ray_platform.metrics(name)["ready"] >= n, 120):
            raise RuntimeError(f"{n} replicas did not start")
        clients = args.capacity * n
        for m in models * 2:  # warm every model where the router puts it
            ray_platform.invoke(name, {"model": m}, model=m, timeout=60)
        out[str(n)] = _closed_loop(ray_platform, name, models, clients, args.throughput_seconds)
        log(f"throughput at {n} replica(s), {clients} clients: {out[str(n)]} req/s")
    ray_platform.remove(name)
    return out


def routers(args: argparse.Namespace, ray_platform: Any) -> dict[str, Any]:
    """The same trace with Veil's router and with Serve's default one, one after the other."""
    cfg = TraceConfig(n_models=args.models, duration_s=args.trace_seconds, total_rate=args.rate, seed=args.seed)
    trace = generate(cfg)
    sizes = model_sizes(args.models)
    log(f"replaying {len(trace)} requests over {args.trace_seconds:.0f} s per router")
    veil = trace_run(args, ray_platform, "veil", trace, sizes)
    serve_default = trace_run(args, ray_platform, "platform", trace, sizes)
    ratio = round(veil["gb_s"] / serve_default["gb_s"], 3) if serve_default["gb_s"] else None
    return {
        "veil": veil,
        "ray_default": serve_default,
        "trace": {**cfg.__dict__, "requests": len(trace)},
        "gb_s_ratio": ratio,
        "targets": {
            "gb_s_ratio_max": 0.8,
            "met": ratio is not None and ratio <= 0.8 and (veil["p99_ms"] or 0) <= (serve_default["p99_ms"] or 0),
        },
    }


def _closed_loop(platform: Any, name: str, models: list[str], clients: int, seconds: float) -> float:
    """Requests per second of `clients` threads each sending the next request as soon as the
    previous one answered, cycling over `models`."""
    done = [0]
    lock = threading.Lock()
    stop = time.monotonic() + seconds

    def loop(i: int) -> None:
        k = 0
        while time.monotonic() < stop:
            m = models[(i + k) % len(models)]
            platform.invoke(name, {"model": m}, model=m, timeout=60)
            k += 1
            with lock:
                done[0] += 1

    t0 = time.monotonic()
    with ThreadPoolExecutor(clients) as pool:
        list(pool.map(loop, range(clients)))
    return round(done[0] / (time.monotonic() - t0), 1)


def code_state() -> dict[str, Any]:
    """The commit measured, and the source files that differed from it during the run (the
    work tree is shared: another engineer's uncommitted change to the runtime or the local
    platform is part of what was measured, so the report says so)."""
    root = Path(__file__).resolve().parents[1]

    def git(*args: str) -> str | None:
        try:
            out = subprocess.run(["git", *args], cwd=root, capture_output=True, text=True, timeout=10)
        except (OSError, subprocess.TimeoutExpired):
            return None
        return out.stdout if out.returncode == 0 else None

    status = git("status", "--porcelain", "--", "src", "bench") or ""
    return {
        "commit": (git("rev-parse", "HEAD") or "").strip() or None,
        "uncommitted": sorted(line[3:] for line in status.splitlines() if line[3:]),
        "ray": importlib.metadata.version("ray"),
    }


def _wait(cond: Any, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if cond():
            return True
        time.sleep(0.2)
    return bool(cond())


def main(argv: list[str]) -> int:
    args = _args(argv)
    from veil.platform.ray_serve import RayOptions
    from veil.platform.ray_serve.cluster import LocalRayCluster

    names = [f"m{i:0{len(str(args.models - 1))}d}" for i in range(args.models)]
    make_models(args.model_dir, names)
    root = Path(tempfile.mkdtemp(prefix="vrb-"))
    report: dict[str, Any] = {
        "machine": machine(),
        "code": code_state(),
        "config": {k: str(v) for k, v in vars(args).items()},
    }
    t_start = time.monotonic()
    with LocalRayCluster(root / "ray", workers=1, num_cpus=2) as cluster:
        saved = cluster.connect_here()
        from veil.platform.ray_serve.platform import RayPlatform

        ray_platform = RayPlatform(
            address=cluster.address,
            node_ip=cluster.head_ip,
            options=RayOptions(num_cpus=args.num_cpus, log_dir=str(root / "runtime-logs")),
        )
        try:
            log(f"cluster {cluster.address} (nodes {cluster.head_ip}, {', '.join(cluster.worker_ips)}) ready")
            parts = set(args.only.split(","))
            targets: dict[str, Any] = {}
            if "latency" in parts:
                report.update(warm_and_cold(args, ray_platform, root))
                targets["warm_p50_ratio"] = {"target": 1.5, "met": report["warm_p50_ratio"] <= 1.5}
                targets["cold_start_ms"] = {"target": 3000, "met": report["cold_start_ms"] <= 3000}
            if "router" in parts:
                report["router"] = routers(args, ray_platform)
                targets["router_gb_s"] = report["router"]["targets"]
            if "throughput" in parts:
                report["throughput_rps"] = throughput(args, ray_platform)
                report["instance_cpu_cores"] = args.num_cpus
                report["cluster_cpu_cores"] = {"logical": 2 * 2, "machine": report["machine"]["cores"]}
            report["targets"] = targets
        finally:
            ray_platform.close()
            cluster.restore_env(saved)
    shutil.rmtree(root, ignore_errors=True)
    report["wall_s"] = round(time.monotonic() - t_start, 1)
    report["load_avg_at_end"] = [round(x, 2) for x in os.getloadavg()]
    if args.json:
        write_json(args.json, report)
    print({k: report.get(k) for k in ("warm_p50_ratio", "cold_start_ms", "cold_start_pool_ms", "throughput_rps")})
    if "router" in report:
        both = {k: report["router"][k] for k in ("veil", "ray_default")}
        print({k: {m: v.get(m) for m in ("gb_s", "p99_ms")} for k, v in both.items()})
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
