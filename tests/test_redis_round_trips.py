"""Redis costs a request exactly one round trip on its path (the admit); settles are batched off it,
retried without being applied twice, and flushed on shutdown.

Needs KAIYUAN_TEST_REDIS_URL (skipped with a reason otherwise).
"""

from __future__ import annotations

import asyncio
import os
import time
import uuid
from collections.abc import Callable
from typing import Any

import openai
import pytest

from kaiyuan.limits import settle_batch
from kaiyuan.limits.counters import NANO, BudgetCheck, RateCheck, RedisCounters, Ticket
from kaiyuan.limits.pipelining import AutoPipeline
from kaiyuan.limits.settle_batch import SettleBatcher
from kaiyuan.testing.fake_openai import FakeOpenAI
from kaiyuan.testing.harness import RunningGateway
from tests.conftest import openai_model
from tests.http import http

REDIS_URL = os.environ.get("KAIYUAN_TEST_REDIS_URL")
pytestmark = pytest.mark.skipif(
    not REDIS_URL, reason="set KAIYUAN_TEST_REDIS_URL (e.g. redis://127.0.0.1:6390/0) to run the Redis round-trip tests"
)
MASTER = "sk-master-rtt"
FLUSH_TASK = "kaiyuan-settle-flush"


class CallLog:
    """Wraps a redis.asyncio client's execute_command: every command (a pipeline would show up
    as its execute) is recorded with the asyncio task that sent it; so is every command handed to
    the counters' auto-pipeline (``pipeline``), each by the task that asked for it."""

    def __init__(self, client: Any, pipeline: AutoPipeline | None = None) -> None:
        self.calls: list[tuple[str, str]] = []
        inner = client.execute_command
        if pipeline is not None:
            self._wrap(pipeline)

        async def execute_command(*args: Any, **kw: Any) -> Any:
            task = asyncio.current_task()
            self.calls.append((task.get_name() if task else "?", str(args[0])))
            return await inner(*args, **kw)

        client.execute_command = execute_command
        pipeline = client.pipeline

        def counted_pipeline(*a: Any, **kw: Any) -> Any:
            pipe = pipeline(*a, **kw)
            run = pipe.execute

            async def execute(*ea: Any, **ekw: Any) -> Any:
                task = asyncio.current_task()
                self.calls.append((task.get_name() if task else "?", "PIPELINE"))
                return await run(*ea, **ekw)

            pipe.execute = execute
            return pipe

        client.pipeline = counted_pipeline

    def _wrap(self, pipeline: AutoPipeline) -> None:
        inner = pipeline.call

        async def call(packed: bytes, orphan: Any = None) -> Any:
            task = asyncio.current_task()
            self.calls.append((task.get_name() if task else "?", packed.split(b"\r\n")[2].decode()))
            return await inner(packed, orphan)

        pipeline.call = call  # type: ignore[method-assign]

    def on_path(self) -> list[str]:
        return [cmd for task, cmd in self.calls if task != FLUSH_TASK]

    def flushes(self) -> list[str]:
        return [cmd for task, cmd in self.calls if task == FLUSH_TASK]


@pytest.fixture
def rgw(make_gateway: Callable[[dict[str, Any]], RunningGateway], fake_openai: FakeOpenAI) -> RunningGateway:
    return make_gateway(
        {
            "server": {"master_key": MASTER},
            "limits": {"backend": "redis", "redis_url": REDIS_URL, "key_cache_ttl_s": 600},
            "models": [openai_model("cheap", fake_openai.url, "upstream-chat", deployment={"price": {"input": 1, "output": 2}})],  # type: ignore[attr-defined]
        }
    )


def _admin(gw: RunningGateway, method: str, path: str, body: Any = None) -> Any:
    r = http(method, gw.url + path, body, MASTER)
    assert r.status_code in (200, 201), r.text
    return r.json()


