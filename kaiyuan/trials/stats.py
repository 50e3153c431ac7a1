"""Trial statistics: pure functions, no I/O, standard library only.

- :func:`win_tie_loss` - rates with paired bootstrap percentile 95% intervals;
- :func:`eb_confidence_sequence` - an anytime-valid confidence sequence for the mean of values in
  [0, 1] (predictable plug-in empirical Bernstein, Waudby-Smith & Ramdas 2023, Thm. 2). It holds
  at every sample size simultaneously, so a trial may look after every result and stop early;
- :func:`non_inferiority` - the verdict "candidate is not worse than the incumbent by more than m";
- latency quantiles, cost per 1,000 requests and monthly projections.
"""

from __future__ import annotations

import math
import random
from collections import Counter
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any

WIN, TIE, LOSS = "win", "tie", "loss"


def outcome(score: float) -> str:
    """A candidate score in [0, 1] (1 = candidate better, 0.5 = tie) as win / tie / loss."""
    if score > 0.5:
        return WIN
    if score < 0.5:
        return LOSS
    return TIE


@dataclass(frozen=True)
class Rate:
    rate: float
    lo: float
    hi: float

    def as_dict(self) -> dict[str, float]:
        return asdict(self)


def _percentile(sorted_vals: Sequence[float], q: float) -> float:
    """Linear-interpolated quantile of already sorted values (q in [0, 1])."""
    if not sorted_vals:
        return math.nan
    pos = (len(sorted_vals) - 1) * q
    lo = math.floor(pos)
    hi = min(lo + 1, len(sorted_vals) - 1)
    return sorted_vals[lo] + (sorted_vals[hi] - sorted_vals[lo]) * (pos - lo)


def quantile(values: Sequence[float], q: float) -> float:
    return _percentile(sorted(values), q)


def paired_bootstrap(
    rows: Sequence[tuple[Any, ...]],
    statistics: dict[str, Any],
    *,
    level: float = 0.95,
    resamples: int = 1000,
    seed: int | None = 0,
) -> dict[str, Rate]:
    """Percentile bootstrap intervals for statistics of paired rows.

    Rows are resampled whole (pairs stay together). Identical rows are grouped first, so the cost
    is O(resamples x n) draws but the statistics run on category counts only.
    ``statistics`` maps a name to ``f(counts: dict[row, int], n) -> float``.
    """
    n = len(rows)
    if n == 0:
        return {k: Rate(math.nan, math.nan, math.nan) for k in statistics}
    rng = random.Random(seed)
    counts = Counter(rows)
    cats = list(counts)
    cum: list[int] = []
    total = 0
    for c in cats:
        total += counts[c]
        cum.append(total)
    point = {k: float(f(counts, n)) for k, f in statistics.items()}
    draws: dict[str, list[float]] = {k: [] for k in statistics}
    for _ in range(resamples):
        sample = Counter(rng.choices(cats, cum_weights=cum, k=n))
        for k, f in statistics.items():
            draws[k].append(float(f(sample, n)))
    a = (1 - level) / 2
    out = {}
    for k, vals in draws.items():
        vals.sort()
        out[k] = Rate(point[k], _percentile(vals, a), _percentile(vals, 1 - a))
    return out


def win_tie_loss(scores: Sequence[float], *, level: float = 0.95, resamples: int = 1000, seed: int | None = 0) -> dict[str, Rate]:
    """Win / tie / loss rates of the candidate, and its mean score, with bootstrap intervals."""
    rows = [(outcome(s), float(s)) for s in scores]

    def share(label: str) -> Any:
        return lambda c, n: sum(v for (o, _), v in c.items() if o == label) / n

    stats = {WIN: share(WIN), TIE: share(TIE), LOSS: share(LOSS),
             "mean_score": lambda c, n: sum(s * v for (_, s), v in c.items()) / n}
    return paired_bootstrap(rows, stats, level=level, resamples=resamples, seed=seed)


def paired_difference(
    incumbent: Sequence[float], candidate: Sequence[float], *, level: float = 0.95, resamples: int = 1000, seed: int | None = 0
) -> dict[str, Rate]:
    """Mean of each model's per-item score and of the paired difference (candidate - incumbent)."""
    if len(incumbent) != len(candidate):
        raise ValueError("paired scores must have the same length")
    rows = list(zip(incumbent, candidate, strict=True))
    stats = {
        "incumbent": lambda c, n: sum(a * v for (a, _), v in c.items()) / n,
        "candidate": lambda c, n: sum(b * v for (_, b), v in c.items()) / n,
        "difference": lambda c, n: sum((b - a) * v for (a, b), v in c.items()) / n,
    }
    return paired_bootstrap(rows, stats, level=level, resamples=resamples, seed=seed)


# -- anytime-valid confidence sequence --------------------------------------------------------------


@dataclass(frozen=True)
class CSPoint:
    n: int
    mean: float
    lo: float
    hi: float


