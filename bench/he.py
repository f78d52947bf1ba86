"""`veil bench he --json PATH`: Veil's HE mode against TenSEAL set up fairly, and as it was before.

Tasks (veil.he.tasks): `lr` (scaler + logistic regression, breast_cancer), `mlp` (digits
64-32-10, square), `mlp3` (digits 64-32-16-10, two squares), `cnn` (digits Conv 3x3/2 ->
square -> Dense, compiled from ONNX). The parent trains and compiles once (with the compiler's
measured-precision check), then runs every side in its own subprocess:

- **veil**: the latency path only, as served minus HTTP (the SDK's key chain and request
  encryption, the eval-key record in the model store as the gateway's upload leaves it, the
  instance fetching it on the first request, `HEAction.run` with the wire format), so its peak
  RSS is measured like the baselines'; `veil_batch` measures throughput packing in another process.
- **fair** (TenSEAL as its own tutorials configure it): the smallest ring the depth fits, the
  tutorials' chains (LR tutorial: N=4096, [40, 20, 40], scale 2^20; MNIST tutorial: N=8192,
  [31, 26 x depth, 31], scale 2^26), standardisation on the client, `dot` / `mm` for dense
  layers, `im2col_encoding` + `conv2d_im2col` for the convolution, n_threads=1.
- **oversized** (the pipeline this benchmark used to compare against): N=16384, [60, 40 x 4+,
  60], the scaler as an encrypted layer, otherwise the same ops.

Every worker imports the same modules (numpy, tenseal, Veil's client and server) before it
starts, and peak RSS is VmHWM after the latency runs; `he_rss_mb` subtracts the RSS after
those imports (the working set of the HE computation itself). One thread everywhere; medians.
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

TASKS = {"lr": "breast_cancer_lr", "mlp": "digits_mlp", "mlp3": "digits_mlp3", "cnn": "digits_cnn"}
TARGETS = {
    "speedup_vs_fair_min": {"lr": 5.0, "mlp": 20.0, "cnn": 10.0},
    "rss_ratio_vs_fair_max": 0.6,
    "agreement_min": 1.0,
    "max_abs_error_max": 1e-4,
    "latency_ms_max": {"mlp": 40.0, "mlp3": 150.0, "cnn": 200.0},
    "eval_keys_mb_max": {"mlp3": 32.0},
    "throughput_min": {"cnn": 3000.0},
    "cost_model_error_max": 0.2,
}
PRECISION = 1e-4
VERIFY_SAMPLES = 32


def _single_thread_env() -> dict[str, str]:
    env = dict(os.environ)
    for var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
        env[var] = "1"
    return env


def _peak_rss_mb() -> float:
    """This process's peak RSS (VmHWM). Not ru_maxrss: Linux carries that over fork and exec, so
    every worker would report at least the parent's peak (the parent trains and compiles)."""
    try:
        with open("/proc/self/status") as fh:
            for line in fh:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024.0
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def _prelude() -> None:
    """The imports every worker makes first, so no side's peak RSS counts a library the other skipped."""
    import tenseal  # noqa: F401

    import veil.he.action  # noqa: F401
    import veil.he.client  # noqa: F401


# ----------------------------------------------------------------------------------- workers


BENCH_USER = "5eed" * 16  # the principal id the gateway would have authenticated


class _ServedModel:
    """One user's model as the served path has it, minus HTTP: the SDK's key chain (keys made
    once and kept in the user's key file), the eval-key record in the model store as the
    gateway's streamed upload leaves it, and requests naming the authenticated user, so the
    instance fetches the keys from the store as any instance lacking them does."""

    def __init__(self, workdir: Path) -> None:
        from veil.he import store
        from veil.he.action import HEAction
        from veil.he.keys import record_header, store_id
        from veil.he.user import HEKeyChain
        from veil.store.local import LocalModelStore

        self.action = HEAction({"kind": "he", "store": str(workdir / "store")})
        chain = HEKeyChain(BENCH_USER, workdir / "user-keys")
        self.keys = chain.for_model("m", store.client_spec(workdir / "store", "m"))
        self.client = self.keys.client
        upload = LocalModelStore(workdir / "store", create=True).begin_upload(store_id(self.keys.key_id), 1)
        try:
            upload.write(record_header(BENCH_USER, "m"))
            with (self.keys.directory / "evalkeys.bin").open("rb") as blob:
                for piece in iter(lambda: blob.read(1 << 20), b""):
                    upload.write(piece)
            upload.commit()
        finally:
            upload.abort()

    def infer(self, x: np.ndarray, packing: str) -> tuple[np.ndarray, float]:
        """(scores, server-side evaluation ms) for samples `x`."""
        from veil.he.user import decrypt_response, encrypt_request

        req, batch = encrypt_request("m", self.keys, x, packing)
        raw = self.action.run({**req.to_json(), "op": "infer", "model": "m", "user": BENCH_USER})
        return decrypt_response(self.keys, raw, batch.packing, batch.batch)["scores"], float(raw["eval_ms"])


