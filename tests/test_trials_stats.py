"""Trial statistics against synthetic data with known truth (pure functions, many repetitions)."""

from __future__ import annotations

import random

import pytest

from kaiyuan.trials import stats


def test_bootstrap_intervals_cover_the_true_rates() -> None:
    rng = random.Random(11)
    truth = {"win": 0.45, "tie": 0.2, "loss": 0.35}
    reps, covered = 120, {k: 0 for k in truth}
    for r in range(reps):
        scores = [1.0 if u < 0.45 else 0.5 if u < 0.65 else 0.0 for u in (rng.random() for _ in range(200))]
        res = stats.win_tie_loss(scores, resamples=300, seed=r)
        for k, p in truth.items():
            covered[k] += res[k].lo <= p <= res[k].hi
    for k in truth:
        assert covered[k] / reps >= 0.88, (k, covered[k] / reps)  # nominal 0.95; 0.88 is > 3 sd below


def test_paired_difference_covers_85_vs_70() -> None:
    rng = random.Random(5)
    reps, covered = 120, 0
    for r in range(reps):
        inc = [float(rng.random() < 0.85) for _ in range(200)]
        cand = [float(rng.random() < 0.70) for _ in range(200)]
        d = stats.paired_difference(inc, cand, resamples=300, seed=r)["difference"]
        covered += d.lo <= -0.15 <= d.hi
    assert covered / reps >= 0.88


def test_bootstrap_is_the_same_whatever_the_row_order() -> None:
    """Reruns store rows in completion order: the intervals must not depend on it."""
    rng = random.Random(2)
    inc = [float(rng.random() < 0.8) for _ in range(150)]
    cand = [float(rng.random() < 0.7) for _ in range(150)]
    a = stats.paired_difference(inc, cand, resamples=200)
    perm = list(range(150))
    rng.shuffle(perm)
    b = stats.paired_difference([inc[i] for i in perm], [cand[i] for i in perm], resamples=200)
    assert a == b
    scores = [rng.choice([0.0, 0.5, 1.0, 0.75]) for _ in range(100)]
    assert stats.win_tie_loss(scores, resamples=200) == stats.win_tie_loss(sorted(scores), resamples=200)


def test_bad_inputs_and_small_helpers() -> None:
    with pytest.raises(ValueError):
        stats.paired_difference([1.0], [1.0, 0.0])
    assert stats.cost_per_1k([None, None]) is None
    assert stats.cost_per_1k([0.001, None, 0.003]) == pytest.approx(2.0)
    p = stats.monthly_projection(2.0, 0.5, stats.per_month(1000, 86400))
    assert p["requests_per_month"] == pytest.approx(30000)
    assert p["savings_usd"] == pytest.approx(45.0) and p["savings_pct"] == pytest.approx(75.0)
    assert stats.monthly_projection(2.0, 0.5, stats.per_month(0, 0))["savings_usd"] is None
    # --monthly-requests is used as given: 1000 stays 1000 (was rounded per day to 990), 12 still projects
    assert stats.monthly_projection(2.0, 0.5, 1000)["requests_per_month"] == 1000
    small = stats.monthly_projection(2.0, 0.5, 12)
    assert small["incumbent_usd"] == pytest.approx(0.024) and small["savings_usd"] == pytest.approx(0.018)
    assert stats.monthly_projection(2.0, 0.5, -5)["savings_usd"] is None
    lat = stats.latency_difference([10, 20, 30], [5, 10, 15])
    assert lat["p50_diff_ms"] == -10
    assert stats.outcome(0.75) == "win" and stats.outcome(0.5) == "tie" and stats.outcome(0.25) == "loss"
