"""One benchmark report: every suite's figures against their baselines and targets, with plots.

`veil bench report --out DIR` collects the latest result of each suite (the JSON files under
`docs/results/`, or `--results DIR`), optionally runs suites first (`--run keyservice,attest`),
and writes `DIR/index.html`: for each suite its headline figures (value, baseline, target, met?),
then every other number it recorded, the plots that belong to it, the machine, the commit, and
the command that reproduces it. Nothing is computed here: the report only shows what the
suites measured.
"""

from __future__ import annotations

import argparse
import datetime as dt
import html
import json
import os
import platform
import shutil
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]


@dataclass(frozen=True)
class Headline:
    """One figure a suite is judged on: where it is in the JSON, and what it is compared with."""

    label: str
    path: str  # dotted path into the suite's JSON
    target: str  # e.g. "≤ 1.10"
    met: Callable[[float], bool]
    baseline: str | None = None  # dotted path of the baseline figure, when the JSON has one


HEADLINES: dict[str, list[Headline]] = {
    "keyservice": [
        Headline("release p50 (ms)", "release_p50_ms", "≤ 2", lambda v: v <= 2),
        Headline("releases per second", "releases_per_s", "≥ 500", lambda v: v >= 500),
    ],
    "runtime": [
        Headline("secure / plain p50 at the gateway", "secure_over_plain_p50", "≤ 1.10", lambda v: v <= 1.10),
        Headline("cold start from zero (ms)", "cold_start_ms", "≤ 1500", lambda v: v <= 1500),
        Headline("copy-per-thread / shared memory per request", "rss_copy_over_shared", "≥ 3", lambda v: v >= 3),
    ],
    "attest": [
        Headline("SGX verify (ms)", "sgx_verify_ms", "≤ 5", lambda v: v <= 5),
        Headline("TDX verify (ms)", "tdx_verify_ms", "≤ 5", lambda v: v <= 5),
        Headline("SEV-SNP verify (ms)", "snp_verify_ms", "≤ 5", lambda v: v <= 5),
    ],
    "ray": [
        Headline("warm p50, Ray / local", "warm_p50_ratio", "≤ 1.5", lambda v: v <= 1.5),
        Headline("cold start from zero replicas (ms)", "cold_start_ms", "≤ 3000", lambda v: v <= 3000),
    ],
    "chaos": [
        Headline("wrong answers", "wrong", "0", lambda v: v == 0),
        Headline("acknowledged writes lost", "lost_writes", "0", lambda v: v == 0),
        Headline("hangs past the deadline", "hangs", "0", lambda v: v == 0),
    ],
}
COMMANDS = {
    "keyservice": "veil bench keyservice --json docs/results/keyservice.json",
    "runtime": "veil bench runtime --json docs/results/runtime.json",
    "attest": "veil bench attest --json docs/results/attest.json -n 200",
    "he": "veil bench he --json docs/results/he.json --reps 15",
    "packer": "veil bench packer --json docs/results/packer.json --plots docs/img",
    "ray": "veil bench ray --json docs/results/ray.json",
    "chaos": "veil bench chaos --minutes 10 --json docs/results/chaos.json",
}


def lookup(obj: Any, path: str) -> Any:
    for part in path.split("."):
        if not isinstance(obj, dict) or part not in obj:
            return None
        obj = obj[part]
    return obj


def numbers(obj: Any, prefix: str = "") -> list[tuple[str, float | int | bool]]:
    """Every numeric leaf of a JSON value, with its dotted path (lists of numbers summarised)."""
    out: list[tuple[str, float | int | bool]] = []
    if isinstance(obj, dict):
        for key, value in obj.items():
            out += numbers(value, f"{prefix}.{key}" if prefix else str(key))
    elif isinstance(obj, bool | int | float):
        out.append((prefix, obj))
    return out


def machine() -> dict[str, str]:
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True)
    return {
        "commit": commit.stdout.strip() or "unknown",
        "python": sys.version.split()[0],
        "platform": platform.platform(),
        "cpus": str(os.cpu_count()),
        "written": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
    }


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    return html.escape(str(value))