def worker_veil(workdir: Path, reps: int) -> dict:
    x = np.load(workdir / "x_test.npy")
    plain_scores = np.load(workdir / "plain_scores.npy")
    plain_pred = np.load(workdir / "plain_pred.npy", allow_pickle=False)
    served = _ServedModel(workdir)
    client = served.client
    served.infer(x[:1], "latency")  # warm instance: model loaded, keys fetched, plaintexts encoded
    lat, evals = [], []
    for i in range(reps):
        row = x[i % len(x) : i % len(x) + 1]
        t0 = time.perf_counter()
        _, eval_ms = served.infer(row, "latency")
        lat.append((time.perf_counter() - t0) * 1e3)
        evals.append(eval_ms)
    per = client.layout.samples_per_ciphertext
    full = []  # one ciphertext full of samples (coeff, conv and bsgs programs hold several)
    for i in range(max(3, reps // 3)):
        t0 = time.perf_counter()
        served.infer(np.resize(x[i:], (per, x.shape[1])), "latency")
        full.append((time.perf_counter() - t0) * 1e3)
    single = client.encrypt(x[:1], "latency")
    # accuracy over the whole test set, one request per sample as a user would send them
    scores = np.concatenate([served.infer(x[i : i + 1], "latency")[0] for i in range(len(x))])
    pred = client.predict(scores)
    cost = client.spec["cost"]
    rss = _peak_rss_mb()
    return {
        "latency_ms": statistics.median(lat),
        "latency_ms_all": lat,
        "eval_ms": statistics.median(evals),
        "latency_full_ciphertext_ms": statistics.median(full),
        "samples_per_latency_ciphertext": per,
        "rss_mb": rss,
        "eval_keys_mb": len(client.eval_keys()) / 2**20,
        "key_fetches": served.action.keys.fetches,
        "upload_kb_per_sample": sum(map(len, single.ciphertexts)) / 1024.0,
        "agreement": float(np.mean(pred == plain_pred)),
        "max_abs_error": float(np.max(np.abs(scores - plain_scores))),
        "poly_modulus_degree": client.params.poly_modulus_degree,
        "coeff_bits": list(client.params.coeff_bits),
        "scale_bits": client.params.scale_bits,
        "galois_keys": len(client.spec["galois_elements"]),
        "latency_program": client.layout.kind,
        "throughput_level": client.params.throughput_level,
        "cost_model_latency_ms": cost["latency_per_ct"],
    }


def worker_veil_batch(workdir: Path, reps: int) -> dict:
    from veil.he.packing import throughput_group

    x = np.load(workdir / "x_test.npy")
    plain_scores = np.load(workdir / "plain_scores.npy")
    served = _ServedModel(workdir)
    client = served.client
    group = throughput_group(client.params.slots)
    big = np.resize(x, (group, x.shape[1]))
    served.infer(big[:2], "throughput")
    rates, walls = [], []
    for _ in range(max(2, reps // 5)):
        t0 = time.perf_counter()
        scores, _ = served.infer(big, "throughput")
        wall = time.perf_counter() - t0
        walls.append(wall * 1e3)
        rates.append(len(big) / wall)
    return {
        "throughput_samples_per_s": statistics.median(rates),
        "throughput_group_ms": statistics.median(walls),
        "throughput_batch": len(big),
        "throughput_max_abs_error": float(np.max(np.abs(scores[: len(x)] - plain_scores))),
        "cost_model_throughput_ms": client.spec["cost"]["throughput_per_group"],
        "rss_mb": _peak_rss_mb(),
    }


def _tenseal_config(side: str, meta: dict) -> tuple[int, list[int], int]:
    """(N, chain, log2 scale) as the TenSEAL tutorials size them (fair) or as this bench used to (oversized)."""
    depth = meta["depth"] + (1 if side == "oversized" and meta["scaler"] else 0)
    if side == "oversized":
        return 16384, [60] + [40] * max(4, depth) + [60], 40
    if depth == 1:  # Tutorial 1 (logistic regression): N=4096, [40, 20, 40], scale 2^20
        return 4096, [40, 20, 40], 20
    chain = [31] + [26] * depth + [31]  # Tutorial 4 (MNIST CNN): [31, 26, ..., 26, 31], scale 2^26
    return _ring_for(chain), chain, 26


def _ring_for(chain: list[int]) -> int:
    """The smallest ring whose 128-bit bound holds `chain` (the HomomorphicEncryption.org table)."""
    for n, limit in ((4096, 109), (8192, 218), (16384, 438), (32768, 881)):
        if sum(chain) <= limit:
            return n
    raise ValueError("no ring fits")


def worker_tenseal(workdir: Path, reps: int, side: str) -> dict:
    import tenseal as ts

    meta = json.loads((workdir / "baseline.json").read_text())
    arrays = np.load(workdir / "baseline.npz")
    x = np.load(workdir / "x_test.npy")
    plain_scores = np.load(workdir / "plain_scores.npy")
    n, chain, scale_bits = _tenseal_config(side, meta)
    ctx = _tenseal_context(ts, n, chain, scale_bits)
    scaler = meta["scaler"]
    mu = np.asarray(scaler["mean"]) if scaler else None
    inv = 1.0 / np.asarray(scaler["scale"]) if scaler else None
    out_dim = plain_scores.shape[1]

    def encrypt(row: np.ndarray):  # noqa: ANN202
        if scaler is not None and side == "fair":
            row = (row - mu) * inv  # the tutorials standardise on the client
        conv = next((lay for lay in meta["layers"] if lay["kind"] == "conv"), None)
        if conv is None:
            return ts.ckks_vector(ctx, row.tolist()), None
        c, h, w = conv["in_shape"]
        p = conv["padding"]
        img = np.pad(row.reshape(h, w), p)
        k = arrays["kernels"].shape[2]
        return ts.im2col_encoding(ctx, img.tolist(), k, k, conv["stride"])

    def one(row: np.ndarray) -> tuple[np.ndarray, int]:
        enc, windows = encrypt(row)
        payload = enc.serialize()  # what the client uploads
        enc = ts.ckks_vector_from(ctx, payload)
        if scaler is not None and side == "oversized":  # the standard scaler as its own encrypted layer
            enc = enc * inv.tolist() + (-mu * inv).tolist()
        for i, lay in enumerate(meta["layers"]):
            if lay["kind"] == "conv":
                kernels, bias = arrays["kernels"], arrays["conv_bias"]
                chans = [
                    enc.conv2d_im2col(kernels[c, 0].tolist(), windows) + float(bias[c]) for c in range(len(kernels))
                ]
                enc = ts.CKKSVector.pack_vectors(chans)
            elif lay["kind"] == "square":
                enc = enc.square()
            else:
                w, b = arrays[f"w{i}"], arrays[f"b{i}"]
                enc = enc.dot(w[:, 0].tolist()) + b.tolist() if w.shape[1] == 1 else enc.mm(w.tolist()) + b.tolist()
        result = ts.ckks_vector_from(ctx, enc.serialize())
        return np.asarray(result.decrypt())[:out_dim], len(payload)

    extra = 0
    while True:  # a chain one prime short shows as "scale out of bounds": add primes as a user would
        try:
            one(x[0])
            break
        except ValueError:
            if side != "fair" or extra >= 2:
                raise
            extra += 1
            chain = [chain[0], *[chain[1]] * (len(chain) - 2 + 1), chain[-1]]
            n = max(n, _ring_for(chain))
            ctx = _tenseal_context(ts, n, chain, scale_bits)
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
    rss = _peak_rss_mb()
    keys = ctx.serialize(save_public_key=False, save_secret_key=False, save_galois_keys=True, save_relin_keys=True)
    return {
        "latency_ms": statistics.median(lat),
        "latency_ms_all": lat,
        "rss_mb": rss,
        "eval_keys_mb": len(keys) / 2**20,
        "upload_kb_per_sample": upload / 1024.0,
        "agreement": float(np.mean(pred == ref)),
        "max_abs_error": float(np.max(np.abs(scores - plain_scores[:n_acc]))),
        "accuracy_samples": n_acc,
        "poly_modulus_degree": n,
        "coeff_bits": chain,
        "scale_bits": scale_bits,
        "extra_primes_needed": extra,
    }


def _tenseal_context(ts, n: int, chain: list[int], scale_bits: int):  # noqa: ANN001, ANN202
    ctx = ts.context(ts.SCHEME_TYPE.CKKS, poly_modulus_degree=n, coeff_mod_bit_sizes=chain, n_threads=1)
    ctx.global_scale = 2**scale_bits
    ctx.generate_galois_keys()
    ctx.generate_relin_keys()
    return ctx


# ------------------------------------------------------------------------------------ parent


def _baseline_model(task, workdir: Path) -> None:  # noqa: ANN001
    """The source model's layers, unfused, for the TenSEAL sides (they get no compiler)."""
    model = task.model
    layers: list[dict] = []
    arrays: dict[str, np.ndarray] = {}
    scaler = None
    if type(model).__name__ == "Pipeline":
        sc = model.steps[0][1]
        scaler = {"mean": sc.mean_.tolist(), "scale": sc.scale_.tolist()}
        est = model.steps[-1][1]
        arrays["w0"], arrays["b0"] = np.atleast_2d(est.coef_).T, np.atleast_1d(est.intercept_)
        layers.append({"kind": "dense"})
    elif type(model).__name__ == "PolyCNN":
        arrays["kernels"], arrays["conv_bias"] = model.kernels, model.conv_bias
        layers += [
            {"kind": "conv", "in_shape": list(model.in_shape), "stride": model.stride, "padding": model.padding},
            {"kind": "square"},
            {"kind": "dense"},
        ]
        arrays["w2"], arrays["b2"] = model.dense, model.dense_bias
    else:  # PolyMLP with a square activation
        for j, (w, b) in enumerate(zip(model.coefs_, model.intercepts_, strict=True)):
            if j:
                layers.append({"kind": "square"})
            arrays[f"w{len(layers)}"], arrays[f"b{len(layers)}"] = w, b
            layers.append({"kind": "dense"})
    depth = sum(1 for lay in layers)
    meta = {
        "layers": layers,
        "depth": depth,
        "scaler": scaler,
        "accuracy_samples": len(task.x_test) if task.name == "breast_cancer_lr" else 60,
    }
    (workdir / "baseline.json").write_text(json.dumps(meta))
    np.savez(workdir / "baseline.npz", **arrays)


def _prepare(short: str, workdir: Path) -> dict:
    from veil.he import store
    from veil.he.compile import compile_model
    from veil.he.tasks import TASKS as MAKERS

    task = MAKERS[TASKS[short]]()
    t0 = time.perf_counter()
    compiled = compile_model(task.model, task.x_train, precision=PRECISION, name="m", verify_samples=VERIFY_SAMPLES)
    compile_s = time.perf_counter() - t0
    store.publish(workdir / "store", "m", compiled)
    np.save(workdir / "x_test.npy", task.x_test)
    np.save(workdir / "plain_scores.npy", compiled.predict_plain(task.x_test))
    np.save(workdir / "plain_pred.npy", np.asarray(task.model.predict(task.x_test)))
    _baseline_model(task, workdir)
    return {
        "compile_s": round(compile_s, 2),
        "measured_error_at_compile": compiled.meta.get("measured_error"),
        "headroom_bits": compiled.meta.get("headroom_bits"),
        "plaintext_accuracy": float(np.mean(task.model.predict(task.x_test) == task.y_test)),
    }


def _run_worker(side: str, workdir: Path, reps: int) -> dict:
    out = workdir / f"{side}.json"
    cmd = [sys.executable, str(Path(__file__).resolve()), "--worker", side, "--workdir", str(workdir)]
    cmd += ["--reps", str(reps), "--out", str(out)]
    subprocess.run(cmd, check=True, env=_single_thread_env())
    return json.loads(out.read_text())


def _ratio(a: float, b: float) -> float:
    return round(a / b, 3) if b else float("nan")


def _summarise(name: str, prep: dict, veil: dict, batch: dict, fair: dict, over: dict) -> dict:
    row = {
        "latency_ms": round(veil["latency_ms"], 3),
        "fair_baseline_latency_ms": round(fair["latency_ms"], 3),
        "oversized_baseline_latency_ms": round(over["latency_ms"], 3),
        "speedup_vs_fair": round(fair["latency_ms"] / veil["latency_ms"], 2),
        "speedup_vs_oversized": round(over["latency_ms"] / veil["latency_ms"], 2),
        "rss_mb": round(veil["rss_mb"], 1),
        "fair_baseline_rss_mb": round(fair["rss_mb"], 1),
        "oversized_baseline_rss_mb": round(over["rss_mb"], 1),
        "rss_ratio_vs_fair": _ratio(veil["rss_mb"], fair["rss_mb"]),
        "rss_ratio_vs_oversized": _ratio(veil["rss_mb"], over["rss_mb"]),
        # peak minus the RSS after the common imports: what the HE computation itself holds
        "he_rss_mb": round(veil["he_rss_mb"], 1),
        "fair_baseline_he_rss_mb": round(fair["he_rss_mb"], 1),
        "he_rss_ratio_vs_fair": _ratio(veil["he_rss_mb"], fair["he_rss_mb"]),
        "agreement": veil["agreement"],
        "max_abs_error": veil["max_abs_error"],
        "throughput_samples_per_s": round(batch["throughput_samples_per_s"], 1),
        "throughput_max_abs_error": batch["throughput_max_abs_error"],
        "eval_keys_mb": round(veil["eval_keys_mb"], 2),
        "fair_baseline_eval_keys_mb": round(fair["eval_keys_mb"], 2),
        "oversized_baseline_eval_keys_mb": round(over["eval_keys_mb"], 2),
        "fair_baseline_agreement": fair["agreement"],
        "fair_baseline_max_abs_error": fair["max_abs_error"],
        "oversized_baseline_agreement": over["agreement"],
        "oversized_baseline_max_abs_error": over["max_abs_error"],
        "latency_full_ciphertext_ms": round(veil["latency_full_ciphertext_ms"], 3),
        "samples_per_latency_ciphertext": veil["samples_per_latency_ciphertext"],
        "cost_model_latency_error": round(veil["cost_model_latency_ms"] / veil["latency_ms"] - 1, 3),
        "cost_model_throughput_error": round(batch["cost_model_throughput_ms"] / batch["throughput_group_ms"] - 1, 3),
        "compile": prep,
        "veil": veil,
        "veil_batch": batch,
        "fair_baseline": fair,
        "oversized_baseline": over,
    }
    met: dict[str, bool] = {}
    if name in TARGETS["speedup_vs_fair_min"]:
        lim = TARGETS["speedup_vs_fair_min"][name]
        met[f"speedup_vs_fair>={lim}x"] = row["speedup_vs_fair"] >= lim
    met["rss<=0.6x_fair"] = row["rss_ratio_vs_fair"] <= TARGETS["rss_ratio_vs_fair_max"]
    met["he_rss<=0.6x_fair"] = row["he_rss_ratio_vs_fair"] <= TARGETS["rss_ratio_vs_fair_max"]
    met["agreement=100%"] = row["agreement"] >= TARGETS["agreement_min"]
    met["max_abs_error<=1e-4"] = row["max_abs_error"] <= TARGETS["max_abs_error_max"]
    if name in TARGETS["latency_ms_max"]:
        met[f"latency<={TARGETS['latency_ms_max'][name]}ms"] = row["latency_ms"] <= TARGETS["latency_ms_max"][name]
    if name in TARGETS["eval_keys_mb_max"]:
        met[f"eval_keys<={TARGETS['eval_keys_mb_max'][name]}MiB"] = (
            row["eval_keys_mb"] <= TARGETS["eval_keys_mb_max"][name]
        )
    if name in TARGETS["throughput_min"]:
        lim = TARGETS["throughput_min"][name]
        met[f"throughput>={lim}/s"] = row["throughput_samples_per_s"] >= lim
    lim = TARGETS["cost_model_error_max"]
    met["cost_model_within_20%"] = (
        abs(row["cost_model_latency_error"]) <= lim and abs(row["cost_model_throughput_error"]) <= lim
    )
    row["targets_met"] = met
    return row


# ------------------------------------------------------------------------------------ coverage


def _coverage_models() -> list[tuple[str, object, np.ndarray, np.ndarray, np.ndarray]]:
    """(family, model or ONNX, x_train, x_test, y_test) for every family docs/he.md lists."""
    import warnings

    from sklearn import datasets
    from sklearn.decomposition import PCA, TruncatedSVD
    from sklearn.discriminant_analysis import LinearDiscriminantAnalysis
    from sklearn.ensemble import RandomForestClassifier
    from sklearn.linear_model import LinearRegression, LogisticRegression, Ridge
    from sklearn.model_selection import train_test_split
    from sklearn.neural_network import MLPClassifier
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import MinMaxScaler, Normalizer, RobustScaler, StandardScaler
    from sklearn.svm import SVC, LinearSVC

    from veil.he.tasks import digits_cnn, digits_mlp, digits_mlp3

    def split(loader):  # noqa: ANN001, ANN202
        x, y = loader(return_X_y=True)
        return train_test_split(x, y, test_size=0.25, random_state=0)

    cancer, wine, diabetes = (
        split(datasets.load_breast_cancer),
        split(datasets.load_wine),
        split(datasets.load_diabetes),
    )
    xd, yd = datasets.load_digits(return_X_y=True)
    digits = train_test_split(xd / 16.0, yd, test_size=0.25, random_state=0)
    rows = []

    def add(family, est, data):  # noqa: ANN001, ANN202
        xtr, xte, ytr, yte = data
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            model = est.fit(xtr, ytr) if hasattr(est, "fit") else est
        rows.append((family, model, xtr, xte, yte))

    add(
        "StandardScaler + LogisticRegression (breast_cancer)",
        make_pipeline(StandardScaler(), LogisticRegression(max_iter=3000)),
        cancer,
    )
    add(
        "StandardScaler + LogisticRegression, 3 classes (wine)",
        make_pipeline(StandardScaler(), LogisticRegression(max_iter=3000)),
        wine,
    )
    add(
        "StandardScaler + PCA(8) + LogisticRegression",
        make_pipeline(StandardScaler(), PCA(8), LogisticRegression(max_iter=3000)),
        cancer,
    )
    add(
        "RobustScaler + TruncatedSVD(5) + LinearSVC (wine)",
        make_pipeline(RobustScaler(), TruncatedSVD(5, random_state=0), LinearSVC()),
        wine,
    )
    add("LinearDiscriminantAnalysis (wine)", make_pipeline(StandardScaler(), LinearDiscriminantAnalysis()), wine)
    add("MinMaxScaler + Ridge (diabetes)", make_pipeline(MinMaxScaler(), Ridge(alpha=0.1)), diabetes)
    add("LinearRegression (diabetes)", LinearRegression(), diabetes)
    for make in (digits_mlp, digits_mlp3, digits_cnn):
        t = make()
        rows.append((f"{t.name} (square activations)", t.model, t.x_train, t.x_test, t.y_test))
    for act in ("relu", "tanh", "logistic"):
        add(
            f"MLPClassifier 64-16-10, {act} (digits)",
            MLPClassifier((16,), activation=act, max_iter=300, random_state=0),
            digits,
        )
    add("SVC(kernel='rbf')", SVC(), cancer)
    add("SVC(kernel='linear'), 3 classes (one-vs-one)", SVC(kernel="linear"), wine)
    add("RandomForestClassifier", RandomForestClassifier(10, random_state=0), cancer)
    add("Normalizer + LogisticRegression", make_pipeline(Normalizer(), LogisticRegression(max_iter=3000)), cancer)
    return rows


def coverage(out: Path) -> list[dict]:
    """Compile every family, run the accepted ones encrypted, and write rows for docs/he.md."""
    from veil.he import store
    from veil.he.action import HEAction
    from veil.he.client import ActionTransport, HEClient, RemoteModel
    from veil.he.compile import compile_model
    from veil.he.errors import HEError

    rows = []
    for family, model, xtr, xte, _yte in _coverage_models():
        row: dict = {"family": family}
        try:
            compiled = compile_model(model, xtr, precision=PRECISION, name="c", verify_samples=16)
        except HEError as exc:
            row.update(accepted=False, why=exc.message[:160])
            rows.append(row)
            print(json.dumps(row), flush=True)
            continue
        with tempfile.TemporaryDirectory() as tmp:
            store.publish(Path(tmp), "c", compiled)
            remote = RemoteModel(
                HEClient(store.client_spec(Path(tmp), "c")), ActionTransport(HEAction({"store": tmp})), "c"
            )
            remote.upload_keys()
            remote.infer(xte[:1], packing="latency")
            lat = []
            for i in range(5):
                t0 = time.perf_counter()
                remote.infer(xte[i : i + 1], packing="latency")
                lat.append((time.perf_counter() - t0) * 1e3)
            res = remote.infer(xte, packing="throughput")
        approx = compiled.meta.get("approximation")
        p = compiled.params
        row.update(
            accepted=True,
            program=compiled.latency,
            ring=p.poly_modulus_degree,
            primes=list(p.coeff_bits),
            latency_ms=round(statistics.median(lat), 2),
            max_abs_error=float(np.max(np.abs(res.scores - compiled.predict_plain(xte)))),
            agreement_with_source=None
            if compiled.plan.output == "regression"
            else float(np.mean(res.predictions == model.predict(xte))),
            approximation=None
            if not approx
            else {"degree": approx["degree"], "prediction_change": approx["prediction_change"]},
        )
        rows.append(row)
        print(json.dumps(row), flush=True)
    out.write_text(json.dumps(rows, indent=1))
    return rows


WORKERS = {
    "veil": worker_veil,
    "veil_batch": worker_veil_batch,
    "fair": lambda w, r: worker_tenseal(w, r, "fair"),
    "oversized": lambda w, r: worker_tenseal(w, r, "oversized"),
}


def _serving_main(argv: list[str]) -> int:
    """`veil bench he --serving ...`: the serving benchmark lives in bench/he_serving.py (through
    `veil up`, not in-process), kept apart so each file measures one thing."""
    import importlib.util

    path = Path(__file__).with_name("he_serving.py")
    if not path.exists():
        print(f"{path} not found", file=sys.stderr)
        return 2
    spec = importlib.util.spec_from_file_location("veil_bench_he_serving", path)
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module.main(argv)


def main(argv: list[str]) -> int:
    if "--serving" in argv:
        return _serving_main([a for a in argv if a != "--serving"])
    parser = argparse.ArgumentParser(prog="veil bench he", description=__doc__.splitlines()[0])
    parser.add_argument("--serving", action="store_true", help="Instead: the serving benchmark (bench/he_serving.py).")
    parser.add_argument("--json", type=Path, help="Write the report here.")
    parser.add_argument("--reps", type=int, default=15, help="Repetitions per latency median.")
    parser.add_argument("--tasks", default=",".join(TASKS), help=f"Comma-separated, of {', '.join(TASKS)}.")
    parser.add_argument("--coverage", type=Path, help="Instead: compile every model family, write the table here.")
    parser.add_argument("--worker", choices=sorted(WORKERS), help=argparse.SUPPRESS)
    parser.add_argument("--workdir", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--out", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        _prelude()
        base = _peak_rss_mb()  # after the common imports, before any HE object exists
        result = WORKERS[args.worker](args.workdir, args.reps)
        result["base_rss_mb"] = base
        result["he_rss_mb"] = result["rss_mb"] - base
        args.out.write_text(json.dumps(result))
        return 0
    if args.coverage:
        coverage(args.coverage)
        return 0
    report: dict = {
        "suite": "he",
        "reps": args.reps,
        "precision_target": PRECISION,
        "targets": TARGETS,
        "tasks": {},
        "host": {"cpus": os.cpu_count(), "loadavg_start": os.getloadavg()},
    }
    for name in args.tasks.split(","):
        if name not in TASKS:
            parser.error(f"unknown task {name!r}; expected {', '.join(TASKS)}")
        with tempfile.TemporaryDirectory(prefix=f"veil-bench-he-{name}-") as tmp:
            workdir = Path(tmp)
            prep = _prepare(name, workdir)
            veil = _run_worker("veil", workdir, args.reps)
            batch = _run_worker("veil_batch", workdir, args.reps)
            fair = _run_worker("fair", workdir, max(3, args.reps // 3))
            over = _run_worker("oversized", workdir, max(3, args.reps // 5))
        row = _summarise(name, prep, veil, batch, fair, over)
        report["tasks"][name] = row
        skip = ("veil", "veil_batch", "fair_baseline", "oversized_baseline", "compile")
        print(name, json.dumps({k: v for k, v in row.items() if k not in skip}, indent=1), flush=True)
    report["host"]["loadavg_end"] = os.getloadavg()
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(report, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
