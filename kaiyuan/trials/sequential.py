"""Sequential verdicts: an anytime-valid confidence sequence that stays right when traffic drifts,
a fixed-horizon alternative, and how many more items a verdict would probably need.

Why this shape. A trial looks at its results after every item and may stop as soon as the verdict
is clear, and live traffic changes its mix over time (by hour, tenant, feature launch; an offline
set replayed in its natural order comes subject by subject). A sequence that assumes one constant
mean, and intersects its intervals over time, is then wrong in two ways: it covers nothing in
particular and the running intersection can turn inverted and empty. This module targets what is
well defined under drift: the running average, over the items seen so far, of each item's expected
value, mu_bar_t = (1/t) sum_{i<=t} E[x_i | past].

The method (a betting / "hedged capital" sequence, Waudby-Smith & Ramdas, JRSS-B 2023, made
drift-robust with the predictable-centre supermartingale of Howard et al., Ann. Statist. 2021).
For x_i in [0, 1], a constant bet lam >= 0 and any predictable centre c_i (known before x_i) with
1 + lam (x_i - c_i) > 0,

    M_t(lam) = prod_i (1 + lam (x_i - c_i)) * exp(-lam sum_i (mu_i - c_i))

is a nonnegative supermartingale whatever the conditional means mu_i are: its factor has
conditional expectation (1 + y) e^(-y) <= 1 with y = lam (mu_i - c_i). Its exponent is linear in
sum_i mu_i = t mu_bar_t, so a mixture sum_k w_k M_t(lam_k) over a grid of bets is a supermartingale
too, and by Ville's inequality the set of m where that mixture (evaluated at mu_bar_t = m) stays
below 2 / alpha covers mu_bar_t at every t at once with probability >= 1 - alpha/2; the same on
1 - x gives the other side. Because log(1 + y) <= y, every bet's wealth at m = the running mean is
at most 1: the interval always contains the running mean, so it is never inverted or empty, and
there is no running intersection (which is only valid for a constant mean).
The centre c_ik is the running mean shrunk to 1/2, clipped so that 1 + lam_k (x - c) >= 1 - CLIP.
Bets up to 20 (not 1) make the sequence tight when outcomes barely vary (identical answers).
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass
from statistics import NormalDist
from typing import Any

GRID_LO, GRID_HI, GRID_RATIO = 0.01, 20.0, 1.6
CLIP = 0.9  # 1 + lam (x - c) >= 1 - CLIP: keeps every factor positive and its log finite
CORE = (0.25, 3.0)  # bets that suit 50 to 5,000 items; they get CORE_WEIGHT of the mixture
CORE_WEIGHT = 0.8


def _grid() -> tuple[float, ...]:
    out, lam = [], GRID_LO
    while lam <= GRID_HI * 1.0001:
        out.append(lam)
        lam *= GRID_RATIO
    return tuple(out)


def _weights(grid: Sequence[float]) -> tuple[float, ...]:
    """Prior weights of the bets (summing to 1): most on the bets typical trial sizes need, the
    rest spread evenly, so very small and very large trials still work, a little less tightly."""
    core = [CORE[0] <= lam <= CORE[1] for lam in grid]
    k_core = sum(core)
    if k_core in (0, len(grid)):
        return tuple(1 / len(grid) for _ in grid)
    return tuple(CORE_WEIGHT / k_core if c else (1 - CORE_WEIGHT) / (len(grid) - k_core) for c in core)


GRID = _grid()
WEIGHTS = _weights(GRID)


@dataclass(frozen=True)
class CSPoint:
    n: int
    mean: float
    lo: float
    hi: float


def _log_mixture(sums: Sequence[float], log_w: Sequence[float], grid: Sequence[float], n: int, m: float) -> float:
    """log sum_k w_k M_n(lam_k) at the running average m (log-sum-exp, no overflow)."""
    terms = [lw + s - lam * n * m for s, lw, lam in zip(sums, log_w, grid, strict=True)]
    top = max(terms)
    return top + math.log(math.fsum(math.exp(t - top) for t in terms))


class ConfidenceSequence:
    """Anytime-valid two-sided (1 - alpha) confidence sequence for the running average of the
    conditional means of values in [0, 1]. O(len(GRID)) per update and per test of a value,
    constant memory; :meth:`point` finds the interval's ends by bisection."""

    def __init__(self, alpha: float = 0.05, grid: Sequence[float] = GRID, weights: Sequence[float] | None = None) -> None:
        if not 0 < alpha < 1:
            raise ValueError(f"alpha must lie in (0, 1), got {alpha}")
        w = tuple(weights) if weights is not None else (WEIGHTS if tuple(grid) == GRID else _weights(grid))
        if len(w) != len(grid) or any(x <= 0 for x in w) or math.fsum(w) > 1 + 1e-9:
            raise ValueError("weights: one positive weight per bet, summing to at most 1")
        self.alpha = alpha
        self.grid = tuple(grid)
        self.log_w = tuple(math.log(x) for x in w)
        self.log_level = math.log(2 / alpha)  # each side spends alpha / 2
        self.n = 0
        self.total = 0.0
        self._lo = [0.0] * len(self.grid)  # per bet: sum log(1 + lam (x - c)) + lam sum c, on x
        self._hi = [0.0] * len(self.grid)  # the same on 1 - x

    def update(self, x: float) -> None:
        if not 0.0 <= x <= 1.0 or math.isnan(x):
            raise ValueError(f"confidence sequence values must lie in [0, 1], got {x}")
        centre = (0.5 + self.total) / (self.n + 1)  # predictable: uses only earlier values
        for k, lam in enumerate(self.grid):
            c = min(centre, CLIP / lam)
            self._lo[k] += math.log1p(lam * (x - c)) + lam * c
            c = min(1.0 - centre, CLIP / lam)
            self._hi[k] += math.log1p(lam * ((1.0 - x) - c)) + lam * c
        self.n += 1
        self.total += x

    def above(self, m: float) -> bool:
        """Whether the whole interval lies above ``m`` (lower bound > m)."""
        return self.n > 0 and _log_mixture(self._lo, self.log_w, self.grid, self.n, m) > self.log_level

    def below(self, m: float) -> bool:
        """Whether the whole interval lies below ``m`` (upper bound < m)."""
        return self.n > 0 and _log_mixture(self._hi, self.log_w, self.grid, self.n, 1.0 - m) > self.log_level

    def covers(self, m: float) -> bool:
        return not self.above(m) and not self.below(m)

    def _end(self, sums: list[float], mean: float) -> float:
        """The lower end on the scale of ``sums``: the largest m <= mean that the mixture rejects
        (it rejects every smaller m: the mixture decreases in m). 0 when it rejects none."""
        def rejects(m: float) -> bool:
            return _log_mixture(sums, self.log_w, self.grid, self.n, m) > self.log_level

        if not rejects(0.0):
            return 0.0
        lo, hi = 0.0, mean  # rejects(lo), and never rejects the running mean (log(1 + y) <= y)
        for _ in range(50):
            mid = (lo + hi) / 2
            if rejects(mid):
                lo = mid
            else:
                hi = mid
        return lo

    def point(self) -> CSPoint:
        if self.n == 0:
            return CSPoint(0, math.nan, 0.0, 1.0)
        mean = self.total / self.n
        return CSPoint(self.n, mean, self._end(self._lo, mean), 1.0 - self._end(self._hi, 1.0 - mean))