def suite_section(name: str, result: dict[str, Any], images: list[Path]) -> str:
    rows = []
    for h in HEADLINES.get(name, []):
        value = lookup(result, h.path)
        if not isinstance(value, int | float):
            rows.append(f"<tr><td>{html.escape(h.label)}</td><td colspan=4>not recorded</td></tr>")
            continue
        ok = h.met(float(value))
        base = lookup(result, h.baseline) if h.baseline else None
        verdict = "<td class=ok>met</td>" if ok else "<td class=miss>MISSED</td>"
        rows.append(
            f"<tr><td>{html.escape(h.label)}</td><td>{_fmt(value)}</td><td>{_fmt(base) if base is not None else ''}"
            f"</td><td>{html.escape(h.target)}</td>{verdict}</tr>"
        )
    head = (
        "<table><tr><th>figure</th><th>value</th><th>baseline</th><th>target</th><th></th></tr>"
        + "".join(rows)
        + "</table>"
        if rows
        else ""
    )
    detail = "".join(f"<tr><td>{html.escape(k)}</td><td>{_fmt(v)}</td></tr>" for k, v in numbers(result))
    plots = "".join(
        f'<figure><img src="img/{p.name}" alt="{p.stem}"><figcaption>{p.stem}</figcaption></figure>' for p in images
    )
    command = html.escape(COMMANDS.get(name, f"veil bench {name} --json PATH"))
    return (
        f"<section><h2>{html.escape(name)}</h2>{head}<p>reproduce: <code>{command}</code></p>{plots}"
        f"<details><summary>every figure recorded</summary><table>{detail}</table></details></section>"
    )


STYLE = """body{font-family:system-ui,sans-serif;max-width:70rem;margin:2rem auto;padding:0 1rem;color:#222}
table{border-collapse:collapse;margin:.5rem 0}td,th{border:1px solid #ccc;padding:.2rem .6rem;text-align:left}
.ok{color:#0a0;font-weight:bold}.miss{color:#c00;font-weight:bold}figure{display:inline-block;margin:.5rem}
img{max-width:32rem}code{background:#f4f4f4;padding:0 .2rem}"""


def write_report(results_dir: Path, images_dir: Path, out: Path) -> Path:
    out.mkdir(parents=True, exist_ok=True)
    (out / "img").mkdir(exist_ok=True)
    sections = []
    for path in sorted(results_dir.glob("*.json")):
        try:
            result = json.loads(path.read_text())
        except ValueError:
            continue
        name = path.stem.split("-")[0]
        images = sorted(images_dir.glob(f"{name}*.png")) if images_dir.is_dir() else []
        for image in images:
            shutil.copy2(image, out / "img" / image.name)
        sections.append(suite_section(name, result if isinstance(result, dict) else {}, images))
    facts = "".join(f"<li>{html.escape(k)}: {html.escape(v)}</li>" for k, v in machine().items())
    page = (
        f"<!doctype html><meta charset=utf-8><title>Veil benchmarks</title><style>{STYLE}</style>"
        f"<h1>Veil benchmarks</h1><ul>{facts}</ul>"
        "<p>Every figure is what a suite measured on this machine (shared and noisy: medians and same-run "
        "ratios). Baselines are configured as their own documentation does.</p>" + "".join(sections)
    )
    index = out / "index.html"
    index.write_text(page)
    return index


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="veil bench report", description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True, help="Directory for index.html and its plots.")
    parser.add_argument("--results", type=Path, default=ROOT / "docs" / "results", help="Suites' JSON results.")
    parser.add_argument("--images", type=Path, default=ROOT / "docs" / "img", help="Suites' plots.")
    parser.add_argument(
        "--run", default="", help="Comma-separated suites to run first (their --json goes to --results)."
    )
    parser.add_argument("--json", type=Path, default=None, help="Also write the machine facts and file list as JSON.")
    args = parser.parse_args(argv)
    for suite in filter(None, args.run.split(",")):
        target = args.results / f"{suite}.json"
        code = subprocess.run([sys.executable, "-m", "veil.cli", "bench", suite, "--json", str(target)]).returncode
        if code != 0:
            print(f"suite {suite} failed (exit {code}); the report shows its previous result", file=sys.stderr)
    index = write_report(args.results, args.images, args.out)
    if args.json is not None:
        args.json.write_text(json.dumps({"index": str(index), **machine()}, indent=2))
    print(f"report written to {index}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
