"""Rate-limit and budget counters: in this process, or in Redis so they hold across replicas.

One ``admit`` checks every limit that applies to a request (RPM, TPM and parallel requests per
key and per team; every budget of the key and its team) and, only if all pass, counts the
request and reserves its worst-case cost. It is atomic: a single synchronous step in memory, a
single Lua script (one round trip) in Redis. ``settle`` releases the reservation and adds the
real cost; in Redis the request path only queues it (``settle_later``) and a background task applies
the queued settles in batches, one EVALSHA each (see ``settle_batch``), so Redis costs a request
exactly one round trip. Money is counted in integer nano-dollars so the sums are exact.

RPM and TPM use fixed one-minute windows (tolerance: one window). TPM counts the prompt tokens
at admit and corrects to the real total (prompt + completion) at settle.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any, Protocol

from kaiyuan.limits.settle_batch import OnEvent, SettleBatcher

NANO = 1_000_000_000
PARALLEL_TTL_S = 900  # a replica that dies mid-request stops holding a parallel slot after this


@dataclass(slots=True)
class RateCheck:
    scope: str  # "key:ID" | "team:ID"
    rpm: int | None
    tpm: int | None
    max_parallel: int | None


@dataclass(slots=True)
class BudgetCheck:
    counter: str  # budget id + period start: one counter per budget per period
    limit: int  # nano-USD
    seed: int  # nano-USD already spent this period (from the ledger), used if the counter is new
    reserve: int  # nano-USD this request may cost at most
    ttl_s: int | None  # when the counter can be forgotten (after the period ends)


@dataclass(slots=True)
class Denial:
    kind: str  # "rpm" | "tpm" | "parallel" | "budget"
    index: int  # which RateCheck / BudgetCheck
    current: int  # requests / tokens / in flight; for budgets: spent (nano)
    reserved: int = 0  # budgets: reserved by requests in flight (nano)


@dataclass(slots=True)
class Ticket:
    """What an admitted request holds, to be given back at settle."""

    rates: list[RateCheck]
    budgets: list[BudgetCheck]
    minute: int
    prompt_tokens: int
    backend: str
    extra: dict[str, Any] = field(default_factory=dict)


class Counters(Protocol):
    name: str

    async def admit(self, rates: list[RateCheck], budgets: list[BudgetCheck], prompt_tokens: int, now: float) -> Ticket | Denial: ...

    async def settle(self, ticket: Ticket, actual: list[int], total_tokens: int) -> None: ...

    async def peek_budget(self, counter: str) -> tuple[int, int] | None: ...

    async def close(self) -> None: ...


class MemoryCounters:
    """Counters in this process (one node). Atomic because admit never awaits."""

    name = "memory"

    def __init__(self) -> None:
        self.windows: dict[str, int] = {}
        self.parallel: dict[str, int] = {}
        self.budgets: dict[str, list[int]] = {}  # counter -> [spent, reserved]
        self._last_prune = 0

    def admit_sync(self, rates: list[RateCheck], budgets: list[BudgetCheck], prompt_tokens: int, now: float) -> Ticket | Denial:
        minute = int(now // 60)
        if minute != self._last_prune:
            self._prune(minute)
        for i, r in enumerate(rates):
            if r.rpm is not None:
                c = self.windows.get(f"rpm:{r.scope}:{minute}", 0)
                if c + 1 > r.rpm:
                    return Denial("rpm", i, c)
            if r.tpm is not None:
                c = self.windows.get(f"tpm:{r.scope}:{minute}", 0)
                if c + prompt_tokens > r.tpm:
                    return Denial("tpm", i, c)
            if r.max_parallel is not None:
                c = self.parallel.get(r.scope, 0)
                if c + 1 > r.max_parallel:
                    return Denial("parallel", i, c)
        for j, b in enumerate(budgets):
            sr = self.budgets.setdefault(b.counter, [b.seed, 0])
            if sr[0] + sr[1] + b.reserve > b.limit:
                return Denial("budget", j, sr[0], sr[1])
        for r in rates:
            if r.rpm is not None:
                k = f"rpm:{r.scope}:{minute}"
                self.windows[k] = self.windows.get(k, 0) + 1
            if r.tpm is not None:
                k = f"tpm:{r.scope}:{minute}"
                self.windows[k] = self.windows.get(k, 0) + prompt_tokens
            if r.max_parallel is not None:
                self.parallel[r.scope] = self.parallel.get(r.scope, 0) + 1
        for b in budgets:
            self.budgets[b.counter][1] += b.reserve
        return Ticket(rates, budgets, minute, prompt_tokens, self.name)

    async def admit(self, rates: list[RateCheck], budgets: list[BudgetCheck], prompt_tokens: int, now: float) -> Ticket | Denial:
        return self.admit_sync(rates, budgets, prompt_tokens, now)

    def settle_sync(self, ticket: Ticket, actual: list[int], total_tokens: int) -> None:
        for r in ticket.rates:
            if r.tpm is not None:
                k = f"tpm:{r.scope}:{ticket.minute}"
                if k in self.windows:
                    self.windows[k] = max(0, self.windows[k] + total_tokens - ticket.prompt_tokens)
            if r.max_parallel is not None:
                self.parallel[r.scope] = max(0, self.parallel.get(r.scope, 0) - 1)
        for b, cost in zip(ticket.budgets, actual, strict=True):
            sr = self.budgets.setdefault(b.counter, [b.seed, b.reserve])
            sr[1] = max(0, sr[1] - b.reserve)
            sr[0] += cost

    async def settle(self, ticket: Ticket, actual: list[int], total_tokens: int) -> None:
        self.settle_sync(ticket, actual, total_tokens)

    async def peek_budget(self, counter: str) -> tuple[int, int] | None:
        sr = self.budgets.get(counter)
        return (sr[0], sr[1]) if sr else None

    def _prune(self, minute: int) -> None:
        self._last_prune = minute
        stale = [k for k in self.windows if int(k.rsplit(":", 1)[1]) < minute - 1]
        for k in stale:
            del self.windows[k]

    async def close(self) -> None:
        return None


# -- Redis ---------------------------------------------------------------------------------------
# KEYS: for each rate scope: rpm window, tpm window, parallel; then one hash per budget counter.
#       then, if ARGV[6] is 1, the marker of this replica's settle batch in flight (see settle_batch).
# ARGV: n_rates, n_budgets, prompt_tokens, window_ttl, parallel_ttl, has_marker,
#       per rate: rpm, tpm, max_parallel (-1 = no limit), this replica's parallel releases queued
#       (not sent yet: certain to be applied, so those slots count as free) and in the batch in
#       flight (free too while its marker is absent, i.e. the batch has not been applied yet),
#       per budget: limit, seed, reserve, ttl (-1 = none)
ADMIT_LUA = """
local nr = tonumber(ARGV[1]); local nb = tonumber(ARGV[2]); local pt = tonumber(ARGV[3])
local wttl = tonumber(ARGV[4]); local pttl = tonumber(ARGV[5])
local a = 7
local unapplied = 0
if tonumber(ARGV[6]) == 1 and redis.call('EXISTS', KEYS[nr*3 + nb + 1]) == 0 then unapplied = 1 end
for i = 0, nr - 1 do
  local rpm = tonumber(ARGV[a + i*5]); local tpm = tonumber(ARGV[a + i*5 + 1]); local par = tonumber(ARGV[a + i*5 + 2])
  if rpm >= 0 then
    local c = tonumber(redis.call('GET', KEYS[i*3 + 1]) or '0')
    if c + 1 > rpm then return {1, i, 'rpm', c, 0} end
  end
  if tpm >= 0 then
    local c = tonumber(redis.call('GET', KEYS[i*3 + 2]) or '0')
    if c + pt > tpm then return {1, i, 'tpm', c, 0} end
  end
  if par >= 0 then
    local c = tonumber(redis.call('GET', KEYS[i*3 + 3]) or '0') - tonumber(ARGV[a + i*5 + 3]) - unapplied * tonumber(ARGV[a + i*5 + 4])
    if c + 1 > par then return {1, i, 'parallel', c, 0} end
  end
