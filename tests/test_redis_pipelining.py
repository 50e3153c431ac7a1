"""The auto-pipeline (kaiyuan/limits/pipelining.py) against a real Redis: many commands share one
write, each still gets its own reply in order, an error reply fails only its command, a dropped
connection is resent on, a paused Redis times the batch out, and the queue is bounded.

Needs redis-server on PATH (a private one per test, restarted and paused: tests/services.py).
"""

from __future__ import annotations

import asyncio
import uuid
from typing import Any

import pytest
import redis.asyncio as aioredis
from redis.exceptions import NoScriptError, ResponseError
from redis.exceptions import TimeoutError as RedisTimeoutError

from kaiyuan.limits import pipelining
from kaiyuan.limits.counters import NANO, BudgetCheck, RateCheck, RedisCounters, Ticket
from kaiyuan.limits.pipelining import AutoPipeline, PipelineFull, pack
from tests.services import PrivateRedis


@pytest.mark.parametrize("packer", [pack, pipelining.pack_py])
def test_pack_is_resp_for_text_and_integers(packer: Any) -> None:
    """The same bytes from hiredis's packer (when installed: ``pack``) and the Python one."""
    assert packer(["SET", "k", 12]) == b"*3\r\n$3\r\nSET\r\n$1\r\nk\r\n$2\r\n12\r\n"
    assert packer(["SET", "clé", -1]) == b"*3\r\n$3\r\nSET\r\n$4\r\ncl\xc3\xa9\r\n$2\r\n-1\r\n"  # length in bytes
    assert packer(["EVALSHA", "f" * 40, 2, "ky:a", "ky:b", 0, 10**12]) == pipelining.pack_py(
        ["EVALSHA", "f" * 40, 2, "ky:a", "ky:b", 0, 10**12])


async def test_concurrent_commands_share_writes_and_each_gets_its_own_reply(redis_server: PrivateRedis) -> None:
    client = aioredis.Redis.from_url(redis_server.url)
    pipe = AutoPipeline(client, 5.0)
    base = uuid.uuid4().hex
    try:
        n = 300
        replies = await asyncio.gather(*(pipe.call(pack(["INCRBY", f"{base}:{i % 7}", i])) for i in range(n)))
        # in issue order: each key's running total, as Redis computed it command by command
        totals: dict[int, int] = {}
        for i, r in enumerate(replies):
            totals[i % 7] = totals.get(i % 7, 0) + i
            assert r == totals[i % 7]
        assert pipe.commands == n and pipe.batches < 5  # one write carried many commands
        # text that is not ASCII goes through as UTF-8
        assert await pipe.call(pack(["SET", f"{base}:t", "naïve 数据"])) in (b"OK", "OK", True)
        assert (await client.get(f"{base}:t")).decode() == "naïve 数据"
    finally:
        await pipe.close()
        await client.aclose()


async def test_an_error_reply_fails_only_its_own_command(redis_server: PrivateRedis) -> None:
    client = aioredis.Redis.from_url(redis_server.url)
    pipe = AutoPipeline(client, 5.0)
    key = uuid.uuid4().hex
    try:
        calls = [
            pipe.call(pack(["INCR", key])),
            pipe.call(pack(["EVALSHA", "0" * 40, 0])),  # no such script
            pipe.call(pack(["HSET", key, "f", 1])),  # wrong type for the key
            pipe.call(pack(["INCR", key])),
        ]
        out = await asyncio.gather(*calls, return_exceptions=True)
        assert out[0] == 1 and out[3] == 2
        assert isinstance(out[1], NoScriptError)
        assert isinstance(out[2], ResponseError) and "WRONGTYPE" in str(out[2])
    finally:
        await pipe.close()
        await client.aclose()


async def test_a_connection_dropped_by_a_restart_is_resent_on_at_once(redis_server: PrivateRedis) -> None:
    client = aioredis.Redis.from_url(redis_server.url)
    pipe = AutoPipeline(client, 5.0)
    try:
        assert await pipe.call(pack(["INCR", "a"])) == 1
        redis_server.restart_empty()  # the pipeline's connection is stale now
        assert await asyncio.gather(*(pipe.call(pack(["INCR", "a"])) for _ in range(5))) == [1, 2, 3, 4, 5]
    finally:
        await pipe.close()
        await client.aclose()


