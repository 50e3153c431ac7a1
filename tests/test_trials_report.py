"""The HTML report is self-contained and escapes everything it shows."""

from __future__ import annotations

from kaiyuan.trials.html import render_html
from kaiyuan.trials.report import render_text


def _rep() -> dict:  # type: ignore[type-arg]
    return {
        "trial": "t<1>", "mode": "offline", "incumbent": "a", "candidates": ["b"], "results": 3, "confidence": 0.95,
        "spend": {"total_usd": 0.01, "cap_usd": 1.0, "by_kind": {}}, "routing": [],
        "by_candidate": [{
            "candidate": "b", "pairs": 3, "failures": {"candidate": 1, "incumbent": 0, "candidate_errors": ["HTTP 500: <boom>"]},
            "judge": {"n": 2, "status_counts": {"ok": 2, "unparsable": 1}, "unparsable": 1,
                      "rates": {"win": {"rate": 0.5, "lo": 0.1, "hi": 0.9}, "tie": {"rate": 0.0, "lo": 0.0, "hi": 0.0},
                                "loss": {"rate": 0.5, "lo": 0.1, "hi": 0.9}},
                      "unparsable_examples": [{"item": "x", "judge_output": ["meh <script>alert(1)</script>"]}]},
            "scorers": {}, "verdict": {"verdict": "inconclusive", "metric": "judge_score", "margin": 0.05, "lo": 0.2, "hi": 0.8,
                                       "threshold": 0.45, "decided_at": None},
            "latency_ms": {"incumbent": {"p50": 10, "p95": 20}, "candidate": {"p50": 5, "p95": 9}, "p50_diff_ms": -5,
                           "p95_diff_ms": -11, "samples": {"incumbent": [10, 12, 20], "candidate": [5, 6, 9]}},
            "cost": {"incumbent_per_1k_usd": 2.0, "candidate_per_1k_usd": 0.2,
                     "projection": {"requests_per_month": 1000, "incumbent_usd": 2, "candidate_usd": 0.2, "savings_usd": 1.8, "savings_pct": 90}},
            "disagreements": [{"item": "i", "request": "<q>", "incumbent": "a", "candidate": "b", "judge_score": 0.0}],
        }],
    }


def test_html_report_is_offline_and_escaped() -> None:
    page = render_html(_rep())
    assert "<script" not in page and "&lt;script&gt;" in page and "&lt;boom&gt;" in page and "t&lt;1&gt;" in page
    assert page.count("<svg") == 3  # win/tie/loss, latency, cost
    assert "src=" not in page and "href=" not in page  # nothing fetched from anywhere
    assert "saving $1.80 (90.0%)" in page and "1 unparsable" in page


def test_text_report() -> None:
    text = render_text(_rep())
    assert "VERDICT (judge_score, margin 0.05): INCONCLUSIVE" in text
    assert "win   0.500  95% CI [0.100, 0.900]" in text
    assert "projected monthly: $2.00 -> $0.20 (saves $1.80, 90.0%)" in text