end
local b = a + nr*5
local kb = nr*3
for j = 0, nb - 1 do
  local k = KEYS[kb + j + 1]
  local limit = tonumber(ARGV[b + j*4]); local res = tonumber(ARGV[b + j*4 + 2])
  redis.call('HSETNX', k, 's', ARGV[b + j*4 + 1])
  local s = tonumber(redis.call('HGET', k, 's')); local r = tonumber(redis.call('HGET', k, 'r') or '0')
  if s + r + res > limit then return {1, j, 'budget', s, r} end
end
for i = 0, nr - 1 do
  if tonumber(ARGV[a + i*5]) >= 0 then redis.call('INCR', KEYS[i*3 + 1]); redis.call('EXPIRE', KEYS[i*3 + 1], wttl) end
  if tonumber(ARGV[a + i*5 + 1]) >= 0 then redis.call('INCRBY', KEYS[i*3 + 2], pt); redis.call('EXPIRE', KEYS[i*3 + 2], wttl) end
  if tonumber(ARGV[a + i*5 + 2]) >= 0 then redis.call('INCR', KEYS[i*3 + 3]); redis.call('EXPIRE', KEYS[i*3 + 3], pttl) end
end
for j = 0, nb - 1 do
  local k = KEYS[kb + j + 1]
  redis.call('HINCRBY', k, 'r', tonumber(ARGV[b + j*4 + 2]))
  local ttl = tonumber(ARGV[b + j*4 + 3])
  if ttl > 0 then redis.call('EXPIRE', k, ttl) end
end
return {0}
"""

# One ticket, applied at once (``RedisCounters.settle``: the in-line fallback when the queue is full).
# KEYS: tpm window and parallel key per rate scope, then budget hashes.
# ARGV: n_rates, n_budgets, token_delta, per rate: has_tpm, has_parallel; per budget: reserve, actual
SETTLE_LUA = """
local nr = tonumber(ARGV[1]); local nb = tonumber(ARGV[2]); local delta = tonumber(ARGV[3])
local a = 4
for i = 0, nr - 1 do
  if tonumber(ARGV[a + i*2]) == 1 and delta ~= 0 and redis.call('EXISTS', KEYS[i*2 + 1]) == 1 then
    redis.call('INCRBY', KEYS[i*2 + 1], delta)
  end
  if tonumber(ARGV[a + i*2 + 1]) == 1 then
    local c = tonumber(redis.call('GET', KEYS[i*2 + 2]) or '0')
    if c > 0 then redis.call('DECR', KEYS[i*2 + 2]) end
  end
