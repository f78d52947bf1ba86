"""Three 400 MB models on 1 GiB instances are never co-located (issue 14), with the real
deployment: KeyService, gateway, Veil's packer, memory enforced, `python -m veil.runtime`.

Slow (about a minute and a half here: generating and publishing three 402.7 MB models is most
of it); the same check runs as a phase of `veil bench chaos` (bench/colocation.py).
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "bench"))

from colocation import colocation_check  # noqa: E402


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_three_400_mb_models_on_1_gib_instances_are_never_co_located(tmp_path: Path) -> None:
    got = colocation_check(tmp_path, rounds=1, echo=lambda line: None)
    assert got["errors"] == [] and got["out_of_memory"] == 0, got
    assert got["wrong"] == 0 and got["correct"] == got["requests"] == 6
    assert got["max_models_per_instance"] == 1, got["census"]
    assert got["instances_started"] == 3
    assert got["never_co_located"]
