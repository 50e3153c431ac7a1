"""The trial report: one JSON-able dict built from stored results (and its terminal rendering)."""

from __future__ import annotations

import math
import time
from typing import Any

import orjson
from sqlalchemy import func, or_, select

from kaiyuan.store.schema import request_log
from kaiyuan.trials import sequential, stats
from kaiyuan.trials.dataset import replay_key
from kaiyuan.trials.models import REPLAY_PREFIX, TrialConfig
from kaiyuan.trials.store import TrialStore


def _clean(v: Any) -> Any:
    if isinstance(v, float) and (math.isnan(v) or math.isinf(v)):
        return None
    if isinstance(v, dict):
        return {k: _clean(x) for k, x in v.items()}
    if isinstance(v, list):
        return [_clean(x) for x in v]
    return v


def observed_volume(store: TrialStore, models: list[str], since: float, until: float) -> int:
    """Real requests to ``models`` in the request log between two times (0 when the log is off).
    Offline replays are not traffic: they are logged with trial ``replay:NAME`` and left out."""
    t = request_log
    q = (select(func.count()).select_from(t)
         .where(t.c.model.in_(models), t.c.ts >= since, t.c.ts <= until,
                or_(t.c.trial.is_(None), t.c.trial.not_like(REPLAY_PREFIX + "%"))))
    with store.engine.connect() as conn:
        return int(conn.execute(q).scalar() or 0)


def _volume(trial: TrialConfig, store: TrialStore, rows: list[dict[str, Any]]) -> tuple[float | None, str]:
    """(requests per month, where the number comes from) for the projection."""
    models = [trial.incumbent, *trial.candidates]
    if trial.mode == "offline" or len(rows) < 2:
        now = time.time()
        n = observed_volume(store, [trial.incumbent], now - 7 * 86400, now)
        if not n:
            return None, "no traffic to the incumbent in the request log in the last 7 days: pass --monthly-requests"
        return stats.per_month(n, 7 * 86400.0), "request log, last 7 days (replays excluded)"
    since, until = min(r["ts"] for r in rows), max(r["ts"] for r in rows)
    n = observed_volume(store, models, since, until)
    if n:
        return stats.per_month(n, until - since), "request log, trial window"
    n = round(len(rows) / trial.sample_rate) if trial.mode == "shadow" and trial.sample_rate else len(rows)
    return stats.per_month(n, until - since), "trial results"


