"""docs/he-serving.md's "Step by step" block, executed as written in a fresh directory (`veil up`
in the background, as the document runs it in its own terminal), so the page cannot drift from
the CLI: HE and hybrid publishes, grants, and encrypted inference in both modes."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from docs_support import run_shell, step_by_step, veil_up

DOC = Path(__file__).resolve().parents[1] / "docs" / "he-serving.md"


@pytest.mark.timeout(300)
def test_he_serving_step_by_step_runs_as_written(tmp_path: Path) -> None:
    lines = step_by_step(DOC)
    assert lines[0].startswith("veil up")
    with veil_up(tmp_path, lines[0].split("#")[0].split(), "docs/he-serving.md") as env:
        result = run_shell(lines[1:], tmp_path, env, timeout=240)
    out = result.stdout
    assert "published bc v1: he mode" in out and "published bc-sealed v1: hybrid mode" in out
    answers = [json.loads(line) for line in out.splitlines() if line.startswith('{"scores"')]
    assert len(answers) == 2 and answers[0]["predictions"] == answers[1]["predictions"], out[-2000:]
    assert (tmp_path / "scores.npz").exists()
    secret = next((tmp_path / ".veil" / "client" / "he-keys" / "bc").rglob("secret.key"))
    assert secret.stat().st_mode & 0o077 == 0
