"""Where one HE request's time goes through the gateway: perf_counter spans around each hop of
an LR (or MLP) latency request, interleaved with the same request run in-process (`HEAction.run`).

The spans are taken from outside the measured code: the gateway runs in this process (or, with
`--separate`, in a child process as `veil up` runs it) and its functions are wrapped here; the
runtime instance is not touched (it reports its own `eval_ms`). `--cprofile` adds cProfile
reports of the gateway's event-loop thread and of the packer's invoke (warm requests only).

    .venv/bin/python bench/he_serving_profile.py --model lr --reps 60 [--separate] [--cprofile]

Hops: client (encrypt, JSON + signature, decrypt) -> HTTP -> gateway ASGI (FastAPI, body,
signature, replay and card checks) -> thread pool -> packer -> platform dispatch -> `/run` on the
instance (HTTP, JSON, the HE action) and back.
"""

from __future__ import annotations

import argparse
import asyncio
import functools
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import median  # noqa: E402

SPANS: dict[str, list[float]] = defaultdict(list)
LAST: dict[str, Any] = {}
PROFILE: Any = None  # a cProfile.Profile of the gateway's event-loop thread (--cprofile)
PACKER_PROFILE: Any = None  # and one of the packer's invoke, in the gateway's worker threads


def _wrap(owner: Any, name: str, label: str) -> None:
    fn = getattr(owner, name)
    if asyncio.iscoroutinefunction(fn):

        @functools.wraps(fn)
        async def awrapped(*a: Any, **k: Any) -> Any:
            t0 = time.perf_counter()
            try:
                return await fn(*a, **k)
            finally:
                SPANS[label].append((time.perf_counter() - t0) * 1e3)

        setattr(owner, name, awrapped)
        return

    @functools.wraps(fn)
    def wrapped(*a: Any, **k: Any) -> Any:
        t0 = time.perf_counter()
        try:
            return fn(*a, **k)
        finally:
            SPANS[label].append((time.perf_counter() - t0) * 1e3)

    setattr(owner, name, wrapped)


def _asgi_timer(app: Any) -> Any:
    async def timed(scope: dict, receive: Any, send: Any) -> None:
        if scope.get("type") != "http" or not scope.get("path", "").endswith(":infer"):
            return await app(scope, receive, send)
        t0 = time.perf_counter()
        first: list[float] = []
        if PROFILE is not None and LAST.get("warm"):
            PROFILE.enable()

        async def recv() -> Any:
            if not first:
                SPANS["gw: asgi entry -> first receive"].append((time.perf_counter() - t0) * 1e3)
            msg = await receive()
            if not msg.get("more_body"):
                first.append(time.perf_counter())
            return msg

        async def snd(msg: dict) -> None:
            if msg.get("type") == "http.response.start" and first:
                SPANS["gw: asgi body received -> response start"].append((time.perf_counter() - first[0]) * 1e3)
                first.append(time.perf_counter())
            await send(msg)
            if msg.get("type") == "http.response.body" and not msg.get("more_body") and len(first) > 1:
                SPANS["gw: asgi response start -> body sent"].append((time.perf_counter() - first[1]) * 1e3)

        try:
            await app(scope, recv, snd)
        finally:
            if PROFILE is not None:
                PROFILE.disable()
            SPANS["gw: asgi total"].append((time.perf_counter() - t0) * 1e3)

    return timed


