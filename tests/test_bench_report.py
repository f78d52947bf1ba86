"""`veil bench report` renders the suites' recorded results into one HTML page: headline figures
against their targets, every recorded number, plots, machine and commit, reproduce commands."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path


def test_report_shows_figures_targets_and_misses(tmp_path: Path) -> None:
    results, images = tmp_path / "results", tmp_path / "img"
    results.mkdir()
    images.mkdir()
    (results / "keyservice.json").write_text(json.dumps({"release_p50_ms": 1.2, "releases_per_s": 120.0}))
    (results / "runtime.json").write_text(json.dumps({"secure_over_plain_p50": 1.05, "cold_start_ms": {"p50": 1}}))
    (results / "broken.json").write_text("{not json")
    (images / "runtime-concurrency.png").write_bytes(b"\x89PNG\r\n\x1a\n")
    out = tmp_path / "report"
    r = subprocess.run(
        [
            sys.executable,
            "-m",
            "veil.cli",
            "bench",
            "report",
            "--out",
            str(out),
            "--results",
            str(results),
            "--images",
            str(images),
        ],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert r.returncode == 0, r.stderr
    page = (out / "index.html").read_text()
    assert "<h2>keyservice</h2>" in page and "<h2>runtime</h2>" in page
    assert "release p50 (ms)</td><td>1.2</td>" in page and "class=ok>met" in page
    assert "releases per second</td><td>120</td>" in page and "class=miss>MISSED" in page  # 120 < 500
    assert "cold start from zero (ms)</td><td colspan=4>not recorded" in page  # a dict, not a number
    assert (out / "img" / "runtime-concurrency.png").exists() and "img/runtime-concurrency.png" in page
    assert "veil bench keyservice --json" in page and "commit" in page
