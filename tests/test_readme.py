"""The README's "Step by step" block, executed as written in a fresh directory (only `veil up`,
which the README runs in its own terminal, goes to the background), so the README cannot drift
from the CLI."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from docs_support import run_shell, veil_up

README = Path(__file__).resolve().parents[1] / "README.md"


def step_by_step() -> list[str]:
    text = README.read_text()
    section = text[text.index("## Step by step") :]
    block = re.search(r"```bash\n(.*?)\n```", section, flags=re.S)
    assert block, "no bash block under Step by step"
    return [line for line in block.group(1).splitlines() if line.strip()]


@pytest.mark.timeout(300)
def test_step_by_step_runs_as_written(tmp_path: Path) -> None:
    lines = step_by_step()
    assert lines[0].startswith("veil up")
    with veil_up(tmp_path, lines[0].split("#")[0].split(), "the README") as env:
        result = run_shell(lines[1:], tmp_path, env, timeout=240)
    out = result.stdout
    assert "published cancer v1" in out and "published cancer v2 (replaces v1)" in out
    assert '"label"' in out and (tmp_path / "predictions.csv").exists()
    assert "policy rows OK" in result.stderr and "chain OK" in result.stderr
    assert "gateway" in out and "GB-s" in out and "cancer v2" in out
