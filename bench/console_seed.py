"""Seed a request log (default 1,000,000 rows over 30 days) and time the console's reads on it.

    PYTHONPATH=. python -m bench.console_seed --rows 1000000 [--db sqlite:///PATH | postgresql://...]

Rows are spread over ``--days`` days across a few models, deployments, teams and keys, with
realistic tokens, costs, latencies and a few percent of errors, from a fixed seed. The script then
times, on that database: the first rollup of the whole log (``console.rollup.catch_up``), a
catch-up with nothing new, and each console read (overview, traffic, keys, a request-log search
with filters, a detail) for 24 h, 7 d and 30 d. Tests call :func:`seed` with a few thousand rows.
"""

from __future__ import annotations

import argparse
import random
import tempfile
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from sqlalchemy import Engine, insert

from kaiyuan.store.schema import api_keys, request_log, teams

# (model, deployment, $ per 1M prompt tokens, $ per 1M completion tokens, base latency ms)
MODELS = [
    ("deepseek-chat", "openai_compatible:deepseek-chat@api.deepseek.com", 0.27, 1.10, 900.0),
    ("qwen-plus", "openai_compatible:qwen-plus@dashscope.aliyuncs.com", 0.40, 1.20, 700.0),
    ("qwen-local", "openai_compatible:Qwen/Qwen2.5-7B-Instruct@10.0.0.12:8000", 0.0, 0.0, 400.0),
    ("gpt-4o", "openai_compatible:gpt-4o@api.openai.com", 2.50, 10.00, 1100.0),
]
TEAMS = ["team-search", "team-finance", "team-risk"]
ERRORS = [(429, "rate limited upstream"), (502, "upstream returned 500"), (504, "upstream timed out"), (400, "bad request")]


@dataclass(frozen=True)
class SeedKey:
    id: str
    team_id: str


def seed_keys(engine: Engine, now: float) -> list[SeedKey]:
    keys = [SeedKey(f"key-{t}-{i}", t) for t in TEAMS for i in range(2)]
    with engine.begin() as conn:
        conn.execute(insert(teams), [{"id": t, "name": t, "created_at": now, "updated_at": now} for t in TEAMS])
        conn.execute(insert(api_keys), [
            {"id": k.id, "name": k.id, "key_hash": uuid.uuid4().hex * 2, "key_hint": "sk-ky-seed", "team_id": k.team_id,
             "created_at": now, "updated_at": now, "version": 1, "admin": False} for k in keys])
    return keys


