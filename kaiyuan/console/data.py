"""The console's numbers, read from the hourly rollup and the indexed request log.

Each function takes a :class:`Scope` (an admin sees everything, a team its own rows) and returns
JSON-able dicts that the admin API serves as they are and the pages render, so a page never shows
a number the API would not. Nothing here scans the log in Python: sums are SQL ``GROUP BY`` over
``usage_hourly``; percentiles merge its per-hour histograms (see :mod:`kaiyuan.console.histogram`).
"""

from __future__ import annotations

import re
import time
from dataclasses import dataclass
from typing import Any

import orjson
from sqlalchemy import Engine, Select, func, select

from kaiyuan.accounting.prices import PriceCatalog, ResolvedPrice, deployment_price, vendor_of
from kaiyuan.config import GatewayConfig
from kaiyuan.console import histogram
from kaiyuan.errors import ErrorKind, kind_for_upstream_status
from kaiyuan.store.schema import request_log, usage_hourly

HOUR = 3600
PERIODS = {"1h": 1, "24h": 24, "7d": 24 * 7, "30d": 24 * 30, "90d": 24 * 90}
_CLOSED_MODEL = re.compile(r"^(gpt-|o\d|chatgpt|claude|gemini|text-embedding-3)", re.I)
_CLOSED_VENDORS = frozenset({"openai", "anthropic", "google"})
SAVINGS_METHOD = (
    "Each model's prompt, cached and completion tokens in the period are priced at the reference model's "
    "per-token list price (its base tier; long-prompt tiers are not applied) and compared with what they "
    "cost. Requests with an unknown cost (no price) are left out of both sides."
)


@dataclass(frozen=True)
class Scope:
    """Whose rows: everything (admin), one team, or one key (a key without a team)."""

    team_id: str | None = None
    key_id: str | None = None

    @property
    def everything(self) -> bool:
        return self.team_id is None and self.key_id is None


def period_hours(period: str) -> int:
    if period not in PERIODS:
        raise ValueError(f"period: use one of {', '.join(PERIODS)}, got {period!r}")
    return PERIODS[period]


@dataclass(frozen=True)
class DeploymentInfo:
    vendor: str
    origin: str  # "open-weight, hosted" ...
    price: ResolvedPrice | None


class Catalogue:
    """What the config says about each deployment: who bills it and where the model comes from."""

    def __init__(self, config: GatewayConfig, catalog: PriceCatalog | None = None) -> None:
        self.config = config
        self.catalog = catalog or PriceCatalog.load(config.accounting)
        self.deployments: dict[str, DeploymentInfo] = {}
        for m in config.models:
            for d in m.deployments:
                price = deployment_price(d, self.catalog)
                vendor = vendor_of(d, price)
                self.deployments[d.id or d.default_id()] = DeploymentInfo(vendor, origin_of(d.model, vendor, d.tags), price)

    def info(self, deployment: str) -> DeploymentInfo:
        return self.deployments.get(deployment) or DeploymentInfo("unknown", "unknown", None)

    def reference(self) -> tuple[str, ResolvedPrice] | None:
        from kaiyuan.accounting.reports import reference_price

        name = self.config.console.reference_model
        if not name:
            return None
        price = reference_price(name, self.config, self.catalog)
        return None if price is None else (name, price)


def origin_of(upstream_model: str, vendor: str, tags: list[str]) -> str:
    """open-weight or closed (tags ``closed`` / ``open_weight`` override the name rule), hosted or self-hosted."""
    closed = "closed" in tags or ("open_weight" not in tags and (vendor in _CLOSED_VENDORS or bool(_CLOSED_MODEL.match(upstream_model))))
    hosted = "self-hosted" if vendor == "self-hosted" or "self_hosted" in tags else "hosted"
    return f"{'closed' if closed else 'open-weight'}, {hosted}"


def _scoped(q: Select[Any], table: Any, scope: Scope) -> Select[Any]:
    if scope.team_id is not None:
        return q.where(table.c.team_id == scope.team_id)
    if scope.key_id is not None:
        return q.where(table.c.key_id == scope.key_id)
    return q


