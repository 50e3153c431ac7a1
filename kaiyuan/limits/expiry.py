"""Reservations expire with the replica that made them.

Why: a replica that dies between admit and settle (SIGKILL, OOM, a lost machine) used to leave its
requests' budget reservations counted until the budget period ended, so a team could be refused
for the rest of the month. Released outright, though, they undercount: those requests may have
reached the upstream, which bills them, and no settle or ledger row will ever say so. So a dead
replica's reservations are turned into spend (at their worst-case cost: a little more than was
spent, never less), and stop counting as reserved.

How: every budget counter keeps, beside the total reserved ``r``, each replica's share
``r:<replica>``, and a set ``resof:<replica>`` names the counters where a replica holds some.
Each replica refreshes a heartbeat key (``hb:<replica>``, ``ttl_s``) every ``every_s`` and sweeps
the others: a replica whose heartbeat has stayed missing for 2.5 sweep intervals (so a Redis
pause, which expires every heartbeat at once, does not count: live replicas beat again within an
interval) has its shares turned into spend. Its late settles, if it was only stalled, release
nothing more (a settle releases at most its replica's share) and add their real cost again:
counted twice, which only refuses early.
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Any

log = logging.getLogger("kaiyuan.limits")

HEARTBEAT_TTL_S = 30
SWEEP_EVERY_S = 10.0
MISSING_FOR = 2.5  # sweep intervals a heartbeat must stay missing (a live replica's beat may wait out a timeout)
RESOF_TTL_S = 40 * 86400

# The dead replica's share moves from reserved to spent: its requests may have reached the upstream
# (and be billed) without a settle or a ledger row.
# KEYS: the budget hash, the dead replica's heartbeat key. ARGV: its replica id.
RECLAIM_LUA = """
if redis.call('EXISTS', KEYS[2]) == 1 then return -1 end
local f = 'r:' .. ARGV[1]
local mine = redis.call('HGET', KEYS[1], f)
if not mine then return 0 end
local r = tonumber(redis.call('HGET', KEYS[1], 'r') or '0')
if r < tonumber(mine) then redis.call('HSET', KEYS[1], 'r', '0') else redis.call('HINCRBY', KEYS[1], 'r', '-' .. mine) end
if redis.call('HEXISTS', KEYS[1], 's') == 1 then redis.call('HINCRBY', KEYS[1], 's', mine) end
redis.call('HDEL', KEYS[1], f)
return 1
"""


class Liveness:
    """This replica's heartbeat, and the sweep that releases dead replicas' reservations."""

    def __init__(self, redis: Any, prefix: str, replica: str, ttl_s: int = HEARTBEAT_TTL_S, every_s: float = SWEEP_EVERY_S) -> None:
        self.redis = redis
        self.prefix = prefix
        self.replica = replica
        self.ttl_s = ttl_s
        self.every_s = every_s
        self._reclaim = redis.register_script(RECLAIM_LUA)
        self._missing: dict[str, float] = {}  # replica -> when its heartbeat was first seen missing
        self._task: asyncio.Task[None] | None = None
        self.released = 0  # reservations released (tests, logs)

    def key(self, replica: str) -> str:
        return f"{self.prefix}hb:{replica}"

    def resof(self, replica: str) -> str:
        return f"{self.prefix}resof:{replica}"

    async def beat(self) -> None:
        await self.redis.set(self.key(self.replica), "1", ex=self.ttl_s)
        await self.redis.sadd(f"{self.prefix}replicas", self.replica)

    def start(self) -> None:
        if self._task is None:
            self._task = asyncio.create_task(self._run(), name="kaiyuan-limits-liveness")

    async def _run(self) -> None:
        while True:
            await asyncio.sleep(self.every_s)
            try:
                await self.beat()
                await self.sweep()
            except asyncio.CancelledError:
                raise
            except Exception as e:  # Redis down: the next round tries again
                self._missing.clear()  # what was seen before the outage proves nothing after it
                log.warning("reservation heartbeat failed (%s); retrying in %.0f s", e, self.every_s)

    async def sweep(self) -> None:
        now = time.monotonic()
        members = {m.decode() if isinstance(m, bytes) else str(m) for m in await self.redis.smembers(f"{self.prefix}replicas")}
        for other in members - {self.replica}:
            if await self.redis.exists(self.key(other)):
                self._missing.pop(other, None)
                continue
            first = self._missing.setdefault(other, now)
            if now - first >= MISSING_FOR * self.every_s:
                await self._release(other)
                self._missing.pop(other, None)

    async def _release(self, other: str) -> None:
        n = 0
        for k in await self.redis.smembers(self.resof(other)):
            key = k.decode() if isinstance(k, bytes) else str(k)
            got = int(await self._reclaim(keys=[key, self.key(other)], args=[other]))
            if got < 0:
                return  # it came back
            n += got
        await self.redis.delete(self.resof(other))
        await self.redis.srem(f"{self.prefix}replicas", other)
        self.released += n
        if n:
            log.warning("replica %s stopped (no heartbeat for over %d s): its reservations on %d budget counters "
                        "now count as spent",
                        other, self.ttl_s, n)

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
            self._task = None
