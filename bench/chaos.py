"""Chaos soak: seeded open-loop load through the real gateway while faults are injected.

    veil bench chaos --minutes 10 --json docs/results/chaos.json   # ~11 min, loopback only
    veil bench chaos --quick --json /tmp/chaos.json                # ~1 min, the CI size

One embedded deployment (`LocalDeployment`: KeyService subprocess, gateway in this process, the
local platform's runtime subprocesses, the packer), three owners, four users and seven TEE models
(the demo's two and five more small scikit-learn models, one of them compute-heavy for the
full-queue burst), plus HE models (breast-cancer LR; the digits MLP too outside `--quick`) when
the deployment's HE function works. Every client trusts only `deployment.local_trust_anchors()`.

Load: Poisson arrivals from a seeded RNG, each a (user, model, rows) drawn from the same RNG, put
on a bounded pool of daemon worker threads, so a slow system never slows the arrival process
(latency is measured from the scheduled arrival). TEE requests are `ModelUser.infer` with a
deadline (marked idempotent: inference has no side effect, so the SDK may retry a request that
may have run); HE requests go through the HE client. Every answer is checked against plain ONNX
Runtime on the same bytes and input (HE: the plaintext evaluation of the compiled plan).

Faults, each in its own window with quiet time between (rounds of the six, in a seeded order
after the first round): `kill -9` of a runtime instance (the one with most cached models; HE's
too in odd rounds); `kill -9` of the KeyService, down for a moment, restarted on the same port
and state, during a storm of acknowledged writes (registrations, grants, request keys);
SIGSTOP of an instance for longer than the request deadline, then SIGCONT; a publish whose
sealed file the (untrusted) store corrupts before it becomes current, restored by publishing
again; a burst of raw requests above the function's capacity (clean `busy` expected); and a
burst of hostile traffic from another process (attestation-challenge flood, oversized and
deeply nested bodies against the gateway and the KeyService, a tensor shape of 2^64 elements,
HE `batch=10**400`: all must get a clean 4xx) while a cold start on a fresh function must work.

A background writer publishes new versions and onboards users all along. Every write the
KeyService acknowledged is recorded and checked at the end: by a release (the onboarded user's
inference), in the KeyService's database rows, and by `veil keyservice audit`.

Figures, overall and per window: sent, correct, wrong, hangs (no answer within the deadline +
grace), errors by code, p50/p99 latency, recovery (fault to the first correct answer of an
affected model, and to a sustained correct run), acknowledged writes lost. A plot of latency and
errors over time with the windows shaded is written next to the JSON (`PATH.png`).
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import json
import logging
import math
import os
import queue
import signal
import struct
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import machine, percentile, write_json  # noqa: E402

# Refusals the system declares for overload and outages (the request did not run; retry later),
# and the two codes of a request whose deadline passed (a stopped instance held it).
DECLARED_5XX = frozenset({"busy", "unavailable", "keyservice_unavailable"})
DEADLINE_CODES = frozenset({"timeout", "deadline_exceeded"})
HANG_GRACE_S = 2.0
KINDS = ("instance_kill", "keyservice_restart", "sigstop", "corrupt_sealed", "full_queue", "hostile")


# -- sizes ----------------------------------------------------------------------------------------


@dataclass
class Config:
    seed: int
    quick: bool
    duration_s: float
    tee_rate: float  # TEE requests per second (Poisson)
    he_rate: float
    deadline_s: float
    he_deadline_s: float
    warmup_s: float
    window_s: float  # minimum length of a fault window
    gap_s: float  # quiet time between windows
    workers: int
    max_instances: int
    concurrency: int
    max_queue: int
    burst: int  # raw requests fired at once in the full-queue window
    burst_rows: int  # rows per burst request (of the compute-heavy model)
    flood: int  # attestation challenges in the hostile window
    hostile_repeats: int
    ks_down_s: float
    corrupt_hold_s: float
    write_interval_s: float  # mean time between background writes
    storm_threads: int
    storm_lead_s: float  # the storm writes this long before the KeyService is killed
    storm_tail_s: float  # and this long after it is back
    sustain_s: float  # a "sustained" correct run lasts this long
    he_models: tuple[str, ...]

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> Config:
        if args.quick:
            return cls(
                seed=args.seed,
                quick=True,
                duration_s=30.0,  # a minimum: the six windows decide the length
                tee_rate=8.0,
                he_rate=0.5,
                deadline_s=3.0,
                he_deadline_s=10.0,
                warmup_s=2.0,
                window_s=3.0,
                gap_s=1.0,
                workers=48,
                max_instances=3,
                concurrency=4,
                max_queue=8,
                burst=60,
                burst_rows=1500,
                flood=1000,
                hostile_repeats=1,
                ks_down_s=0.3,
                corrupt_hold_s=2.5,
                write_interval_s=2.0,
                storm_threads=2,
                storm_lead_s=0.5,
                storm_tail_s=0.5,
                sustain_s=1.5,
                he_models=("he-breast-lr",),
            )
        return cls(
            seed=args.seed,
            quick=False,
            duration_s=args.minutes * 60.0,
            tee_rate=10.0,
            he_rate=0.5,
            deadline_s=5.0,
            he_deadline_s=20.0,
            warmup_s=15.0,
            window_s=12.0,
            gap_s=12.0,
            workers=64,
            max_instances=3,
            concurrency=4,
            max_queue=8,
            burst=120,
            burst_rows=1500,
            flood=10001,
            hostile_repeats=6,
            ks_down_s=1.5,
            corrupt_hold_s=6.0,
            write_interval_s=3.0,
            storm_threads=3,
            storm_lead_s=1.0,
            storm_tail_s=1.5,
            sustain_s=3.0,
            he_models=("he-breast-lr", "he-digits-mlp"),
        )


# -- models ---------------------------------------------------------------------------------------


@dataclass
class TeeModel:
    model_id: str
    owner: str
    onnx: bytes
    x: np.ndarray  # rows the users send (float32)
    delay_s: int = 10
    _session: Any = None
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def reference(self, x: np.ndarray) -> dict[str, np.ndarray]:
        """Plain ONNX Runtime on the same bytes and input: the ground truth."""
        import onnxruntime as ort

        with self._lock:
            if self._session is None:
                self._session = ort.InferenceSession(self.onnx, providers=["CPUExecutionProvider"])
        names = [o.name for o in self._session.get_outputs()]
        return dict(zip(names, self._session.run(names, {"input": x}), strict=True))


def _to_onnx(estimator: Any, n_features: int) -> bytes:
    from skl2onnx import to_onnx
    from skl2onnx.common.data_types import FloatTensorType

    options = {id(estimator): {"zipmap": False}} if hasattr(estimator, "predict_proba") else None
    return to_onnx(
        estimator, initial_types=[("input", FloatTensorType([None, n_features]))], options=options, target_opset=17
    ).SerializeToString()


CHURN = "wine-lr"  # the model whose sealed file the store corrupts (short revocation delay)
WIDE = "digits-wide"  # compute-heavy per row (64-1024-1024-10): the full-queue burst sends it many rows


def tee_models(seed: int) -> dict[str, TeeModel]:
    """The demo's two models and four more small scikit-learn models, three owners."""
    import warnings

    from sklearn.datasets import load_diabetes, load_digits, load_iris, load_wine
    from sklearn.ensemble import RandomForestClassifier
    from sklearn.exceptions import ConvergenceWarning
    from sklearn.linear_model import LogisticRegression, Ridge
    from sklearn.neural_network import MLPClassifier
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler
    from sklearn.tree import DecisionTreeClassifier

    from veil.demo_models import train_demo_models

    out: dict[str, TeeModel] = {}
    for m in train_demo_models(seed=seed):
        out[m.model_id] = TeeModel(m.model_id, "hospital", m.onnx, m.x_test.astype(np.float32))
    x, y = load_iris(return_X_y=True)
    x = x.astype(np.float32)
    out["iris-tree"] = TeeModel(
        "iris-tree", "lab", _to_onnx(DecisionTreeClassifier(max_depth=4, random_state=seed).fit(x, y), 4), x
    )
    x, y = load_wine(return_X_y=True)
    x = x.astype(np.float32)
    forest = RandomForestClassifier(n_estimators=8, max_depth=5, random_state=seed).fit(x, y)
    out["wine-forest"] = TeeModel("wine-forest", "lab", _to_onnx(forest, 13), x)
    lr = make_pipeline(StandardScaler(), LogisticRegression(max_iter=2000)).fit(x, y)
    out[CHURN] = TeeModel(CHURN, "vendor", _to_onnx(lr, 13), x, delay_s=2)
    x, y = load_diabetes(return_X_y=True)
    x = x.astype(np.float32)
    out["diabetes-ridge"] = TeeModel("diabetes-ridge", "vendor", _to_onnx(Ridge(alpha=1.0).fit(x, y), 10), x)
    x, y = load_digits(return_X_y=True)
    x = (x / 16.0).astype(np.float32)
    with warnings.catch_warnings():  # one pass over a few rows: the model is here to be heavy, not good
        warnings.simplefilter("ignore", ConvergenceWarning)
        wide = MLPClassifier(hidden_layer_sizes=(1024, 1024), max_iter=1, random_state=seed).fit(x[:240], y[:240])
    out[WIDE] = TeeModel(WIDE, "lab", _to_onnx(wide, 64), x)
    return out