def _budgets(gw: RunningGateway, key_id: str) -> list[dict[str, Any]]:
    return list(_admin(gw, "GET", f"/admin/keys/{key_id}")["budgets"])


def test_one_redis_round_trip_per_request(rgw: RunningGateway) -> None:
    team = _admin(rgw, "POST", "/admin/teams", {"name": f"t{uuid.uuid4().hex[:6]}", "rpm": 1000, "max_parallel": 50})
    _admin(rgw, "POST", "/admin/budgets", {"scope": "team", "scope_id": team["id"], "period": "month", "limit_usd": 100})
    key = _admin(rgw, "POST", "/admin/keys", {
        "name": "rtt", "team_id": team["id"], "rpm": 1000, "tpm": 10**7, "max_parallel": 1,
        "budgets": [{"period": "day", "limit_usd": 50}, {"period": "total", "limit_usd": 80}],
    })
    c = openai.OpenAI(base_url=rgw.base_url, api_key=key["key"], max_retries=0)
    msgs = [{"role": "user", "content": "hello"}]
    c.chat.completions.create(model="cheap", messages=msgs, max_tokens=20)  # warm: key cache, script load
    counters = rgw.gateway.reservations.counters
    assert isinstance(counters, RedisCounters)
    _wait_applied(counters, 1)  # the warm-up's settle is not counted below
    log = CallLog(counters.redis, counters.pipeline)
    n = 6
    for i in range(n):  # back to back with max_parallel=1: never refused for its own finished request
        if i % 2:
            for _ in c.chat.completions.create(model="cheap", messages=msgs, max_tokens=20, stream=True):
                pass
        else:
            c.chat.completions.create(model="cheap", messages=msgs, max_tokens=20)
    on_path = log.on_path()
    # exactly one command per request on its path, and it is the admit script
    assert on_path == ["EVALSHA"] * n, log.calls
    # the settles went out from the background task, batched: never more EVALSHAs than requests
    _wait_applied(counters, n + 1)
    assert counters.batcher.applied == n + 1 and counters.batcher.dropped == 0
    assert 1 <= log.flushes().count("EVALSHA") <= n
    # every reservation was released and the real cost added, in every budget (key and team)
    rows = [r for r in rgw.log_rows() if r["key_id"] == key["id"]]
    spent = sum(r["cost_usd"] for r in rows)
    assert len(rows) == n + 1 and spent > 0
    for b in _budgets(rgw, key["id"]):
        assert b["reserved_usd"] == 0
        assert b["spent_usd"] == pytest.approx(spent, abs=1e-9)


def _wait_applied(counters: RedisCounters, n: int) -> None:
    for _ in range(250):
        if counters.batcher.applied >= n and not len(counters.batcher) and counters.batcher.inflight_marker is None:
            return
        time.sleep(0.02)


def _ticket(counter: str, scope: str, reserve: int) -> Ticket:
    return Ticket([RateCheck(scope, None, 1000, 5)], [BudgetCheck(counter, 100 * NANO, 0, reserve, 3600)], 0, 10, "redis")