def rows(n: int, now: float, days: float, keys: list[SeedKey], rng: random.Random) -> Any:
    """``n`` request-log rows, oldest first, ending at ``now``."""
    span = days * 86400
    for i in range(n):
        ts = now - span + span * (i + rng.random()) / n
        model, dep, pin, pout, base = MODELS[min(int(rng.random() ** 1.5 * len(MODELS)), len(MODELS) - 1)]
        key = keys[rng.randrange(len(keys))]
        err = rng.random() < 0.03
        status, error = ERRORS[rng.randrange(len(ERRORS))] if err else (200, None)
        pt = None if err else rng.randint(50, 4000)
        ct = None if err else rng.randint(10, 800)
        cached = None if err else rng.choice([0, 0, 0, (pt or 0) // 2])
        cost = None if err else round(((pt or 0) * pin + (ct or 0) * pout) / 1e6, 9)
        latency = base * rng.lognormvariate(0, 0.5)
        yield {"id": f"req-{i:08d}-{rng.getrandbits(32):08x}", "ts": ts, "key_id": key.id, "team_id": key.team_id,
               "dialect": "openai", "endpoint": "chat", "model": model, "deployment": dep, "stream": i % 3 == 0,
               "status": status, "prompt_tokens": pt, "completion_tokens": ct, "cached_tokens": cached,
               "reasoning_tokens": None, "cost_usd": cost, "latency_ms": latency,
               "ttft_ms": latency * 0.3 if i % 3 == 0 and not err else None, "attempts": 1, "attempt_log": None,
               "policy": None, "trial": None, "cancelled": False, "error": error,
               "request_body": None, "response_body": None}


def seed(engine: Engine, n: int, now: float | None = None, days: float = 30.0, seed_: int = 7, batch: int = 20_000) -> list[SeedKey]:
    now = time.time() if now is None else now
    keys = seed_keys(engine, now)
    rng = random.Random(seed_)
    buf: list[dict[str, Any]] = []
    for r in rows(n, now, days, keys, rng):
        buf.append(r)
        if len(buf) >= batch:
            with engine.begin() as conn:
                conn.execute(insert(request_log), buf)
            buf = []
    if buf:
        with engine.begin() as conn:
            conn.execute(insert(request_log), buf)
    return keys


def _time(label: str, fn: Callable[[], Any], repeat: int = 3) -> Any:
    best = float("inf")
    out = None
    for _ in range(repeat):
        t0 = time.perf_counter()
        out = fn()
        best = min(best, time.perf_counter() - t0)
    print(f"  {label:48} {1000 * best:9.1f} ms")
    return out


def main() -> None:
    from kaiyuan.config import parse_config
    from kaiyuan.console import data, rollup
    from kaiyuan.store.db import open_store

    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--rows", type=int, default=1_000_000)
    ap.add_argument("--days", type=float, default=30.0)
    ap.add_argument("--db", help="database URL (default: a new SQLite file in a temp dir)")
    args = ap.parse_args()
    url = args.db or f"sqlite:///{tempfile.mkdtemp(prefix='kaiyuan-console-bench-')}/kaiyuan.db"
    engine = open_store(url)
    now = time.time()
    t0 = time.perf_counter()
    keys = seed(engine, args.rows, now, args.days)
    print(f"seeded {args.rows:,} rows over {args.days:g} days in {time.perf_counter() - t0:.1f} s ({engine.url.get_backend_name()})")
    t0 = time.perf_counter()
    rows = rollup.catch_up(engine)
    print(f"first rollup of the whole log: {rows:,} rows in {time.perf_counter() - t0:.1f} s (once, in the background)")
    cfg = parse_config({"console": {"reference_model": "gpt-4o"}, "models": [
        {"name": m, "deployments": [{"provider": "openai_compatible", "base_url": "https://" + d.split("@")[1], "model": d.split(":", 1)[1].split("@")[0],
                                     "id": d, "price": {"input": pin, "output": pout}}]} for m, d, pin, pout, _ in MODELS]}, "<bench>")
    cat = data.Catalogue(cfg)
    print("console reads (best of 3):")
    _time("rollup catch-up, nothing new", lambda: rollup.catch_up(engine))
    team = data.Scope(team_id=keys[0].team_id)
    for period in ("24h", "7d", "30d"):
        _time(f"overview {period} (admin)", lambda p=period: data.overview(engine, cat, data.Scope(), p, now))
        _time(f"traffic {period} (admin)", lambda p=period: data.traffic(engine, data.Scope(), p, now))
    _time("overview 30d (one team)", lambda: data.overview(engine, cat, team, "30d", now))
    _time("request log: newest 50", lambda: data.search_requests(engine, data.Scope(), data.LogFilter()))
    _time("request log: model + status 5xx, 50", lambda: data.search_requests(engine, data.Scope(), data.LogFilter(model="gpt-4o", status="5xx")))
    _time("request log: one key, 50", lambda: data.search_requests(engine, data.Scope(), data.LogFilter(key_id=keys[1].id)))
    _time("request log: one team (team viewer), 50", lambda: data.search_requests(engine, team, data.LogFilter()))
    last = data.search_requests(engine, data.Scope(), data.LogFilter(limit=1))["data"][0]["id"]
    _time("request detail", lambda: data.request_detail(engine, data.Scope(), last))
    _time("keys and budgets", lambda: data.keys_and_budgets(engine, data.Scope()))


if __name__ == "__main__":
    main()