def eb_confidence_sequence(xs: Sequence[float], *, alpha: float = 0.05, cap: float = 0.5) -> list[CSPoint]:
    """A two-sided (1 - alpha) confidence sequence for the mean of i.i.d. values in [0, 1].

    Predictable plug-in empirical-Bernstein CS (Waudby-Smith & Ramdas, "Estimating means of bounded
    random variables by betting", JRSS-B 2023, Theorem 2), with the running intersection taken so
    the interval never widens. P(the true mean leaves the interval at ANY n) <= alpha.
    """
    log_term = math.log(2 / alpha)
    out: list[CSPoint] = []
    sum_lam = sum_lam_x = sum_v_psi = 0.0
    mu_prev = 0.5  # mu_hat_{t-1}, regularised
    sigma2_prev = 0.25
    sum_x = 0.0
    sum_sq = 0.0
    lo_run, hi_run = 0.0, 1.0
    for t, x in enumerate(xs, start=1):
        if not 0.0 <= x <= 1.0:
            raise ValueError(f"confidence sequence values must lie in [0, 1], got {x}")
        lam = min(math.sqrt(2 * log_term / (sigma2_prev * t * math.log(1 + t))), cap)
        sum_lam += lam
        sum_lam_x += lam * x
        v = 4 * (x - mu_prev) ** 2
        psi = (-math.log(1 - lam) - lam) / 4
        sum_v_psi += v * psi
        centre = sum_lam_x / sum_lam
        width = (log_term + sum_v_psi) / sum_lam
        lo_run = max(lo_run, centre - width)
        hi_run = min(hi_run, centre + width)
        sum_x += x
        mu_prev = (0.5 + sum_x) / (t + 1)
        sum_sq += (x - mu_prev) ** 2
        sigma2_prev = (0.25 + sum_sq) / (t + 1)
        out.append(CSPoint(t, sum_x / t, max(lo_run, 0.0), min(hi_run, 1.0)))
    return out


@dataclass(frozen=True)
class Verdict:
    verdict: str  # "non_inferior" | "inferior" | "inconclusive" | "no_data"
    margin: float
    threshold: float  # on the [0, 1] scale of the confidence sequence
    n: int
    mean: float
    lo: float
    hi: float
    decided_at: int | None  # the first sample size at which the verdict was reached
    metric: str

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def non_inferiority(xs: Sequence[float], threshold: float, *, margin: float, alpha: float = 0.05, metric: str = "") -> Verdict:
    """Test "mean(xs) > threshold" with an anytime-valid confidence sequence.

    ``non_inferior`` when the whole sequence interval lies above ``threshold``, ``inferior`` when it
    lies below, else ``inconclusive``. Because the sequence is time-uniform, the first crossing is a
    valid stopping time: ``decided_at`` tells how many results were needed.
    """
    cs = eb_confidence_sequence(xs, alpha=alpha)
    if not cs:
        return Verdict("no_data", margin, threshold, 0, math.nan, math.nan, math.nan, None, metric)
    decided_at = None
    verdict = "inconclusive"
    for p in cs:
        if p.lo > threshold:
            verdict, decided_at = "non_inferior", p.n
            break
        if p.hi < threshold:
            verdict, decided_at = "inferior", p.n
            break
    last = cs[-1]
    return Verdict(verdict, margin, threshold, last.n, last.mean, last.lo, last.hi, decided_at, metric)


def judge_verdict(scores: Sequence[float], margin: float, alpha: float = 0.05) -> Verdict:
    """Pairwise judge scores (1 win, 0.5 tie, 0 loss): non-inferior when E[score] > 0.5 - margin."""
    return non_inferiority(scores, 0.5 - margin, margin=margin, alpha=alpha, metric="judge_score")


def reference_verdict(incumbent: Sequence[float], candidate: Sequence[float], margin: float, alpha: float = 0.05) -> Verdict:
    """Per-item reference scores in [0, 1]: non-inferior when E[candidate - incumbent] > -margin.

    The difference d in [-1, 1] is mapped to (d + 1) / 2 in [0, 1] for the sequence.
    """
    xs = [(b - a + 1) / 2 for a, b in zip(incumbent, candidate, strict=True)]
    v = non_inferiority(xs, (1 - margin) / 2, margin=margin, alpha=alpha, metric="reference_difference")
    return Verdict(v.verdict, margin, -margin, v.n, 2 * v.mean - 1, 2 * v.lo - 1, 2 * v.hi - 1, v.decided_at, v.metric)


# -- latency and cost ---------------------------------------------------------------------------


def latency_summary(ms: Sequence[float]) -> dict[str, float | int]:
    vals = sorted(m for m in ms if m is not None and not math.isnan(m))
    return {"n": len(vals), "p50": _percentile(vals, 0.5), "p95": _percentile(vals, 0.95),
            "mean": (sum(vals) / len(vals)) if vals else math.nan}


def latency_difference(incumbent_ms: Sequence[float], candidate_ms: Sequence[float]) -> dict[str, float]:
    a, b = latency_summary(incumbent_ms), latency_summary(candidate_ms)
    return {"p50_diff_ms": float(b["p50"]) - float(a["p50"]), "p95_diff_ms": float(b["p95"]) - float(a["p95"])}


def cost_per_1k(costs: Sequence[float | None]) -> float | None:
    """Mean cost per 1,000 requests; ``None`` when no request had a known price."""
    known = [c for c in costs if c is not None]
    if not known:
        return None
    return 1000 * sum(known) / len(known)


def monthly_projection(
    incumbent_per_1k: float | None, candidate_per_1k: float | None, requests: int, window_s: float
) -> dict[str, float | None]:
    """Project monthly cost (30 days) of each model at the observed request rate, and the savings."""
    if requests <= 0 or window_s <= 0:
        return {"requests_per_month": None, "incumbent_usd": None, "candidate_usd": None, "savings_usd": None, "savings_pct": None}
    per_month = requests / window_s * 30 * 86400
    inc = incumbent_per_1k * per_month / 1000 if incumbent_per_1k is not None else None
    cand = candidate_per_1k * per_month / 1000 if candidate_per_1k is not None else None
    savings = inc - cand if inc is not None and cand is not None else None
    pct = (savings / inc * 100) if savings is not None and inc else None
    return {"requests_per_month": per_month, "incumbent_usd": inc, "candidate_usd": cand, "savings_usd": savings, "savings_pct": pct}
