"""HE serving through `veil up`: the gateway, the packer, the local platform and runtime
processes, against the same HE code run in-process.

What it measures, in one run, on one deployment (`LocalDeployment`, the embedded `veil up`, with
`--instances` runtime instances at most per function):

- `serving.failed`: failed or wrong answers while `--clients` users (each with its own keys,
  uploaded once into the model store) send requests at once, over the LR and the MLP;
- `serving.gateway_over_inprocess`: p50 of one user's latency-packed request through the gateway
  (encrypt, sign, HTTP, packer, instance, decrypt) over p50 of the same request handed to
  `HEAction.run` in this process (encrypt, evaluate, decrypt), requests interleaved;
- the 64-32-16-10 MLP (`digits_mlp3`, ~73 MiB of evaluation keys) published and served;
- `hybrid_over_he`: p50 of the same model published in hybrid mode (the HE evaluator inside the
  attested runtime, its weights sealed; requests in envelopes) over its p50 in HE mode (the MLP;
  the LR's figure is reported beside it);
- `split_speedup`: a throughput-packed MLP batch of two ciphertext groups, spread over two
  instances (`max_parts=2`) vs run on one (`max_parts=1`), wall time of the whole call, medians
  of interleaved repeats. `instance_cpu_cores`: each instance is one single-threaded process, so
  two instances can use at most `min(2, cores)` cores, shared with everything else running here.

    veil bench he --serving --json docs/results/he_serving.json
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import machine, median, summary, write_json  # noqa: E402

TARGETS = {"failed": 0, "gateway_over_inprocess": 1.3, "hybrid_over_he": 1.15, "split_speedup": 1.6}


def _timed(fn: Any) -> float:
    t0 = time.perf_counter()
    fn()
    return (time.perf_counter() - t0) * 1e3


def _latencies(stack: dict[str, Any], name: str, reps: int) -> dict[str, list[float]]:
    """Interleaved single-sample latency requests: in-process, gateway (HE), gateway (hybrid)."""
    task, user, remote = stack["tasks"][name], stack["user"], stack["inprocess"][name]
    out: dict[str, list[float]] = {"inprocess": [], "gateway": [], "hybrid": []}
    for i in range(reps + 3):
        x = task.x_test[i % len(task.x_test) : i % len(task.x_test) + 1]
        samples = {
            "inprocess": _timed(lambda x=x: remote.infer(x, "latency")),
            "gateway": _timed(lambda x=x: user.infer(name, x, packing="latency")),
            "hybrid": _timed(lambda x=x: user.infer(f"{name}-hybrid", x, packing="latency")),
        }
        if i >= 3:  # the first rounds warm caches, sessions and connections
            for k, v in samples.items():
                out[k].append(v)
    return out


def _load(stack: dict[str, Any], clients: int, per_client: int) -> dict[str, Any]:
    """`clients` fresh users at once, each `per_client` requests over LR and MLP."""
    users = [stack["new_user"](("lr", "mlp")) for _ in range(clients)]
    failures: list[str] = []
    latencies: list[float] = []
    lock = threading.Lock()
    barrier = threading.Barrier(clients)

    def work(i: int) -> None:
        barrier.wait(timeout=120)
        for r in range(per_client):
            name = "mlp" if (i + r) % 4 == 0 else "lr"
            task = stack["tasks"][name]
            x = task.x_test[(i + r) % 30 : (i + r) % 30 + 2]
            t0 = time.perf_counter()
            try:
                got = users[i].infer(name, x, packing="latency", deadline_s=180)
                wrong = list(got["predictions"]) != list(task.model.predict(x))
                err = "wrong predictions" if wrong else ""
            except Exception as exc:  # noqa: BLE001 - every failure counts, whatever it is
                err = f"{getattr(exc, 'code', type(exc).__name__)}: {str(exc)[:200]}"
            with lock:
                latencies.append((time.perf_counter() - t0) * 1e3)
                if err:
                    failures.append(f"client {i} request {r}: {err}")

    threads = [threading.Thread(target=work, args=(i,), daemon=True) for i in range(clients)]
    t0 = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=600)
    hung = sum(t.is_alive() for t in threads)
    for u in users:
        u.close()
    return {
        "clients": clients,
        "requests": clients * per_client,
        "failed": len(failures) + hung * per_client,
        "failures": failures[:20],
        "hung_clients": hung,
        "wall_s": round(time.perf_counter() - t0, 2),
        "latency_ms": summary(latencies),
    }


def _mlp3(stack: dict[str, Any], reps: int) -> dict[str, Any]:
    from veil.he.compile import compile_model
    from veil.he.tasks import digits_mlp3

    task = digits_mlp3()
    compiled = compile_model(task.model, task.x_train, name="mlp3")
    stack["owner"].publish("mlp3", compiled, mode="he")
    user = stack["new_user"](("mlp3",))
    try:
        x = task.x_test[:2]
        t0 = time.perf_counter()
        first = user.infer("mlp3", x, packing="latency")
        first_ms = (time.perf_counter() - t0) * 1e3
        keys = user.he_keys.for_model("mlp3", user.card("mlp3").extra["he_spec"])
        times = [_timed(lambda: user.infer("mlp3", task.x_test[:1], packing="latency")) for _ in range(reps)]
        return {
            "served": list(first["predictions"]) == list(task.model.predict(x)),
            "layers": "64-32-16-10",
            "poly_modulus_degree": compiled.params.poly_modulus_degree,
            "eval_keys_mib": round(len(keys.client.eval_keys()) / 2**20, 1),
            "first_request_ms_with_key_upload": round(first_ms, 1),
            "p50_ms": round(median(times), 1),
        }
    finally:
        user.close()


def _split(stack: dict[str, Any], reps: int) -> dict[str, Any]:
    """One MLP throughput batch of two groups: spread over two instances vs on one."""
    user, task = stack["user"], stack["tasks"]["mlp"]
    group = user.card("mlp").extra["throughput_group"]
    n = 2 * group
    x = np.tile(task.x_test, (n // len(task.x_test) + 1, 1))[:n]
    want = task.model.predict(x)
    runs: dict[int, dict[str, list[float]]] = {p: {"call": [], "service": [], "eval": []} for p in (1, 2)}
    wrong = 0
    for i in range(reps + 1):
        for parts in (1, 2) if i % 2 == 0 else (2, 1):
            t0 = time.perf_counter()
            got = user.infer("mlp", x, packing="throughput", max_parts=parts, deadline_s=600)
            if i:  # the first round warms both instances
                runs[parts]["call"].append((time.perf_counter() - t0) * 1e3)
                runs[parts]["service"].append(user.last_timings["round_trip_ms"])
                runs[parts]["eval"].append(user.last_timings.get("eval_ms", 0.0))
                assert user.last_timings.get("parts", 1) == parts, user.last_timings
            wrong += int(np.mean(got["predictions"] == want) < 0.99)
    one, two = runs[1]["service"], runs[2]["service"]
    return {
        "samples": n,
        "groups": 2,
        "what": "service time of the batch (the HTTP call to the gateway: upload, split, evaluate, reassemble, "
        "download); end to end adds the client's encryption and decryption, the same either way",
        "one_instance_ms": summary(one, 1),
        "two_instances_ms": summary(two, 1),
        "one_instance_samples_per_s": round(n / (median(one) / 1e3), 1),
        "two_instances_samples_per_s": round(n / (median(two) / 1e3), 1),
        "speedup": round(median(one) / median(two), 3),
        "end_to_end_ms": {"one": summary(runs[1]["call"], 1), "two": summary(runs[2]["call"], 1)},
        "end_to_end_speedup": round(median(runs[1]["call"]) / median(runs[2]["call"]), 3),
        "eval_ms": {"one": summary(runs[1]["eval"], 1), "two_slowest_part": summary(runs[2]["eval"], 1)},
        "wrong_batches": wrong,
        "instance_cpu_cores": min(2, os.cpu_count() or 1),
    }


def _stack(root: Path, instances: int, memory_mb: int) -> tuple[Any, dict[str, Any]]:
    from veil.deployment import LocalDeployment, StackOptions
    from veil.he import store
    from veil.he.action import HEAction
    from veil.he.client import ActionTransport, HEClient, RemoteModel
    from veil.he.compile import compile_model
    from veil.he.tasks import breast_cancer_lr, digits_mlp
    from veil.sdk import ModelOwner, ModelUser

    # a throughput batch of two MLP groups (128 ciphertexts, ~32 MB of JSON) needs more than the
    # default 512 MB per instance while it is parsed and evaluated
    options = StackOptions(max_instances=instances, concurrency=2, he=True, memory_mb=memory_mb)
    deployment = LocalDeployment(root, options)
    info = deployment.start()
    trust = deployment.local_trust_anchors()
    owner = ModelOwner(info, trust=trust, timeout=600)
    owner.register()

    def new_user(grant: tuple[str, ...]) -> Any:
        u = ModelUser(info, trust=trust, timeout=600)
        u.register()
        for model in grant:
            owner.grant(model, u.id)
        return u

    tasks = {"lr": breast_cancer_lr(), "mlp": digits_mlp()}
    user = new_user(())
    dev = root / "dev-store"
    action = HEAction({"kind": "he", "store": str(dev)})
    inprocess = {}
    for name, task in tasks.items():
        compiled = compile_model(task.model, task.x_train, name=name)
        for mode, model_id in (("he", name), ("hybrid", f"{name}-hybrid")):
            owner.publish(model_id, compiled, mode=mode)
            owner.grant(model_id, user.id)
        user.request_access(f"{name}-hybrid")
        store.publish(dev, name, compiled)
        inprocess[name] = RemoteModel(HEClient(store.client_spec(dev, name)), ActionTransport(action), name)
    return deployment, {
        "owner": owner,
        "user": user,
        "tasks": tasks,
        "inprocess": inprocess,
        "new_user": new_user,
    }


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="veil bench he --serving", description=__doc__.splitlines()[0])
    parser.add_argument("--json", type=Path, help="Write the report here.")
    parser.add_argument("--reps", type=int, default=30, help="Interleaved latency repeats of the MLP.")
    parser.add_argument(
        "--lr-reps",
        type=int,
        default=150,
        help="Interleaved latency repeats of the LR (a few ms each: more repeats steady its median on a busy machine).",
    )
    parser.add_argument("--clients", type=int, default=16, help="Concurrent users in the load phase.")
    parser.add_argument("--requests", type=int, default=4, help="Requests per user in the load phase.")
    parser.add_argument("--instances", type=int, default=4, help="Runtime instances at most per function.")
    parser.add_argument("--memory-mb", type=int, default=1536, help="Memory limit of each instance.")
    parser.add_argument("--split-reps", type=int, default=4, help="Repeats of the split batch (each way).")
    parser.add_argument(
        "--only",
        choices=["all", "split", "latency"],
        default="all",
        help="Measure only this part (latency: the gateway/in-process and hybrid/HE p50s, nothing else).",
    )
    parser.add_argument("--quick", action="store_true", help="Few repeats: a smoke run, not a figure.")
    args = parser.parse_args(argv)
    if args.quick:
        args.reps, args.lr_reps, args.clients, args.requests, args.split_reps = 5, 5, 4, 2, 1
    report: dict[str, Any] = {"machine": machine(), "targets": TARGETS, "options": vars(args) | {"json": None}}
    with tempfile.TemporaryDirectory(prefix="veil-bench-he-serving-") as tmp:
        deployment, stack = _stack(Path(tmp), args.instances, args.memory_mb)
        try:
            if args.only == "split":  # iterating on one figure: the others stay unmeasured
                split = _split(stack, args.split_reps)
                print(split)
                return 0
            lat = {name: _latencies(stack, name, args.lr_reps if name == "lr" else args.reps) for name in ("lr", "mlp")}
            p50 = {name: {k: round(median(v), 3) for k, v in runs.items()} for name, runs in lat.items()}
            if args.only == "latency":
                ratios = {name: round(p["gateway"] / p["inprocess"], 3) for name, p in p50.items()}
                hybrid = {name: round(p["hybrid"] / p["gateway"], 3) for name, p in p50.items()}
                print(f"gateway/in-process p50: {ratios} | p50 ms: {p50} | hybrid/HE p50: {hybrid}")
                return 0
            load = _load(stack, args.clients, args.requests)
            mlp3 = _mlp3(stack, max(3, args.reps // 5))
            split = _split(stack, args.split_reps)
        finally:
            for principal in (stack["owner"], stack["user"]):
                principal.close()
            deployment.stop()
    ratios = {name: round(p["gateway"] / p["inprocess"], 3) for name, p in p50.items()}
    hybrid = {name: round(p["hybrid"] / p["gateway"], 3) for name, p in p50.items()}
    report.update(
        {
            "serving": {
                "failed": load["failed"],
                "gateway_over_inprocess": ratios,
                "p50_ms": p50,
                "latency_ms": {name: {k: summary(v) for k, v in runs.items()} for name, runs in lat.items()},
                "load": load,
                "mlp3": mlp3,
            },
            "hybrid_over_he": hybrid["mlp"],
            "hybrid_over_he_by_model": hybrid,
            "split_speedup": split["speedup"],
            "split": split,
            "instance_cpu_cores": split["instance_cpu_cores"],
        }
    )
    print(
        f"failed {load['failed']}/{load['requests']} | gateway/in-process p50: lr {ratios['lr']} "
        f"({p50['lr']['gateway']:.2f} vs {p50['lr']['inprocess']:.2f} ms), mlp {ratios['mlp']} "
        f"({p50['mlp']['gateway']:.1f} vs {p50['mlp']['inprocess']:.1f} ms) | mlp3 served {mlp3['served']} "
        f"({mlp3['eval_keys_mib']} MiB keys) | hybrid/HE p50: mlp {hybrid['mlp']}, lr {hybrid['lr']} | "
        f"split speedup {split['speedup']} on {split['instance_cpu_cores']} cores"
    )
    if args.json:
        write_json(args.json, report)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
