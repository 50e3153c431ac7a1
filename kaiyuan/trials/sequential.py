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
sum_i mu_i = t mu_bar_t, so Ville's inequality on a uniform mixture over a grid of K bets gives, with
probability >= 1 - alpha/2 at every t at once,

    mu_bar_t >= max_k [ sum_i log(1 + lam_k (x_i - c_ik)) + lam_k sum_i c_ik - log(2K / alpha) ] / (lam_k t)

and the same on 1 - x gives the upper bound. Because log(1 + y) <= y, the lower bound is always
strictly below the running mean and the upper bound strictly above it: the interval is never
inverted or empty, and there is no running intersection (which is only valid for a constant mean).
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


def _grid() -> tuple[float, ...]:
    out, lam = [], GRID_LO
    while lam <= GRID_HI * 1.0001:
        out.append(lam)
        lam *= GRID_RATIO
    return tuple(out)


GRID = _grid()


@dataclass(frozen=True)
class CSPoint:
    n: int
    mean: float
    lo: float
    hi: float


class ConfidenceSequence:
    """Anytime-valid two-sided (1 - alpha) confidence sequence for the running average of the
    conditional means of values in [0, 1]. O(len(GRID)) per update, constant memory."""

    def __init__(self, alpha: float = 0.05, grid: Sequence[float] = GRID) -> None:
        if not 0 < alpha < 1:
            raise ValueError(f"alpha must lie in (0, 1), got {alpha}")
        self.alpha = alpha
        self.grid = tuple(grid)
        self.threshold = math.log(2 * len(self.grid) / alpha)
        self.n = 0
        self.total = 0.0
        self._lo = [0.0] * len(self.grid)  # per bet: sum log(1 + lam (x - c)) + lam sum c, on x
        self._hi = [0.0] * len(self.grid)  # the same on 1 - x

    def update(self, x: float) -> CSPoint:
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
        return self.point()

    def _bound(self, sums: list[float]) -> float:
        return max((s - self.threshold) / (lam * self.n) for s, lam in zip(sums, self.grid, strict=True))

    def point(self) -> CSPoint:
        if self.n == 0:
            return CSPoint(0, math.nan, 0.0, 1.0)
        mean = self.total / self.n
        lo = min(max(self._bound(self._lo), 0.0), mean)
        hi = max(min(1.0 - self._bound(self._hi), 1.0), mean)
        return CSPoint(self.n, mean, lo, hi)


def confidence_sequence(xs: Iterable[float], *, alpha: float = 0.05) -> list[CSPoint]:
    """The sequence's interval after each value of ``xs`` (in the order given)."""
    cs = ConfidenceSequence(alpha)
    return [cs.update(x) for x in xs]


# -- how many more items ------------------------------------------------------------------------


def items_needed(cs: ConfidenceSequence, var: float, target: float) -> int | None:
    """More items the sequence ``cs`` would probably need before its interval clears ``target``,
    if the running mean and the variance ``var`` stay as they are: each bet's log-wealth is carried
    forward at its expected growth per item, lam * mean - lam^2 * var / 2. 0 when it already has;
    None when the mean sits on the target (or it would take more than a billion items)."""
    p = cs.point()
    if cs.n == 0 or p.mean == target or math.isnan(p.mean):
        return None
    if p.lo > target or p.hi < target:
        return 0
    above = p.mean > target
    mean = p.mean if above else 1.0 - p.mean  # the upper bound on x is a lower bound on 1 - x
    goal = target if above else 1.0 - target
    sums = cs._lo if above else cs._hi
    var = max(var, 1e-6)
    growth = [lam * mean - lam * lam * var / 2 if lam * mean <= CLIP else -math.inf for lam in cs.grid]

    def clears(m: int) -> bool:
        n = cs.n + m
        return max((s + m * g - cs.threshold) / (lam * n) for s, g, lam in zip(sums, growth, cs.grid, strict=True)) > goal

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
        p = cs.update(x)
        now = "non_inferior" if p.lo > threshold else "inferior" if p.hi < threshold else "inconclusive"
        if now != verdict:
            verdict, decided_at = now, (p.n if now != "inconclusive" else None)
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