def confidence_sequence(xs: Iterable[float], *, alpha: float = 0.05) -> list[CSPoint]:
    """The sequence's interval after each value of ``xs`` (in the order given)."""
    cs = ConfidenceSequence(alpha)
    out = []
    for x in xs:
        cs.update(x)
        out.append(cs.point())
    return out


# -- how many more items ------------------------------------------------------------------------


def items_needed(cs: ConfidenceSequence, var: float, target: float) -> int | None:
    """More items the sequence ``cs`` would probably need before its interval clears ``target``,
    if the running mean and the variance ``var`` stay as they are: each bet's log-wealth is carried
    forward at its expected growth per item, lam * mean - lam^2 * var / 2. 0 when it already has;
    None when the mean sits on the target (or it would take more than a billion items)."""
    if cs.n == 0:
        return None
    mean_x = cs.total / cs.n
    if mean_x == target or math.isnan(mean_x):
        return None
    if cs.above(target) or cs.below(target):
        return 0
    above = mean_x > target
    mean = mean_x if above else 1.0 - mean_x  # the upper bound on x is a lower bound on 1 - x
    goal = target if above else 1.0 - target
    sums = cs._lo if above else cs._hi
    var = max(var, 1e-6)
    growth = [lam * mean - lam * lam * var / 2 if lam * mean <= CLIP else -1e9 for lam in cs.grid]

    def clears(m: int) -> bool:
        projected = [s + m * g for s, g in zip(sums, growth, strict=True)]
        return _log_mixture(projected, cs.log_w, cs.grid, cs.n + m, goal) > cs.log_level

    hi = 1
    while not clears(hi):
        hi *= 2
        if hi > 10**9:
            return None
    lo = hi // 2
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if clears(mid):
            hi = mid
        else:
            lo = mid
    return hi


# -- fixed horizon --------------------------------------------------------------------------------


def fixed_horizon_interval(xs: Sequence[float], alpha: float = 0.05) -> CSPoint:
    """The (1 - alpha) normal-approximation interval for the mean of ``xs``, read ONCE at a sample
    size fixed in advance. Not valid if looked at repeatedly (use the confidence sequence then)."""
    n = len(xs)
    if n < 2:
        return CSPoint(n, xs[0] if xs else math.nan, 0.0, 1.0)
    mean = sum(xs) / n
    var = sum((x - mean) ** 2 for x in xs) / (n - 1)
    half = NormalDist().inv_cdf(1 - alpha / 2) * math.sqrt(var / n)
    return CSPoint(n, mean, max(0.0, mean - half), min(1.0, mean + half))


