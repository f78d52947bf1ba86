"""Seeded multi-model request traces shaped like the Azure Functions trace.

Each model gets a share of the total rate from a skewed popularity law (Zipf or log-normal) and
a Gamma renewal process of inter-arrival times whose coefficient of variation (CV) is drawn from
the Azure Functions 2019 trace's distribution (Shahrad et al., ATC '20, Fig. 6: about 35 % of
functions have CV <= 1, 55 % <= 2, 75 % <= 4). A sinusoidal daily cycle of +-`amplitude` is
applied by time-rescaling the renewal process (the Gamma shape is kept in "operational time"),
and its period `day_s` can be compressed into minutes. Traces are saved as CSV `t_s,model`.
"""

from __future__ import annotations

import csv
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

# (CV, cumulative fraction of functions), interpolated linearly in log(CV).
AZURE_CV_CDF: tuple[tuple[float, float], ...] = (
    (0.1, 0.0),
    (1.0, 0.35),
    (2.0, 0.55),
    (4.0, 0.75),
    (10.0, 1.0),
)


def cv_quantile(u: np.ndarray) -> np.ndarray:
    """Inverse of AZURE_CV_CDF at probabilities `u` (in [0, 1])."""
    cvs = np.log([c for c, _ in AZURE_CV_CDF])
    probs = np.array([p for _, p in AZURE_CV_CDF])
    return np.exp(np.interp(u, probs, cvs))


def sample_cvs(n: int, rng: np.random.Generator, *, stratified: bool = True) -> np.ndarray:
    """`n` CVs following the Azure distribution; stratified so even 20 models match it."""
    if stratified:
        u = (np.arange(n) + rng.random(n)) / n
        rng.shuffle(u)
    else:
        u = rng.random(n)
    return cv_quantile(u)


def popularity(n: int, rng: np.random.Generator, *, law: str = "zipf", param: float = 1.0) -> np.ndarray:
    """Each model's share of requests (sums to 1, most popular first).

    `zipf`: share ~ 1 / rank**param. `lognormal`: shares ~ LogNormal(0, param), sorted.
    """
    if law == "zipf":
        weights = 1.0 / np.arange(1, n + 1) ** param
    elif law == "lognormal":
        weights = np.sort(rng.lognormal(0.0, param, n))[::-1]
    else:
        raise ValueError(f"unknown popularity law {law!r} (zipf or lognormal)")
    return weights / weights.sum()


@dataclass
class TraceConfig:
    """Everything that determines a trace; the same config and seed give the same trace."""

    n_models: int = 20
    duration_s: float = 600.0
    total_rate: float = 4.0
    law: str = "zipf"
    law_param: float = 1.0
    day_s: float | None = None  # period of the daily cycle; None = one cycle over the trace
    amplitude: float = 0.2
    seed: int = 0
    prefix: str = "m"
    cvs: list[float] | None = None  # override the sampled CVs (tests)

    @property
    def period_s(self) -> float:
        return self.day_s if self.day_s else self.duration_s


