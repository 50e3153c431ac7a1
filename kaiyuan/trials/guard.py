"""The canary guard: watches the candidate's live answers - during a canary and after a promotion -
and asks for an automatic rollback when the judged loss rate, the error rate or the p95 latency is
over its configured line, by the same anytime-valid confidence sequence the verdicts use.

A line is crossed when the whole interval lies above it, so with results read continuously a
false rollback on one metric happens with probability at most alpha/2 per watch window (a window
starts at each promotion, or at the start of a canary). The p95 test is the share of answers
slower than ``max_p95_ms``: p95 is above the line exactly when more than 5% of answers are.
Pure logic: the runtime feeds rows and records the rollback.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from kaiyuan.trials.models import GuardSettings
from kaiyuan.trials.sequential import ConfidenceSequence

P95_SHARE = 0.05  # p95 > line  <=>  more than 5% of answers are slower than the line


@dataclass(frozen=True)
class Breach:
    metric: str  # "loss_rate" | "error_rate" | "p95_latency"
    n: int
    estimate: float
    lo: float
    hi: float
    line: float

    def note(self) -> str:
        what = {"loss_rate": "judged loss rate", "error_rate": "error rate",
                "p95_latency": "share of answers slower than the p95 line"}[self.metric]
        return (f"guard: {what} {self.estimate:.3f}, anytime-valid interval [{self.lo:.3f}, {self.hi:.3f}] "
                f"wholly above {self.line:g} after {self.n} results")


@dataclass
class Watch:
    """One watch window of one trial: a sequence per metric, fed in arrival order."""

    settings: GuardSettings
    alpha: float
    since: float
    seqs: dict[str, ConfidenceSequence] = field(default_factory=dict)
    tripped: Breach | None = None

    def _feed(self, metric: str, x: float, line: float) -> Breach | None:
        cs = self.seqs.setdefault(metric, ConfidenceSequence(self.alpha))
        cs.update(x)
        if cs.n >= self.settings.min_results and cs.above(line):
            p = cs.point()
            return Breach(metric, p.n, p.mean, p.lo, p.hi, line)
        return None

    def observe(self, row: dict[str, Any]) -> Breach | None:
        """Add one candidate-side result; the first breach of the window, else None."""
        if self.tripped is not None or row.get("ts", 0.0) < self.since or row.get("candidate_ms") is None:
            return None
        g = self.settings
        failed = bool(row.get("candidate_error"))
        found: list[Breach | None] = []
        if g.max_error_rate is not None:
            found.append(self._feed("error_rate", float(failed), g.max_error_rate))
        if g.max_p95_ms is not None and not failed:
            found.append(self._feed("p95_latency", float(row["candidate_ms"] > g.max_p95_ms), P95_SHARE))
        if g.max_loss_rate is not None and row.get("judge_score") is not None:
            found.append(self._feed("loss_rate", float(row["judge_score"] < 0.5), g.max_loss_rate))
        self.tripped = next((b for b in found if b is not None), None)
        return self.tripped

    def status(self) -> dict[str, Any]:
        out: dict[str, Any] = {"since": self.since, "tripped": self.tripped.note() if self.tripped else None}
        for metric, cs in self.seqs.items():
            p = cs.point()
            out[metric] = {"n": p.n, "estimate": p.mean, "lo": p.lo, "hi": p.hi}
        return out