def instrument() -> None:
    import uvicorn

    import veil.gateway.app as gw_app
    import veil.gateway.he_routes as he_routes
    import veil.he.user as he_user
    import veil.platform.dispatch as dispatch
    import veil.platform.instance as instance

    orig_config = uvicorn.Config.__init__

    def config(self: Any, app: Any, *a: Any, **k: Any) -> None:
        orig_config(self, _asgi_timer(app), *a, **k)

    uvicorn.Config.__init__ = config  # type: ignore[method-assign]
    _wrap(he_routes, "read_body", "gw: read_body")
    _wrap(he_routes, "parse_json_object", "gw: parse_json_object")
    _wrap(he_routes.Verifiers, "verify", "gw: verify signature")
    _wrap(gw_app, "run_blocking", "gw: run_blocking(router.invoke) (thread hop)")
    _wrap(dispatch, "encode_activation", "platform: encode_activation (each)")
    _wrap(dispatch, "invoke", "platform: dispatch.invoke")
    _wrap(instance.Instance, "run", "platform: instance.run (HTTP to runtime)")
    _wrap(instance, "parse_run", "platform: parse_run (json.loads answer)")
    import veil.packer.packer as packer

    orig_invoke = packer.Packer.invoke

    def profiled_invoke(self: Any, *a: Any, **k: Any) -> Any:
        if PACKER_PROFILE is None or not LAST.get("warm"):
            t0 = time.perf_counter()
            try:
                return orig_invoke(self, *a, **k)
            finally:
                SPANS["packer: Packer.invoke"].append((time.perf_counter() - t0) * 1e3)
        PACKER_PROFILE.enable()
        try:
            return orig_invoke(self, *a, **k)
        finally:
            PACKER_PROFILE.disable()

    packer.Packer.invoke = profiled_invoke  # type: ignore[method-assign]
    orig_run = instance.Instance.run

    def capture(self: Any, body: bytes, timeout: float, *a: Any, **k: Any) -> Any:
        LAST["run"] = (self, body)
        return orig_run(self, body, timeout, *a, **k)

    instance.Instance.run = capture  # type: ignore[method-assign]
    _wrap(he_user, "encrypt_request", "client: encrypt")
    _wrap(he_user, "signed_request", "client: json+sign")
    _wrap(he_user, "decrypt_response", "client: parse+decrypt")


