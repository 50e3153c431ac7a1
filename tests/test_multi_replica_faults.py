"""Three gateway processes sharing a private PostgreSQL and a private Redis, under load, through
faults: Redis restarted empty, Redis paused (SIGSTOP) and resumed, PostgreSQL stopped and
started, and a replica killed (SIGKILL). Then the load runs the shared budget out.

What must hold (issue 9):
- overspend: the upstream's bill (requests it received x the cost of one) is at most the budget
  plus one request's cost per replica;
- every request the upstream received has a ledger row, except what a SIGKILL can lose: the
  killed replica's requests in flight and its rows queued for at most one flush interval;
- no client ever sees a 500.

The fake upstream counts what it received. Each request costs the same (same prompt length, fixed
answer), so the bill is count x cost.
"""

from __future__ import annotations

import concurrent.futures as cf
import itertools
import os
import signal
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import openai
import pytest
from sqlalchemy import func, select

from kaiyuan.store.db import make_engine
from kaiyuan.store.schema import spend_ledger
from kaiyuan.testing.fake_openai import Behaviour, FakeOpenAI
from kaiyuan.testing.harness import GatewayProcess
from tests.http import http
from tests.services import PrivatePostgres, PrivateRedis

MASTER = "sk-master-faults"
N_REPLICAS = 3
BUDGET = 1.50
FLUSH_S = 0.2
REPO = str(Path(__file__).resolve().parents[1])


@dataclass
class Outcome:
    replica: int
    kind: str  # ok | budget | unavailable | gone (connection refused: a killed replica) | other
    at: float


@pytest.fixture
def cluster(fake_openai: FakeOpenAI, tmp_path: Path) -> Iterator[tuple[list[GatewayProcess], PrivateRedis, PrivatePostgres]]:
    redis = PrivateRedis(tmp_path)
    redis.start()
    pg = PrivatePostgres()
    pg.start()
    cfg = {
        "server": {"master_key": MASTER},
        "store": {"url": pg.url},
        "request_log": {"flush_interval_s": FLUSH_S},
        "accounting": {"spend_flush_interval_s": FLUSH_S},
        "limits": {"backend": "redis", "redis_url": redis.url, "key_cache_ttl_s": 1},
        "models": [{"name": "paid", "deployments": [{
            "provider": "openai_compatible", "base_url": fake_openai.url + "/v1",  # type: ignore[attr-defined]
            "model": "upstream-chat", "api_key": "sk-upstream", "price": {"input": 1000, "output": 2000},
        }]}],
    }
    procs: list[GatewayProcess] = []
    try:
        procs.append(GatewayProcess(cfg, str(tmp_path), env={"PYTHONPATH": REPO}))
        procs[0].wait_ready()  # the first one migrates the database
        for _ in range(N_REPLICAS - 1):
            procs.append(GatewayProcess(cfg, str(tmp_path), env={"PYTHONPATH": REPO}))
        for p in procs:
            p.wait_ready()
        yield procs, redis, pg
    finally:
        for p in procs:
            p.stop()
        redis.stop()
        pg.remove()


