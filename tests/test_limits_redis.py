"""Counters in Redis (many replicas), and what happens when Redis is unreachable."""

from __future__ import annotations

import asyncio
import os
import uuid
from collections.abc import Callable
from typing import Any

import openai
import pytest

from kaiyuan.limits.counters import (
    NANO,
    BudgetCheck,
    Denial,
    MemoryCounters,
    RateCheck,
    RedisCounters,
    Ticket,
)
from kaiyuan.testing.fake_openai import FakeOpenAI
from kaiyuan.testing.harness import RunningGateway
from tests.conftest import openai_model
from tests.http import http

REDIS_URL = os.environ.get("KAIYUAN_TEST_REDIS_URL")
needs_redis = pytest.mark.skipif(
    not REDIS_URL, reason="set KAIYUAN_TEST_REDIS_URL (e.g. redis://127.0.0.1:6390/0) to run the Redis tests"
)
MASTER = "sk-master-test"


async def _burst(counters: list[Any], n: int, limit: int, reserve: int, counter: str) -> tuple[int, int]:
    """n concurrent admits spread over several counter instances (replicas); returns (admitted, denied)."""

    async def one(i: int) -> Ticket | Denial:
        c = counters[i % len(counters)]
        return await c.admit([RateCheck(f"key:{counter}", None, None, None)], [BudgetCheck(counter, limit, 0, reserve, 3600)], 10, 1e9)

    res = await asyncio.gather(*(one(i) for i in range(n)))
    ok = [r for r in res if isinstance(r, Ticket)]
    return len(ok), len(res) - len(ok)