@dataclass
class Trace:
    """Arrival times (seconds from 0, sorted) and the model of each request."""

    times: np.ndarray
    models: list[str]
    rates: dict[str, float] = field(default_factory=dict)
    cvs: dict[str, float] = field(default_factory=dict)
    config: dict = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.models)

    @property
    def model_names(self) -> list[str]:
        return sorted(set(self.models), key=self.models.index)

    def duration(self) -> float:
        return float(self.config.get("duration_s", self.times[-1] if len(self.times) else 0.0))

    def head(self, seconds: float) -> Trace:
        """The first `seconds` of the trace (same models and parameters)."""
        keep = self.times < seconds
        config = dict(self.config, duration_s=seconds)
        models = [m for m, k in zip(self.models, keep, strict=True) if k]
        return Trace(self.times[keep], models, dict(self.rates), dict(self.cvs), config)

    def to_csv(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        with path.open("w", newline="") as fh:
            writer = csv.writer(fh)
            writer.writerow(["t_s", "model"])
            for t, m in zip(self.times, self.models, strict=True):
                writer.writerow([f"{t:.6f}", m])

    @classmethod
    def from_csv(cls, path: Path, duration_s: float | None = None) -> Trace:
        times: list[float] = []
        models: list[str] = []
        with path.open(newline="") as fh:
            reader = csv.DictReader(fh)
            for row in reader:
                times.append(float(row["t_s"]))
                models.append(row["model"])
        order = np.argsort(times, kind="stable")
        arr = np.asarray(times)[order]
        config = {"duration_s": duration_s if duration_s is not None else (arr[-1] if len(arr) else 0.0)}
        return cls(arr, [models[i] for i in order], config=config)


def _cycle_inverse(cfg: TraceConfig) -> tuple[np.ndarray, np.ndarray]:
    """Grid of (g(t), t) with g(t) = integral of 1 + a sin(2 pi t / P), for inverting."""
    grid = np.linspace(0.0, cfg.duration_s, max(2, int(cfg.duration_s * 20) + 1))
    p = cfg.period_s
    g = grid + cfg.amplitude * p / (2 * math.pi) * (1 - np.cos(2 * math.pi * grid / p))
    return g, grid


def generate(cfg: TraceConfig) -> Trace:
    """Generate the trace described by `cfg`."""
    if not 0 <= cfg.amplitude < 1:
        raise ValueError("amplitude must be in [0, 1)")
    rng = np.random.default_rng(cfg.seed)
    shares = popularity(cfg.n_models, rng, law=cfg.law, param=cfg.law_param)
    cvs = np.asarray(cfg.cvs, dtype=float) if cfg.cvs is not None else sample_cvs(cfg.n_models, rng)
    if len(cvs) != cfg.n_models:
        raise ValueError("need one CV per model")
    g_grid, t_grid = _cycle_inverse(cfg)
    g_end = g_grid[-1]
    width = len(str(cfg.n_models - 1))
    all_t: list[np.ndarray] = []
    all_m: list[np.ndarray] = []
    names = [f"{cfg.prefix}{i:0{width}d}" for i in range(cfg.n_models)]
    for idx in range(cfg.n_models):
        rate = cfg.total_rate * shares[idx]
        shape = 1.0 / cvs[idx] ** 2
        horizon = rate * g_end  # expected count in operational time
        chunks: list[np.ndarray] = []
        total = rng.random() * rng.gamma(shape, 1.0 / shape)  # random phase for the first gap
        while True:
            gaps = rng.gamma(shape, 1.0 / shape, size=max(16, int(horizon * 1.2) + 16))
            pos = total + np.cumsum(gaps)
            chunks.append(pos)
            total = pos[-1]
            if total >= horizon:
                break
        s = np.concatenate(chunks)
        s = s[s < horizon] / rate  # unit-rate operational time -> g(t)
        all_t.append(np.interp(s, g_grid, t_grid))
        all_m.append(np.full(len(s), idx))
    times = np.concatenate(all_t) if all_t else np.array([])
    which = np.concatenate(all_m) if all_m else np.array([], dtype=int)
    order = np.argsort(times, kind="stable")
    return Trace(
        times=times[order],
        models=[names[i] for i in which[order]],
        rates={names[i]: float(cfg.total_rate * shares[i]) for i in range(cfg.n_models)},
        cvs={names[i]: float(cvs[i]) for i in range(cfg.n_models)},
        config=asdict(cfg),
    )


def observed_stats(trace: Trace) -> dict[str, dict[str, float]]:
    """Per-model observed rate (req/s over the trace) and CV of inter-arrival times."""
    out: dict[str, dict[str, float]] = {}
    duration = trace.duration()
    models = np.asarray(trace.models)
    for name in sorted(set(trace.models)):
        t = trace.times[models == name]
        gaps = np.diff(t)
        cv = float(gaps.std() / gaps.mean()) if len(gaps) > 1 and gaps.mean() > 0 else float("nan")
        out[name] = {"count": float(len(t)), "rate": len(t) / duration, "cv": cv}
    return out
