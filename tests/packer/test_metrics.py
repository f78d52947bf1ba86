import pytest

from veil.packer.metrics import InstanceSpan, RequestRecord, percentile, summarize, timeline


def test_percentile_is_nearest_rank():
    values = list(range(1, 101))
    assert percentile(values, 99) == 99
    assert percentile(values, 50) == 50
    assert percentile([5.0], 99) == 5.0


def test_summary_bills_lifetimes_and_counts_colds():
    spans = [InstanceSpan("a", "f", 1024, 0.0, 10.0), InstanceSpan("b", "f", 512, 5.0, None)]
    reqs = [
        RequestRecord(0.0, "A", 1.0, True, True),
        RequestRecord(12.0, "A", 0.01, False, True),
        RequestRecord(13.0, "B", 0.0, False, False, error="busy"),
    ]
    s = summarize(reqs, spans, end=20.0)
    assert s["gb_s"] == pytest.approx(10.0 + 0.5 * 15.0)
    assert s["cold_start_fraction"] == pytest.approx(1 / 3, abs=1e-3)
    assert s["failed"] == 1 and s["max_instances"] == 2
    assert s["p99_ms"] == 1000.0 and s["p99_after_warmup_ms"] == 10.0
    assert timeline(spans, 20.0) == [(0.0, 1), (5.0, 2), (10.0, 1), (20.0, 0)]
