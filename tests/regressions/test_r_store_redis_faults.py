"""Regressions (issue 9), Redis faults, against a private real Redis this test restarts and pauses:

- Redis restarted empty: the budget was re-seeded from a ledger read cached up to 60 s (65%
  overspend). Now it is seeded from the ledger read then, plus this replica's unwritten rows.
- Redis paused, then resumed: admits that had timed out ran late and leaked their reservations for
  good (12.7% of the budget). Now an admit carries a deadline and a late one counts nothing.
- After Redis came back, stale pooled connections gave 503s for 25 s. Now they reconnect at once.
- A reservation made before the restart must not release one made after it (generations), and
  this replica's reservations in flight are counted again in the re-made counter.
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Callable
from typing import Any

import openai

from kaiyuan.accounting.budget_seeds import BudgetSeeds
from kaiyuan.accounting.ledger import SpendLedger
from kaiyuan.limits.counters import (
    NANO,
    SEED_UNKNOWN,
    BudgetCheck,
    NeedSeed,
    RateCheck,
    RedisCounters,
    Ticket,
)
from kaiyuan.observability.metrics import Metrics
from kaiyuan.testing.fake_openai import FakeOpenAI
from kaiyuan.testing.harness import RunningGateway
from tests.conftest import openai_model
from tests.http import http
from tests.services import PrivateRedis

MASTER = "sk-master-redis-faults"


def _check(counter: str, reserve: int = NANO, seed: int = 0) -> BudgetCheck:
    return BudgetCheck(counter, 100 * NANO, seed, reserve, 3600)


async def _admit(rc: RedisCounters, counter: str, seed: int = 0) -> Any:
    return await rc.admit([RateCheck(f"key:{counter}", None, None, None)], [_check(counter, seed=seed)], 1, 0.0)


async def test_a_missing_counter_asks_for_a_seed_and_old_reservations_do_not_release_new_ones(redis_server: PrivateRedis) -> None:
    rc = RedisCounters(redis_server.url)
    counter = f"b{uuid.uuid4().hex}:0"
    try:
        assert isinstance(await _admit(rc, counter, SEED_UNKNOWN), NeedSeed)  # never guesses a seed
        old = await _admit(rc, counter, 5 * NANO)
        assert isinstance(old, Ticket) and await rc.peek_budget(counter) == (5 * NANO, NANO)
        redis_server.restart_empty()
        assert isinstance(await _admit(rc, counter, SEED_UNKNOWN), NeedSeed)  # reconnected, and asks again
        new = await _admit(rc, counter, 7 * NANO)
        assert isinstance(new, Ticket) and new.budgets[0].gen != old.budgets[0].gen
        # the old request ends: its cost counts, but its reservation (gone with the restart) must
        # not free the new request's one
        await rc.settle(old, [NANO // 2], 1)
        assert await rc.peek_budget(counter) == (7 * NANO + NANO // 2, NANO)
        # this replica re-counts its reservation in flight in the re-made counter ...
        seeds = BudgetSeeds(SpendLedger(None, 60, Metrics().store))
        again = RedisCounters(redis_server.url)
        t1 = await _admit(again, counter)
        await seeds.hold(t1, again, 0)
        redis_server.restart_empty()
        t2 = await _admit(again, counter, 0)
        await seeds.hold(t2, again, 0)  # a new generation: t1's reservation is counted in it again
        assert await again.peek_budget(counter) == (0, 2 * NANO)
        seeds.release(t1, 0, None)
        await again.settle(t1, [0], 1)  # ... and released by its settle
        assert await again.peek_budget(counter) == (0, NANO)
        await again.close()
    finally:
        await rc.close()


async def test_admits_that_reach_a_paused_redis_late_count_nothing(redis_server: PrivateRedis) -> None:
    rc = RedisCounters(redis_server.url)
    counter = f"b{uuid.uuid4().hex}:0"
    try:
        # five pooled connections, each idle and ready
        first = await asyncio.gather(*(_admit(rc, counter) for _ in range(5)))
        assert all(isinstance(t, Ticket) for t in first)
        for t in first:
            await rc.settle(t, [0], 1)
        assert await rc.peek_budget(counter) == (0, 0)
        redis_server.pause()
        late = await asyncio.gather(*(_admit(rc, counter) for _ in range(5)), return_exceptions=True)
        assert all(isinstance(e, Exception) for e in late)  # timed out: the callers answered 503
        redis_server.resume()
        await rc.redis.ping()  # answered after Redis has run the queued admits: each past its deadline
        assert await rc.peek_budget(counter) == (0, 0)  # nothing reserved for requests never served
        assert isinstance(await _admit(rc, counter), Ticket)
    finally:
        redis_server.resume()
        await rc.close()


async def test_stale_pooled_connections_reconnect_at_once_after_a_restart(redis_server: PrivateRedis) -> None:
    rc = RedisCounters(redis_server.url)
    counter = f"b{uuid.uuid4().hex}:0"
    try:
        assert all(isinstance(t, Ticket) for t in await asyncio.gather(*(_admit(rc, counter) for _ in range(8))))
        redis_server.restart_empty()
        # every pooled connection is stale now; each admit must still succeed on its first try
        again = await asyncio.gather(*(_admit(rc, counter, 0) for _ in range(8)), return_exceptions=True)
        assert all(isinstance(t, Ticket) for t in again), again
    finally:
        await rc.close()


def test_a_restarted_redis_is_reseeded_from_the_ledger_including_unwritten_rows(
    make_gateway: Callable[[dict[str, Any]], RunningGateway], fake_openai: FakeOpenAI, redis_server: PrivateRedis,
) -> None:
    url = fake_openai.url  # type: ignore[attr-defined]
    gw = make_gateway({
        "server": {"master_key": MASTER},
        "limits": {"backend": "redis", "redis_url": redis_server.url},
        "accounting": {"spend_flush_interval_s": 3600},  # the ledger rows stay queued, unwritten
        "models": [openai_model("paid", url, "upstream-chat", deployment={"price": {"input": 1000, "output": 2000}})],
    })
    r = http("POST", gw.url + "/admin/keys", {"name": "b", "budgets": [{"period": "day", "limit_usd": 0.5}]}, MASTER)
    assert r.status_code == 201, r.text
    c = openai.OpenAI(base_url=gw.base_url, api_key=r.json()["key"], max_retries=0)

    def one() -> str:
        try:
            c.chat.completions.create(model="paid", messages=[{"role": "user", "content": "hi"}], max_tokens=5)
            return "ok"
        except openai.RateLimitError as e:
            return str(e.code)

    served = [one() for _ in range(5)]
    assert served == ["ok"] * 5
    redis_server.restart_empty()
    results = [one() for _ in range(60)]
    assert results[0] == "ok"  # reconnected at once: no 503
    assert "budget_exceeded" in results
    ledger = gw.gateway.ledger
    rows = ledger.writer.rows()
    spent = sum(row.cost_usd or 0.0 for row in rows)
    one_request = max(row.cost_usd or 0.0 for row in rows)
    assert spent <= 0.5 + 1e-9, f"spent ${spent:.4f} of a $0.50 budget (one request: ${one_request:.4f})"
    assert spent >= 0.4  # and the budget was used (a reservation is larger than a request's real cost)


async def test_a_settle_redis_refuses_is_set_aside_and_the_rest_of_its_batch_applies(redis_server: PrivateRedis) -> None:
    events: list[tuple[str, int]] = []
    rc = RedisCounters(redis_server.url, on_settle_event=lambda what, n: events.append((what, n)))
    good, bad = f"g{uuid.uuid4().hex}:0", f"x{uuid.uuid4().hex}:0"
    try:
        tickets = [await _admit(rc, good) for _ in range(2)]
        poisoned = await _admit(rc, bad)
        assert all(isinstance(t, Ticket) for t in [*tickets, poisoned])
        await rc.redis.delete(f"ky:bud:{bad}")
        await rc.redis.set(f"ky:bud:{bad}", "not a hash")  # every script touching it fails (WRONGTYPE)
        for t in (tickets[0], poisoned, tickets[1]):
            assert rc.settle_later(t, [NANO // 10], 1)
        await rc.batcher.drain()
        assert await rc.peek_budget(good) == (2 * (NANO // 10), 0)  # both good settles applied
        assert ("set_aside", 1) in events and rc.batcher.applied == 2
    finally:
        await rc.close()


async def test_a_dead_replicas_reservations_become_spend_and_a_live_ones_stay_reserved(redis_server: PrivateRedis) -> None:
    """Reservations must not outlive their replica: one killed mid-request left them reserved until the
    period ended. They become spend: its requests may have been billed."""
    live, dead = RedisCounters(redis_server.url), RedisCounters(redis_server.url)
    for rc in (live, dead):
        rc.liveness.ttl_s, rc.liveness.every_s = 1, 0.5
    counter = f"b{uuid.uuid4().hex}:0"
    try:
        mine = await _admit(live, counter)
        assert isinstance(mine, Ticket) and isinstance(await _admit(dead, counter), Ticket)
        assert await live.peek_budget(counter) == (0, 2 * NANO)
        await dead.liveness.close()  # it stops beating, as a killed process does (its requests never settle)
        for _ in range(40):
            await asyncio.sleep(0.25)
            if live.liveness.released:
                break
        assert live.liveness.released == 1
        # the dead one's reservation counts as spent (its request may have reached the upstream, and
        # nothing will ever settle it); ours stays reserved
        assert await live.peek_budget(counter) == (NANO, NANO)
        await live.settle(mine, [NANO // 4], 1)
        assert await live.peek_budget(counter) == (NANO + NANO // 4, 0)
    finally:
        await live.close()
        await dead.close()
