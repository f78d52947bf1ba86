import numpy as np
import pytest
from tracegen import Trace, TraceConfig, cv_quantile, generate, observed_stats, sample_cvs


def test_cv_distribution_follows_azure():
    cvs = sample_cvs(4000, np.random.default_rng(0), stratified=False)
    assert np.mean(cvs <= 1) == pytest.approx(0.35, abs=0.03)
    assert np.mean(cvs <= 2) == pytest.approx(0.55, abs=0.03)
    assert np.mean(cvs <= 4) == pytest.approx(0.75, abs=0.03)
    small = sample_cvs(20, np.random.default_rng(1))
    assert sum(small <= 1) == 7 and sum(small <= 2) == 11 and sum(small <= 4) == 15
    assert cv_quantile(np.array([0.35]))[0] == pytest.approx(1.0)


def test_rates_and_cvs_match_what_was_asked():
    cfg = TraceConfig(n_models=4, duration_s=20000, total_rate=8.0, amplitude=0.0, seed=3, cvs=[0.5, 1.0, 1.5, 2.0])
    tr = generate(cfg)
    stats = observed_stats(tr)
    for name, s in stats.items():
        assert s["rate"] == pytest.approx(tr.rates[name], rel=0.1)
        assert s["cv"] == pytest.approx(tr.cvs[name], rel=0.15)
    total = sum(s["rate"] for s in stats.values())
    assert total == pytest.approx(8.0, rel=0.05)


def test_zipf_popularity_and_daily_cycle():
    cfg = TraceConfig(n_models=5, duration_s=4000, total_rate=10.0, amplitude=0.2, seed=4, cvs=[1.0] * 5)
    tr = generate(cfg)
    shares = [tr.rates[m] for m in sorted(tr.rates)]
    assert shares == sorted(shares, reverse=True)
    assert shares[0] / shares[1] == pytest.approx(2.0)
    # rate(t) = r (1 + 0.2 sin(2 pi t / P)): first half above average, second below
    first = np.sum(tr.times < 2000) / 2000
    second = np.sum(tr.times >= 2000) / 2000
    expected = (1 + 0.2 * 2 / np.pi) / (1 - 0.2 * 2 / np.pi)
    assert first / second == pytest.approx(expected, rel=0.08)


def test_seeded_and_csv_round_trip(tmp_path):
    a = generate(TraceConfig(duration_s=60, seed=7))
    b = generate(TraceConfig(duration_s=60, seed=7))
    assert np.array_equal(a.times, b.times) and a.models == b.models
    assert not np.array_equal(a.times, generate(TraceConfig(duration_s=60, seed=8)).times)
    assert np.all(np.diff(a.times) >= 0) and a.times[-1] < 60
    a.to_csv(tmp_path / "t.csv")
    c = Trace.from_csv(tmp_path / "t.csv", duration_s=60)
    assert np.allclose(c.times, a.times, atol=1e-6) and c.models == a.models
