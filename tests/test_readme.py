"""The README's "Step by step" block, executed as written in a fresh directory (only `veil up`,
which the README runs in its own terminal, goes to the background), so the README cannot drift
from the CLI."""

from __future__ import annotations

from pathlib import Path

import pytest

from docs_support import run_shell, step_by_step, veil_up

README = Path(__file__).resolve().parents[1] / "README.md"


@pytest.mark.timeout(300)
def test_step_by_step_runs_as_written(tmp_path: Path) -> None:
    lines = step_by_step(README)
    assert lines[0].startswith("veil up")
    with veil_up(tmp_path, lines[0].split("#")[0].split(), "the README") as env:
        result = run_shell(lines[1:], tmp_path, env, timeout=240)
    out = result.stdout
    assert "published cancer v1" in out and "published cancer v2 (replaces v1)" in out
    assert '"label"' in out and (tmp_path / "predictions.csv").exists()
    assert "policy rows OK" in result.stderr and "chain OK" in result.stderr
    assert "gateway" in out and "GB-s" in out and "cancer v2" in out