def open_answer(user: Any, model_id: str, rid: str, env: dict, answer: dict) -> dict[str, np.ndarray]:
    """The tensors in the runtime's answer envelope to request `rid` (sealed as `env`)."""
    from veil.crypto.envelope import Envelope, open_envelope
    from veil.runtime import tensors

    plain = open_envelope(
        user.request_keys[model_id],
        Envelope.from_json(answer),
        model=model_id,
        user=user.id,
        direction="response",
        request_id=rid,
        expires=env["expires"],
    )
    return tensors.decode_with_meta(plain)[0]


def mismatch(want: dict[str, np.ndarray], got: dict[str, np.ndarray]) -> str:
    """Why `got` is not plain ONNX Runtime's answer ("" when it is)."""
    if sorted(got) != sorted(want):
        return f"outputs {sorted(got)} != {sorted(want)}"
    for name, ref in want.items():
        out = got[name]
        if out.dtype != ref.dtype or out.shape != ref.shape:
            return f"{name}: {out.dtype}{out.shape} != {ref.dtype}{ref.shape}"
        if np.issubdtype(ref.dtype, np.floating):
            if not np.allclose(out, ref, rtol=1e-5, atol=1e-6):
                return f"{name}: max |diff| {float(np.max(np.abs(out - ref))):.3g}"
        elif not np.array_equal(out, ref):
            return f"{name}: values differ"
    return ""


@dataclass
class HeUser:
    """One HE model and its client (the user's secret key never leaves it)."""

    model_id: str
    compiled: Any
    remote: Any  # the SDK's ModelUser (HE mode: its keys stay in its key directory)
    x: np.ndarray
    deadline_s: float = 20.0
    lock: threading.Lock = field(default_factory=threading.Lock)


def setup_he(
    deployment: Any, names: tuple[str, ...], timeout_s: float, trust: Any, workdir: Path
) -> tuple[list[HeUser], str]:
    """Compile the HE models, publish them through the gateway as their owner (mode "he"),
    grant them to an HE user of the SDK ([] and why, if the HE function does not work)."""
    try:
        from veil.he.compile import compile_model
        from veil.he.tasks import breast_cancer_lr, digits_mlp
        from veil.sdk import ModelOwner, ModelUser

        tasks = {"he-breast-lr": breast_cancer_lr, "he-digits-mlp": digits_mlp}
        owner = ModelOwner(deployment.info, trust=trust, timeout=timeout_s)
        owner.register()
        users = []
        for name in names:
            task = tasks[name]()
            compiled = compile_model(task.model, task.x_train, name=name)
            owner.publish(name, compiled, mode="he")
            user = ModelUser(deployment.info, trust=trust, timeout=timeout_s, key_dir=workdir / "he-keys" / name)
            user.register()
            owner.grant(name, user.id)
            x = np.asarray(task.x_test, dtype=np.float64)
            he_user = HeUser(name, compiled, user, x, deadline_s=timeout_s)
            with he_user.lock:
                err = he_check(he_user, x[:2])
            if err:
                return [], f"{name}: the first encrypted answer is wrong ({err})"
            users.append(he_user)
        return users, ""
    except Exception as exc:  # noqa: BLE001 - any failure means: soak without HE, and say why
        return [], f"{type(exc).__name__}: {str(exc)[:300]}"


def he_check(he: HeUser, x: np.ndarray) -> str:
    """Infer `x` encrypted; "" if the scores equal the plaintext plan's within CKKS noise.
    (One request at a time per client: the caller holds `he.lock`.)"""
    scores = np.asarray(he.remote.infer(he.model_id, x, deadline_s=he.deadline_s)["scores"])
    plain = he.compiled.predict_plain(x)
    tol = 1e-2 * max(1.0, float(np.max(np.abs(plain))))
    if scores.shape != plain.shape:
        return f"scores {scores.shape} != {plain.shape}"
    err = float(np.max(np.abs(scores - plain)))
    return "" if err <= tol else f"max |score error| {err:.3g} > {tol:.3g}"


# -- requests and their records --------------------------------------------------------------------


@dataclass
class Req:
    seq: int
    kind: str  # tee | he | burst
    model: str
    user: str
    t_sched: float  # seconds since the soak started (arrival)
    t_start: float = math.nan  # a worker began sending it
    t_end: float = math.nan
    outcome: str = "pending"  # correct | wrong | error | pending (never answered)
    code: str = ""
    status: int = 0
    detail: str = ""
    deadline_s: float = 0.0

    def latency(self) -> float:
        return self.t_end - self.t_sched

    def hung(self) -> bool:
        """No answer (or error) within its deadline and the grace: a hang."""
        if self.outcome == "pending" or math.isnan(self.t_end):
            return True
        begun = self.t_sched if math.isnan(self.t_start) else self.t_start
        return self.t_end - begun > self.deadline_s + HANG_GRACE_S


@dataclass
class Window:
    kind: str
    round: int
    t_fault: float
    t_heal: float = math.nan
    t_end: float = math.nan
    affected: list[str] = field(default_factory=list)  # models whose recovery is timed ([] = all)
    detail: dict[str, Any] = field(default_factory=dict)


@dataclass
class Ack:
    """A write the KeyService acknowledged."""

    kind: str  # register | grant | request_key | publish
    t: float
    principal: str
    model: str = ""
    user: str = ""
    version: int = 0


