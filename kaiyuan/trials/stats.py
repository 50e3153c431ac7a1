"""Trial statistics: pure functions, no I/O, standard library only.

- :func:`win_tie_loss` - rates with paired bootstrap percentile 95% intervals, the same on every
  rerun (rows are grouped and sorted before resampling, and the generator is seeded);
- latency quantiles, cost per 1,000 requests and monthly projections.

The anytime-valid verdicts live in :mod:`kaiyuan.trials.sequential`.
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

    Rows are resampled whole (pairs stay together). Identical rows are grouped and sorted first, so
    the result does not depend on the order rows were stored in, the cost is O(resamples x n)
    draws, and the statistics run on category counts only.
    ``statistics`` maps a name to ``f(counts: dict[row, int], n) -> float``.
    """
    n = len(rows)
    if n == 0:
        return {k: Rate(math.nan, math.nan, math.nan) for k in statistics}
    rng = random.Random(seed)
    counts = Counter(rows)
    cats = sorted(counts, key=repr)
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
    incumbent_per_1k: float | None, candidate_per_1k: float | None, requests_per_month: float | None
) -> dict[str, float | None]:
    """Monthly cost of each model at ``requests_per_month`` (any positive volume, not rounded), and
    the savings. All ``None`` without a volume."""
    if requests_per_month is None or requests_per_month <= 0 or math.isnan(requests_per_month):
        return {"requests_per_month": None, "incumbent_usd": None, "candidate_usd": None, "savings_usd": None, "savings_pct": None}
    per_month = float(requests_per_month)
    inc = incumbent_per_1k * per_month / 1000 if incumbent_per_1k is not None else None
    cand = candidate_per_1k * per_month / 1000 if candidate_per_1k is not None else None
    savings = inc - cand if inc is not None and cand is not None else None
    pct = (savings / inc * 100) if savings is not None and inc else None
    return {"requests_per_month": per_month, "incumbent_usd": inc, "candidate_usd": cand, "savings_usd": savings, "savings_pct": pct}


def per_month(requests: int, window_s: float) -> float | None:
    """A volume observed over ``window_s`` seconds, scaled to 30 days; None without one."""
    if requests <= 0 or window_s <= 0:
        return None
    return requests / window_s * 30 * 86400
