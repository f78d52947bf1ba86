"""The idle histogram's coefficient of variation, kept incrementally, equals the one computed
from its bins for any sequence of idle times."""

from __future__ import annotations

import math
import random

import pytest

from veil.packer.keepalive import IdleHistogram


def _reference(counts: list[int]) -> float:
    n = len(counts)
    mean = sum(counts) / n
    return 0.0 if mean == 0 else math.sqrt(sum((c - mean) ** 2 for c in counts) / n) / mean


@pytest.mark.parametrize("seed", range(20))
def test_bin_cv_matches_the_bins(seed):
    rng = random.Random(seed)
    hist = IdleHistogram(0.5, 240)
    assert hist.bin_cv() == 0.0
    for _ in range(rng.randint(1, 600)):
        hist.observe(rng.choice([rng.expovariate(1.0), 1.2, 500.0, -1.0]))  # in range, one bin, out, clamped
        assert hist.bin_cv() == pytest.approx(_reference(hist.counts), rel=1e-9, abs=1e-12)
    assert sum(hist.counts) + hist.oob == hist.total