class Soak:
    def __init__(self, cfg: Config, workdir: Path, echo: Callable[[str], None]) -> None:
        self.cfg = cfg
        self.workdir = workdir
        self.echo = echo
        self.rng = np.random.default_rng(cfg.seed)
        self.t0 = 0.0
        self.end_t = cfg.duration_s
        self.reqs: list[Req] = []
        self.windows: list[Window] = []
        self.acks: list[Ack] = []
        self.write_failures = Counter()
        self.lock = threading.Lock()
        self.stop = threading.Event()
        self.faults_done = threading.Event()
        self.jobs: queue.Queue = queue.Queue()
        self.deployment: Any = None
        self.models: dict[str, TeeModel] = {}
        self.owners: dict[str, Any] = {}
        self.users: list[Any] = []
        self.pairs: list[tuple[Any, str]] = []
        self.he: list[HeUser] = []
        self.he_note = ""
        self.onboarded: list[tuple[Any, str]] = []
        self.stopped_pids: set[int] = set()
        self.setup_s = 0.0
        self.phases: dict[str, float] = {}
        self.machine = machine()  # before anything runs: its load average is the machine's own

    def now(self) -> float:
        return time.monotonic() - self.t0

    # -- setup ----------------------------------------------------------------------------------
    def setup(self) -> None:
        from veil.deployment import LocalDeployment, StackOptions
        from veil.sdk import ModelOwner, ModelUser

        cfg, t = self.cfg, time.monotonic()
        trained: list[Any] = []
        trainer = threading.Thread(target=lambda: trained.append(tee_models(cfg.seed)), daemon=True)
        trainer.start()  # CPU work, while the deployment's processes start
        options = StackOptions(
            he=bool(cfg.he_models),
            max_instances=cfg.max_instances,
            concurrency=cfg.concurrency,
            max_queue=cfg.max_queue,
            runtime_env={"VEIL_LOG_LEVEL": "WARNING"},
        )
        self.deployment = LocalDeployment(self.workdir / "deployment", options)
        info = self.deployment.start()
        trainer.join()
        if not trained:
            raise RuntimeError("training the models failed (see the traceback above)")
        self.models = trained[0]
        trust = self.deployment.local_trust_anchors()
        self.trust = trust
        self.measurements = {"runtime": trust.runtime_measurements[0], "keyservice": trust.keyservice_measurements[0]}
        delays = [5, 10, 20]
        for name in ("hospital", "lab", "vendor"):
            owner = ModelOwner(info, trust=trust, timeout=30)
            owner.register()
            self.owners[name] = owner
        for m in self.models.values():
            if m.model_id != CHURN:
                m.delay_s = int(self.rng.choice(delays))
            done = self.owners[m.owner].publish(m.model_id, m.onnx, revocation_delay_s=m.delay_s)
            self.ack("publish", self.owners[m.owner].id, model=m.model_id, version=done["version"])
        names = sorted(self.models)
        for i in range(4):
            user = ModelUser(info, trust=trust, timeout=30)
            user.register()
            picks = set(self.rng.choice(names, size=3, replace=False).tolist()) | set(names[i::4]) | {CHURN, WIDE}
            for model_id in sorted(picks):
                self.owners[self.models[model_id].owner].grant(model_id, user.id)
                user.request_access(model_id)
                user.card(model_id)  # fetched once, before any fault
                self.pairs.append((user, model_id))
            self.users.append(user)
        for model_id in names:  # every model warm once: answers are right before anything fails
            user = next(u for u, m in self.pairs if m == model_id)
            x = self.models[model_id].x[:2]
            problem = mismatch(self.models[model_id].reference(x), user.infer(model_id, x, deadline_s=30))
            if problem:
                raise RuntimeError(f"{model_id}: the first answer is already wrong: {problem}")
        if cfg.he_models:
            self.he, self.he_note = setup_he(
                self.deployment, cfg.he_models, cfg.he_deadline_s, self.trust, self.workdir
            )
        else:
            self.he_note = "not asked for"
        self.storm_cast = self._storm_setup()
        self.setup_s = time.monotonic() - t

    def _storm_setup(self) -> list[tuple[Any, str]]:
        """Owners and models of the write storm (KeyService state only: nothing is served)."""
        from veil.crypto.keys import SymmetricKey
        from veil.sdk import ModelOwner

        out = []
        for i in range(self.cfg.storm_threads):
            owner = ModelOwner(self.deployment.info, trust=self.trust, timeout=10)
            owner.register()
            model_id = f"storm-{i}"
            owner.keyservice.put_model_key(model_id, SymmetricKey.generate(), self.trust.runtime_measurements)
            out.append((owner, model_id))
        return out

    def ack(self, kind: str, principal: str, *, model: str = "", user: str = "", version: int = 0) -> None:
        with self.lock:
            self.acks.append(Ack(kind, self.now() if self.t0 else 0.0, principal, model, user, version))

    # -- load -----------------------------------------------------------------------------------
    def arrivals(self) -> None:
        """Open loop: Poisson arrivals from the seeded RNG; never waits for an answer."""
        rng = np.random.default_rng([self.cfg.seed, 1])
        he_share = self.cfg.he_rate / (self.cfg.tee_rate + self.cfg.he_rate) if self.he else 0.0
        rate = self.cfg.tee_rate + (self.cfg.he_rate if self.he else 0.0)
        t, seq = 0.0, 0
        while not self.stop.is_set():
            t += float(rng.exponential(1.0 / rate))
            he_pick, pair, rows, start = rng.random(), rng.integers(1 << 30), rng.integers(1, 5), rng.integers(1 << 30)
            if t >= self.end_t and self.faults_done.is_set():
                return
            if he_pick < he_share:
                he = self.he[int(pair) % len(self.he)]
                x = he.x[int(start) % (len(he.x) - 4) :][: int(rows)]
                req = Req(seq, "he", he.model_id, "he", t, deadline_s=self.cfg.he_deadline_s)
                job = (req, he, x)
            else:
                user, model_id = self.pairs[int(pair) % len(self.pairs)]
                data = self.models[model_id].x
                x = data[int(start) % (len(data) - 4) :][: int(rows)]
                req = Req(seq, "tee", model_id, user.id[:8], t, deadline_s=self.cfg.deadline_s)
                job = (req, user, x)
            seq += 1
            with self.lock:
                self.reqs.append(req)
            wait = t - self.now()
            if wait > 0 and self.stop.wait(wait):
                return
            self.jobs.put(job)

    def worker(self) -> None:
        while True:
            job = self.jobs.get()
            if job is None:
                return
            req, who, x = job
            req.t_start = self.now()
            try:
                if req.kind == "he":
                    self._run_he(req, who, x)
                else:
                    self._run_tee(req, who, x)
            except Exception as exc:  # noqa: BLE001 - recorded, the soak goes on
                self._error(req, "exception", 0, f"{type(exc).__name__}: {str(exc)[:200]}")
            finally:
                req.t_end = self.now()

    def _error(self, req: Req, code: str, status: int, detail: str) -> None:
        req.outcome, req.code, req.status, req.detail = "error", code, status, detail[:300]

    def _run_tee(self, req: Req, user: Any, x: np.ndarray) -> None:
        from veil.errors import VeilError

        left = req.deadline_s - (req.t_start - req.t_sched)
        if left < 0.2:  # waited for a worker until its deadline: the client, not the system, was full
            self._error(req, "client_backlog", 0, f"no free worker for {req.t_start - req.t_sched:.2f} s")
            return
        try:
            got = user.infer(req.model, x, deadline_s=left, idempotent=True)
        except VeilError as exc:
            self._error(req, exc.code, exc.status, exc.message)
            return
        problem = mismatch(self.models[req.model].reference(x), got)
        req.outcome, req.detail = ("wrong", problem) if problem else ("correct", "")

    def _run_he(self, req: Req, he: HeUser, x: np.ndarray) -> None:
        from veil.errors import VeilError
        from veil.he.errors import HEError

        with he.lock:  # one request at a time per HE client: its deadline starts when it is sent
            req.t_start = self.now()
            try:
                problem = he_check(he, x)
            except (HEError, VeilError) as exc:
                self._error(req, exc.code, exc.status, exc.message)
                return
        req.outcome, req.detail = ("wrong", problem) if problem else ("correct", "")

    # -- background writes ------------------------------------------------------------------------
    def writer(self) -> None:
        """Acknowledged writes all along: new versions of served models, new users onboarded."""
        from veil.errors import VeilError
        from veil.sdk import ModelUser

        rng = np.random.default_rng([self.cfg.seed, 2])
        republish = sorted(m for m in self.models if m != CHURN)
        while not self.stop.wait(float(rng.exponential(self.cfg.write_interval_s))):
            if self.faults_done.is_set() and self.now() >= self.end_t - self.cfg.gap_s:
                return
            action, pick = rng.random(), rng.integers(1 << 30)
            try:
                if action < 0.4:
                    m = self.models[republish[int(pick) % len(republish)]]
                    owner = self.owners[m.owner]
                    done = owner.publish(m.model_id, m.onnx, revocation_delay_s=m.delay_s)
                    self.ack("publish", owner.id, model=m.model_id, version=done["version"])
                else:
                    model_id = republish[int(pick) % len(republish)]
                    owner = self.owners[self.models[model_id].owner]
                    user = ModelUser(self.deployment.info, trust=self.trust, timeout=10)
                    user.register()
                    self.ack("register", user.id)
                    owner.grant(model_id, user.id)
                    self.ack("grant", owner.id, model=model_id, user=user.id)
                    user.request_access(model_id)
                    self.ack("request_key", user.id, model=model_id)
                    self.onboarded.append((user, model_id))
            except VeilError as exc:
                with self.lock:
                    self.write_failures[exc.code] += 1

    def storm(self, owner: Any, model_id: str, stop: threading.Event) -> None:
        """Writes as fast as the KeyService takes them (register, grant, request key)."""
        from veil.crypto.identity import Identity
        from veil.crypto.keys import SymmetricKey
        from veil.errors import VeilError
        from veil.keyservice.client import PrincipalClient

        while not stop.is_set():
            identity = Identity.generate()
            client = PrincipalClient(
                self.deployment.info.keyservice_url,
                identity,
                expected_measurements=set(self.trust.keyservice_measurements),
                trust=self.trust.verifier_trust(),
                allow_simulated=True,
                timeout=5,
            )
            try:
                client.register()
                self.ack("register", identity.id)
                owner.grant(model_id, identity.id)
                self.ack("grant", owner.id, model=model_id, user=identity.id)
                client.put_request_key(model_id, SymmetricKey.generate(), self.trust.runtime_measurements)
                self.ack("request_key", identity.id, model=model_id)
            except VeilError as exc:
                with self.lock:
                    self.write_failures[exc.code] += 1
                stop.wait(0.05)
            finally:
                client.close()

    # -- faults -----------------------------------------------------------------------------------
    def fault_plan(self) -> list[tuple[int, str]]:
        """(round, kind): the six kinds in order, then in a seeded order per round, as many
        rounds as fit (at least one of each)."""
        rng = np.random.default_rng([self.cfg.seed, 3])
        slot = self.cfg.window_s + self.cfg.gap_s + 2.0
        rounds = max(1, int((self.cfg.duration_s - self.cfg.warmup_s) // (slot * len(KINDS))))
        plan = [(0, k) for k in KINDS]
        for r in range(1, rounds):
            plan += [(r, KINDS[i]) for i in rng.permutation(len(KINDS))]
        return plan

    def faults(self) -> None:
        try:
            self._faults()
        finally:
            self.faults_done.set()

    def _faults(self) -> None:
        from veil.deployment import TEE_FUNCTION

        rng = np.random.default_rng([self.cfg.seed, 4])
        next_t = self.cfg.warmup_s
        for rnd, kind in self.fault_plan():
            if self.stop.wait(max(0.0, next_t - self.now())):
                return
            w = Window(kind, rnd, self.now())
            self.echo(f"[{w.t_fault:6.1f} s] fault: {kind} (round {rnd})")
            try:
                getattr(self, f"_fault_{kind}")(w, rng, TEE_FUNCTION)
            except Exception as exc:  # noqa: BLE001 - a fault that could not be injected is reported
                w.detail["injection_error"] = f"{type(exc).__name__}: {str(exc)[:300]}"
                self.echo(f"   injection failed: {w.detail['injection_error']}")
            if math.isnan(w.t_heal):
                w.t_heal = self.now()
            w.t_end = max(w.t_fault + self.cfg.window_s, w.t_heal + self.cfg.window_s / 2)
            with self.lock:
                self.windows.append(w)
            next_t = w.t_end + self.cfg.gap_s
        self.end_t = max(self.cfg.duration_s, next_t)
        self.faults_done.set()

    def _victim(self, function: str, rng: np.random.Generator) -> tuple[Any, list[str]]:
        """The ready instance with the most cached models (ties by the RNG), and those models."""
        platform = self.deployment.platform
        ready = [i for i in platform.instances(function) if i.state == "ready" and i.pid]
        if not ready:
            raise RuntimeError(f"no ready instance of {function}")
        cached: dict[str, list[str]] = {}
        for inst in ready:
            try:
                stats = platform.invoke_instance(function, inst.id, {"op": "stats"}, timeout=2)
                cached[inst.id] = list(stats.get("models_cached", []))
            except Exception:  # noqa: BLE001 - a busy instance: no stats, still a candidate
                cached[inst.id] = []
        order = rng.permutation(len(ready))
        best = max((ready[i] for i in order), key=lambda inst: len(cached[inst.id]))
        return best, cached[best.id]

    def _fault_instance_kill(self, w: Window, rng: np.random.Generator, function: str) -> None:
        victim, models = self._victim(function, rng)
        w.t_fault = self.now()
        os.kill(victim.pid, signal.SIGKILL)
        w.affected = models
        w.detail.update(instance=victim.id, pid=victim.pid, models_cached=models)
        if self.he and w.round % 2 == 1:
            from veil.deployment import HE_FUNCTION

            he_ready = [i for i in self.deployment.platform.instances(HE_FUNCTION) if i.state == "ready" and i.pid]
            if he_ready:
                os.kill(he_ready[0].pid, signal.SIGKILL)
                w.detail.update(he_instance=he_ready[0].id, he_pid=he_ready[0].pid)
                w.affected += [h.model_id for h in self.he]

    def _fault_keyservice_restart(self, w: Window, rng: np.random.Generator, function: str) -> None:
        stop = threading.Event()
        storms = [
            threading.Thread(target=self.storm, args=(owner, model_id, stop), daemon=True)
            for owner, model_id in self.storm_cast
        ]
        for s in storms:
            s.start()
        before = len(self.acks)
        time.sleep(self.cfg.storm_lead_s)  # writes flowing when the KeyService dies
        w.t_fault = self.now()
        pid = self.deployment.kill_keyservice()
        time.sleep(self.cfg.ks_down_s)
        t_restart = self.now()
        self.deployment.restart_keyservice(kill=False)
        w.t_heal = self.now()
        time.sleep(self.cfg.storm_tail_s)
        stop.set()
        for s in storms:
            s.join(timeout=10)
        w.detail.update(
            old_pid=pid,
            down_s=round(t_restart - w.t_fault, 3),
            restart_s=round(w.t_heal - t_restart, 3),
            storm_acks=len(self.acks) - before,
        )

    def _fault_sigstop(self, w: Window, rng: np.random.Generator, function: str) -> None:
        victim, models = self._victim(function, rng)
        hold = self.cfg.deadline_s + (1.0 if self.cfg.quick else 1.5)
        w.t_fault = self.now()
        os.kill(victim.pid, signal.SIGSTOP)
        self.stopped_pids.add(victim.pid)
        try:
            time.sleep(hold)
        finally:
            with contextlib.suppress(ProcessLookupError):
                os.kill(victim.pid, signal.SIGCONT)
            self.stopped_pids.discard(victim.pid)
        w.t_heal = self.now()
        w.affected = models
        w.detail.update(instance=victim.id, pid=victim.pid, models_cached=models, stopped_s=round(hold, 2))

    def _fault_corrupt_sealed(self, w: Window, rng: np.random.Generator, function: str) -> None:
        m = self.models[CHURN]
        owner = self.owners[m.owner]
        store = Path(self.deployment.store_dir) / "models" / CHURN
        corrupted: list[str] = []

        def corrupt(step: str, done: int, total: int) -> None:
            if step != "card" or corrupted:
                return
            # the upload is in the store and not yet current: the store flips 16 bytes in the middle
            newest = max(store.glob("v*.veilm"), key=lambda p: int(p.stem[1:]))
            data = bytearray(newest.read_bytes())
            mid = len(data) // 2
            data[mid : mid + 16] = bytes(b ^ 0xFF for b in data[mid : mid + 16])
            newest.write_bytes(bytes(data))
            corrupted.append(newest.name)

        w.t_fault = self.now()
        bad = owner.publish(CHURN, m.onnx, revocation_delay_s=m.delay_s, progress=corrupt)
        self.ack("publish", owner.id, model=CHURN, version=bad["version"])
        time.sleep(self.cfg.corrupt_hold_s)
        good = owner.publish(CHURN, m.onnx, revocation_delay_s=m.delay_s)
        self.ack("publish", owner.id, model=CHURN, version=good["version"])
        w.t_heal = self.now()
        w.affected = [CHURN]
        w.detail.update(corrupted=corrupted, corrupt_version=bad["version"], restored_version=good["version"])

    def _fault_full_queue(self, w: Window, rng: np.random.Generator, function: str) -> None:
        import httpx

        n = self.cfg.burst
        prepared = []
        wide_users = [u for u, m in self.pairs if m == WIDE]
        data = self.models[WIDE].x
        for _ in range(n):
            user, model_id = wide_users[int(rng.integers(len(wide_users)))], WIDE
            start = int(rng.integers(len(data)))
            x = np.roll(data, -start, axis=0)[: self.cfg.burst_rows]
            rid, env = user.sealed_request(model_id, {"input": x}, expires=int(time.time() + self.cfg.deadline_s) + 1)
            req = Req(-1, "burst", model_id, user.id[:8], 0.0, deadline_s=self.cfg.deadline_s)
            prepared.append((req, user, model_id, x, rid, env))
        barrier = threading.Barrier(n + 1)
        client = httpx.Client(
            base_url=self.deployment.info.gateway_url,
            timeout=self.cfg.deadline_s + HANG_GRACE_S,
            limits=httpx.Limits(max_connections=n + 8, max_keepalive_connections=n + 8),
        )

        def fire(req: Req, user: Any, model_id: str, x: np.ndarray, rid: str, env: dict) -> None:
            barrier.wait(timeout=30)
            req.t_sched = req.t_start = self.now()
            try:
                headers = {"x-veil-timeout-ms": str(int(self.cfg.deadline_s * 1000))}
                r = client.post(f"/v1/models/{model_id}:infer", json=env, headers=headers)
                body = r.json()
                if r.status_code != 200:
                    err = body.get("error", {}) if isinstance(body, dict) else {}
                    self._error(req, str(err.get("code", "no_code")), r.status_code, str(err.get("message", ""))[:200])
                    return
                got = open_answer(user, model_id, rid, env, body["envelope"])
                problem = mismatch(self.models[model_id].reference(x), got)
                req.outcome, req.detail = ("wrong", problem) if problem else ("correct", "")
            except httpx.HTTPError as exc:
                self._error(req, "connection", 0, type(exc).__name__)
            except Exception as exc:  # noqa: BLE001
                self._error(req, "exception", 0, f"{type(exc).__name__}: {exc}"[:200])
            finally:
                req.t_end = self.now()

        threads = [threading.Thread(target=fire, args=p, daemon=True) for p in prepared]
        for t in threads:
            t.start()
        barrier.wait(timeout=30)
        w.t_fault = self.now()
        for t in threads:
            t.join(timeout=self.cfg.deadline_s + 10)
        w.t_heal = self.now()
        client.close()
        burst = [p[0] for p in prepared]
        with self.lock:
            for req in burst:
                req.seq = len(self.reqs)
                self.reqs.append(req)
        codes = Counter(r.code if r.outcome == "error" else r.outcome for r in burst)
        w.detail.update(burst=n, answers=dict(codes), capacity=self.cfg.max_instances * self.cfg.concurrency)
        w.detail["max_queue"] = self.cfg.max_queue

    def _fault_hostile(self, w: Window, rng: np.random.Generator, function: str) -> None:
        info = self.deployment.info
        spec = {
            "gateway_url": info.gateway_url,
            "keyservice_url": info.keyservice_url,
            "flood": self.cfg.flood,
            "repeats": self.cfg.hostile_repeats,
            "tee_model": "breast-cancer-lr",
            "he_model": self.he[0].model_id if self.he else None,
        }
        w.t_fault = self.now()
        child = subprocess.Popen(
            [sys.executable, __file__, "--hostile-worker", json.dumps(spec)],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        time.sleep(0.3)  # the flood is on
        probe = self._cold_start_probe()
        sealed = self._hostile_sealed()
        try:
            out, err = child.communicate(timeout=120)
            hostile = json.loads(out.strip().splitlines()[-1]) if out.strip() else {"error": err[-500:]}
        except subprocess.TimeoutExpired:
            child.kill()
            child.communicate()
            hostile = {"error": "the hostile client did not finish within 120 s"}
        w.t_heal = self.now()
        w.detail.update(hostile=hostile, cold_start=probe, sealed_hostile=sealed)

    def _cold_start_probe(self) -> dict[str, Any]:
        """A fresh instance of a copy of the TEE function, started during the flood: it must
        attest, get keys and answer correctly."""
        platform = self.deployment.platform
        spec = copy.deepcopy(self.deployment.tee_spec)
        spec.name, spec.min_instances, spec.max_instances = "veil-tee-probe", 0, 1
        model_id = "breast-cancer-lr"
        user = next(u for u, m in self.pairs if m == model_id)
        x = self.models[model_id].x[:3]
        t0 = time.monotonic()
        out: dict[str, Any] = {"ok": False}
        inst = None
        try:
            platform.deploy(spec)
            inst = platform.start_instance(spec.name)
            out["start_s"] = round(time.monotonic() - t0, 3)
            rid, env = user.sealed_request(model_id, {"input": x})
            result = platform.invoke_instance(spec.name, inst, {"envelope": env}, timeout=30)
            got = open_answer(user, model_id, rid, env, result["envelope"])
            problem = mismatch(self.models[model_id].reference(x), got)
            out.update(ok=not problem, problem=problem, first_answer_s=round(time.monotonic() - t0, 3))
        except Exception as exc:  # noqa: BLE001 - the probe failing is the finding
            out["error"] = f"{type(exc).__name__}: {str(exc)[:300]}"
        finally:
            if inst is not None:
                with contextlib.suppress(Exception):
                    platform.stop_instance(spec.name, inst, drain_s=1.0)
        return out

    def _hostile_sealed(self) -> dict[str, Any]:
        """Authenticated but hostile plaintexts: a tensor of 2^32 x 2^32 elements, and a header
        that is not JSON. The runtime must refuse them (a 4xx, its error sealed)."""
        import httpx

        from veil.crypto.envelope import new_request_id, seal

        model_id = "breast-cancer-lr"
        user = next(u for u, m in self.pairs if m == model_id)
        huge = json.dumps({"tensors": [{"name": "input", "dtype": "float32", "shape": [2**32, 2**32]}]}).encode()
        bodies = {
            "shape_2^64": b"VTN1" + struct.pack(">I", len(huge)) + huge,
            "header_not_json": b"VTN1" + struct.pack(">I", 5) + b"{[[[[",
        }
        out: dict[str, Any] = {}
        with httpx.Client(base_url=self.deployment.info.gateway_url, timeout=10) as client:
            for name, plaintext in bodies.items():
                env = seal(
                    user.request_keys[model_id],
                    plaintext,
                    model=model_id,
                    user=user.id,
                    request_id=new_request_id(),
                    direction="request",
                ).to_json()
                try:
                    r = client.post(f"/v1/models/{model_id}:infer", json=env)
                    body = r.json()
                    code = body.get("error", {}).get("code") if isinstance(body, dict) else None
                    out[name] = {
                        "status": r.status_code,
                        "code": code,
                        "clean": 400 <= r.status_code < 500 and bool(code),
                    }
                except Exception as exc:  # noqa: BLE001
                    out[name] = {"status": 0, "code": type(exc).__name__, "clean": False}
        return out

    # -- run ------------------------------------------------------------------------------------
    def run(self) -> None:
        self.t0 = time.monotonic()
        workers = [threading.Thread(target=self.worker, daemon=True, name=f"w{i}") for i in range(self.cfg.workers)]
        for t in workers:
            t.start()
        helpers = [
            threading.Thread(target=self.arrivals, daemon=True, name="arrivals"),
            threading.Thread(target=self.faults, daemon=True, name="faults"),
            threading.Thread(target=self.writer, daemon=True, name="writer"),
        ]
        for t in helpers:
            t.start()
        hard_stop = self.cfg.duration_s * 2 + 120
        last = -1
        while any(t.is_alive() for t in helpers[:2]):
            if self.now() > hard_stop:
                self.echo("hard stop: the soak ran past twice its length")
                break
            tick = int(self.now() // 15)
            if tick != last:
                last = tick
                with self.lock:
                    done = [r for r in self.reqs if not math.isnan(r.t_end)]
                ok = sum(r.outcome == "correct" for r in done)
                self.echo(f"[{self.now():6.1f} s] sent {len(self.reqs)}, answered {len(done)}, correct {ok}")
            time.sleep(0.2)
        self.stop.set()
        for pid in list(self.stopped_pids):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGCONT)
        drain = time.monotonic() + self.cfg.he_deadline_s + HANG_GRACE_S + 2
        while time.monotonic() < drain:
            with self.lock:
                if all(not math.isnan(r.t_end) for r in self.reqs):
                    break
            time.sleep(0.1)
        for _ in workers:
            self.jobs.put(None)
        helpers[2].join(timeout=30)

    # -- after: acknowledged writes ---------------------------------------------------------------
    def verify_writes(self) -> dict[str, Any]:
        """Every acknowledged write, checked: onboarded users get a correct answer (a release needs
        their registration, grant and request key); then, with the deployment stopped, the rows of
        the KeyService's database and `veil keyservice audit`."""
        from veil.errors import VeilError

        served, refused = 0, []
        for user, model_id in self.onboarded:
            x = self.models[model_id].x[:2]
            for attempt in range(3):
                try:
                    problem = mismatch(self.models[model_id].reference(x), user.infer(model_id, x, deadline_s=15))
                    if problem:
                        refused.append(f"{user.id[:8]}/{model_id}: wrong answer ({problem})")
                    else:
                        served += 1
                    break
                except VeilError as exc:
                    if exc.code in ("not_granted", "no_request_key", "unknown_principal") or attempt == 2:
                        refused.append(f"{user.id[:8]}/{model_id}: {exc.code}")
                        break
                    time.sleep(1)
        versions = {}
        for name, owner in self.owners.items():
            for m in self.models.values():
                if m.owner == name:
                    versions[m.model_id] = owner.keyservice.model_info(m.model_id).get("current_version")
        return {"onboarded_served": served, "onboarded_refused": refused, "current_versions": versions}

    def measurement_drift(self) -> dict[str, Any]:
        """The measurements the clients trusted, and whether the code on disk still measures so:
        a runtime started after the checkout changed is (rightly) refused keys."""
        from veil.attest.measurement import measure

        now = {name: measure(name) for name in self.measurements}
        return {"trusted": self.measurements, "changed_during_run": now != self.measurements}

    def check_rows(self) -> dict[str, Any]:
        from veil.attest.measurement import measure
        from veil.attest.sim import SimRoot
        from veil.keyservice.server import open_store, sim_root_path

        state = self.deployment.keyservice_dir
        store = open_store(state, SimRoot.load_or_create(sim_root_path(state)), measure("keyservice"))
        lost: list[dict[str, Any]] = []
        try:
            for a in self.acks:
                why = ""
                try:
                    if a.kind == "register":
                        ok = store.principal_key(a.principal) is not None
                    elif a.kind == "grant":
                        ok = store.is_granted(a.model, a.user)
                    elif a.kind == "request_key":
                        ok = store.request_key(a.model, a.principal) is not None
                    else:
                        record = store.model(a.model)
                        ok = record is not None and record.current_version >= a.version
                except Exception as exc:  # noqa: BLE001 - a row that does not verify is lost too
                    ok, why = False, f"{type(exc).__name__}: {str(exc)[:120]}"
                if not ok:
                    lost.append(
                        {
                            "kind": a.kind,
                            "t": round(a.t, 3),
                            "model": a.model,
                            "principal": a.principal[:16],
                            "why": why,
                        }
                    )
        finally:
            store.close()
        audit = subprocess.run(
            [sys.executable, "-m", "veil.cli", "keyservice", "audit", "--state-dir", str(state), "--tail", "1"],
            capture_output=True,
            text=True,
            timeout=120,
        )
        return {
            "acknowledged": dict(Counter(a.kind for a in self.acks)),
            "lost": lost,
            "audit_exit": audit.returncode,
            "audit": audit.stderr.strip().splitlines()[-2:],
        }


# -- hostile client (its own process, as an attacker's would be) ------------------------------------


def hostile_main(spec: dict[str, Any]) -> dict[str, Any]:
    """Flood the challenge endpoint and send malformed bodies; count every answer that is not a
    clean 4xx (`{"error": {"code", "message"}}`) or, for challenges, a 200."""
    import httpx

    from veil.keyservice import wire

    gw, ks, repeats = spec["gateway_url"], spec["keyservice_url"], spec["repeats"]
    counts: Counter = Counter()
    bad: list[str] = []
    lock = threading.Lock()

    def note(name: str, response: httpx.Response | None, exc: Exception | None, ok_status: tuple[int, int]) -> None:
        with lock:
            if exc is not None:
                counts[f"{name} {type(exc).__name__}"] += 1
                if len(bad) < 50:
                    bad.append(f"{name}: {type(exc).__name__}")
                return
            assert response is not None
            counts[f"{name} {response.status_code}"] += 1
            clean = ok_status[0] <= response.status_code <= ok_status[1]
            if clean and response.status_code >= 400:
                try:
                    err = response.json().get("error")
                    clean = isinstance(err, dict) and isinstance(err.get("code"), str) and bool(err.get("message"))
                except (ValueError, AttributeError):
                    clean = False
            if not clean and len(bad) < 50:
                bad.append(f"{name}: HTTP {response.status_code} {response.text[:120]!r}")

    def flood(n: int) -> None:
        with httpx.Client(base_url=ks, timeout=30) as client:
            for _ in range(n):
                try:
                    note("challenge", client.post("/v1/attest/challenge"), None, (200, 200))
                except httpx.HTTPError as exc:
                    note("challenge", None, exc, (200, 200))

    deep = b'{"v":1,"evidence":' + b"[" * 200_000 + b"]" * 200_000 + b"}"
    deep_list = b"[" * 100_000 + b"]" * 100_000
    big_ks = b'{"v":1,"pad":"' + b"a" * (wire.MAX_BODY + 1) + b'"}'
    big_gw = b'{"v":1,"pad":"' + b"a" * (33 << 20) + b'"}'
    list_evidence = json.dumps({"v": 1, "challenge": "A" * 43, "public_key": "A" * 43, "evidence": [1, 2]}).encode()
    tee, he = spec["tee_model"], spec["he_model"]

    def streamed(data: bytes):
        def gen():
            for i in range(0, len(data), 1 << 20):
                yield data[i : i + (1 << 20)]

        return gen()

    cases: list[tuple[str, str, str, str, Any]] = [
        ("ks nested attest", ks, "POST", "/v1/attest", deep),
        ("ks nested principals", ks, "POST", "/v1/principals", deep_list),
        ("ks nested release", ks, "POST", "/v1/release", deep),
        ("ks oversized attest", ks, "POST", "/v1/attest", big_ks),
        ("ks oversized streamed", ks, "POST", "/v1/attest", "stream-ks"),
        ("ks evidence is a list", ks, "POST", "/v1/attest", list_evidence),
        ("ks not json", ks, "POST", "/v1/release", b"\xff\xfe{"),
        ("gw nested infer", gw, "POST", f"/v1/models/{tee}:infer", deep),
        ("gw list infer", gw, "POST", f"/v1/models/{tee}:infer", deep_list),
        ("gw oversized infer", gw, "POST", f"/v1/models/{tee}:infer", big_gw),
        ("gw oversized streamed", gw, "POST", f"/v1/models/{tee}:infer", "stream-gw"),
        ("gw not json", gw, "POST", f"/v1/models/{tee}:infer", b"\xff\xfe{"),
        ("gw unsigned upload", gw, "PUT", f"/v1/models/{tee}/versions/999/sealed", b"x" * 1024),
        ("gw nested he keys", gw, "POST", "/v1/he/keys", deep),
    ]
    if he:
        huge_batch = b'{"v":1,"model":"' + he.encode() + b'","key_id":"00","packing":"latency","batch":1'
        huge_batch += b"0" * 400 + b',"features":30,"ciphertexts":[]}'
        cases += [
            ("gw nested he infer", gw, "POST", f"/v1/he/models/{he}:infer", deep),
            ("gw he batch 10**400", gw, "POST", f"/v1/he/models/{he}:infer", huge_batch),
        ]

    def malformed() -> None:
        clients = {base: httpx.Client(base_url=base, timeout=30) for base in (ks, gw)}
        try:
            for _ in range(repeats):
                for name, base, method, path, body in cases:
                    if body == "stream-ks":
                        body = streamed(big_ks)
                    elif body == "stream-gw":
                        body = streamed(big_gw)
                    try:
                        r = clients[base].request(
                            method, path, content=body, headers={"content-type": "application/json"}
                        )
                        note(name, r, None, (400, 499))
                    except httpx.HTTPError as exc:
                        note(name, None, exc, (400, 499))
        finally:
            for c in clients.values():
                c.close()

    t0 = time.monotonic()
    threads = [threading.Thread(target=flood, args=(spec["flood"] // 8 + (i < spec["flood"] % 8),)) for i in range(8)]
    threads += [threading.Thread(target=malformed) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return {
        "seconds": round(time.monotonic() - t0, 2),
        "sent": sum(counts.values()),
        "answers": dict(sorted(counts.items())),
        "not_clean": bad,
        "clean": not bad,
    }


# -- figures --------------------------------------------------------------------------------------


def figures(reqs: list[Req], cfg: Config) -> dict[str, Any]:
    codes = Counter(r.code for r in reqs if r.outcome == "error")
    by_status = Counter(f"{r.status} {r.code}" for r in reqs if r.outcome == "error")
    correct = [r for r in reqs if r.outcome == "correct"]
    lat = [r.latency() * 1e3 for r in correct]
    lat_all = [r.latency() * 1e3 for r in reqs if not math.isnan(r.t_end)]
    undeclared = Counter(
        f"{r.status} {r.code}"
        for r in reqs
        if r.outcome == "error" and (r.status >= 500 or r.status == 0) and r.code not in DECLARED_5XX | DEADLINE_CODES
    )
    return {
        "sent": len(reqs),
        "correct": len(correct),
        "wrong": sum(r.outcome == "wrong" for r in reqs),
        "hangs": sum(r.hung() for r in reqs),
        "errors": sum(r.outcome == "error" for r in reqs),
        "errors_by_code": dict(codes.most_common()),
        "errors_by_status": dict(by_status.most_common()),
        "undeclared_5xx": dict(undeclared.most_common()),
        "correct_fraction": round(len(correct) / len(reqs), 5) if reqs else None,
        "latency_ms": {
            "p50": round(percentile(lat, 50), 1) if lat else None,
            "p99": round(percentile(lat, 99), 1) if lat else None,
        },
        "latency_all_ms": {
            "p50": round(percentile(lat_all, 50), 1) if lat_all else None,
            "p99": round(percentile(lat_all, 99), 1) if lat_all else None,
        },
        "by_kind": {
            kind: {"sent": sum(r.kind == kind for r in reqs), "correct": sum(r.kind == kind for r in correct)}
            for kind in sorted({r.kind for r in reqs})
        },
        "wrong_examples": [f"{r.model}: {r.detail}" for r in reqs if r.outcome == "wrong"][:5],
    }


def recovery(reqs: list[Req], w: Window, t_ref: float, sustain_s: float) -> dict[str, float | None]:
    """From `t_ref`: to the first correct answer of an affected model, and to the answer that
    starts a run of `sustain_s` seconds of arrivals (at least 3) all answered correctly."""
    affected = set(w.affected)
    mine = sorted(
        (r for r in reqs if r.kind != "burst" and r.t_sched >= t_ref and (not affected or r.model in affected)),
        key=lambda r: r.t_sched,
    )
    first = min((r.t_end for r in mine if r.outcome == "correct"), default=None)
    sustained = None
    for i, r in enumerate(mine):
        if r.outcome != "correct":
            continue
        run = [q for q in mine[i:] if q.t_sched <= r.t_sched + sustain_s]
        if len(run) >= 3 and all(q.outcome == "correct" for q in run) and mine[-1].t_sched >= r.t_sched + sustain_s:
            sustained = r.t_end
            break
    return {
        "first_correct_s": None if first is None else round(first - t_ref, 3),
        "sustained_s": None if sustained is None else round(sustained - t_ref, 3),
    }


def report(soak: Soak, writes: dict[str, Any], rows: dict[str, Any], wall_s: float, argv: list[str]) -> dict[str, Any]:
    cfg = soak.cfg
    reqs = list(soak.reqs)
    windows = sorted(soak.windows, key=lambda w: w.t_fault)

    def in_window(r: Req) -> Window | None:
        for w in windows:
            if w.t_fault <= r.t_sched < w.t_end:
                return w
        return None

    outside = [r for r in reqs if in_window(r) is None]
    win_out = []
    recovery_s: dict[str, dict[str, list]] = {}
    for w in windows:
        mine = [r for r in reqs if in_window(r) is w]
        rec = recovery(reqs, w, w.t_fault, cfg.sustain_s)
        entry: dict[str, Any] = {
            "kind": w.kind,
            "round": w.round,
            "t_fault_s": round(w.t_fault, 3),
            "t_heal_s": round(w.t_heal, 3),
            "t_end_s": round(w.t_end, 3),
            "affected_models": w.affected or "all",
            **figures(mine, cfg),
            "acknowledged_writes": sum(w.t_fault - cfg.storm_lead_s <= a.t < w.t_end for a in soak.acks),
            "lost_writes": sum(w.t_fault - cfg.storm_lead_s <= a["t"] < w.t_end for a in rows["lost"]),
            "recovery": rec,
            "detail": w.detail,
        }
        if w.t_heal - w.t_fault > 0.5:
            entry["recovery_after_heal"] = recovery(reqs, w, w.t_heal, cfg.sustain_s)
        win_out.append(entry)
        slot = recovery_s.setdefault(w.kind, {"first_correct": [], "sustained": []})
        slot["first_correct"].append(rec["first_correct_s"])
        slot["sustained"].append(rec["sustained_s"])
    total = figures(reqs, cfg)
    out_fig = figures(outside, cfg)
    lost = rows["lost"] + [{"kind": "release", "detail": d} for d in writes["onboarded_refused"]]

    def worst(kind: str) -> float | None:
        vals = recovery_s.get(kind, {}).get("sustained", [])
        return None if not vals or any(v is None for v in vals) else max(vals)

    hostile = [w for w in win_out if w["kind"] == "hostile"]
    hostile_clean = bool(hostile) and all(
        w["detail"].get("hostile", {}).get("clean") and all(v["clean"] for v in w["detail"]["sealed_hostile"].values())
        for w in hostile
    )
    cold_ok = bool(hostile) and all(w["detail"].get("cold_start", {}).get("ok") for w in hostile)
    queue_windows = [w for w in win_out if w["kind"] == "full_queue"]
    undeclared = sum(total["undeclared_5xx"].values())
    targets = {
        "wrong == 0": (total["wrong"], total["wrong"] == 0),
        "lost_writes == 0": (len(lost), not lost and rows["audit_exit"] == 0),
        "hangs == 0": (total["hangs"], total["hangs"] == 0),
        "5xx other than busy/unavailable == 0": (undeclared, undeclared == 0),
        ">= 99% correct outside fault windows": (
            out_fig["correct_fraction"],
            (out_fig["correct_fraction"] or 0) >= 0.99,
        ),
        "recovery <= 5 s after an instance kill": (worst("instance_kill"), (worst("instance_kill") or 99) <= 5),
        "recovery <= 10 s after a KeyService restart": (
            worst("keyservice_restart"),
            (worst("keyservice_restart") or 99) <= 10,
        ),
        "hostile traffic gets clean 4xx": (hostile_clean, hostile_clean),
        "cold start works during the challenge flood": (cold_ok, cold_ok),
        "a full queue answers a clean busy": (
            [w["detail"].get("answers") for w in queue_windows],
            bool(queue_windows)
            and all(
                w["detail"].get("answers", {}).get("busy", 0) > 0 and set(w["detail"]["answers"]) <= {"correct", "busy"}
                for w in queue_windows
            ),
        ),
    }
    return {
        "command": " ".join(["veil bench chaos", *argv]),
        "seed": cfg.seed,
        "sent": total["sent"],
        "correct": total["correct"],
        "wrong": total["wrong"],
        "hangs": total["hangs"],
        "lost_writes": len(lost),
        "errors_by_code": total["errors_by_code"],
        "recovery_s": recovery_s,
        "targets": {k: {"measured": v[0], "met": bool(v[1])} for k, v in targets.items()},
        "all_targets_met": all(v[1] for v in targets.values()),
        "overall": total,
        "outside_windows": out_fig,
        "windows": win_out,
        "writes": {**rows, **writes, "failed_unacknowledged": dict(soak.write_failures)},
        "lost": lost,
        "he": {"models": [h.model_id for h in soak.he], "note": soak.he_note},
        "measurements": soak.measurement_drift(),
        "config": {k: v for k, v in cfg.__dict__.items()},
        "setup_s": round(soak.setup_s, 1),
        "phases_s": {"setup": round(soak.setup_s, 1), **{k: round(v, 1) for k, v in soak.phases.items()}},
        "soak_s": round(soak.end_t, 1),
        "wall_s": round(wall_s, 1),
        "machine": {**soak.machine, "load_avg_at_end": [round(x, 2) for x in os.getloadavg()]},
    }


def plot(soak: Soak, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    reqs, cfg = soak.reqs, soak.cfg
    fig, (ax1, ax2) = plt.subplots(2, 1, figsize=(14, 7), sharex=True, gridspec_kw={"height_ratios": [3, 2]})
    colors = {
        "instance_kill": "tab:red",
        "keyservice_restart": "tab:purple",
        "sigstop": "tab:orange",
        "corrupt_sealed": "tab:brown",
        "full_queue": "tab:olive",
        "hostile": "tab:cyan",
    }
    for w in soak.windows:
        for ax in (ax1, ax2):
            ax.axvspan(w.t_fault, w.t_end, color=colors[w.kind], alpha=0.15, lw=0)
            ax.axvline(w.t_fault, color=colors[w.kind], lw=0.8)
        ax1.text(
            w.t_fault, 1.02, w.kind.replace("_", " "), transform=ax1.get_xaxis_transform(), rotation=30, fontsize=7
        )
    for kind, marker, color in (("tee", ".", "tab:blue"), ("he", "s", "tab:green"), ("burst", ".", "tab:gray")):
        ok = [r for r in reqs if r.kind == kind and r.outcome == "correct"]
        if ok:
            ax1.scatter(
                [r.t_sched for r in ok],
                [r.latency() * 1e3 for r in ok],
                s=4,
                marker=marker,
                color=color,
                label=f"{kind} correct",
                alpha=0.6,
            )
    err = [r for r in reqs if r.outcome == "error" and not math.isnan(r.t_end)]
    if err:
        ax1.scatter(
            [r.t_sched for r in err],
            [max(r.latency() * 1e3, 1) for r in err],
            s=14,
            marker="x",
            color="red",
            label="error",
            alpha=0.8,
        )
    wrong = [r for r in reqs if r.outcome == "wrong"]
    if wrong:
        ax1.scatter(
            [r.t_sched for r in wrong],
            [r.latency() * 1e3 for r in wrong],
            s=30,
            marker="*",
            color="black",
            label="WRONG",
        )
    ax1.axhline(cfg.deadline_s * 1e3, color="gray", ls="--", lw=0.8, label="TEE deadline")
    ax1.set_yscale("log")
    ax1.set_ylabel("latency from arrival (ms)")
    ax1.legend(loc="upper right", fontsize=7, ncol=3)
    end = max([r.t_sched for r in reqs] + [1.0])
    edges = np.arange(0, end + 1, 1.0)
    t_ok = [r.t_sched for r in reqs if r.outcome == "correct"]
    t_err = [r.t_sched for r in reqs if r.outcome == "error"]
    ok_h, _ = np.histogram(t_ok, bins=edges)
    err_h, _ = np.histogram(t_err, bins=edges)
    ax2.bar(edges[:-1], ok_h, width=1.0, align="edge", color="tab:blue", alpha=0.6, label="correct / s")
    ax2.bar(edges[:-1], err_h, width=1.0, align="edge", bottom=ok_h, color="red", alpha=0.8, label="errors / s")
    ax2.set_yscale("symlog")
    ax2.set_ylabel("requests per second (by arrival)")
    ax2.set_xlabel("seconds since the soak started")
    ax2.legend(loc="upper right", fontsize=7)
    fig.suptitle(f"veil bench chaos (seed {cfg.seed}): latency and errors, fault windows shaded", y=0.995)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def print_summary(result: dict[str, Any], echo: Callable[[str], None]) -> None:
    echo(
        f"sent {result['sent']}, correct {result['correct']}, wrong {result['wrong']}, hangs {result['hangs']}, "
        f"lost writes {result['lost_writes']}; errors {result['errors_by_code']}"
    )
    for w in result["windows"]:
        rec = w["recovery"]
        echo(
            f"  {w['kind']:<19} r{w['round']} at {w['t_fault_s']:6.1f} s: sent {w['sent']:4d} "
            f"correct {w['correct']:4d} "
            f"errors {w['errors_by_code']} recovery first {rec['first_correct_s']} s, sustained {rec['sustained_s']} s"
        )
    for name, t in result["targets"].items():
        echo(f"  [{'ok' if t['met'] else 'MISSED'}] {name}: {t['measured']}")


def main(argv: list[str]) -> int:
    if argv[:1] == ["--hostile-worker"]:
        print(json.dumps(hostile_main(json.loads(argv[1]))))
        return 0
    parser = argparse.ArgumentParser(prog="veil bench chaos", description=__doc__.splitlines()[0])
    parser.add_argument("--json", type=Path, required=True, help="write the figures here (and the plot at PATH.png)")
    parser.add_argument("--minutes", type=float, default=10.0, help="length of the soak (default 10)")
    parser.add_argument("--quick", action="store_true", help="the CI size: one window of each fault, about a minute")
    parser.add_argument("--seed", type=int, default=14, help="seeds the arrivals, the choices and the fault order")
    parser.add_argument("--workdir", type=Path, default=None, help="keep the deployment's files here")
    parser.add_argument("--records", type=Path, default=None, help="also write every request's record (JSON lines)")
    parser.add_argument(
        "--colocation",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="after the soak, check that three 400 MB models on 1 GiB instances are never co-located "
        "(bench/colocation.py, about 2 minutes; default: on, off with --quick)",
    )
    args = parser.parse_args(argv)
    cfg = Config.from_args(args)
    t_wall = time.monotonic()

    def echo(line: str) -> None:
        print(line, file=sys.stderr, flush=True)

    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("veil.attest.validate").setLevel(logging.ERROR)  # "accepting SIMULATED": every check

    with contextlib.ExitStack() as stack:
        if args.workdir is None:
            workdir = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="veil-chaos-")))
        else:
            workdir = args.workdir.resolve()
            workdir.mkdir(parents=True, exist_ok=True)
        soak = Soak(cfg, workdir, echo)
        try:
            echo("setting up: models, deployment, owners, users" + (", HE" if cfg.he_models else ""))
            soak.setup()
            echo(f"set up in {soak.setup_s:.1f} s; HE: {[h.model_id for h in soak.he] or soak.he_note}")
            soak.run()
            soak.phases["soak"] = time.monotonic() - t_wall - soak.setup_s
            writes = soak.verify_writes()
            soak.phases["verify"] = time.monotonic() - t_wall - soak.setup_s - soak.phases["soak"]
        finally:
            soak.stop.set()
            for pid in list(soak.stopped_pids):
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGCONT)
            principals = [*soak.owners.values(), *soak.users, *(u for u, _ in soak.onboarded)]
            he_users = [h.remote for h in getattr(soak, "he", [])]
            for p in principals + [o for o, _ in getattr(soak, "storm_cast", [])] + he_users:
                with contextlib.suppress(Exception):
                    p.close()
            if soak.deployment is not None:
                t_stop = time.monotonic()
                soak.deployment.stop()
                soak.phases["stop"] = time.monotonic() - t_stop
        t_rows = time.monotonic()
        rows = soak.check_rows()
        soak.phases["rows_and_audit"] = time.monotonic() - t_rows
        result = report(soak, writes, rows, time.monotonic() - t_wall, argv)
        if args.colocation if args.colocation is not None else not args.quick:
            from colocation import colocation_check

            echo("checking that three 400 MB models on 1 GiB instances are never co-located")
            coloc = colocation_check(workdir / "colocation", echo=echo)
            result["colocation"] = coloc
            result["targets"]["three 400 MB models on 1 GiB instances are never co-located"] = {
                "measured": {k: coloc[k] for k in ("max_models_per_instance", "out_of_memory", "wrong", "errors")},
                "met": bool(coloc["never_co_located"]),
            }
            result["all_targets_met"] = all(t["met"] for t in result["targets"].values())
            result["wall_s"] = round(time.monotonic() - t_wall, 1)
    write_json(args.json, result)
    png = args.json.with_suffix(".png")
    try:
        plot(soak, png)
        result["plot"] = str(png)
        write_json(args.json, result)
    except ImportError as exc:
        echo(f"no plot ({exc}): install the bench extra")
    if args.records is not None:
        with args.records.open("w") as f:
            for r in sorted(soak.reqs, key=lambda r: r.t_sched):
                f.write(
                    json.dumps(
                        {k: (None if isinstance(v, float) and math.isnan(v) else v) for k, v in r.__dict__.items()}
                    )
                    + "\n"
                )
    print_summary(result, echo)
    echo(f"wrote {args.json}" + (f" and {png}" if "plot" in result else ""))
    return 0


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
    raise SystemExit(main(sys.argv[1:]))