@needs_redis
async def test_redis_budget_is_global_across_replicas() -> None:
    assert REDIS_URL
    replicas = [RedisCounters(REDIS_URL) for _ in range(3)]
    counter = f"bud_test_{uuid.uuid4().hex}:0"
    try:
        admitted, denied = await _burst(replicas, 60, limit=10 * NANO, reserve=NANO, counter=counter)
        assert admitted == 10 and denied == 50  # exactly the budget, not 10 per replica
        spent, reserved = await replicas[0].peek_budget(counter) or (0, 0)
        assert (spent, reserved) == (0, 10 * NANO)
        # settle one at a lower real cost: the reservation is released, the real cost added (a
        # reservation of the counter's current generation, by a replica that holds some: each
        # releases only its own share, and which replicas got the 10 depends on how their
        # pipelined admits interleaved)
        gen = (await replicas[0].redis.hget(f"ky:bud:{counter}", "g")).decode()
        holder = [r for r in replicas if await r.redis.hget(f"ky:bud:{counter}", f"r:{r.replica}")][-1]
        t = Ticket([], [BudgetCheck(counter, 10 * NANO, 0, NANO, 3600, gen)], 0, 10, "redis")
        await holder.settle(t, [NANO // 4], 10)
        assert await replicas[2].peek_budget(counter) == (NANO // 4, 9 * NANO)
    finally:
        for r in replicas:
            await r.close()


@needs_redis
async def test_redis_rpm_and_parallel_are_global() -> None:
    assert REDIS_URL
    replicas = [RedisCounters(REDIS_URL) for _ in range(2)]
    scope = f"key:test_{uuid.uuid4().hex}"
    try:
        res = await asyncio.gather(*(replicas[i % 2].admit([RateCheck(scope, 7, None, None)], [], 5, 120.0) for i in range(20)))
        assert sum(isinstance(r, Ticket) for r in res) == 7
        denial = next(r for r in res if isinstance(r, Denial))
        assert denial.kind == "rpm" and denial.current == 7
        pscope = scope + ":p"
        res = await asyncio.gather(*(replicas[i % 2].admit([RateCheck(pscope, None, None, 2)], [], 5, 120.0) for i in range(5)))
        tickets = [r for r in res if isinstance(r, Ticket)]
        assert len(tickets) == 2
        await replicas[0].settle(tickets[0], [], 5)
        again = await replicas[1].admit([RateCheck(pscope, None, None, 2)], [], 5, 120.0)
        assert isinstance(again, Ticket)
    finally:
        for r in replicas:
            await r.close()


async def test_memory_counters_match_the_lua_semantics() -> None:
    m = MemoryCounters()
    admitted, denied = await _burst([m], 30, limit=5 * NANO, reserve=NANO, counter="b:0")
    assert (admitted, denied) == (5, 25)
    d = await m.admit([], [BudgetCheck("b:0", 5 * NANO, 0, 1, None)], 0, 0.0)
    assert isinstance(d, Denial) and d.kind == "budget" and d.reserved == 5 * NANO


def _unreachable_gateway(make_gateway: Callable[[dict[str, Any]], RunningGateway], url: str, mode: str) -> RunningGateway:
    return make_gateway(
        {
            "server": {"master_key": MASTER},
            "limits": {"backend": "redis", "redis_url": "redis://127.0.0.1:1/0", "on_redis_error": mode},
            "models": [openai_model("cheap", url, "upstream-chat", deployment={"price": {"input": 1, "output": 2}})],
        }
    )


def _key(gw: RunningGateway, **body: Any) -> str:
    r = http("POST", gw.url + "/admin/keys", {"name": "k", **body}, MASTER)
    assert r.status_code == 201, r.text
    return str(r.json()["key"])


def test_redis_down_fails_closed_by_default(make_gateway: Callable[[dict[str, Any]], RunningGateway], fake_openai: FakeOpenAI) -> None:
    gw = _unreachable_gateway(make_gateway, fake_openai.url, "fail_closed")  # type: ignore[attr-defined]
    key = _key(gw, budgets=[{"period": "month", "limit_usd": 5}])
    c = openai.OpenAI(base_url=gw.base_url, api_key=key, max_retries=0)
    with pytest.raises(openai.APIStatusError) as e:
        c.chat.completions.create(model="cheap", messages=[{"role": "user", "content": "hi"}])
    assert e.value.status_code == 503 and "Redis unreachable" in str(e.value)
    assert e.value.response.headers.get("Retry-After") == "1"
    plain = _key(gw)  # no limits, no budget: Redis is not needed
    openai.OpenAI(base_url=gw.base_url, api_key=plain, max_retries=0).chat.completions.create(
        model="cheap", messages=[{"role": "user", "content": "hi"}]
    )
    metrics = http("GET", gw.url + "/metrics").text
    assert 'kaiyuan_limits_redis_errors_total{action="fail_closed"} 1.0' in metrics


def test_redis_down_falls_back_to_local_limits(make_gateway: Callable[[dict[str, Any]], RunningGateway], fake_openai: FakeOpenAI) -> None:
    gw = _unreachable_gateway(make_gateway, fake_openai.url, "local")  # type: ignore[attr-defined]
    key = _key(gw, rpm=2)
    c = openai.OpenAI(base_url=gw.base_url, api_key=key, max_retries=0)
    outcomes = []
    for _ in range(3):
        try:
            c.chat.completions.create(model="cheap", messages=[{"role": "user", "content": "hi"}])
            outcomes.append("ok")
        except openai.RateLimitError:
            outcomes.append("429")
    assert outcomes.count("ok") in (2, 3) and outcomes[0] == "ok"  # 3 only if a minute boundary fell inside
    assert 'kaiyuan_limits_redis_errors_total{action="local"}' in http("GET", gw.url + "/metrics").text


@needs_redis
def test_revocation_reaches_other_replicas_at_once(servers: Any, fake_openai: FakeOpenAI, tmp_path: Any) -> None:
    from kaiyuan.testing.harness import start_gateway
    from tests.conftest import _stop_gateway

    cfg = {
        "server": {"master_key": MASTER},
        "limits": {"backend": "redis", "redis_url": REDIS_URL, "key_cache_ttl_s": 600},  # the cache alone would wait 10 min
        "models": [openai_model("cheap", fake_openai.url, "upstream-chat", deployment={"price": {"input": 1, "output": 2}})],  # type: ignore[attr-defined]
    }
    db = f"sqlite:///{tmp_path}/shared.db"
    a = start_gateway(servers, cfg, db)
    b = start_gateway(servers, cfg, db)
    try:
        key = http("POST", a.url + "/admin/keys", {"name": "k", "rpm": 1000}, MASTER).json()
        cb = openai.OpenAI(base_url=b.base_url, api_key=key["key"], max_retries=0)
        for _ in range(2):  # cached on b now (and b is listening for changes)
            cb.chat.completions.create(model="cheap", messages=[{"role": "user", "content": "hi"}])
        import time

        import redis

        r = redis.Redis.from_url(REDIS_URL)
        for _ in range(100):  # b subscribes to key changes when it serves its first request
            if r.pubsub_numsub("ky:invalidate")[0][1] >= 1:
                break
            time.sleep(0.02)
        r.close()
        assert http("POST", a.url + f"/admin/keys/{key['id']}/revoke", {}, MASTER).status_code == 200
        for _ in range(50):
            try:
                cb.chat.completions.create(model="cheap", messages=[{"role": "user", "content": "hi"}])
            except openai.AuthenticationError as e:
                assert e.code == "key_revoked"
                break
            time.sleep(0.05)
        else:
            pytest.fail("replica b kept accepting a key revoked on replica a")
    finally:
        _stop_gateway(servers, a)
        _stop_gateway(servers, b)