end
local b = a + nr*2
for j = 0, nb - 1 do
  local k = KEYS[nr*2 + j + 1]
  local res = tonumber(ARGV[b + j*2]); local cost = tonumber(ARGV[b + j*2 + 1])
  local r = tonumber(redis.call('HGET', k, 'r') or '0')
  if r - res < 0 then res = r end
  redis.call('HINCRBY', k, 'r', -res)
  redis.call('HINCRBY', k, 's', cost)
end
return 0
"""


REDIS_MAX_CONNECTIONS = 64
REDIS_POOL_WAIT_S = 5.0


class RedisCounters:
    """Counters in Redis, shared by every replica. An admit is one EVALSHA on the request path;
    settles are queued (``settle_later``) and applied in batches off it."""

    name = "redis"

    def __init__(self, url: str, prefix: str = "ky:", on_settle_event: OnEvent | None = None) -> None:
        import redis.asyncio as aioredis

        # A bounded, blocking pool: under a burst, requests queue for one of REDIS_MAX_CONNECTIONS
        # connections instead of each opening its own (a connect storm that timed out as "unreachable").
        pool = aioredis.BlockingConnectionPool.from_url(
            url, max_connections=REDIS_MAX_CONNECTIONS, timeout=REDIS_POOL_WAIT_S,
            socket_connect_timeout=2, socket_timeout=5, health_check_interval=30,
        )
        self.redis = aioredis.Redis.from_pool(pool)  # owns the pool: aclose() disconnects it
        self.prefix = prefix
        self._admit = self.redis.register_script(ADMIT_LUA)
        self._settle = self.redis.register_script(SETTLE_LUA)
        self.batcher = SettleBatcher(self.redis, prefix, on_settle_event)

    def _rate_keys(self, scope: str, minute: int) -> list[str]:
        p = self.prefix
        return [f"{p}rpm:{scope}:{minute}", f"{p}tpm:{scope}:{minute}", f"{p}par:{scope}"]

    async def admit(self, rates: list[RateCheck], budgets: list[BudgetCheck], prompt_tokens: int, now: float) -> Ticket | Denial:
        minute = int(now // 60)
        keys: list[str] = []
        bt = self.batcher
        marker = bt.inflight_marker
        args: list[Any] = [len(rates), len(budgets), prompt_tokens, 120, PARALLEL_TTL_S, int(marker is not None)]
        queued, inflight = bt.pending_parallel, bt.inflight_parallel
        for r in rates:
            keys += self._rate_keys(r.scope, minute)
            args += [_lim(r.rpm), _lim(r.tpm), _lim(r.max_parallel)]
            args += [queued.get(r.scope, 0), inflight.get(r.scope, 0)] if r.max_parallel is not None else [0, 0]
        for b in budgets:
            keys.append(f"{self.prefix}bud:{b.counter}")
            args += [b.limit, b.seed, b.reserve, b.ttl_s if b.ttl_s else -1]
        if marker is not None:
            keys.append(marker)
        res = await self._admit(keys=keys, args=args)
        if int(res[0]) == 0:
            return Ticket(rates, budgets, minute, prompt_tokens, self.name)
        kind = res[2].decode() if isinstance(res[2], bytes) else str(res[2])
        return Denial(kind, int(res[1]), int(res[3]), int(res[4]))

    def settle_later(self, ticket: Ticket, actual: list[int], total_tokens: int) -> bool:
        """Queue the settle for the background batcher (no I/O); False when the queue is full."""
        return self.batcher.put(ticket, actual, total_tokens)

    async def settle(self, ticket: Ticket, actual: list[int], total_tokens: int) -> None:
        """Apply one settle now (one EVALSHA)."""
        keys: list[str] = []
        args: list[Any] = [len(ticket.rates), len(ticket.budgets), total_tokens - ticket.prompt_tokens]
        for r in ticket.rates:
            rk = self._rate_keys(r.scope, ticket.minute)
            keys += [rk[1], rk[2]]
            args += [int(r.tpm is not None), int(r.max_parallel is not None)]
        for b, cost in zip(ticket.budgets, actual, strict=True):
            keys.append(f"{self.prefix}bud:{b.counter}")
            args += [b.reserve, cost]
        await self._settle(keys=keys, args=args)

    async def peek_budget(self, counter: str) -> tuple[int, int] | None:
        v = await self.redis.hmget(f"{self.prefix}bud:{counter}", ["s", "r"])
        if v[0] is None:
            return None
        return int(v[0]), int(v[1] or 0)

    async def close(self) -> None:
        await self.batcher.close()
        await self.redis.aclose()


def _lim(v: int | None) -> int:
    return -1 if v is None else v


def now() -> float:
    return time.time()
