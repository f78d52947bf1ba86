"""The compile-time cost model's timings: more runs for a fast model, few for a slow one."""

from __future__ import annotations

from itertools import count

from veil.he import bounds


def _feeder(ms: float):
    calls = count(1)
    seen = []

    def once() -> float:
        seen.append(next(calls))
        return ms

    return once, seen


def test_fast_model_is_timed_until_the_budget_is_spent() -> None:
    once, seen = _feeder(10.0)
    assert bounds._median_ms(once, 5, 41) == 10.0
    # 600 ms budget at 10 ms a run: 60 runs wanted, capped at 41
    assert len(seen) == 41


def test_budget_stops_before_the_cap() -> None:
    once, seen = _feeder(100.0)
    bounds._median_ms(once, 3, 41)
    assert len(seen) == 6  # 6 x 100 ms spends the 600 ms budget


def test_slow_model_gets_only_the_minimum() -> None:
    once, seen = _feeder(2000.0)
    assert bounds._median_ms(once, 3, 9) == 2000.0
    assert len(seen) == 3


def test_median_ignores_one_spike() -> None:
    values = iter([1.0, 1.1, 50.0, 0.9, 1.0] + [1.0] * 100)
    assert bounds._median_ms(lambda: next(values), 5, 5) == 1.0