def ordered(trial: TrialConfig, rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Results in the order the confidence sequence reads them: an offline trial's seeded random
    replay order (so reruns read the same sequence), else arrival order."""
    if trial.mode == "offline" and trial.order == "shuffled":
        return sorted(rows, key=lambda r: (replay_key(trial.seed, r["item"] or ""), r["ts"], r["id"]))
    return sorted(rows, key=lambda r: (r["ts"], r["id"]))


def candidate_report(trial: TrialConfig, rows: list[dict[str, Any]], candidate: str, resamples: int = 1000,
                     volume: tuple[float | None, str] = (None, "")) -> dict[str, Any]:
    rows = ordered(trial, [r for r in rows if r["candidate"] == candidate and r["source"] != "promoted"])
    out: dict[str, Any] = {"candidate": candidate, "pairs": len(rows)}
    out["failures"] = {
        "candidate": sum(1 for r in rows if r["candidate_error"]),
        "incumbent": sum(1 for r in rows if r["incumbent_error"]),
        "candidate_errors": sorted({(r["candidate_error"] or "")[:200] for r in rows if r["candidate_error"]})[:10],
    }
    # judge
    if trial.judge is not None:
        statuses: dict[str, int] = {}
        for r in rows:
            statuses[r["judge_status"] or "none"] = statuses.get(r["judge_status"] or "none", 0) + 1
        judged = [r["judge_score"] for r in rows if r["judge_score"] is not None]
        j: dict[str, Any] = {"n": len(judged), "status_counts": statuses, "unparsable": statuses.get("unparsable", 0)}
        if judged:
            j["rates"] = {k: v.as_dict() for k, v in stats.win_tie_loss(judged, resamples=resamples).items()}
        j["verdict"] = sequential.judge_verdict(judged, trial.margin, trial.alpha, trial.planned_n).as_dict()
        j["unparsable_examples"] = [
            {"item": r["item"], "judge_output": orjson.loads(r["judge_detail"])["raw"] if r["judge_detail"] else None}
            for r in rows if r["judge_status"] == "unparsable"][:5]
        out["judge"] = j
    # reference scorers
    ref: dict[str, Any] = {}
    for s in trial.scorers:
        pairs = []
        for r in rows:
            sc = orjson.loads(r["scores"]) if r["scores"] else {}
            e = sc.get(s.label) or {}
            if e.get("incumbent") is not None and e.get("candidate") is not None:
                pairs.append((float(e["incumbent"]), float(e["candidate"])))
        entry: dict[str, Any] = {"n": len(pairs)}
        if pairs:
            inc, cand = [p[0] for p in pairs], [p[1] for p in pairs]
            entry["means"] = {k: v.as_dict() for k, v in stats.paired_difference(inc, cand, resamples=resamples).items()}
            entry["verdict"] = sequential.reference_verdict(inc, cand, trial.margin, trial.alpha, trial.planned_n).as_dict()
        ref[s.label] = entry
    out["scorers"] = ref
    primary = trial.primary_metric
    if primary == "judge" and "judge" in out:
        out["verdict"] = out["judge"]["verdict"]
    elif primary in ref and "verdict" in ref[primary]:
        out["verdict"] = ref[primary]["verdict"]
    else:
        out["verdict"] = {"verdict": "no_data", "metric": primary}
    # latency and cost
    inc_ms = [r["incumbent_ms"] for r in rows if r["incumbent_ms"] is not None and not r["incumbent_error"]]
    cand_ms = [r["candidate_ms"] for r in rows if r["candidate_ms"] is not None and not r["candidate_error"]]
    out["latency_ms"] = {"incumbent": stats.latency_summary(inc_ms), "candidate": stats.latency_summary(cand_ms),
                         **stats.latency_difference(inc_ms, cand_ms), "samples": {"incumbent": inc_ms[:2000], "candidate": cand_ms[:2000]}}
    inc_1k = stats.cost_per_1k([r["incumbent_cost"] for r in rows])
    cand_1k = stats.cost_per_1k([r["candidate_cost"] for r in rows])
    out["cost"] = {"incumbent_per_1k_usd": inc_1k, "candidate_per_1k_usd": cand_1k,
                   "projection": {**stats.monthly_projection(inc_1k, cand_1k, volume[0]), "volume_source": volume[1]}}
    # largest disagreements
    def gap(r: dict[str, Any]) -> float:
        if r["judge_score"] is not None:
            return abs(r["judge_score"] - 0.5) * 2
        sc = orjson.loads(r["scores"]) if r["scores"] else {}
        return max((abs((e.get("candidate") or 0) - (e.get("incumbent") or 0)) for e in sc.values()), default=0.0)

    worst = sorted((r for r in rows if r["candidate_error"] is None), key=lambda r: (-gap(r), r["judge_score"] or 0))
    out["disagreements"] = [
        {"item": r["item"], "request": (r["request"] or "")[:600], "incumbent": (r["incumbent_answer"] or "")[:600],
         "candidate": (r["candidate_answer"] or "")[:600], "judge_score": r["judge_score"], "scores": orjson.loads(r["scores"]) if r["scores"] else None}
        for r in worst if gap(r) > 0][:5]
    return out


def build_report(trial: TrialConfig, store: TrialStore, *, monthly_requests: float | None = None, resamples: int = 1000) -> dict[str, Any]:
    rows = store.results(trial.name)
    volume = (monthly_requests, "--monthly-requests") if monthly_requests else _volume(trial, store, rows)
    rep: dict[str, Any] = {
        "trial": trial.name, "mode": trial.mode, "incumbent": trial.incumbent, "candidates": trial.candidates,
        "margin": trial.margin, "confidence": 1 - trial.alpha, "primary_metric": trial.primary_metric,
        "results": len(rows),
        "order": {"order": trial.order, "seed": trial.seed} if trial.mode == "offline" else {"order": "arrival", "seed": None},
        "spend": {"total_usd": store.spent(trial.name), "by_kind": store.spend_by_kind(trial.name), "cap_usd": trial.budget_usd},
        "routing": [{**{k: r[k] for k in ("ts", "action", "candidate", "step_s", "actor", "note")}, "steps": orjson.loads(r["steps"])}
                    for r in store.routing_history(trial.name)],
        "by_candidate": [candidate_report(trial, rows, c, resamples, volume) for c in trial.candidates],
        "after_promotion": _promoted_summary([r for r in rows if r["source"] == "promoted"]),
        "guard": trial.guard.model_dump() if trial.guard is not None else None,
    }
    return _clean(rep)


def _promoted_summary(rows: list[dict[str, Any]]) -> dict[str, Any] | None:
    """What the guard watches after a promotion: the candidate's live answers to promoted traffic."""
    if not rows:
        return None
    ok_ms = [r["candidate_ms"] for r in rows if r["candidate_ms"] is not None and not r["candidate_error"]]
    judged = [r["judge_score"] for r in rows if r["judge_score"] is not None]
    return {"results": len(rows), "error_rate": sum(1 for r in rows if r["candidate_error"]) / len(rows),
            "p95_ms": stats.quantile(ok_ms, 0.95) if ok_ms else None, "judged": len(judged),
            "loss_rate": sum(1 for x in judged if x < 0.5) / len(judged) if judged else None}


def _f(v: Any, fmt: str = ".3f") -> str:
    return "-" if v is None else format(v, fmt)


def _interval_name(v: dict[str, Any]) -> str:
    if v.get("method") == "fixed_horizon":
        return f"fixed-horizon CI (planned n={v.get('planned_n')})"
    return "anytime-valid CS"


def _needed(v: dict[str, Any]) -> str:
    k = v.get("items_needed")
    if v.get("verdict") != "inconclusive":
        return ""
    if k is None:
        return "; the estimate sits on the threshold: more items may not settle it"
    if v.get("method") == "fixed_horizon" and v.get("n", 0) < (v.get("planned_n") or 0):
        return f"; read once the planned {v.get('planned_n')} results are in ({k} to go)"
    return f"; probably needs about {k} more results if the current mean and spread hold"


def _order_line(rep: dict[str, Any]) -> str:
    o = rep.get("order") or {}
    if o.get("order") == "shuffled":
        return f"replay order: seeded random, seed {o.get('seed')}"
    if o.get("order") == "dataset":
        return "replay order: the dataset's own order - the verdict covers the items replayed so far, not the whole set"
    return "order: arrival; under drift the verdict covers the traffic seen so far"


def render_text(rep: dict[str, Any]) -> str:
    lines = [f"trial {rep['trial']}  mode={rep['mode']}  incumbent={rep['incumbent']}  results={rep['results']}",
             _order_line(rep),
             f"spend: ${rep['spend']['total_usd']:.4f}" + (f" of cap ${rep['spend']['cap_usd']:.4f}" if rep['spend']['cap_usd'] is not None else "")]
    for c in rep["by_candidate"]:
        lines.append("")
        lines.append(f"candidate {c['candidate']}: {c['pairs']} pairs, {c['failures']['candidate']} candidate failures, "
                     f"{c['failures']['incumbent']} incumbent failures")
        j = c.get("judge")
        if j:
            lines.append(f"  judge: {j['n']} judged, {j['unparsable']} unparsable (excluded), statuses {j['status_counts']}")
            for k in ("win", "tie", "loss"):
                r = (j.get("rates") or {}).get(k)
                if r:
                    lines.append(f"    {k:5} {r['rate']:.3f}  95% CI [{_f(r['lo'])}, {_f(r['hi'])}]")
        for label, s in c["scorers"].items():
            m = s.get("means")
            if m:
                lines.append(f"  {label}: incumbent {m['incumbent']['rate']:.3f} [{_f(m['incumbent']['lo'])}, {_f(m['incumbent']['hi'])}]"
                             f"  candidate {m['candidate']['rate']:.3f} [{_f(m['candidate']['lo'])}, {_f(m['candidate']['hi'])}]"
                             f"  diff {m['difference']['rate']:+.3f} [{_f(m['difference']['lo'])}, {_f(m['difference']['hi'])}]  (n={s['n']})")
        v = c["verdict"]
        if v.get("verdict") != "no_data":
            lines.append(f"  VERDICT ({v['metric']}, margin {v['margin']}): {v['verdict'].upper()}  {_interval_name(v)} "
                         f"[{_f(v['lo'])}, {_f(v['hi'])}] vs threshold {_f(v['threshold'])}"
                         + (f", decided after {v['decided_at']} results" if v.get("decided_at") else "")
                         + _needed(v))
        else:
            lines.append("  VERDICT: no data yet")
        lat = c["latency_ms"]
        lines.append(f"  latency ms p50 {_f(lat['incumbent']['p50'], '.1f')} -> {_f(lat['candidate']['p50'], '.1f')}  "
                     f"p95 {_f(lat['incumbent']['p95'], '.1f')} -> {_f(lat['candidate']['p95'], '.1f')}")
        cost = c["cost"]
        lines.append(f"  cost per 1k requests: ${_f(cost['incumbent_per_1k_usd'], '.4f')} -> ${_f(cost['candidate_per_1k_usd'], '.4f')}")
        p = cost["projection"]
        if p.get("savings_usd") is not None:
            lines.append(f"  projected monthly: ${p['incumbent_usd']:.2f} -> ${p['candidate_usd']:.2f} "
                         f"(saves ${p['savings_usd']:.2f}, {_f(p['savings_pct'], '.1f')}%) at {p['requests_per_month']:,.1f} req/month"
                         f" ({p.get('volume_source')})")
        elif p.get("volume_source"):
            lines.append(f"  projected monthly: - ({p['volume_source']})")
    a = rep.get("after_promotion")
    if a:
        lines.append("")
        lines.append(f"after promotion: {a['results']} answers, error rate {a['error_rate']:.3f}, p95 {_f(a['p95_ms'], '.1f')} ms, "
                     f"judged loss rate {_f(a['loss_rate'])} ({a['judged']} judged)")
    if rep.get("guard"):
        g = rep["guard"]
        lines.append("guard: rolls back when " + ", ".join(
            f"{k} > {g[k]}" for k in ("max_loss_rate", "max_error_rate", "max_p95_ms") if g.get(k) is not None)
            + " (anytime-valid)")
    if rep["routing"]:
        r = rep["routing"][-1]
        lines.append("")
        lines.append(f"routing: last action {r['action']} to {r['candidate']} steps {r['steps']}")
        for r in rep["routing"]:
            if r.get("actor") == "guard":
                when = time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(r["ts"]))
                lines.append(f"  AUTOMATIC {r['action']} of {r['candidate']} at {when}: {r.get('note')}")
    return "\n".join(lines)
