"""Trial state in the database: results, the spend ledger, routing overrides, admin-defined trials.

Every call here does blocking I/O: call it from a CLI, or through ``asyncio.to_thread`` from the
gateway's background tasks, never on a request's path.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

import orjson
from sqlalchemy import Engine, delete, func, select

from kaiyuan.store.schema import trial_def, trial_result, trial_routing, trial_spend


@dataclass(frozen=True)
class RoutingState:
    trial: str
    action: str
    incumbent: str
    candidate: str
    steps: list[float]
    step_s: float
    ts: float

    def share(self, now: float | None = None) -> float:
        """The share of the incumbent's traffic the candidate answers now (steps advance with time)."""
        if self.action != "promote" or not self.steps:
            return 0.0
        if self.step_s <= 0:
            return self.steps[-1]
        i = int(max(0.0, (now or time.time()) - self.ts) // self.step_s)
        return self.steps[min(i, len(self.steps) - 1)]


class TrialStore:
    def __init__(self, engine: Engine) -> None:
        self.engine = engine

    # -- results -------------------------------------------------------------------------------
    def add_results(self, rows: list[dict[str, Any]]) -> None:
        if rows:
            with self.engine.begin() as conn:
                conn.execute(trial_result.insert(), rows)

    def results(self, trial: str) -> list[dict[str, Any]]:
        with self.engine.connect() as conn:
            q = select(trial_result).where(trial_result.c.trial == trial).order_by(trial_result.c.ts, trial_result.c.id)
            return [dict(r) for r in conn.execute(q).mappings()]

    def clear_results(self, trial: str) -> None:
        with self.engine.begin() as conn:
            conn.execute(delete(trial_result).where(trial_result.c.trial == trial))

    # -- spend ---------------------------------------------------------------------------------
    def add_spend(self, trial: str, entries: list[tuple[str, str, float]]) -> None:
        """``entries``: (kind, model, cost_usd)."""
        now = time.time()
        rows = [{"trial": trial, "ts": now, "kind": k, "model": m, "cost_usd": c} for k, m, c in entries if c]
        if rows:
            with self.engine.begin() as conn:
                conn.execute(trial_spend.insert(), rows)

    def add_spend_rows(self, rows: list[dict[str, Any]]) -> None:
        """Rows of trial_spend (trial, ts, kind, model, cost_usd), from the batch writer."""
        if rows:
            with self.engine.begin() as conn:
                conn.execute(trial_spend.insert(), rows)

    def spent(self, trial: str) -> float:
        with self.engine.connect() as conn:
            v = conn.execute(select(func.sum(trial_spend.c.cost_usd)).where(trial_spend.c.trial == trial)).scalar()
        return float(v or 0.0)

    def spend_by_kind(self, trial: str) -> dict[str, float]:
        with self.engine.connect() as conn:
            q = select(trial_spend.c.kind, func.sum(trial_spend.c.cost_usd)).where(trial_spend.c.trial == trial).group_by(trial_spend.c.kind)
            return {k: float(v or 0) for k, v in conn.execute(q)}

    # -- routing -------------------------------------------------------------------------------
    def record_routing(self, trial: str, action: str, incumbent: str, candidate: str, steps: list[float],
                       step_s: float = 0.0, actor: str | None = None, note: str | None = None) -> RoutingState:
        now = time.time()
        with self.engine.begin() as conn:
            conn.execute(trial_routing.insert(), [{"trial": trial, "ts": now, "action": action, "incumbent": incumbent,
                                                   "candidate": candidate, "steps": orjson.dumps(steps).decode(),
                                                   "step_s": step_s, "actor": actor, "note": note}])
        return RoutingState(trial, action, incumbent, candidate, steps, step_s, now)

    def routing_history(self, trial: str) -> list[dict[str, Any]]:
        with self.engine.connect() as conn:
            q = select(trial_routing).where(trial_routing.c.trial == trial).order_by(trial_routing.c.id)
            return [dict(r) for r in conn.execute(q).mappings()]

    def routing_states(self) -> dict[str, RoutingState]:
        """The latest promote/rollback of every trial."""
        with self.engine.connect() as conn:
            latest = select(trial_routing.c.trial, func.max(trial_routing.c.id).label("id")).group_by(trial_routing.c.trial).subquery()
            q = select(trial_routing).join(latest, trial_routing.c.id == latest.c.id)
            out = {}
            for r in conn.execute(q).mappings():
                out[r["trial"]] = RoutingState(r["trial"], r["action"], r["incumbent"], r["candidate"],
                                               [float(x) for x in orjson.loads(r["steps"])], float(r["step_s"] or 0), float(r["ts"]))
            return out

    # -- admin-defined trials ---------------------------------------------------------------------
    def save_def(self, name: str, definition: dict[str, Any]) -> None:
        with self.engine.begin() as conn:
            conn.execute(delete(trial_def).where(trial_def.c.name == name))
            conn.execute(trial_def.insert(), [{"name": name, "definition": orjson.dumps(definition).decode(),
                                               "created": time.time(), "status": "active"}])

    def delete_def(self, name: str) -> bool:
        with self.engine.begin() as conn:
            return bool(conn.execute(delete(trial_def).where(trial_def.c.name == name)).rowcount)

    def defs(self) -> dict[str, dict[str, Any]]:
        with self.engine.connect() as conn:
            return {r["name"]: orjson.loads(r["definition"]) for r in conn.execute(select(trial_def)).mappings()}
