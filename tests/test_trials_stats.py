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


def test_confidence_sequence_is_time_uniform() -> None:
    """P(the truth ever leaves the sequence, at any n) <= alpha: checked over whole paths."""
    rng = random.Random(3)
    reps, misses = 200, 0
    mean = (0.70 - 0.85 + 1) / 2
    for _ in range(reps):
        xs = [(float(rng.random() < 0.70) - float(rng.random() < 0.85) + 1) / 2 for _ in range(400)]
        if any(not (p.lo <= mean <= p.hi) for p in stats.eb_confidence_sequence(xs, alpha=0.05)):
            misses += 1
    assert misses / reps <= 0.08
    # and it is informative: it shrinks
    cs = stats.eb_confidence_sequence(xs)
    assert cs[-1].hi - cs[-1].lo < cs[20].hi - cs[20].lo < 1


def test_verdict_flips_when_the_margin_is_crossed() -> None:
    rng = random.Random(9)
    inc = [float(rng.random() < 0.85) for _ in range(1500)]
    cand = [float(rng.random() < 0.70) for _ in range(1500)]
    wide = stats.reference_verdict(inc, cand, margin=0.25)
    narrow = stats.reference_verdict(inc, cand, margin=0.05)
    assert wide.verdict == "non_inferior" and wide.decided_at is not None and wide.decided_at < 1500
    assert narrow.verdict == "inferior"
    assert narrow.lo <= -0.15 <= narrow.hi
    # a judge that rates the candidate a coin flip: non-inferior with a margin, inconclusive at 0 early on
    ties = [1.0 if rng.random() < 0.5 else 0.0 for _ in range(600)]
    assert stats.judge_verdict(ties, margin=0.15).verdict == "non_inferior"
    assert stats.judge_verdict(ties[:30], margin=0.0).verdict == "inconclusive"
    assert stats.judge_verdict([], margin=0.1).verdict == "no_data"


def test_bad_inputs_and_small_helpers() -> None:
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        stats.eb_confidence_sequence([0.5, 1.5])
    with pytest.raises(ValueError):
        stats.paired_difference([1.0], [1.0, 0.0])
    assert stats.cost_per_1k([None, None]) is None
    assert stats.cost_per_1k([0.001, None, 0.003]) == pytest.approx(2.0)
    p = stats.monthly_projection(2.0, 0.5, 1000, 86400)
    assert p["requests_per_month"] == pytest.approx(30000)
    assert p["savings_usd"] == pytest.approx(45.0) and p["savings_pct"] == pytest.approx(75.0)
    assert stats.monthly_projection(2.0, 0.5, 0, 0)["savings_usd"] is None
    lat = stats.latency_difference([10, 20, 30], [5, 10, 15])
    assert lat["p50_diff_ms"] == -10
    assert stats.outcome(0.75) == "win" and stats.outcome(0.5) == "tie" and stats.outcome(0.25) == "loss"
