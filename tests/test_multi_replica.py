"""Three gateway processes sharing PostgreSQL and Redis: budgets and rate limits hold globally, and
the spend in the database equals the sum of the logged request costs, to the cent.

Needs KAIYUAN_TEST_POSTGRES_URL and KAIYUAN_TEST_REDIS_URL (skipped with a reason otherwise).
"""

from __future__ import annotations

import concurrent.futures as cf
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import openai
import pytest
import yaml
from sqlalchemy import func, select

from kaiyuan.store.schema import request_log, spend_ledger
from kaiyuan.testing.fake_openai import FakeOpenAI
from tests.http import http
from tests.test_migrations_keys import drop_pg_database, fresh_pg_database

PG_URL = os.environ.get("KAIYUAN_TEST_POSTGRES_URL")
REDIS_URL = os.environ.get("KAIYUAN_TEST_REDIS_URL")
pytestmark = pytest.mark.skipif(
    not (PG_URL and REDIS_URL),
    reason="set KAIYUAN_TEST_POSTGRES_URL and KAIYUAN_TEST_REDIS_URL to run the multi-replica test",
)
MASTER = "sk-master-replicas"
N_REPLICAS = 3


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture
def replicas(fake_openai: FakeOpenAI, tmp_path: Path) -> Iterator[tuple[list[str], Any]]:
    assert PG_URL and REDIS_URL
    db_url, engine = fresh_pg_database(PG_URL)
    cfg = {
        "server": {"master_key": MASTER},
        "store": {"url": db_url},
        "request_log": {"flush_interval_s": 0.2},
        "accounting": {"spend_flush_interval_s": 0.2},
        "limits": {"backend": "redis", "redis_url": REDIS_URL, "key_cache_ttl_s": 1},
        "models": [
            {
                "name": "cheap",
                "deployments": [
                    {
                        "provider": "openai_compatible",
                        "base_url": fake_openai.url + "/v1",  # type: ignore[attr-defined]
                        "model": "upstream-chat",
                        "api_key": "sk-upstream",
                        # big prices so that one request is worth cents: ~$0.02 each
                        "price": {"input": 1000, "output": 2000},
                    }
                ],
            }
        ],
    }
    path = tmp_path / "kaiyuan.yaml"
    path.write_text(yaml.safe_dump(cfg))
    procs: list[subprocess.Popen[bytes]] = []
    urls = []
    for i in range(N_REPLICAS):
        port = _free_port()
        log = open(tmp_path / f"replica{i}.log", "wb")
        procs.append(
            subprocess.Popen(
                [sys.executable, "-m", "kaiyuan", "serve", "--config", str(path), "--port", str(port)],
                stdout=log, stderr=subprocess.STDOUT, env=dict(os.environ),
            )
        )
        urls.append(f"http://127.0.0.1:{port}")
    try:
        for url, p in zip(urls, procs, strict=True):
            for _ in range(300):
                if p.poll() is not None:
                    raise RuntimeError(f"replica exited: {(tmp_path / 'replica0.log').read_text()[-2000:]}")
                try:
                    if http("GET", url + "/healthz").status_code == 200:
                        break
                except OSError:
                    pass
                time.sleep(0.1)
            else:
                raise RuntimeError(f"replica {url} did not start")
        yield urls, engine
    finally:
        for p in procs:
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)
        for p in procs:
            try:
                p.wait(timeout=30)
            except subprocess.TimeoutExpired:
                p.kill()
        engine.dispose()
        drop_pg_database(PG_URL, db_url)


def test_budgets_and_limits_hold_across_replicas(replicas: tuple[list[str], Any]) -> None:
    urls, engine = replicas

    def admin(method: str, path: str, body: Any = None) -> Any:
        r = http(method, urls[0] + path, body, MASTER)
        assert r.status_code in (200, 201), r.text
        return r.json()

    team = admin("POST", "/admin/teams", {"name": "shared"})
    admin("POST", "/admin/budgets", {"scope": "team", "scope_id": team["id"], "period": "month", "limit_usd": 0.25})
    keys = {
        "total": admin("POST", "/admin/keys", {"name": "total", "budgets": [{"period": "total", "limit_usd": 0.30}]}),
        "day": admin("POST", "/admin/keys", {"name": "day", "budgets": [{"period": "day", "limit_usd": 0.20}]}),
        "team1": admin("POST", "/admin/keys", {"name": "t1", "team_id": team["id"]}),
        "team2": admin("POST", "/admin/keys", {"name": "t2", "team_id": team["id"]}),
        "rpm": admin("POST", "/admin/keys", {"name": "rpm", "rpm": 6}),
        "tpm": admin("POST", "/admin/keys", {"name": "tpm", "tpm": 40}),
    }

    def one(job: tuple[str, int]) -> tuple[str, str, float]:
        name, i = job
        c = openai.OpenAI(base_url=urls[i % len(urls)] + "/v1", api_key=keys[name]["key"], max_retries=0)
        t = time.time()
        try:
            if i % 4 == 0:
                s = c.chat.completions.create(
                    model="cheap", messages=[{"role": "user", "content": f"stream number {i}"}], max_tokens=20, stream=True
                )
                for _ in s:
                    pass
            else:
                c.chat.completions.create(model="cheap", messages=[{"role": "user", "content": f"number {i}"}], max_tokens=20)
            return name, "ok", t
        except openai.RateLimitError as e:
            return name, str(e.code), t

    jobs = [(name, i) for i in range(24) for name in keys]
    with cf.ThreadPoolExecutor(16) as ex:
        results = list(ex.map(one, jobs))

    def count(name: str, outcome: str) -> int:
        return sum(1 for n, o, _ in results if n == name and o == outcome)

    # every budget was reached (some requests refused) ...
    for name in ("total", "day", "team1"):
        assert count(name, "budget_exceeded") > 0, name
    # ... rate limits hold globally: 6 per minute window, whichever replica served the request
    rpm_times = [t for n, _o, t in results if n == "rpm"]
    windows = len({int(t // 60) for t in rpm_times})
    assert 6 <= count("rpm", "ok") <= 6 * windows
    assert count("rpm", "rpm_limit_exceeded") > 0
    assert count("tpm", "tpm_limit_exceeded") > 0

    time.sleep(1.0)  # five flush intervals: every replica has written its request log and ledger batches
    with engine.connect() as conn:
        def log_sum(col: Any, value: str) -> float:
            return float(conn.execute(select(func.coalesce(func.sum(request_log.c.cost_usd), 0)).where(col == value)).scalar_one())

        spent_total = log_sum(request_log.c.key_id, keys["total"]["id"])
        spent_day = log_sum(request_log.c.key_id, keys["day"]["id"])
        spent_team = log_sum(request_log.c.team_id, team["id"])
        # never over a budget, not even by one request
        assert 0 < spent_total <= 0.30
        assert 0 < spent_day <= 0.20
        assert 0 < spent_team <= 0.25
        logged = float(conn.execute(select(func.sum(request_log.c.cost_usd))).scalar_one() or 0)
        ledger = float(conn.execute(select(func.sum(spend_ledger.c.cost_usd))).scalar_one() or 0)
        n_log = conn.execute(select(func.count()).select_from(request_log).where(request_log.c.cost_usd.is_not(None))).scalar_one()
        n_ledger = conn.execute(select(func.count()).select_from(spend_ledger)).scalar_one()
    assert n_log == n_ledger > 0
    assert round(ledger, 2) == round(logged, 2) and abs(ledger - logged) < 1e-9
