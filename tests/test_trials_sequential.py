"""Sequential verdicts against synthetic data with a known truth: coverage under random, sorted,
drifting and adversarial orders; false acceptance under continuous peeking; power at stated effect
sizes; the fixed-horizon mode; the "more items needed" estimate. Small simulations (seconds);
bench/trials_power.py runs the large ones behind the numbers in docs/trials.md."""

from __future__ import annotations

import math
import random
from collections.abc import Callable

import pytest

from bench.trials_power import legacy_cs, paired_items
from kaiyuan.trials import sequential as sq
from kaiyuan.trials.dataset import Item, replay_order


def _draw(rng: random.Random, e: float) -> float:
    """One paired outcome x = (d + 1) / 2 in {0, 0.5, 1} with E[x] = e (d = candidate - incumbent)."""
    d = 2 * e - 1
    disagree = min(1.0, abs(d) + 0.2)  # the answers differ on 20% of items beyond what the mean needs
    win = (disagree + d) / 2
    u = rng.random()
    return 1.0 if u < win else 0.0 if u < disagree else 0.5


ORDERS: dict[str, Callable[[int], list[float]]] = {
    # per-item expected value of x, in the order the items arrive
    "random": lambda n: [0.45] * n,
    "sorted": lambda n: sorted(0.2 + 0.6 * (i % 8) / 7 for i in range(n)),  # subjects one after another
    "drifting": lambda n: [0.5 + 0.35 * math.sin(i / 40) for i in range(n)],  # hour-of-day, launches
    "adversarial": lambda n: [0.95 if (i // 60) % 2 == 0 else 0.05 for i in range(n)],  # long blocks, max swing
}


@pytest.mark.parametrize("order", list(ORDERS))
def test_the_sequence_covers_the_running_average_at_every_step(order: str) -> None:
    """P(the running average of the items' expected values ever leaves the interval) <= alpha."""
    rng = random.Random(hash(order) % 1000)
    n, reps, misses = 300, 70, 0
    truth = ORDERS[order](n)
    running = [sum(truth[: t + 1]) / (t + 1) for t in range(n)]
    for _ in range(reps):
        cs = sq.ConfidenceSequence(alpha=0.05)
        for t, e in enumerate(truth):
            cs.update(_draw(rng, e))
            if not cs.covers(running[t]):
                misses += 1
                break
    assert misses / reps <= 0.05 + 0.06, misses  # nominal <= 0.05; 0.11 is > 3 sd above it


def test_intervals_are_never_inverted_or_empty_even_against_an_adaptive_adversary() -> None:
    cs = sq.ConfidenceSequence(alpha=0.05)
    for _ in range(150):  # each value pushes against the current interval
        p = cs.point()
        cs.update(0.0 if p.n and p.mean > (p.lo + p.hi) / 2 else 1.0)
        q = cs.point()
        assert 0.0 <= q.lo <= q.mean <= q.hi <= 1.0 and q.lo < q.hi
        assert cs.covers(q.mean) and not cs.above(q.mean) and not cs.below(q.mean)
        assert cs.above(q.lo - 1e-9) == (q.lo > 1e-9) and cs.below(q.hi + 1e-9) == (q.hi < 1 - 1e-9)
    for const in (0.0, 0.5, 1.0):
        pts = sq.confidence_sequence([const] * 200)
        assert all(p.lo <= const <= p.hi and p.lo < p.hi for p in pts)
    # the method it replaced inverted when the mix changed (its running intersection assumes one mean)
    truth = [0.9] * 150 + [0.3] * 250
    rng = random.Random(4)
    xs = [_draw(rng, e) for e in truth]
    assert any(lo > hi for lo, hi in legacy_cs(xs))
    assert all(p.lo < p.hi for p in sq.confidence_sequence(xs))


def test_bad_values_are_refused() -> None:
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        sq.confidence_sequence([0.5, 1.5])
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        sq.confidence_sequence([math.nan])
    with pytest.raises(ValueError, match="alpha"):
        sq.ConfidenceSequence(alpha=0)
    with pytest.raises(ValueError, match="weights"):
        sq.ConfidenceSequence(weights=[1.0] * len(sq.GRID))
    with pytest.raises(ValueError):
        sq.reference_verdict([1.0], [1.0, 0.0], margin=0.1)
    assert sq.judge_verdict([], margin=0.1).verdict == "no_data"


def _peeking_accepts(xs: list[float], threshold: float) -> bool:
    cs = sq.ConfidenceSequence(alpha=0.05)
    for x in xs:
        cs.update(x)
        if cs.above(threshold):
            return True
    return False


def test_false_acceptance_under_continuous_peeking_stays_below_alpha() -> None:
    """A candidate exactly at the margin, looked at after every item, stopped at the first "non
    inferior": accepted in at most alpha of trials - in random order and under drift."""
    margin, n, reps = 0.10, 300, 100
    rng = random.Random(8)
    thr = (1 - margin) / 2
    stationary = sum(_peeking_accepts(paired_items(rng, n, -margin, 0.3), thr) for _ in range(reps))
    assert stationary / reps <= 0.05
    # drifting: worse first, then better, so the running average stays at or below the margin throughout
    truth = [thr - 0.1 if i < n // 2 else thr + 0.1 for i in range(n)]
    drifting = sum(_peeking_accepts([_draw(rng, e) for e in truth], thr) for _ in range(reps))
    assert drifting / reps <= 0.05


def test_power_at_stated_effect_sizes() -> None:
    margin = 0.10
    thr = (1 - margin) / 2
    # a candidate that answers exactly like the incumbent passes a 0.10 margin within 100 items
    same = sq.reference_verdict([1.0, 0.0] * 50, [1.0, 0.0] * 50, margin)
    assert same.verdict == "non_inferior" and same.decided_at is not None and same.decided_at <= 100
    assert all(lo <= thr for lo, _ in legacy_cs([0.5] * 100))  # the old sequence could not (floor ~14.8/n)
    # equal quality, answers differing on 30% of items: accepted by n=800 in most trials (bench: ~93%)
    rng = random.Random(12)
    wins = sum(_peeking_accepts(paired_items(rng, 800, 0.0, 0.3), thr) for _ in range(40))
    assert wins / 40 >= 0.8
    # the fixed-horizon mode at a planned 400: ~96% (a single look, so no peeking premium)
    fixed = [sq.reference_verdict([0.5] * 400, [2 * x - 0.5 for x in paired_items(rng, 400, 0.0, 0.3)], margin,
                                  planned_n=400) for _ in range(60)]
    assert sum(v.verdict == "non_inferior" for v in fixed) / 60 >= 0.85
    assert all(v.method == "fixed_horizon" and v.planned_n == 400 for v in fixed)


def test_fixed_horizon_waits_for_the_planned_size_and_covers() -> None:
    rng = random.Random(3)
    early = sq.reference_verdict([1.0] * 50, [1.0] * 50, 0.1, planned_n=200)
    assert early.verdict == "inconclusive" and early.items_needed == 150
    covered = 0
    for _ in range(200):
        xs = paired_items(rng, 200, -0.05, 0.4)
        p = sq.fixed_horizon_interval(xs)
        covered += p.lo <= (1 - 0.05) / 2 <= p.hi
    assert covered / 200 >= 0.9


def test_more_items_needed_is_a_fair_estimate() -> None:
    v = sq.non_inferiority([0.5] * 20, 0.45, margin=0.1)
    assert v.verdict == "inconclusive" and v.items_needed is not None
    decided = next(i for i in range(1, 10_000) if sq.non_inferiority([0.5] * i, 0.45, margin=0.1).verdict == "non_inferior")
    assert abs(20 + v.items_needed - decided) <= 0.25 * decided
    assert sq.non_inferiority([0.5] * 200, 0.45, margin=0.1).items_needed == 0
    assert sq.non_inferiority([0.0, 1.0] * 10, 0.5, margin=0.0).items_needed is None  # mean on the threshold


def _quiz(subjects: int = 8, per: int = 100) -> tuple[list[Item], dict[str, float]]:
    """An MMLU-like set in its natural order: the candidate matches the incumbent on the first half
    of the subjects and is 25 points worse on the rest (true difference -0.125)."""
    items, diff = [], {}
    for s in range(subjects):
        for k in range(per):
            iid = f"subject{s}-{k}"
            items.append(Item(iid, {"messages": [{"role": "user", "content": iid}]}, {}))
            diff[iid] = 0.0 if s < subjects // 2 else -0.25
    return items, diff


def test_sorted_offline_set_gives_no_false_non_inferior_once_shuffled() -> None:
    items, diff = _quiz()
    truth = sum(diff.values()) / len(diff)
    assert truth == pytest.approx(-0.125)
    thr = (1 - 0.10) / 2
    rng = random.Random(21)

    def accepted(order: list[Item]) -> bool:
        return _peeking_accepts([_draw(rng, (diff[it.id] + 1) / 2) for it in order], thr)

    natural = sum(accepted(items) for _ in range(20))
    shuffled = sum(accepted(replay_order(items, seed)) for seed in range(20))
    assert natural >= 10  # in natural order an early stop judges the easy subjects only
    assert shuffled <= 2  # in the seeded random order it is a false acceptance, <= alpha
    assert replay_order(items, 7) == replay_order(list(reversed(items)), 7)  # the seed alone fixes the order
    assert replay_order(items, 7) != replay_order(items, 8)