async def test_a_paused_redis_times_the_batch_out_and_the_next_batch_reconnects(redis_server: PrivateRedis) -> None:
    client = aioredis.Redis.from_url(redis_server.url)
    pipe = AutoPipeline(client, 0.3)
    try:
        assert await pipe.call(pack(["PING"])) in (b"PONG", "PONG", True)
        redis_server.pause()
        out = await asyncio.gather(*(pipe.call(pack(["INCR", "p"])) for _ in range(3)), return_exceptions=True)
        assert all(isinstance(e, RedisTimeoutError) for e in out), out
        redis_server.resume()
        assert isinstance(await pipe.call(pack(["INCR", "p"])), int)
    finally:
        redis_server.resume()
        await pipe.close()
        await client.aclose()


async def test_a_caller_gone_before_the_write_is_not_sent_and_the_queue_is_bounded(
        redis_server: PrivateRedis, monkeypatch: pytest.MonkeyPatch) -> None:
    client = aioredis.Redis.from_url(redis_server.url)
    pipe = AutoPipeline(client, 5.0)
    key = uuid.uuid4().hex
    try:
        gone = asyncio.ensure_future(pipe.call(pack(["INCR", key])))
        await asyncio.sleep(0)  # queued; the batch starts at the end of this turn
        gone.cancel()
        assert await pipe.call(pack(["INCR", key])) == 1  # the cancelled INCR never reached Redis
        monkeypatch.setattr(pipelining, "MAX_QUEUE", 2)
        calls = [asyncio.ensure_future(pipe.call(pack(["INCR", key]))) for _ in range(3)]
        out = await asyncio.gather(*calls, return_exceptions=True)
        assert out[:2] == [2, 3] and isinstance(out[2], PipelineFull)
    finally:
        await pipe.close()
        await client.aclose()


async def test_counters_reload_their_scripts_after_a_restart_and_settle_in_the_same_pipeline(redis_server: PrivateRedis) -> None:
    rc = RedisCounters(redis_server.url)
    counter, scope = f"b{uuid.uuid4().hex}:0", f"key:{uuid.uuid4().hex}"

    async def admit(seed: int = 0) -> Ticket:
        t = await rc.admit([RateCheck(scope, 100, None, 2)], [BudgetCheck(counter, 10 * NANO, seed, NANO, 3600)], 1, 0.0)
        assert isinstance(t, Ticket), t
        return t

    try:
        t = await admit()
        assert rc.settle_later(t, [NANO // 2], 1)
        await rc.batcher.drain()
        assert await rc.peek_budget(counter) == (NANO // 2, 0)
        assert rc.pipeline.commands >= 2  # the admit and the settle batch both went through it
        redis_server.restart_empty()  # scripts and counters gone: NOSCRIPT, then redis-py loads them
        await admit(seed=3 * NANO)
        assert await rc.peek_budget(counter) == (3 * NANO, NANO)
    finally:
        await rc.close()


async def test_an_admit_whose_caller_left_after_it_was_written_is_given_back(redis_server: PrivateRedis) -> None:
    """A client that hangs up while its admit is on the wire: the admit runs, nothing would ever
    settle it, so its reservation, parallel slot and tokens are given back when its reply arrives."""
    rc = RedisCounters(redis_server.url)
    counter, scope = f"b{uuid.uuid4().hex}:0", f"key:{uuid.uuid4().hex}"

    def admit() -> Any:
        return rc.admit([RateCheck(scope, 100, 10**6, 2)], [BudgetCheck(counter, 10 * NANO, 0, NANO, 3600)], 7, 0.0)

    try:
        t = await admit()  # the clock offset is measured and the script loaded
        assert isinstance(t, Ticket) and rc.settle_later(t, [0], 7)
        await rc.batcher.drain()
        sent = rc.pipeline.batches
        redis_server.pause()
        caller = asyncio.ensure_future(admit())
        for _ in range(200):  # until the admit is written (into the socket of the stopped Redis)
            if rc.pipeline.batches > sent:
                break
            await asyncio.sleep(0.005)
        assert rc.pipeline.batches > sent
        caller.cancel()
        redis_server.resume()  # well within the admit's 2 s deadline: it runs and reserves
        for _ in range(300):
            await rc.batcher.drain()
            if await rc.peek_budget(counter) == (0, 0) and rc.batcher.applied >= 2:
                break
            await asyncio.sleep(0.01)
        assert await rc.peek_budget(counter) == (0, 0)
        assert int(await rc.redis.get(f"ky:par:{scope}") or 0) == 0
        assert int(await rc.redis.get(f"ky:tpm:{scope}:0") or 0) == 7  # the first admit's 7; the orphan's given back
    finally:
        redis_server.resume()
        await rc.close()