def test_budget_and_ledger_hold_through_redis_postgres_and_replica_faults(
    cluster: tuple[list[GatewayProcess], PrivateRedis, PrivatePostgres], fake_openai: FakeOpenAI,
) -> None:
    procs, redis, pg = cluster
    fake_openai.default = Behaviour(content="fixed answer", delay_first_byte=0.02)  # type: ignore[attr-defined]
    r = http("POST", procs[0].url + "/admin/keys", {"name": "load", "budgets": [{"period": "total", "limit_usd": BUDGET}]}, MASTER)
    assert r.status_code == 201, r.text
    key = r.json()["key"]
    clients = [openai.OpenAI(base_url=p.url + "/v1", api_key=key, max_retries=0, timeout=30) for p in procs]
    alive = set(range(N_REPLICAS))
    outcomes: list[Outcome] = []
    lock = threading.Lock()
    stop = threading.Event()
    seq = itertools.count()

    def one() -> None:
        i = next(seq)
        with lock:
            choices = sorted(alive)
        rep = choices[i % len(choices)]
        kind = "ok"
        try:
            clients[rep].chat.completions.create(model="paid", messages=[{"role": "user", "content": "same prompt"}], max_tokens=5)
        except openai.RateLimitError as e:
            kind = "budget" if e.code == "budget_exceeded" else f"other:{e.code}"
        except openai.InternalServerError as e:
            kind = "unavailable" if e.status_code == 503 else f"other:{e.status_code}:{e.message[:200]}"
        except openai.APIConnectionError:
            kind = "gone"
        with lock:
            outcomes.append(Outcome(rep, kind, time.monotonic()))

    def load() -> None:
        while not stop.is_set():
            one()

    def served_since(t: float) -> int:
        with lock:
            return sum(1 for o in outcomes if o.at >= t and o.kind == "ok")

    def run_until(n_ok: int, limit_s: float = 15) -> None:
        t, end = time.monotonic(), time.monotonic() + limit_s
        while served_since(t) < n_ok and time.monotonic() < end:
            time.sleep(0.05)

    with cf.ThreadPoolExecutor(4) as ex:
        workers = [ex.submit(load) for _ in range(4)]
        run_until(8)
        redis.restart_empty()  # 1. Redis restarted empty
        run_until(8)
        redis.pause()  # 2. Redis paused, then resumed
        time.sleep(3.0)
        redis.resume()
        run_until(8)
        pg.stop()  # 3. PostgreSQL stopped, then started
        time.sleep(1.5)
        pg.start()
        run_until(8)
        killed = N_REPLICAS - 1  # 4. a replica killed
        with lock:
            alive.discard(killed)
        kill_at = time.monotonic()
        procs[killed].proc.send_signal(signal.SIGKILL)
        # 5. run the budget out
        end = time.monotonic() + 30
        while time.monotonic() < end:
            with lock:
                recent = [o.kind for o in outcomes[-12:]]
            if len(recent) == 12 and all(k == "budget" for k in recent):
                break
            time.sleep(0.1)
        stop.set()
        for w in workers:
            w.result()

    time.sleep(5 * FLUSH_S)  # the live replicas write their last ledger batches
    kinds = [o.kind for o in outcomes]
    assert not [k for k in kinds if k.startswith("other")], sorted(set(kinds))
    assert "budget" in kinds, "the budget was never reached"
    received = len(fake_openai.requests)  # type: ignore[attr-defined]
    engine = make_engine(pg.url)
    try:
        with engine.connect() as conn:
            rows = conn.execute(select(func.count(), func.sum(spend_ledger.c.cost_usd), func.max(spend_ledger.c.cost_usd))).one()
    finally:
        engine.dispose()
    n_rows, ledger_usd, one_cost = int(rows[0]), float(rows[1] or 0), float(rows[2] or 0)
    assert one_cost > 0
    bill = received * one_cost
    # overspend: at most one request's cost per replica
    assert bill <= BUDGET + N_REPLICAS * one_cost + 1e-9, (
        f"upstream billed ${bill:.4f} for {received} requests on a ${BUDGET} budget (one request ${one_cost:.4f})")
    # every request the upstream received has a ledger row, but what the SIGKILL took: the killed
    # replica's requests in flight (answered 'gone') and those it answered in its last flush interval
    lost_budget = sum(1 for o in outcomes if o.replica == killed and (o.kind == "gone" or (o.kind == "ok" and o.at >= kill_at - 3 * FLUSH_S)))
    assert received - lost_budget <= n_rows <= received, (received, n_rows, lost_budget)
    assert abs(ledger_usd - n_rows * one_cost) < 1e-6  # every row is one same-cost request
    if os.environ.get("KAIYUAN_FAULTS_VERBOSE"):
        print(f"received={received} rows={n_rows} bill=${bill:.4f} budget=${BUDGET} outcomes="
              f"{ {k: kinds.count(k) for k in set(kinds)} }")
