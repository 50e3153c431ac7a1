"""The console's rollup and reads on SQLite and (when available) PostgreSQL: sums equal the log's.

Also: the rollup is idempotent (two passes, two replicas at once, a rebuild never double count),
a late row is summed whatever its hour, and a team scope filters every read. The incremental
rollup's exactness against a full re-sum: tests/test_rollup_incremental.py.
"""

from __future__ import annotations

import threading
import time
import uuid
from typing import Any

import pytest
from sqlalchemy import delete, func, insert, select

from bench.console_seed import MODELS, TEAMS, seed
from kaiyuan.config import parse_config
from kaiyuan.console import data, rollup
from kaiyuan.store.db import open_store
from kaiyuan.store.schema import request_log, usage_hourly
from tests.test_store import db_url  # noqa: F401  (the sqlite / postgres fixture)

NOW = 1_790_000_000.0 + 1800  # a fixed half past the hour


def _cat() -> data.Catalogue:
    models = [{"name": m, "deployments": [{"provider": "openai_compatible", "base_url": "http://h/v1", "model": m, "id": d,
                                           "price": {"input": pin, "output": pout}}]} for m, d, pin, pout, _ in MODELS]
    return data.Catalogue(parse_config({"console": {"reference_model": "gpt-4o"}, "models": models}, "<t>"))


def _row(ts: float, model: str, **kw: Any) -> dict[str, Any]:
    return {"id": uuid.uuid4().hex, "ts": ts, "dialect": "openai", "endpoint": "chat", "model": model, "status": 200,
            "stream": False, "attempts": 1, "cancelled": False, "latency_ms": 5.0, **kw}


def _add(engine: Any, rows: list[dict[str, Any]]) -> None:
    with engine.begin() as c:
        c.execute(insert(request_log), rows)


def _log_sums(engine: Any, since: float, team: str | None = None) -> tuple[int, int, float]:
    t = request_log
    q = select(func.count(), func.coalesce(func.sum(t.c.prompt_tokens), 0) + func.coalesce(func.sum(t.c.completion_tokens), 0),
               func.coalesce(func.sum(t.c.cost_usd), 0.0)).where(t.c.ts >= since)
    if team:
        q = q.where(t.c.team_id == team)
    with engine.connect() as c:
        n, tok, cost = c.execute(q).one()
    return int(n), int(tok), float(cost)


def test_rollup_sums_equal_the_log(db_url: str) -> None:  # noqa: F811
    engine = open_store(db_url)
    seed(engine, 2000, NOW, days=3)
    assert rollup.catch_up(engine) > 0
    cat = _cat()
    for period in ("24h", "7d"):
        ov = data.overview(engine, cat, data.Scope(), period, NOW)
        n, tok, cost = _log_sums(engine, ov["since"])
        assert (ov["totals"]["requests"], ov["totals"]["tokens"]) == (n, tok)
        assert ov["totals"]["cost_usd"] == pytest.approx(cost, abs=1e-6)
    team = data.overview(engine, cat, data.Scope(team_id=TEAMS[1]), "7d", NOW)
    n, tok, _ = _log_sums(engine, team["since"], TEAMS[1])
    assert (team["totals"]["requests"], team["totals"]["tokens"]) == (n, tok)
    assert [s["name"] for s in team["shares"]["team"]] == [TEAMS[1]]
    tr = data.traffic(engine, data.Scope(), "7d", NOW)
    assert tr["requests"] == data.overview(engine, cat, data.Scope(), "7d", NOW)["totals"]["requests"]
    page = data.search_requests(engine, data.Scope(team_id=TEAMS[2]), data.LogFilter(status="error", limit=10))
    assert page["data"] and all(r["team_id"] == TEAMS[2] and r["status"] >= 400 for r in page["data"])
    older = data.search_requests(engine, data.Scope(), data.LogFilter(limit=5, before=page["data"][-1]["ts"]))
    assert all(r["ts"] < page["data"][-1]["ts"] for r in older["data"])
    assert data.request_detail(engine, data.Scope(team_id=TEAMS[0]), page["data"][0]["id"]) is None  # another team's
    assert data.request_detail(engine, data.Scope(), page["data"][0]["id"]) is not None


