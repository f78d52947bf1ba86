"""docs/tutorial.md, executed: its first block (`veil up`) in the background, every other bash
block in order in one shell, in a fresh directory; then what the tutorial says happened."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from docs_support import run_shell, veil_up

TUTORIAL = Path(__file__).resolve().parents[1] / "docs" / "tutorial.md"


@pytest.mark.timeout(420)
def test_tutorial_runs_as_written(tmp_path: Path) -> None:
    blocks = re.findall(r"```bash\n(.*?)\n```", TUTORIAL.read_text(), flags=re.S)
    assert blocks[0].strip() == "veil up"
    with veil_up(tmp_path, ["veil", "up"], "the tutorial") as env:
        r = run_shell(blocks[1:], tmp_path, env, timeout=360)
    assert "published risk v1" in r.stdout and "revocation delay 10 s" in r.stdout
    assert sum(line.startswith("granted ") for line in r.stdout.splitlines()) == 2
    assert "clinic B refused (exit 1)" in r.stdout
    assert "clinic A still served" in r.stdout and "not_granted" in r.stderr
    assert (tmp_path / "clinic-b.csv").read_text().startswith("label,probabilities_0,probabilities_1")
    assert "chain OK" in r.stderr and "policy rows OK" in r.stderr
    for who in ("hospital", "clinic-a", "clinic-b"):
        assert (tmp_path / who / "trust.json").exists()