def _serve(root: str, instances: int, out: Any, stop: Any) -> None:
    """The deployment in its own process (as `veil up` runs it), instrumented."""
    instrument()
    from veil.deployment import LocalDeployment, StackOptions

    d = LocalDeployment(Path(root), StackOptions(max_instances=instances, concurrency=2, he=True, memory_mb=1536))
    info = d.start()
    out.put(info.to_json())
    stop.wait()
    d.stop()
    out.put(dict(SPANS))


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", default="lr", choices=["lr", "mlp"])
    parser.add_argument("--reps", type=int, default=40)
    parser.add_argument("--instances", type=int, default=4)
    parser.add_argument("--separate", action="store_true", help="the deployment in its own process")
    parser.add_argument("--cprofile", action="store_true", help="profile the gateway's event-loop thread")
    parser.add_argument("--json", type=Path, help="write the medians here")
    args = parser.parse_args(argv)
    if args.cprofile:
        import cProfile

        global PROFILE, PACKER_PROFILE
        PROFILE, PACKER_PROFILE = cProfile.Profile(), cProfile.Profile()
    instrument()
    import multiprocessing as mp

    import veil.sdk as sdk
    from veil.deployment import LocalDeployment, StackOptions
    from veil.he import store
    from veil.he.action import HEAction
    from veil.he.client import ActionTransport, HEClient, RemoteModel
    from veil.he.compile import compile_model
    from veil.he.tasks import breast_cancer_lr, digits_mlp
    from veil.sdk import ModelOwner, ModelUser

    _wrap(sdk.ModelUser, "_he_once", "client: _he_once (sign+HTTP+json)")
    _wrap(sdk.ModelUser, "_upload_he_keys", "client: _upload_he_keys check")
    _wrap(sdk.ModelUser, "card", "client: card")
    task = (breast_cancer_lr if args.model == "lr" else digits_mlp)()
    with tempfile.TemporaryDirectory(prefix="veil-he-profile-") as tmp:
        root = Path(tmp)
        if args.separate:
            from veil.attest.measurement import measure
            from veil.attest.sim import SimRoot
            from veil.sdk import Deployment
            from veil.trust import TrustAnchors

            ctx = mp.get_context("spawn")
            out, stop = ctx.Queue(), ctx.Event()
            child = ctx.Process(target=_serve, args=(str(root), args.instances, out, stop))
            child.start()
            info = Deployment.from_json(out.get(timeout=120))
            trust = TrustAnchors(
                keyservice_measurements=[measure("keyservice")],
                runtime_measurements=[measure("runtime")],
                allow_simulated=True,
                sim_roots=[SimRoot.load_or_create(root / "cloud" / "keyservice" / "sim-root.key").public_key],
            )
        else:
            d = LocalDeployment(
                root, StackOptions(max_instances=args.instances, concurrency=2, he=True, memory_mb=1536)
            )
            info = d.start()
            trust = d.local_trust_anchors()
        owner = ModelOwner(info, trust=trust)
        owner.register()
        user = ModelUser(info, trust=trust)
        user.register()
        compiled = compile_model(task.model, task.x_train, name=args.model)
        owner.publish(args.model, compiled, mode="he")
        owner.grant(args.model, user.id)
        store.publish(root / "dev", args.model, compiled)
        remote = RemoteModel(
            HEClient(store.client_spec(root / "dev", args.model)),
            ActionTransport(HEAction({"kind": "he", "store": str(root / "dev")})),
            args.model,
        )
        e2e: dict[str, list[float]] = {"inprocess": [], "gateway": [], "round_trip": [], "eval": []}
        inproc_parts: dict[str, list[float]] = defaultdict(list)
        try:
            for i in range(args.reps + 5):
                x = task.x_test[i % 20 : i % 20 + 1]
                t0 = time.perf_counter()
                res = remote.infer(x, "latency")
                t1 = time.perf_counter()
                if i == 4:
                    SPANS.clear()
                    LAST["warm"] = True
                user.infer(args.model, x, packing="latency")
                t2 = time.perf_counter()
                if i >= 5:
                    e2e["inprocess"].append((t1 - t0) * 1e3)
                    e2e["gateway"].append((t2 - t1) * 1e3)
                    e2e["round_trip"].append(user.last_timings["round_trip_ms"])
                    e2e["eval"].append(user.last_timings.get("eval_ms", 0.0))
                    for k, v in res.timings_ms.items():
                        inproc_parts[k].append(v)
            spans = {k: len(v) for k, v in SPANS.items()}  # the extra calls below stay out of the spans
            # the client-gateway hop alone: an unsigned request, refused before any work (401)
            import http.client
            from urllib.parse import urlsplit

            where = urlsplit(info.gateway_url)
            hop = http.client.HTTPConnection(where.hostname, where.port, timeout=10.0)
            refused = []
            for _ in range(args.reps):
                t0 = time.perf_counter()
                hop.request("POST", f"/v1/he/models/{args.model}:infer", body=b"{}")
                answer = hop.getresponse()
                answer.read()
                refused.append((time.perf_counter() - t0) * 1e3)
                assert answer.status == 401, answer.status
            hop.close()
            e2e["unsigned request refused (client-gateway hop)"] = refused
            if not args.separate:  # the same /run body straight to the instance, from an idle process
                inst, body = LAST["run"]
                direct = []
                for _ in range(args.reps):
                    t0 = time.perf_counter()
                    inst.run(body, 10.0)
                    direct.append((time.perf_counter() - t0) * 1e3)
                e2e["instance.run direct (idle gateway)"] = direct
            for k in list(SPANS):
                del SPANS[k][spans.get(k, 0) :]
        finally:
            owner.close()
            user.close()
            if args.separate:
                stop.set()
                for k, v in out.get(timeout=60).items():
                    SPANS[k] = v[5:]
                child.join(30)
            else:
                d.stop()
    print(f"model {args.model}, {args.reps} reps; medians in ms")
    for k, v in e2e.items():
        print(f"  e2e {k:58s} {median(v):8.3f}")
    for k, v in inproc_parts.items():
        print(f"  in-process {k:51s} {median(v):8.3f}")
    for k, v in sorted(SPANS.items()):
        print(f"  {k:62s} {median(v):8.3f}  (n={len(v)})")
    if args.json:
        from _common import machine, write_json

        write_json(
            args.json,
            {
                "machine": machine(),
                "model": args.model,
                "reps": args.reps,
                "separate_process": args.separate,
                "median_ms": {k: round(median(v), 3) for k, v in e2e.items()}
                | {f"in-process {k}": round(median(v), 3) for k, v in inproc_parts.items()}
                | {k: round(median(v), 3) for k, v in sorted(SPANS.items())},
            },
        )
    if PROFILE is not None:
        import pstats

        pstats.Stats(PROFILE).sort_stats("tottime").print_stats(30)
        print("packer.invoke (worker thread)")
        pstats.Stats(PACKER_PROFILE).sort_stats("tottime").print_stats(25)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