async def test_a_retried_batch_is_applied_once_and_close_flushes() -> None:
    assert REDIS_URL
    rc = RedisCounters(REDIS_URL)
    counter, scope = f"rtt_{uuid.uuid4().hex}:0", f"key:rtt_{uuid.uuid4().hex}"
    try:
        tickets = []
        for _ in range(3):
            t = await rc.admit([RateCheck(scope, None, 1000, 5)], [BudgetCheck(counter, 100 * NANO, 0, NANO, 3600)], 10, 30.0)
            assert isinstance(t, Ticket)
            tickets.append(t)
        assert await rc.peek_budget(counter) == (0, 3 * NANO)
        # the same batch sent twice (a retry after a lost reply) is applied once
        keys, args = rc.batcher.encode([(tickets[0], [NANO // 10], 25)], "ky:settled:test:retried")
        script = rc.redis.register_script(settle_batch.SETTLE_MANY_LUA)
        assert await script(keys=keys, args=args) == 1
        assert await script(keys=keys, args=args) == 0
        assert await rc.peek_budget(counter) == (NANO // 10, 2 * NANO)
        assert int(await rc.redis.get(f"ky:par:{scope}")) == 2
        assert int(await rc.redis.get(f"ky:tpm:{scope}:0")) == 30 + 15  # corrected by total - prompt
        # queued settles count as free parallel slots for this replica's next admit ...
        for t in tickets[1:]:
            assert rc.settle_later(t, [NANO // 10], 10)
        assert rc.batcher.pending_parallel[scope] == 2
        # ... and close() applies what is queued before the connection goes
        await rc.close()
        assert rc.batcher.applied == 2 and not rc.batcher.pending_parallel
        assert not rc.settle_later(tickets[1], [0], 10)  # closed: the caller settles in-line
    finally:
        check = RedisCounters(REDIS_URL)
        assert await check.peek_budget(counter) == (3 * (NANO // 10), 0)
        assert int(await check.redis.get(f"ky:par:{scope}")) == 0
        await check.close()


async def test_queued_and_in_flight_releases_free_parallel_slots_at_admit() -> None:
    assert REDIS_URL
    rc = RedisCounters(REDIS_URL)
    bt = rc.batcher
    scope = f"key:par_{uuid.uuid4().hex}"
    rate = [RateCheck(scope, None, None, 1)]
    try:
        t = await rc.admit(rate, [], 1, 30.0)
        assert isinstance(t, Ticket)
        refused = await rc.admit(rate, [], 1, 30.0)
        assert not isinstance(refused, Ticket) and refused.kind == "parallel"
        # queued, not sent yet (what put() does, minus waking the task): the slot counts as free
        bt._queue.append((t, [], 1))
        bt.pending_parallel[scope] = 1
        t2 = await rc.admit(rate, [], 1, 30.0)
        assert isinstance(t2, Ticket)
        await bt.drain()
        assert int(await rc.redis.get(f"ky:par:{scope}")) == 1  # exactly t2
        # in flight (sent, reply not back): free while the batch's marker is absent in Redis ...
        keys, args = bt.encode([(t2, [], 1)], f"ky:settled:test:{uuid.uuid4().hex}")
        bt.inflight_marker, bt.inflight_parallel = keys[0], {scope: 1}
        t3 = await rc.admit(rate, [], 1, 30.0)
        assert isinstance(t3, Ticket)
        # ... and no longer discounted once the batch has landed (its release is in the count now)
        script = rc.redis.register_script(settle_batch.SETTLE_MANY_LUA)
        assert await script(keys=keys, args=args) == 1
        late = await rc.admit(rate, [], 1, 30.0)
        assert not isinstance(late, Ticket) and late.kind == "parallel" and late.current == 1  # t3 is in flight
        bt.inflight_marker, bt.inflight_parallel = None, {}
    finally:
        await rc.close()


async def test_unreachable_redis_batch_is_retried_then_dropped(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(settle_batch, "RETRY_FOR_S", 0.3)
    events: list[tuple[str, int]] = []
    import redis.asyncio as aioredis

    client = aioredis.from_url("redis://127.0.0.1:1/0", socket_connect_timeout=0.2)
    b = SettleBatcher(client, "ky:", "test-replica", lambda what, n: events.append((what, n)))
    try:
        b.put(_ticket("c:0", "key:x", NANO), [0], 10)
        assert b.pending_parallel == {"key:x": 1}
        for _ in range(100):
            if b.dropped:
                break
            await asyncio.sleep(0.02)
        assert b.dropped == 1 and b.applied == 0 and not b.pending_parallel
        assert ("retry", 1) in events and events[-1] == ("dropped", 1)
    finally:
        await b.close(0.1)
        await client.aclose()