def _since_hour(hours: int, now: float) -> int:
    return int(now // HOUR) - hours + 1


_PRICED = (func.sum(usage_hourly.c.priced_prompt_tokens), func.sum(usage_hourly.c.priced_completion_tokens),
           func.sum(usage_hourly.c.priced_cached_tokens))
_SUMS = (func.sum(usage_hourly.c.requests), func.sum(usage_hourly.c.prompt_tokens), func.sum(usage_hourly.c.completion_tokens),
         func.sum(usage_hourly.c.cached_tokens), func.sum(usage_hourly.c.cost_usd), func.sum(usage_hourly.c.cost_unknown))


def _sums(r: Any, start: int) -> dict[str, Any]:
    req, pt, ct, cached, cost, unknown = (r[start + i] or 0 for i in range(6))
    return {"requests": int(req), "prompt_tokens": int(pt), "completion_tokens": int(ct), "cached_tokens": int(cached),
            "tokens": int(pt) + int(ct), "cost_usd": float(cost), "cost_unknown_requests": int(unknown)}


def overview(engine: Engine, cat: Catalogue, scope: Scope, period: str, now: float | None = None) -> dict[str, Any]:
    now = time.time() if now is None else now
    hours = period_hours(period)
    since = _since_hour(hours, now)
    t = usage_hourly
    step = 1 if hours <= 48 else 24  # hourly points up to two days, daily beyond
    with engine.connect() as conn:
        series_q = _scoped(select(t.c.hour, *_SUMS).where(t.c.hour >= since).group_by(t.c.hour), t, scope)
        by_dep_q = _scoped(select(t.c.model, t.c.deployment, *_SUMS, *_PRICED).where(t.c.hour >= since).group_by(t.c.model, t.c.deployment), t, scope)
        by_team_q = _scoped(select(t.c.team_id, *_SUMS).where(t.c.hour >= since).group_by(t.c.team_id), t, scope)
        err_q = _scoped(select(func.sum(t.c.requests)).where(t.c.hour >= since, t.c.status >= 400), t, scope)
        series_rows = list(conn.execute(series_q))
        dep_rows = list(conn.execute(by_dep_q))
        team_rows = list(conn.execute(by_team_q))
        errors = int(conn.execute(err_q).scalar() or 0)
    points: dict[int, dict[str, Any]] = {}
    for i in range(0, hours, step):
        points[since + i] = {"t": (since + i) * HOUR, "requests": 0, "tokens": 0, "cost_usd": 0.0}
    for r in series_rows:
        start = since + ((int(r[0]) - since) // step) * step
        p = points.setdefault(start, {"t": start * HOUR, "requests": 0, "tokens": 0, "cost_usd": 0.0})
        s = _sums(r, 1)
        p["requests"] += s["requests"]
        p["tokens"] += s["tokens"]
        p["cost_usd"] += s["cost_usd"]
    total = _zero()
    by: dict[str, dict[str, dict[str, Any]]] = {"model": {}, "vendor": {}, "origin": {}, "deployment": {}}
    for r in dep_rows:
        s = _sums(r, 2)
        info = cat.info(r[1])
        for dim, name in (("model", r[0]), ("vendor", info.vendor), ("origin", info.origin), ("deployment", r[1])):
            _add(by[dim].setdefault(name or "(none)", _zero()), s)
        _add(total, s)
    teams: dict[str, dict[str, Any]] = {}
    for r in team_rows:
        _add(teams.setdefault(r[0] or "(no team)", _zero()), _sums(r, 1))
    shares = {dim: _shares(rows, total) for dim, rows in {**by, "team": teams}.items()}
    return {
        "object": "console.overview", "period": period, "since": since * HOUR, "until": now, "step_s": step * HOUR,
        "scope": {"team_id": scope.team_id, "key_id": scope.key_id},
        "totals": {**total, "cost_usd": round(total["cost_usd"], 6), "errors": errors},
        "series": [{**points[k], "cost_usd": round(points[k]["cost_usd"], 6)} for k in sorted(points)],
        "shares": shares,
        "savings": savings(cat, dep_rows),
    }


def _zero() -> dict[str, Any]:
    return {"requests": 0, "prompt_tokens": 0, "completion_tokens": 0, "cached_tokens": 0, "tokens": 0, "cost_usd": 0.0,
            "cost_unknown_requests": 0}


def _add(acc: dict[str, Any], s: dict[str, Any]) -> None:
    for k, v in s.items():
        acc[k] += v


def _shares(rows: dict[str, dict[str, Any]], total: dict[str, Any]) -> list[dict[str, Any]]:
    out = []
    for name, s in rows.items():
        out.append({"name": name, **s, "cost_usd": round(s["cost_usd"], 6),
                    "share_requests": round(s["requests"] / total["requests"], 4) if total["requests"] else None,
                    "share_cost": round(s["cost_usd"] / total["cost_usd"], 4) if total["cost_usd"] else None})
    return sorted(out, key=lambda x: (-x["requests"], x["name"]))


def savings(cat: Catalogue, dep_rows: list[Any]) -> dict[str, Any]:
    """What the same tokens would have cost at the configured closed reference model."""
    ref = cat.reference()
    if ref is None:
        why = ("set console.reference_model (for example gpt-4o) to compare" if not cat.config.console.reference_model
               else f"the reference model {cat.config.console.reference_model!r} has no known price")
        return {"reference_model": cat.config.console.reference_model, "available": False, "why": why, "method": SAVINGS_METHOD}
    name, price = ref
    actual = reference = 0.0
    excluded = 0
    per_model: dict[str, dict[str, float]] = {}
    for r in dep_rows:
        _req, _pt, _ct, _cached, cost, unknown, pt, ct, cached = (r[2 + i] or 0 for i in range(9))
        excluded += int(unknown)
        ref_cost = _at_base(price, int(pt), int(ct), int(cached))
        m = per_model.setdefault(r[0] or "(none)", {"actual_usd": 0.0, "reference_usd": 0.0})
        m["actual_usd"] += float(cost)
        m["reference_usd"] += ref_cost
        actual += float(cost)
        reference += ref_cost
    return {
        "reference_model": name, "available": True, "method": SAVINGS_METHOD,
        "actual_usd": round(actual, 6), "reference_usd": round(reference, 6), "savings_usd": round(reference - actual, 6),
        "savings_pct": round(100 * (reference - actual) / reference, 2) if reference else None,
        "requests_excluded_unknown_cost": excluded,
        "by_model": [{"model": k, "actual_usd": round(v["actual_usd"], 6), "reference_usd": round(v["reference_usd"], 6),
                      "savings_usd": round(v["reference_usd"] - v["actual_usd"], 6)} for k, v in sorted(per_model.items())],
    }


def _at_base(price: ResolvedPrice, prompt: int, completion: int, cached: int) -> float:
    """Summed tokens at the base tier (a sum has no single prompt length to pick a tier by)."""
    r = price.base
    cached = min(cached, prompt)
    return (prompt - cached) * r.input + cached * r.cache_hit + completion * r.output


def error_kind(status: int) -> str:
    if status == ErrorKind.CLIENT_CLOSED.status:
        return "client_closed"
    if status == 500:
        return "internal"
    return kind_for_upstream_status(status).name.lower()


def traffic(engine: Engine, scope: Scope, period: str, now: float | None = None) -> dict[str, Any]:
    """Latency and TTFT percentiles by model and deployment, and error rates by kind."""
    now = time.time() if now is None else now
    since = _since_hour(period_hours(period), now)
    t = usage_hourly
    q = _scoped(select(t.c.model, t.c.deployment, t.c.status, t.c.requests, t.c.latency_hist, t.c.ttft_hist).where(t.c.hour >= since), t, scope)
    deps: dict[tuple[str, str], dict[str, Any]] = {}
    kinds: dict[str, int] = {}
    total = 0
    with engine.connect() as conn:
        for model, dep, status, n, lat, ttft in conn.execute(q):
            d = deps.setdefault((model, dep), {"requests": 0, "errors": 0, "lat": {}, "ttft": {}})
            d["requests"] += n
            total += n
            if status >= 400:
                d["errors"] += n
                kinds[error_kind(status)] = kinds.get(error_kind(status), 0) + n
            else:  # latency of answers only: a fast refusal is not a fast model
                histogram.merge_json(d["lat"], lat)
                histogram.merge_json(d["ttft"], ttft)
    rows = []
    for (model, dep), d in sorted(deps.items()):
        rows.append({"model": model or "(none)", "deployment": dep or "(none)", "requests": d["requests"], "errors": d["errors"],
                     "error_rate": round(d["errors"] / d["requests"], 4) if d["requests"] else None,
                     **{f"latency_{k}_ms": _r(histogram.percentile(d["lat"], q)) for k, q in (("p50", 0.5), ("p95", 0.95))},
                     **{f"ttft_{k}_ms": _r(histogram.percentile(d["ttft"], q)) for k, q in (("p50", 0.5), ("p95", 0.95))},
                     "ttft_samples": histogram.count(d["ttft"])})
    errors = [{"kind": k, "requests": n, "rate": round(n / total, 4) if total else None} for k, n in sorted(kinds.items(), key=lambda x: -x[1])]
    return {"object": "console.traffic", "period": period, "since": since * HOUR, "until": now, "requests": total,
            "percentile_error_bound": round(histogram.ERROR_BOUND, 4), "by_deployment": rows, "errors_by_kind": errors}


def _r(v: float | None) -> float | None:
    return None if v is None else round(v, 1)


# -- the request log --------------------------------------------------------------------------------
LIST_COLUMNS = ("id", "ts", "key_id", "team_id", "model", "deployment", "status", "prompt_tokens", "completion_tokens",
                "cached_tokens", "cost_usd", "latency_ms", "ttft_ms", "attempts", "error", "cancelled", "stream", "endpoint")


@dataclass(frozen=True)
class LogFilter:
    key_id: str | None = None
    team_id: str | None = None
    model: str | None = None
    status: str | None = None  # "200", "4xx", "5xx", "error"
    before: float | None = None
    limit: int = 50

    @classmethod
    def from_query(cls, q: Any) -> LogFilter:
        status = q.get("status") or None
        if status is not None and not re.fullmatch(r"\d{3}|[1-5]xx|error", status):
            raise ValueError(f"status: give a code (429), a class (5xx) or 'error', got {status!r}")
        try:
            before = float(q["before"]) if q.get("before") else None
            limit = int(q.get("limit") or 50)
        except ValueError:
            raise ValueError("before must be unix seconds and limit a whole number") from None
        if not 1 <= limit <= 500:
            raise ValueError(f"limit: 1 to 500, got {limit}")
        return cls(q.get("key_id") or None, q.get("team_id") or None, q.get("model") or None, status, before, limit)


def search_requests(engine: Engine, scope: Scope, f: LogFilter) -> dict[str, Any]:
    """The newest requests matching the filters (keyset pages: pass the last ``ts`` as ``before``)."""
    t = request_log
    q = _scoped(select(*(t.c[c] for c in LIST_COLUMNS)), t, scope)
    for col, v in (("key_id", f.key_id), ("team_id", f.team_id), ("model", f.model)):
        if v is not None:
            q = q.where(t.c[col] == v)
    if f.status == "error":
        q = q.where(t.c.status >= 400)
    elif f.status and f.status.endswith("xx"):
        lo = int(f.status[0]) * 100
        q = q.where(t.c.status >= lo, t.c.status < lo + 100)
    elif f.status:
        q = q.where(t.c.status == int(f.status))
    if f.before is not None:
        q = q.where(t.c.ts < f.before)
    q = q.order_by(t.c.ts.desc()).limit(f.limit)
    with engine.connect() as conn:
        rows = [dict(r) for r in conn.execute(q).mappings()]
    return {"object": "list", "data": rows, "next_before": rows[-1]["ts"] if len(rows) == f.limit else None}


def request_detail(engine: Engine, scope: Scope, request_id: str) -> dict[str, Any] | None:
    t = request_log
    with engine.connect() as conn:
        row = conn.execute(_scoped(select(t).where(t.c.id == request_id), t, scope)).mappings().first()
    if row is None:
        return None
    out = dict(row)
    try:
        out["attempt_log"] = orjson.loads(out["attempt_log"]) if out["attempt_log"] else []
    except orjson.JSONDecodeError:
        pass
    out["bodies_logged"] = out["request_body"] is not None or out["response_body"] is not None
    return out


def recent_failures(engine: Engine, scope: Scope, limit: int = 20) -> list[dict[str, Any]]:
    return search_requests(engine, scope, LogFilter(status="5xx", limit=limit))["data"]


# -- keys, teams and budgets ------------------------------------------------------------------------
def keys_and_budgets(engine: Engine, scope: Scope, now: float | None = None) -> dict[str, Any]:
    """Keys and teams in scope, each budget with what its period has spent (from the spend ledger)."""
    from kaiyuan.accounting import keystore

    now = time.time() if now is None else now
    keys = keystore.list_keys(engine, scope.team_id)
    if scope.key_id is not None and scope.team_id is None:
        keys = [k for k in keys if k["id"] == scope.key_id]
    team_list = [t for t in keystore.list_teams(engine) if scope.everything or t["id"] == scope.team_id]
    visible = {("key", k["id"]) for k in keys} | {("team", t["id"]) for t in team_list}
    budgets = []
    for b in keystore.list_budgets(engine):
        if (b["scope"], b["scope_id"]) not in visible:
            continue
        start, reset = keystore.period_bounds(b["period"], now)
        spent = keystore.spent_since(engine, b["scope"], b["scope_id"], start)
        budgets.append({**b, "spent_usd": round(spent, 6), "remaining_usd": round(b["limit_usd"] - spent, 6),
                        "used_pct": round(100 * spent / b["limit_usd"], 1) if b["limit_usd"] else None, "resets_at": reset})
    return {"object": "console.keys", "keys": keys, "teams": team_list, "budgets": budgets}
