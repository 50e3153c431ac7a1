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


def test_reports_show_order_items_needed_guard_actions_and_after_promotion() -> None:
    rep = _rep()
    rep["order"] = {"order": "shuffled", "seed": 7}
    rep["by_candidate"][0]["verdict"].update({"items_needed": 140, "method": "anytime", "n": 3})
    rep["after_promotion"] = {"results": 9, "error_rate": 0.5, "p95_ms": 12.0, "judged": 0, "loss_rate": None}
    rep["guard"] = {"max_error_rate": 0.2, "max_loss_rate": None, "max_p95_ms": None, "min_results": 5}
    rep["routing"] = [{"ts": 0.0, "action": "rollback", "candidate": "b<x>", "step_s": 0, "actor": "guard",
                       "note": "guard: error rate 0.500 <wholly> above", "steps": [0.0]}]
    text = render_text(rep)
    assert "replay order: seeded random, seed 7" in text
    assert "probably needs about 140 more results" in text
    assert "after promotion: 9 answers, error rate 0.500" in text and "guard: rolls back when max_error_rate > 0.2" in text
    assert "AUTOMATIC rollback of b<x> at 1970-01-01 00:00:00 UTC: guard: error rate 0.500" in text
    page = render_html(rep)
    assert "seeded random order (seed 7)" in page and "probably needs about 140 more results" in page
    assert "After promotion" in page and "by guard: guard: error rate 0.500 &lt;wholly&gt; above" in page
    rep["order"] = {"order": "dataset", "seed": None}
    rep["by_candidate"][0]["verdict"].update({"method": "fixed_horizon", "planned_n": 400, "items_needed": 397})
    text = render_text(rep)
    assert "the verdict covers the items replayed so far" in text
    assert "fixed-horizon CI (planned n=400)" in text and "read once the planned 400 results are in (397 to go)" in text


def test_progress_bar_goes_to_stderr_only_when_asked_or_on_a_terminal() -> None:
    import io

    from kaiyuan.trials.progress import Progress

    quiet = io.StringIO()
    p = Progress(2, "numeric", stream=quiet)  # a StringIO is not a terminal
    p.observe({"scores": '{"numeric": {"incumbent": 1.0, "candidate": 0.0}}'})
    p.item_done(0.5)
    p.close()
    assert quiet.getvalue() == ""
    loud = io.StringIO()
    p = Progress(2, "judge", stream=loud, enabled=True, every_s=0)
    p.observe({"judge_score": 0.75})
    p.item_done(0.0123)
    p.observe({"judge_score": None})  # not judged: not in the estimate
    p.item_done(0.02)
    p.close()
    out = loud.getvalue()
    assert "1/2 items" in out and "2/2 items" in out and "$0.0200" in out and "judge score 0.750 (n=1)" in out
    assert "items/s" in out and out.endswith("\n")
