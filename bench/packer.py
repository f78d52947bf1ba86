"""`veil bench packer`: the same multi-model trace under each packing policy.

1. Builds one ONNX model per model id and measures cold/warm costs on the real local platform
   (or loads them with --calibration).
2. Simulates a compressed day (one daily cycle in --day-s seconds) under each policy.
3. With --real-minutes N > 0, replays an N-minute trace in real time on a fresh LocalPlatform per
   policy (instances: bench/workloads/model_action.py), then simulates that same trace with the
   measured costs and reports where simulation and reality differ.
4. Writes `--json` ({"policies": {...}} from the real run if any, else from the simulated day,
   plus every run in full) and `--plots` (latency CDF, instances over time, cost per policy).

    veil bench packer --json out/packer.json --plots docs/img --real-minutes 10
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent / "workloads"))

from calibrate import calibrate  # noqa: E402
from models import make_models  # noqa: E402
from plots import cost_bars, instances_over_time, latency_cdf  # noqa: E402
from replay import replay  # noqa: E402
from sim import Costs, simulate  # noqa: E402
from tracegen import Trace, TraceConfig, generate  # noqa: E402

from veil.packer import Packer, PoolSpec, make_policy  # noqa: E402
from veil.packer.metrics import InstanceSpan, RequestRecord  # noqa: E402
from veil.platform import FunctionSpec, LocalPlatform  # noqa: E402

POLICY_NAMES = ("per-model", "sesemi", "veil")
METRICS = ("gb_s", "cold_start_fraction", "p50_ms", "p99_ms", "p99_after_warmup_ms", "max_instances")


def _args(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="veil bench packer", description=__doc__.split("\n\n")[0])
    p.add_argument("--json", type=Path, help="write the report here")
    p.add_argument("--plots", type=Path, help="write PNG plots into this directory")
    p.add_argument("--models", type=int, default=20)
    p.add_argument("--rate", type=float, default=4.0, help="total requests per second (mean)")
    p.add_argument("--law", choices=("zipf", "lognormal"), default="zipf")
    p.add_argument("--law-param", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--day-s", type=float, default=3600.0, help="simulated compressed day length (s)")
    p.add_argument("--real-minutes", type=float, default=0.0, help="real replay length (0: none)")
    p.add_argument("--parallel", action="store_true", help="replay the policies at the same time")
    p.add_argument("--policies", default=",".join(POLICY_NAMES), help="comma-separated subset to replay")
    p.add_argument("--capacity", type=int, default=4, help="requests in flight per instance")
    p.add_argument("--memory-mb", type=int, default=512)
    p.add_argument("--idle-timeout", type=float, default=60.0, help="fixed keep-alive of baselines")
    p.add_argument("--max-instances", type=int, default=32)
    p.add_argument("--max-inflight", type=int, default=64, help="replayer bound")
    p.add_argument("--calibration", type=Path, help="load costs from this JSON instead of measuring")
    p.add_argument("--save-calibration", type=Path, help="write the measured costs here")
    p.add_argument("--trace-dir", type=Path, default=Path("bench/workloads/results"), help="where traces are saved")
    p.add_argument("--model-dir", type=Path, default=Path.home() / ".cache" / "veil-bench" / "packer-models")
    return p.parse_args(argv)


def _template(args: argparse.Namespace, name: str = "pool") -> FunctionSpec:
    action = Path(__file__).resolve().parent / "workloads" / "model_action.py"
    return FunctionSpec(
        name,
        [sys.executable, str(action)],
        init_value={"model_dir": str(args.model_dir.resolve())},
        memory_mb=args.memory_mb,
        concurrency=args.capacity,
        max_instances=args.max_instances,
        idle_timeout_s=args.idle_timeout,
        max_queue=4 * args.max_inflight,
    )


def _policy_options(name: str, args: argparse.Namespace, costs: Costs) -> dict:
    """Per-policy options; SeSeMI gets one slot per model, so "all busy" cannot starve a model."""
    return {"pool_size": args.models} if name == "sesemi" else {}


def _pool_spec(args: argparse.Namespace, costs: Costs) -> PoolSpec:
    return PoolSpec(
        function="pool",
        capacity=args.capacity,
        memory_mb=float(args.memory_mb),
        base_mb=costs.base_mb,
        max_instances=args.max_instances,
        idle_timeout_s=args.idle_timeout,
        model_mb=dict(costs.model_mb),
    )


def run_sim(trace: Trace, args: argparse.Namespace, costs: Costs) -> dict[str, tuple]:
    out = {}
    for name in POLICY_NAMES:
        policy = make_policy(name, _pool_spec(args, costs), **_policy_options(name, args, costs))
        t0 = time.perf_counter()
        res = simulate(policy, trace.times, trace.models, costs, seed=args.seed, end=trace.duration())
        summary = res.summary()
        summary["wall_s"] = round(time.perf_counter() - t0, 3)
        out[name] = (summary, res.requests, res.spans, res.end)
    return out


def _service_time(result: dict) -> float | None:
    """The model action's own time (load + run), like FnPacker's ExecTime."""
    total = result.get("total_ms")
    return None if total is None else float(total) / 1000.0


def run_real_policy(name: str, trace: Trace, args: argparse.Namespace, costs: Costs) -> tuple:
    with LocalPlatform() as platform:
        packer = Packer(
            platform,
            _template(args),
            name,
            base_mb=costs.base_mb,
            model_mb=dict(costs.model_mb),
            max_instances=args.max_instances,
            unload_value=lambda m: {"op": "unload", "model": m},
            exec_time=_service_time,
            **_policy_options(name, args, costs),
        )
        try:
            sent = replay(
                list(trace.times),
                trace.models,
                lambda m: packer.invoke(m, {"model": m}, timeout=120.0),
                max_inflight=args.max_inflight,
            )
        finally:
            packer.close()
        summary = packer.stats()
        records: list[RequestRecord] = packer.records()
        spans: list[InstanceSpan] = packer.spans()
        lags = sorted(s.lag_s for s in sent)
        summary["replay_lag_p99_ms"] = round(1000 * float(lags[int(0.99 * (len(lags) - 1))]), 2) if lags else 0.0
        summary["replay_failed"] = sum(not s.ok for s in sent)
        summary.pop("instance_timeline", None)
    return summary, records, spans, summary["duration_s"]


def _dump_records(path: Path, records: list[RequestRecord]) -> None:
    """Per-request results of a real run, for looking at the tail."""
    with path.open("w") as fh:
        fh.write("at_s,model,latency_ms,cold,ok,instance,error\n")
        for r in records:
            fh.write(
                f"{r.at:.4f},{r.model},{r.latency_s * 1000:.2f},{int(r.cold)},{int(r.ok)},{r.instance},{r.error}\n"
            )


def compare(sim: dict[str, dict], real: dict[str, dict]) -> dict:
    """Per policy and metric: sim, real and the relative difference (sim - real) / real."""
    out: dict[str, dict] = {}
    for name in real:
        out[name] = {}
        for metric in METRICS:
            s, r = sim[name][metric], real[name][metric]
            rel = None if not r else round((s - r) / r, 3)
            out[name][metric] = {"sim": s, "real": r, "rel_diff": rel}
    return out


def targets(per: dict[str, dict]) -> dict:
    if not all(n in per for n in POLICY_NAMES):
        return {}
    v, s, p = per["veil"], per["sesemi"], per["per-model"]
    return {
        "gb_s_vs_per_model": {
            "ratio": round(v["gb_s"] / p["gb_s"], 3),
            "target": 0.5,
            "met": v["gb_s"] <= 0.5 * p["gb_s"],
        },
        "gb_s_vs_sesemi": {
            "ratio": round(v["gb_s"] / s["gb_s"], 3),
            "target": 0.8,
            "met": v["gb_s"] <= 0.8 * s["gb_s"],
        },
        "p99_vs_sesemi": {"veil": v["p99_ms"], "sesemi": s["p99_ms"], "met": v["p99_ms"] <= s["p99_ms"]},
        "cold_vs_sesemi": {
            "veil": v["cold_start_fraction"],
            "sesemi": s["cold_start_fraction"],
            "met": v["cold_start_fraction"] <= s["cold_start_fraction"],
        },
    }


def _plots(label: str, runs: dict[str, tuple], out: Path, suffix: str) -> None:
    latency_cdf({n: r[1] for n, r in runs.items()}, out / f"packer-latency-cdf{suffix}.png", f"Latency CDF ({label})")
    instances_over_time(
        {n: (r[2], r[3]) for n, r in runs.items()},
        out / f"packer-instances{suffix}.png",
        f"Instances over time ({label})",
    )


def main(argv: list[str]) -> int:
    args = _args(argv)
    names = [f"m{i:0{len(str(args.models - 1))}d}" for i in range(args.models)]
    make_models(args.model_dir, names)
    if args.calibration:
        costs = Costs.from_json(args.calibration)
    else:
        print("calibrating cold/warm costs on the local platform ...", file=sys.stderr)
        with LocalPlatform() as platform:
            costs = calibrate(platform, _template(args, "calibrate"), names)
        if args.save_calibration:
            costs.to_json(args.save_calibration)
    report: dict = {
        "calibration": {
            "start_s": costs.start_s,
            "base_mb": costs.base_mb,
            "load_s": costs.load_s,
            "model_mb": costs.model_mb,
        }
    }

    day_cfg = TraceConfig(
        n_models=args.models,
        duration_s=args.day_s,
        total_rate=args.rate,
        law=args.law,
        law_param=args.law_param,
        seed=args.seed,
    )
    day = generate(day_cfg)
    args.trace_dir.mkdir(parents=True, exist_ok=True)
    day.to_csv(args.trace_dir / "packer-day.csv")
    sim_day = run_sim(day, args, costs)
    report["sim_day"] = {
        "trace": day_cfg.__dict__ | {"requests": len(day)},
        "policies": {n: r[0] for n, r in sim_day.items()},
    }
    report["sim_day"]["targets"] = targets(report["sim_day"]["policies"])
    main_policies = report["sim_day"]["policies"]
    report["source"] = "sim_day"
    summaries = {f"simulated day ({args.day_s:.0f} s)": main_policies}
    if args.plots:
        args.plots.mkdir(parents=True, exist_ok=True)
        _plots(f"simulated day, {len(day)} requests", sim_day, args.plots, "-sim")

    if args.real_minutes > 0:
        real_cfg = TraceConfig(
            n_models=args.models,
            duration_s=args.real_minutes * 60,
            total_rate=args.rate,
            law=args.law,
            law_param=args.law_param,
            seed=args.seed + 1,
        )
        real_trace = generate(real_cfg)
        real_trace.to_csv(args.trace_dir / "packer-real.csv")
        print(f"replaying {len(real_trace)} requests over {args.real_minutes} min per policy ...", file=sys.stderr)
        chosen = [n for n in POLICY_NAMES if n in args.policies.split(",")]
        if args.parallel:
            with ThreadPoolExecutor(len(chosen)) as pool:
                futures = {n: pool.submit(run_real_policy, n, real_trace, args, costs) for n in chosen}
                real = {n: f.result() for n, f in futures.items()}
        else:
            real = {n: run_real_policy(n, real_trace, args, costs) for n in chosen}
        for n, r in real.items():
            _dump_records(args.trace_dir / f"packer-real-{n}.csv", r[1])
        sim_real = run_sim(real_trace, args, costs)
        real_summ = {n: r[0] for n, r in real.items()}
        sim_summ = {n: r[0] for n, r in sim_real.items()}
        sim_summ = {n: sim_summ[n] for n in real_summ}
        report["real"] = {
            "trace": real_cfg.__dict__ | {"requests": len(real_trace)},
            "parallel": args.parallel,
            "policies": real_summ,
            "targets": targets(real_summ),
        }
        report["sim_of_real_trace"] = {"policies": sim_summ}
        report["sim_vs_real"] = compare(sim_summ, real_summ)
        main_policies = real_summ
        report["source"] = "real"
        summaries = {f"real, {args.real_minutes:g} min": real_summ, "simulated, same trace": sim_summ, **summaries}
        if args.plots:
            _plots(f"real replay, {len(real_trace)} requests", real, args.plots, "")
            _plots(f"simulated replay trace, {len(real_trace)} requests", sim_real, args.plots, "-sim-real")
    if args.plots:
        cost_bars(summaries, args.plots / "packer-cost.png", "Cost per policy (GB-seconds)")
    report["policies"] = main_policies
    text = json.dumps(report, indent=1, default=str)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(text)
    for label, per in summaries.items():
        print(f"== {label}")
        for n, s in per.items():
            print(f"  {n:10s} " + "  ".join(f"{m}={s[m]}" for m in METRICS))
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