def _variance(xs: Sequence[float]) -> float:
    if len(xs) < 2:
        return 0.25
    m = sum(xs) / len(xs)
    return sum((x - m) ** 2 for x in xs) / (len(xs) - 1)


# -- verdicts -------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Verdict:
    verdict: str  # "non_inferior" | "inferior" | "inconclusive" | "no_data"
    margin: float
    threshold: float  # on the metric's own scale
    n: int
    mean: float
    lo: float
    hi: float
    decided_at: int | None  # the first sample size at which the verdict was reached
    metric: str
    method: str = "anytime"  # "anytime" | "fixed_horizon"
    planned_n: int | None = None  # fixed horizon: the sample size planned in advance
    items_needed: int | None = None  # more items the verdict would probably need (None: no estimate)

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def non_inferiority(xs: Sequence[float], threshold: float, *, margin: float, alpha: float = 0.05, metric: str = "",
                    planned_n: int | None = None) -> Verdict:
    """Test "mean(xs) > threshold" for values in [0, 1], in the order given.

    Anytime (``planned_n`` None): the verdict of the latest interval - ``non_inferior`` when its
    lower bound clears the threshold, ``inferior`` when its upper bound is below it - and
    ``decided_at``, the n since which that verdict has held. The sequence holds at every n at once,
    so reading it after every item, and stopping at the first verdict, stays valid. Fixed horizon: one normal interval on the first
    ``planned_n`` values, and no verdict before there are that many.
    """
    if not xs:
        return Verdict("no_data", margin, threshold, 0, math.nan, math.nan, math.nan, None, metric,
                       "fixed_horizon" if planned_n else "anytime", planned_n, None)
    if planned_n:
        return _fixed(xs, threshold, margin, alpha, metric, planned_n)
    cs = ConfidenceSequence(alpha)
    verdict, decided_at = "inconclusive", None
    for x in xs:
        cs.update(x)
        now = "non_inferior" if cs.above(threshold) else "inferior" if cs.below(threshold) else "inconclusive"
        if now != verdict:
            verdict, decided_at = now, (cs.n if now != "inconclusive" else None)
    last = cs.point()
    needed = 0 if decided_at else items_needed(cs, _variance(xs), threshold)
    return Verdict(verdict, margin, threshold, last.n, last.mean, last.lo, last.hi, decided_at, metric, "anytime", None, needed)


def _fixed(xs: Sequence[float], threshold: float, margin: float, alpha: float, metric: str, planned_n: int) -> Verdict:
    p = fixed_horizon_interval(xs[:planned_n], alpha)
    if len(xs) < planned_n:
        return Verdict("inconclusive", margin, threshold, p.n, p.mean, p.lo, p.hi, None, metric, "fixed_horizon",
                       planned_n, planned_n - len(xs))
    verdict = "non_inferior" if p.lo > threshold else "inferior" if p.hi < threshold else "inconclusive"
    needed = None
    if verdict == "inconclusive" and p.mean != threshold:
        z = NormalDist().inv_cdf(1 - alpha / 2)
        needed = max(1, math.ceil(z * z * _variance(xs[:planned_n]) / (p.mean - threshold) ** 2) - planned_n)
    return Verdict(verdict, margin, threshold, p.n, p.mean, p.lo, p.hi, planned_n if verdict != "inconclusive" else None,
                   metric, "fixed_horizon", planned_n, 0 if verdict != "inconclusive" else needed)


def judge_verdict(scores: Sequence[float], margin: float, alpha: float = 0.05, planned_n: int | None = None) -> Verdict:
    """Pairwise judge scores (1 win, 0.5 tie, 0 loss): non-inferior when E[score] > 0.5 - margin."""
    return non_inferiority(scores, 0.5 - margin, margin=margin, alpha=alpha, metric="judge_score", planned_n=planned_n)


def reference_verdict(incumbent: Sequence[float], candidate: Sequence[float], margin: float, alpha: float = 0.05,
                      planned_n: int | None = None) -> Verdict:
    """Per-item paired scores in [0, 1]: non-inferior when the average of E[candidate - incumbent]
    over the items is above -margin. The difference d in [-1, 1] runs as (d + 1) / 2 in [0, 1]."""
    xs = [(b - a + 1) / 2 for a, b in zip(incumbent, candidate, strict=True)]
    v = non_inferiority(xs, (1 - margin) / 2, margin=margin, alpha=alpha, metric="reference_difference", planned_n=planned_n)
    return Verdict(v.verdict, margin, -margin, v.n, 2 * v.mean - 1, 2 * v.lo - 1, 2 * v.hi - 1, v.decided_at, v.metric,
                   v.method, v.planned_n, v.items_needed)
