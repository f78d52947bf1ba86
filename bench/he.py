"""`veil bench he --json PATH`: Veil's HE mode vs the conventional TenSEAL pipeline.

Two tasks: (a) logistic regression (scaler + LR) on breast_cancer, (b) MLP 64-32-10 with square
activation on digits. The parent trains and compiles once, then runs each side in its own
subprocess (so peak RSS is that side's alone): Veil (client keys/encrypt/decrypt + the HEAction
server code, wire format included) and the baseline as TenSEAL's tutorials do it (one CKKSVector
per sample, N=16384 with [60,40,40,40,40,60], all power-of-two Galois keys, high-level ops, the
scaler applied as its own encrypted layer, no fusion). Single-threaded; medians over repetitions.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

TARGETS = {
    "speedup_min": 10.0,
    "rss_ratio_max": 1 / 3,
    "latency_ms_max": {"breast_cancer_lr": 3.0, "digits_mlp": 100.0},
    "agreement_min": 0.999,
    "max_abs_error_max": 1e-3,
    "mlp_eval_keys_mb_max": 32.0,
    "mlp_throughput_min": 5000.0,
}


def _single_thread_env() -> dict[str, str]:
    env = dict(os.environ)
    for var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
        env[var] = "1"
    return env


def _peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


# ----------------------------------------------------------------------------------- workers


def worker_veil(workdir: Path, reps: int) -> dict:
    from veil.crypto.encoding import b64e
    from veil.he import store
    from veil.he.action import HEAction
    from veil.he.client import ActionTransport, HEClient, RemoteModel
    from veil.he.packing import throughput_group

    x = np.load(workdir / "x_test.npy")
    plain_scores = np.load(workdir / "plain_scores.npy")
    plain_pred = np.load(workdir / "plain_pred.npy", allow_pickle=False)
    action = HEAction({"kind": "he", "store": str(workdir / "store")})
    client = HEClient(store.client_spec(workdir / "store", "m"))
    remote = RemoteModel(client, ActionTransport(action), "m")
    action.run({"op": "upload_keys", "v": 1, "model": "m", "keys": b64e(client.eval_keys())})
    remote._uploaded = True
    remote.infer(x[:1], packing="latency")  # warm instance: model loaded, diagonals encoded
    lat = []
    for i in range(reps):
        row = x[i % len(x) : i % len(x) + 1]
        t0 = time.perf_counter()
        remote.infer(row, packing="latency")
        lat.append((time.perf_counter() - t0) * 1e3)
    single = client.encrypt(x[:1], "latency")
    # accuracy over the whole test set, one request per sample as a user would send them
    scores = np.concatenate([remote.infer(x[i : i + 1], packing="latency").scores for i in range(len(x))])
    pred = client.predict(scores)
    # batch mode: one full group in throughput packing (two samples per slot)
    group = throughput_group(client.params.slots)
    big = np.resize(x, (group, x.shape[1]))
    thr = []
    for _ in range(max(1, reps // 5)):
        t0 = time.perf_counter()
        res = remote.infer(big, packing="throughput")
        thr.append(len(big) / (time.perf_counter() - t0))
    thr_err = float(np.max(np.abs(res.scores[: len(x)] - plain_scores)))
    return {
        "latency_ms": statistics.median(lat),
        "latency_ms_all": lat,
        "rss_mb": _peak_rss_mb(),
        "eval_keys_mb": len(client.eval_keys()) / 2**20,
        "upload_kb_per_sample": sum(map(len, single.ciphertexts)) / 1024.0,
        "throughput_samples_per_s": statistics.median(thr),
        "throughput_batch": len(big),
        "throughput_max_abs_error": thr_err,
        "agreement": float(np.mean(pred == plain_pred)),
        "max_abs_error": float(np.max(np.abs(scores - plain_scores))),
        "poly_modulus_degree": client.params.poly_modulus_degree,
        "coeff_bits": list(client.params.coeff_bits),
        "galois_keys": len(client.spec["galois_elements"]),
        "latency_program": client.layout.kind,
        "throughput_level": client.params.throughput_level,
    }


def worker_baseline(workdir: Path, reps: int) -> dict:
    import tenseal as ts

    meta = json.loads((workdir / "baseline.json").read_text())
    layers = [(np.load(workdir / f"bw{i}.npy"), np.load(workdir / f"bb{i}.npy")) for i in range(meta["layers"])]
    x = np.load(workdir / "x_test.npy")
    plain_scores = np.load(workdir / "plain_scores.npy")
    ctx = ts.context(ts.SCHEME_TYPE.CKKS, poly_modulus_degree=16384, coeff_mod_bit_sizes=[60, 40, 40, 40, 40, 60])
    ctx.global_scale = 2**40
    ctx.generate_galois_keys()
    ctx.generate_relin_keys()
    scaler = meta.get("scaler")
    mu = np.asarray(scaler["mean"]) if scaler else None
    inv = 1.0 / np.asarray(scaler["scale"]) if scaler else None

    def one(row: np.ndarray) -> np.ndarray:
        enc = ts.ckks_vector(ctx, row.tolist())
        payload = enc.serialize()  # what the client uploads
        enc = ts.ckks_vector_from(ctx, payload)
        if scaler is not None:  # the standard scaler as its own encrypted layer (no fusion)
            enc = enc * inv.tolist() + (-mu * inv).tolist()
        for i, (w, b) in enumerate(layers):
            enc = enc.dot(w[:, 0].tolist()) + b.tolist() if w.shape[1] == 1 else enc.mm(w.tolist()) + b.tolist()
            if i < len(layers) - 1 and meta["square"]:
                enc = enc.square()
        result = ts.ckks_vector_from(ctx, enc.serialize())
        return np.asarray(result.decrypt())[: layers[-1][0].shape[1]], len(payload)

    one(x[0])
    lat = []
    for i in range(reps):
        t0 = time.perf_counter()
        _, upload = one(x[i % len(x)])
        lat.append((time.perf_counter() - t0) * 1e3)
    n_acc = min(len(x), meta["accuracy_samples"])
    scores = np.stack([one(x[i])[0] for i in range(n_acc)])
    if scores.shape[1] == 1:
        pred, ref = scores[:, 0] > 0, plain_scores[:n_acc, 0] > 0
    else:
        pred, ref = scores.argmax(1), plain_scores[:n_acc].argmax(1)
    keys = ctx.serialize(save_public_key=False, save_secret_key=False, save_galois_keys=True, save_relin_keys=True)
    return {
        "latency_ms": statistics.median(lat),
        "latency_ms_all": lat,
        "rss_mb": _peak_rss_mb(),
        "eval_keys_mb": len(keys) / 2**20,
        "upload_kb_per_sample": upload / 1024.0,
        "agreement": float(np.mean(pred == ref)),
        "max_abs_error": float(np.max(np.abs(scores - plain_scores[:n_acc]))),
        "accuracy_samples": n_acc,
    }


# ------------------------------------------------------------------------------------ parent


def _prepare(task_name: str, workdir: Path) -> None:
    from veil.he import store
    from veil.he.compile import compile_model
    from veil.he.compiler import from_sklearn
    from veil.he.tasks import TASKS

    task = TASKS[task_name]()
    compiled = compile_model(task.model, task.x_train, name="m")
    store.publish(workdir / "store", "m", compiled)
    np.save(workdir / "x_test.npy", task.x_test)
    np.save(workdir / "plain_scores.npy", compiled.predict_plain(task.x_test))
    np.save(workdir / "plain_pred.npy", np.asarray(task.model.predict(task.x_test)))
    plan = from_sklearn(task.model)  # unfused, for the baseline
    ops = plan.ops
    scaler = None
    if type(task.model).__name__ == "Pipeline":
        sc = task.model.steps[0][1]
        scaler = {"mean": sc.mean_.tolist(), "scale": sc.scale_.tolist()}
        ops = ops[1:]
    affines = [op for op in ops if hasattr(op, "weight")]
    for i, op in enumerate(affines):
        np.save(workdir / f"bw{i}.npy", op.weight.T)  # (in, out) as TenSEAL's mm expects
        np.save(workdir / f"bb{i}.npy", op.bias)
    meta = {
        "layers": len(affines),
        "square": len(ops) > len(affines),
        "scaler": scaler,
        "accuracy_samples": len(task.x_test) if task_name == "breast_cancer_lr" else 60,
    }
    (workdir / "baseline.json").write_text(json.dumps(meta))


def _run_worker(side: str, workdir: Path, reps: int) -> dict:
    out = workdir / f"{side}.json"
    cmd = [
        sys.executable,
        str(Path(__file__).resolve()),
        "--worker",
        side,
        "--workdir",
        str(workdir),
        "--reps",
        str(reps),
        "--out",
        str(out),
    ]
    subprocess.run(cmd, check=True, env=_single_thread_env())
    return json.loads(out.read_text())


def _summarise(name: str, veil: dict, base: dict) -> dict:
    row = {
        "latency_ms": round(veil["latency_ms"], 3),
        "baseline_latency_ms": round(base["latency_ms"], 3),
        "speedup": round(base["latency_ms"] / veil["latency_ms"], 1),
        "rss_mb": round(veil["rss_mb"], 1),
        "baseline_rss_mb": round(base["rss_mb"], 1),
        "rss_ratio": round(veil["rss_mb"] / base["rss_mb"], 3),
        "eval_keys_mb": round(veil["eval_keys_mb"], 2),
        "baseline_eval_keys_mb": round(base["eval_keys_mb"], 2),
        "upload_kb_per_sample": round(veil["upload_kb_per_sample"], 1),
        "baseline_upload_kb_per_sample": round(base["upload_kb_per_sample"], 1),
        "throughput_samples_per_s": round(veil["throughput_samples_per_s"], 1),
        "agreement": veil["agreement"],
        "max_abs_error": veil["max_abs_error"],
        "baseline_agreement": base["agreement"],
        "baseline_max_abs_error": base["max_abs_error"],
        "veil": veil,
        "baseline": base,
    }
    lat_max = TARGETS["latency_ms_max"][name]
    row["targets_met"] = {
        "speedup>=10x": row["speedup"] >= TARGETS["speedup_min"],
        "rss<=1/3": row["rss_ratio"] <= TARGETS["rss_ratio_max"],
        f"latency<={lat_max}ms": row["latency_ms"] <= lat_max,
        "agreement>=99.9%": row["agreement"] >= TARGETS["agreement_min"],
        "max_abs_error<=1e-3": row["max_abs_error"] <= TARGETS["max_abs_error_max"],
    }
    if name == "digits_mlp":
        row["targets_met"]["eval_keys<=32MiB"] = row["eval_keys_mb"] <= TARGETS["mlp_eval_keys_mb_max"]
        row["targets_met"]["throughput>=5000/s"] = row["throughput_samples_per_s"] >= TARGETS["mlp_throughput_min"]
    return row


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="veil bench he", description=__doc__.splitlines()[0])
    parser.add_argument("--json", type=Path, help="Write the report here.")
    parser.add_argument("--reps", type=int, default=15, help="Repetitions per latency median.")
    parser.add_argument("--tasks", default="breast_cancer_lr,digits_mlp")
    parser.add_argument("--worker", choices=["veil", "baseline"], help=argparse.SUPPRESS)
    parser.add_argument("--workdir", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--out", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        fn = worker_veil if args.worker == "veil" else worker_baseline
        args.out.write_text(json.dumps(fn(args.workdir, args.reps)))
        return 0
    report: dict = {
        "suite": "he",
        "reps": args.reps,
        "targets": TARGETS,
        "tasks": {},
        "host": {"cpus": os.cpu_count(), "loadavg_start": os.getloadavg()},
    }
    for name in args.tasks.split(","):
        with tempfile.TemporaryDirectory(prefix=f"veil-bench-he-{name}-") as tmp:
            workdir = Path(tmp)
            _prepare(name, workdir)
            veil = _run_worker("veil", workdir, args.reps)
            base = _run_worker("baseline", workdir, max(3, args.reps // 3))
        row = _summarise(name, veil, base)
        report["tasks"][name] = row
        short = {k: v for k, v in row.items() if k not in ("veil", "baseline")}
        print(name, json.dumps(short, indent=1), flush=True)
    report["host"]["loadavg_end"] = os.getloadavg()
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(report, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
