"""Spend reports from the spend ledger: by key, team, user, model, vendor and day; CSV; savings.

The savings view prices the same tokens at a reference model the admin names (for example
``gpt-4o``) and shows what they would have cost there against what they cost.
"""

from __future__ import annotations

import csv
import io
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from sqlalchemy import Engine, select

from kaiyuan.accounting.prices import PriceCatalog, ResolvedPrice, deployment_price
from kaiyuan.config import GatewayConfig
from kaiyuan.context import Usage
from kaiyuan.store.schema import spend_ledger

DIMENSIONS = ("key", "team", "user", "model", "vendor", "deployment", "day")
_COLUMN = {"key": "key_id", "team": "team_id", "user": "user_id", "model": "model", "vendor": "vendor", "deployment": "deployment"}


@dataclass
class SpendQuery:
    group_by: list[str]
    since: float | None = None
    until: float | None = None
    key_id: str | None = None
    team_id: str | None = None
    reference: str | None = None

    @classmethod
    def from_query(cls, q: dict[str, str]) -> SpendQuery:
        group = [g.strip() for g in (q.get("group_by") or "model").split(",") if g.strip()]
        bad = [g for g in group if g not in DIMENSIONS]
        if bad:
            raise ValueError(f"group_by: unknown dimension(s) {', '.join(bad)}; use any of {', '.join(DIMENSIONS)}")
        return cls(group, _time(q.get("since"), "since"), _time(q.get("until"), "until"), q.get("key_id"), q.get("team_id"), q.get("reference"))


def _time(v: str | None, name: str) -> float | None:
    if not v:
        return None
    try:
        return float(v)
    except ValueError:
        pass
    try:
        d = datetime.fromisoformat(v.replace("Z", "+00:00"))
    except ValueError:
        raise ValueError(f"{name}: give a date (2026-11-01), an ISO time or unix seconds, got {v!r}") from None
    if d.tzinfo is None:
        d = d.replace(tzinfo=UTC)
    return d.timestamp()


def reference_price(name: str, config: GatewayConfig, catalog: PriceCatalog | None) -> ResolvedPrice | None:
    """A gateway model's first priced deployment, else the catalog row for that upstream id."""
    catalog = catalog or PriceCatalog.load(config.accounting)
    m = config.model(name)
    if m is not None:
        for d in m.deployments:
            p = deployment_price(d, catalog)
            if p is not None:
                return p
    return catalog.lookup(name)


def spend_report(engine: Engine, q: SpendQuery, ref: ResolvedPrice | None) -> dict[str, Any]:
    t = spend_ledger
    stmt = select(t)
    if q.since is not None:
        stmt = stmt.where(t.c.ts >= q.since)
    if q.until is not None:
        stmt = stmt.where(t.c.ts < q.until)
    if q.key_id:
        stmt = stmt.where(t.c.key_id == q.key_id)
    if q.team_id:
        stmt = stmt.where(t.c.team_id == q.team_id)
    groups: dict[tuple[Any, ...], dict[str, Any]] = {}
    total = _zero(ref)
    with engine.connect() as conn:
        for r in conn.execute(stmt).mappings():
            key = tuple(
                datetime.fromtimestamp(r["ts"], UTC).strftime("%Y-%m-%d") if g == "day" else r[_COLUMN[g]] for g in q.group_by
            )
            g = groups.get(key)
            if g is None:
                g = groups[key] = {**dict(zip(q.group_by, key, strict=True)), **_zero(ref)}
            for acc in (g, total):
                _add(acc, r, ref)
    rows = sorted(groups.values(), key=lambda x: -x["cost_usd"])
    for acc in [*rows, total]:
        _round(acc)
    return {"object": "spend_report", "group_by": q.group_by, "reference": q.reference, "data": rows, "total": total}


def _zero(ref: ResolvedPrice | None) -> dict[str, Any]:
    z: dict[str, Any] = {"requests": 0, "prompt_tokens": 0, "completion_tokens": 0, "cost_usd": 0.0}
    if ref is not None:
        z.update(reference_cost_usd=0.0, savings_usd=0.0)
    return z


def _add(acc: dict[str, Any], r: Any, ref: ResolvedPrice | None) -> None:
    acc["requests"] += 1
    acc["prompt_tokens"] += r["prompt_tokens"] or 0
    acc["completion_tokens"] += r["completion_tokens"] or 0
    acc["cost_usd"] += r["cost_usd"] or 0.0
    if ref is not None:
        rc = ref.cost(Usage(r["prompt_tokens"], r["completion_tokens"], r["cached_tokens"])) or 0.0
        acc["reference_cost_usd"] += rc
        acc["savings_usd"] += rc - (r["cost_usd"] or 0.0)


def _round(acc: dict[str, Any]) -> None:
    for k in ("cost_usd", "reference_cost_usd", "savings_usd"):
        if k in acc:
            acc[k] = round(acc[k], 6)
    if "reference_cost_usd" in acc:
        acc["savings_pct"] = round(100 * acc["savings_usd"] / acc["reference_cost_usd"], 2) if acc["reference_cost_usd"] else None


def to_csv(report: dict[str, Any]) -> str:
    rows = report["data"]
    cols = list(report["group_by"]) + [c for c in report["total"] if c not in report["group_by"]]
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=cols, extrasaction="ignore", lineterminator="\n")
    w.writeheader()
    for r in rows:
        w.writerow(r)
    return buf.getvalue()