def test_rollup_never_double_counts(db_url: str) -> None:  # noqa: F811
    engine = open_store(db_url)
    seed(engine, 600, NOW, days=1)
    threads = [threading.Thread(target=rollup.catch_up, args=(engine, 150)) for _ in range(3)]  # three replicas at once
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    rollup.catch_up(engine)
    with engine.connect() as c:
        rolled = c.execute(select(func.sum(usage_hourly.c.requests))).scalar()
    assert int(rolled) == 600
    assert rollup.catch_up(engine) == 0  # nothing new
    assert rollup.rebuild(engine) == 600
    with engine.connect() as c:
        assert int(c.execute(select(func.sum(usage_hourly.c.requests))).scalar()) == 600


def test_a_late_row_for_an_old_hour_is_summed_by_the_next_pass(db_url: str) -> None:  # noqa: F811
    engine = open_store(db_url)
    seed(engine, 100, NOW, days=1)
    rollup.catch_up(engine)
    _add(engine, [_row(NOW - 10, "late"), _row(NOW - 6 * 3600, "late")])  # the open hour, and one long closed
    assert rollup.catch_up(engine) == 2
    ov = data.overview(engine, _cat(), data.Scope(), "24h", NOW)
    assert {s["name"]: s["requests"] for s in ov["shares"]["model"]}.get("late") == 2
    before = rollup.stored(engine)
    assert rollup.rebuild(engine) == 102 and rollup.stored(engine) == before


def test_savings_price_the_priced_tokens_at_the_reference(db_url: str) -> None:  # noqa: F811
    engine = open_store(db_url)
    seed(engine, 500, NOW, days=1)
    rollup.catch_up(engine)
    ov = data.overview(engine, _cat(), data.Scope(), "24h", NOW)
    t = request_log
    with engine.connect() as c:
        pt, ct, cached, cost = c.execute(select(func.sum(t.c.prompt_tokens), func.sum(t.c.completion_tokens), func.sum(t.c.cached_tokens),
                                                func.sum(t.c.cost_usd)).where(t.c.ts >= ov["since"], t.c.cost_usd.is_not(None))).one()
    ref = ((pt - cached) * 2.5 + cached * 2.5 + ct * 10.0) / 1e6  # gpt-4o at the given price (no cache price: input)
    sv = ov["savings"]
    assert sv["reference_usd"] == pytest.approx(ref, rel=1e-9)
    assert sv["actual_usd"] == pytest.approx(float(cost), abs=1e-6)
    assert sv["savings_usd"] == pytest.approx(ref - float(cost), abs=1e-6)


def test_no_reference_model_says_how_to_set_one(tmp_path: Any) -> None:
    engine = open_store(f"sqlite:///{tmp_path}/x.db")
    cat = data.Catalogue(parse_config({"models": []}, "<t>"))
    sv = data.overview(engine, cat, data.Scope(), "24h", time.time())["savings"]
    assert not sv["available"] and "console.reference_model" in sv["why"]


def test_console_rollup_command_rebuilds(tmp_path: Any, capsys: pytest.CaptureFixture[str]) -> None:
    from kaiyuan.cli import main

    url = f"sqlite:///{tmp_path}/r.db"
    engine = open_store(url)
    seed(engine, 200, time.time(), days=1)
    assert main(["console-rollup", "--db", url]) == 0
    assert "caught up" in capsys.readouterr().err
    with engine.begin() as c:  # log rows deleted: the rollup keeps them until it is rebuilt
        c.execute(delete(request_log).where(request_log.c.id.in_(select(request_log.c.id).limit(10).scalar_subquery())))
    assert main(["console-rollup", "--db", url]) == 0
    with engine.connect() as c:
        assert int(c.execute(select(func.sum(usage_hourly.c.requests))).scalar()) == 200
    _add(engine, [_row(time.time() - 20 * 3600, "imported")])
    assert main(["console-rollup", "--db", url, "--rebuild"]) == 0
    with engine.connect() as c:
        assert int(c.execute(select(func.sum(usage_hourly.c.requests))).scalar()) == 191
